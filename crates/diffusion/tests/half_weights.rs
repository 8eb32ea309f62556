//! f32 models whose linear and convolution weights are kept in f16 / bf16
//! (`cpu::set_weight_dtype`). A separate test binary: the setting is process-wide.
//! The fixture checkpoints are stored in f16, so f16 storage loses nothing and the outputs must
//! still match diffusers' to 1e-4.

mod common;

use candle_core::{DType, Device};
use common::{assert_close, fixtures, io};
use easyphoto_diffusion::cpu;
use easyphoto_diffusion::diffusers_folder;
use easyphoto_diffusion::layers::{LayerMut, VisitLayers};

const TOL: f32 = 1e-4;

#[test]
fn half_weights_match_diffusers() {
    cpu::set_weight_dtype(Some(DType::F16));
    let mut unet = diffusers_folder::load_unet(&fixtures().join("sd15"), None, DType::F32, &Device::Cpu).unwrap();
    let vae = diffusers_folder::load_vae(&fixtures().join("vae"), None, DType::F32, &Device::Cpu).unwrap();
    cpu::set_weight_dtype(None);
    let mut dtypes = vec![];
    unet.visit_layers(&mut |layer| {
        dtypes.push(match layer {
            LayerMut::Linear(l) => (l.weight().dtype(), l.bias().map(|b| b.dtype())),
            LayerMut::Conv2d(c) => (c.weight().dtype(), c.bias().map(|b| b.dtype())),
        })
    });
    assert!(dtypes.len() > 20);
    assert!(dtypes.iter().all(|&(w, b)| w == DType::F16 && b.is_none_or(|b| b == DType::F32)), "{dtypes:?}");

    let io_unet = io("sd15/io.safetensors");
    let out =
        unet.forward(&io_unet["sample"], &io_unet["timestep"], &io_unet["encoder_hidden_states"], &Default::default());
    let out = out.unwrap();
    assert_eq!(out.dtype(), DType::F32);
    assert_close("sd15 out, f16 weights", &out, &io_unet["out"], TOL);

    let io_vae = io("vae/io.safetensors");
    assert_close("vae decoded, f16 weights", &vae.decode(&io_vae["latent"]).unwrap(), &io_vae["decoded"], TOL);
    let posterior = vae.encode(&io_vae["image"]).unwrap();
    assert_close("vae mean, f16 weights", &posterior.mean, &io_vae["mean"], TOL);

    // bf16 keeps 8 mantissa bits: close, not equal. (In the same test: the setting is global.)
    cpu::set_weight_dtype(Some(DType::BF16));
    let unet = diffusers_folder::load_unet(&fixtures().join("sd15"), None, DType::F32, &Device::Cpu).unwrap();
    cpu::set_weight_dtype(None);
    let io = io("sd15/io.safetensors");
    let out = unet.forward(&io["sample"], &io["timestep"], &io["encoder_hidden_states"], &Default::default()).unwrap();
    let err = common::max_abs_diff(&out, &io["out"]);
    let scale = io["out"].abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(err > 0.0 && err < 0.02 * scale, "bf16 error {err} (scale {scale})");
}
