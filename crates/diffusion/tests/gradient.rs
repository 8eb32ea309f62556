//! The UNet is differentiable with respect to a delta attached to `attn1.to_q`, and the
//! gradient matches PyTorch's.

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use common::{assert_close, fixtures, io};
use easyphoto_diffusion::{Adapter, VisitLayers, diffusers_folder};

/// `x ↦ x Dᵀ`: a full-rank delta on a linear layer.
#[derive(Debug)]
struct FullDelta(Var);

impl Adapter for FullDelta {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.broadcast_matmul(&self.0.as_tensor().t()?)
    }
}

const LAYER: &str = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";

#[test]
fn gradient_of_attached_delta_matches_pytorch() {
    let mut unet = diffusers_folder::load_unet(&fixtures().join("sd15"), None, DType::F32, &Device::Cpu).unwrap();
    let io = io("sd15/io.safetensors");
    let grad = common::io("sd15/grad.safetensors");
    let delta = Var::from_tensor(&grad["delta"]).unwrap();
    unet.attach_adapter(LAYER, Arc::new(FullDelta(delta.clone()))).unwrap();

    let out = unet.forward(&io["sample"], &io["timestep"], &io["encoder_hidden_states"], &Default::default()).unwrap();
    assert_close("out with delta", &out, &grad["out_delta"], 1e-4);
    let loss = (out * &grad["weights"]).unwrap().sum_all().unwrap();
    let expected = grad["loss"].flatten_all().unwrap().get(0).unwrap().to_scalar::<f32>().unwrap();
    let got = loss.to_scalar::<f32>().unwrap();
    assert!((got - expected).abs() <= 1e-3 * expected.abs().max(1.0), "loss {got} vs {expected}");

    let grads = loss.backward().unwrap();
    let g = grads.get(delta.as_tensor()).expect("no gradient reached the delta");
    assert_close("grad_delta", g, &grad["grad_delta"], 1e-4);

    // Detaching restores the plain model's output.
    unet.detach_all_adapters();
    let plain =
        unet.forward(&io["sample"], &io["timestep"], &io["encoder_hidden_states"], &Default::default()).unwrap();
    assert_close("out after detach", &plain, &io["out"], 1e-4);
}

#[test]
fn every_transformer_linear_is_addressable() {
    let mut unet = diffusers_folder::load_unet(&fixtures().join("sd15"), None, DType::F32, &Device::Cpu).unwrap();
    let paths = unet.layer_paths();
    for suffix in
        ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_k", "ff.net.0.proj", "ff.net.2"]
    {
        assert!(paths.contains(&format!("down_blocks.1.attentions.1.transformer_blocks.0.{suffix}")), "{suffix}");
    }
    for path in
        ["down_blocks.0.attentions.0.proj_in", "up_blocks.2.resnets.2.conv_shortcut", "mid_block.resnets.1.conv2"]
    {
        assert!(paths.contains(&path.to_string()), "{path}");
    }
    // sd15 fixture: 2+2 down + 1 mid + 3+3 up transformer blocks, 10 linears each.
    let transformer_linears = paths.iter().filter(|p| p.contains("transformer_blocks")).count();
    assert_eq!(transformer_linears, (2 + 2 + 1 + 3 + 3) * 10);
    let err = unet
        .attach_adapter("down_blocks.9.nothing", Arc::new(FullDelta(Var::zeros(1, DType::F32, &Device::Cpu).unwrap())));
    assert!(err.is_err());
}
