//! Applying kohya and peft LoRAs to a tiny SD1.5-like and SDXL-like UNet and text encoders,
//! merged and attached, against diffusers' `load_lora_weights` + `set_adapters` + `fuse_lora`
//! (fixtures from `tools/reference/lora_apply.py`).

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixture, max_abs, tensors};
use easyphoto_diffusion::diffusers_folder::{load_clip_text_model, load_clip_text_model_with_projection, load_unet};
use easyphoto_diffusion::{CLIPTextModel, CLIPTextModelWithProjection, UNet2DConditionModel, UNetConditioning};
use easyphoto_lora::{KohyaLora, LoraError, Targets, attach, detach, load_lora, merge};

/// diffusers computes in f32 with the same f16-representable weights; the remaining error is
/// summation order (outputs of magnitude ~3).
const TOL: f32 = 1e-4;

struct Sd15 {
    unet: UNet2DConditionModel,
    te: CLIPTextModel,
}

fn sd15() -> Sd15 {
    let dev = Device::Cpu;
    Sd15 {
        unet: load_unet(&fixture("apply/sd15_unet"), None, DType::F32, &dev).unwrap(),
        te: load_clip_text_model(&fixture("apply/sd15_te"), None, DType::F32, &dev).unwrap(),
    }
}

impl Sd15 {
    fn targets(&mut self) -> Targets<'_> {
        Targets { unet: Some(&mut self.unet), text_encoder: Some(&mut self.te), text_encoder_2: None }
    }

    fn outputs(&self) -> (Tensor, Tensor) {
        let io = tensors("apply/io.safetensors");
        let unet = self
            .unet
            .forward(&io["sample"], &io["timestep"], &io["encoder_hidden_states"], &UNetConditioning::default())
            .unwrap();
        let te = self.te.forward(&io["input_ids"]).unwrap().last_hidden_state;
        (unet, te)
    }
}

fn lora(name: &str) -> KohyaLora {
    load_lora(fixture(&format!("apply/{name}")), &Device::Cpu).unwrap()
}

fn check(what: &str, (unet, te): &(Tensor, Tensor), key: &str) {
    let io = tensors("apply/io.safetensors");
    assert_close(&format!("{what} unet"), unet, &io[&format!("sd15/unet_{key}")], TOL);
    assert_close(&format!("{what} text encoder"), te, &io[&format!("sd15/te_{key}")], TOL);
}

#[test]
fn kohya_merged_and_attached_match_diffusers() {
    let mut m = sd15();
    check("base", &m.outputs(), "base");
    let a = lora("sd15_kohya_a.safetensors");
    assert_eq!(a.metadata()["ss_base_model_version"], "sd_v1");

    let (merged, reports) = merge(&mut m.targets(), &[(&a, 0.7)]).unwrap();
    println!("unmatched {:?}", reports[0].unmatched);
    assert_eq!(reports[0].applied, a.len());
    reports[0].ensure_complete().unwrap();
    check("merged a@0.7", &m.outputs(), "a");
    merged.unmerge(&mut m.targets()).unwrap();
    let ((u, t), (u0, t0)) = (m.outputs(), sd15().outputs());
    assert_eq!(max_abs(&u, &u0).max(max_abs(&t, &t0)), 0.0, "un-merge must be exact");

    attach(&mut m.targets(), &[(&a, 0.7)]).unwrap();
    check("attached a@0.7", &m.outputs(), "a");
    detach(&mut m.targets());
    check("detached", &m.outputs(), "base");
}

#[test]
fn two_loras_with_their_own_weights_merged_or_attached() {
    let (a, b) = (lora("sd15_kohya_a.safetensors"), lora("sd15_kohya_b.safetensors"));
    let stack = [(&a, 0.7), (&b, 0.4)];
    let mut m = sd15();
    let (merged, _) = merge(&mut m.targets(), &stack).unwrap();
    let by_merge = m.outputs();
    check("merged a@0.7 + b@0.4", &by_merge, "ab");
    merged.unmerge(&mut m.targets()).unwrap();
    attach(&mut m.targets(), &stack).unwrap();
    let by_attach = m.outputs();
    check("attached a@0.7 + b@0.4", &by_attach, "ab");
    // Hot swap: drop both, attach only `a`, without reloading the model.
    detach(&mut m.targets());
    attach(&mut m.targets(), &[(&a, 0.7)]).unwrap();
    check("hot-swapped to a@0.7", &m.outputs(), "a");
    let err = max_abs(&by_merge.0, &by_attach.0).max(max_abs(&by_merge.1, &by_attach.1));
    println!("merged vs attached: {err:e}");
    assert!(err <= 2e-5);
}

#[test]
fn peft_file_with_metadata_alphas_matches_diffusers() {
    let p = lora("sd15_peft.safetensors");
    // unet lora_alpha 8 except proj_in of down_blocks.0.attentions.0 (alpha_pattern: 2); TE 2.
    let name = "lora_unet_down_blocks_0_attentions_0_proj_in";
    assert_eq!(p.get(name).unwrap().alpha, Some(2.0));
    assert_eq!(p.get("lora_unet_down_blocks_0_attentions_0_proj_out").unwrap().alpha, Some(8.0));
    assert_eq!(p.get("lora_te_text_model_encoder_layers_1_mlp_fc2").unwrap().alpha, Some(2.0));
    let mut m = sd15();
    let (merged, reports) = merge(&mut m.targets(), &[(&p, 0.7)]).unwrap();
    reports[0].ensure_complete().unwrap();
    check("peft merged", &m.outputs(), "peft");
    merged.unmerge(&mut m.targets()).unwrap();
    attach(&mut m.targets(), &[(&p, 0.7)]).unwrap();
    check("peft attached", &m.outputs(), "peft");
}

fn sdxl_targets<'a>(
    unet: &'a mut UNet2DConditionModel,
    te1: &'a mut CLIPTextModel,
    te2: &'a mut CLIPTextModelWithProjection,
) -> Targets<'a> {
    Targets { unet: Some(unet), text_encoder: Some(te1), text_encoder_2: Some(te2) }
}

#[test]
fn sdxl_pair_merged_and_attached_match_diffusers() {
    let dev = Device::Cpu;
    let io = tensors("apply/io.safetensors");
    let mut unet = load_unet(&fixture("apply/sdxl_unet"), None, DType::F32, &dev).unwrap();
    let mut te1 = load_clip_text_model(&fixture("apply/sdxl_te1"), None, DType::F32, &dev).unwrap();
    let mut te2: CLIPTextModelWithProjection =
        load_clip_text_model_with_projection(&fixture("apply/sdxl_te2"), None, DType::F32, &dev).unwrap();
    let x = lora("sdxl_kohya.safetensors");
    let sgm = lora("sdxl_kohya_sgm.safetensors");
    assert!(sgm.modules().any(|(n, _)| n.starts_with("lora_unet_input_blocks_")));
    let outputs = |unet: &UNet2DConditionModel, te1: &CLIPTextModel, te2: &CLIPTextModelWithProjection| {
        let cond = UNetConditioning {
            text_embeds: Some(&io["text_embeds"]),
            time_ids: Some(&io["time_ids"]),
            ..Default::default()
        };
        let u = unet.forward(&io["sample"], &io["timestep"], &io["sdxl_encoder_hidden_states"], &cond).unwrap();
        let t1 = te1.forward(&io["input_ids"]).unwrap().last_hidden_state;
        let o2 = te2.forward(&io["input_ids"]).unwrap();
        [u, t1, o2.last_hidden_state, o2.text_embeds]
    };
    let names = ["unet", "te1", "te2", "te2_embeds"];
    for (got, n) in outputs(&unet, &te1, &te2).iter().zip(names) {
        assert_close(&format!("sdxl base {n}"), got, &io[&format!("sdxl/{n}_base")], TOL);
    }
    let targets = sdxl_targets;
    let (merged, reports) = merge(&mut targets(&mut unet, &mut te1, &mut te2), &[(&x, 0.7)]).unwrap();
    reports[0].ensure_complete().unwrap();
    for (got, n) in outputs(&unet, &te1, &te2).iter().zip(names) {
        assert_close(&format!("sdxl merged {n}"), got, &io[&format!("sdxl/{n}_lora")], TOL);
    }
    merged.unmerge(&mut targets(&mut unet, &mut te1, &mut te2)).unwrap();
    // The same LoRA with SGM UNet names (kohya's SDXL trainer), merged.
    let (merged, reports) = merge(&mut targets(&mut unet, &mut te1, &mut te2), &[(&sgm, 0.7)]).unwrap();
    reports[0].ensure_complete().unwrap();
    for (got, n) in outputs(&unet, &te1, &te2).iter().zip(names) {
        assert_close(&format!("sdxl SGM names merged {n}"), got, &io[&format!("sdxl/{n}_lora")], TOL);
    }
    merged.unmerge(&mut targets(&mut unet, &mut te1, &mut te2)).unwrap();
    attach(&mut targets(&mut unet, &mut te1, &mut te2), &[(&x, 0.7)]).unwrap();
    for (got, n) in outputs(&unet, &te1, &te2).iter().zip(names) {
        assert_close(&format!("sdxl attached {n}"), got, &io[&format!("sdxl/{n}_lora")], TOL);
    }
}

#[test]
fn unmatched_modules_and_keys_are_reported() {
    let dev = Device::Cpu;
    let a = lora("sd15_kohya_a.safetensors");
    // Only the UNet: every text-encoder module is unmatched, and listed.
    let mut m = sd15();
    let mut targets = Targets { unet: Some(&mut m.unet), ..Default::default() };
    let reports = attach(&mut targets, &[(&a, 1.0)]).unwrap();
    let te_modules = a.modules().filter(|(n, _)| n.starts_with("lora_te_")).count();
    assert_eq!(reports[0].unmatched.len(), te_modules);
    assert_eq!(reports[0].applied, a.len() - te_modules);
    let err = reports[0].ensure_complete().unwrap_err();
    assert!(err.to_string().contains("lora_te_text_model_encoder_layers_0_self_attn_q_proj"), "{err}");

    // A file with a DoRA scale and a LyCORIS key: reported, not silently dropped.
    let dir = common::temp_dir("unmatched");
    let path = dir.join("extra.safetensors");
    let name = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let map = [
        (format!("{name}.lora_down.weight"), Tensor::zeros((2, 32, 1, 1), DType::F32, &dev).unwrap()),
        (format!("{name}.lora_up.weight"), Tensor::zeros((32, 2, 1, 1), DType::F32, &dev).unwrap()),
        (format!("{name}.dora_scale"), Tensor::zeros((1, 32, 1, 1), DType::F32, &dev).unwrap()),
        ("lora_unet_mid_block_resnets_0_conv1.hada_w1_a".to_string(), Tensor::zeros((4, 2), DType::F32, &dev).unwrap()),
        ("lora_unet_no_such_layer.lora_down.weight".to_string(), Tensor::zeros((2, 8), DType::F32, &dev).unwrap()),
        ("lora_unet_no_such_layer.lora_up.weight".to_string(), Tensor::zeros((8, 2), DType::F32, &dev).unwrap()),
    ];
    candle_core::safetensors::save(&map.into_iter().collect(), &path).unwrap();
    let extra = load_lora(&path, &dev).unwrap();
    let mut m = sd15();
    let reports = merge(&mut m.targets(), &[(&extra, 1.0)]).unwrap().1;
    assert_eq!(reports[0].applied, 1);
    assert_eq!(reports[0].unmatched, ["lora_unet_no_such_layer"]);
    assert_eq!(
        reports[0].unsupported_keys,
        [format!("{name}.dora_scale"), "lora_unet_mid_block_resnets_0_conv1.hada_w1_a".to_string()]
    );
}

#[test]
fn lora_of_another_family_is_refused() {
    let dev = Device::Cpu;
    let mut m = sd15();
    // SDXL LoRA (te1/te2 and its metadata) on the SD1.5-like UNet: its UNet modules do not fit.
    let x = lora("sdxl_kohya.safetensors");
    let err = merge(&mut m.targets(), &[(&x, 1.0)]).unwrap_err();
    assert!(matches!(err, LoraError::ModuleShape { .. }), "{err}");
    println!("{err}");

    // A LoRA whose cross-attention projection takes 2048-wide text (SDXL) on a model whose
    // attn2.to_k takes 768 (SD1): refused by family, naming both.
    let dir = common::temp_dir("family");
    let sd1_layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";
    let weights: std::collections::HashMap<String, Tensor> =
        [(format!("{sd1_layer}.weight"), Tensor::zeros((320, 768), DType::F32, &dev).unwrap())].into_iter().collect();
    let vb = candle_nn::VarBuilder::from_tensors(weights, DType::F32, &dev);
    let mut layer = easyphoto_diffusion::layers::Linear::new(vb.pp(sd1_layer), 768, 320, false).unwrap();
    let name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k";
    let map = [
        (format!("{name}.lora_down.weight"), Tensor::zeros((4, 2048), DType::F16, &dev).unwrap()),
        (format!("{name}.lora_up.weight"), Tensor::zeros((320, 4), DType::F16, &dev).unwrap()),
    ];
    let path = dir.join("sdxl_lora.safetensors");
    candle_core::safetensors::save(&map.into_iter().collect(), &path).unwrap();
    let sdxl = load_lora(&path, &dev).unwrap();
    let mut targets = Targets { unet: Some(&mut layer), ..Default::default() };
    let err = attach(&mut targets, &[(&sdxl, 1.0)]).unwrap_err();
    println!("{err}");
    match &err {
        LoraError::WrongBase { lora, model, .. } => {
            assert_eq!((*lora, *model), (easyphoto_lora::BaseFamily::Sdxl, easyphoto_lora::BaseFamily::Sd1));
        }
        other => panic!("expected WrongBase, got {other:?}"),
    }
    assert!(err.to_string().contains("2048") && err.to_string().contains("sdxl_lora.safetensors"), "{err}");
}

/// Where the written files go; `tools/reference/lora_check_written.py` loads them in diffusers.
fn written_dir() -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("lora_written");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn written_kohya_and_peft_files_round_trip() {
    let dir = written_dir();
    let a = lora("sd15_kohya_a.safetensors");
    let mut m = sd15();
    let index = m.targets().module_index().unwrap();
    let kohya = dir.join("sd15_written_kohya.safetensors");
    let peft = dir.join("sd15_written_peft.safetensors");
    a.save(&kohya, DType::F16).unwrap();
    easyphoto_lora::save_peft(&a, &index, &peft, DType::F32).unwrap();
    // No temp file is left beside them.
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(names.iter().all(|n| !n.to_string_lossy().contains(".tmp-")), "{names:?}");

    // bf16 files read back within bf16 rounding.
    let bf16 = dir.join("sd15_written_kohya_bf16.safetensors");
    a.save(&bf16, DType::BF16).unwrap();
    let back = load_lora(&bf16, &Device::Cpu).unwrap();
    for (name, module) in a.modules() {
        let got = back.get(name).unwrap();
        assert_eq!(got.down.dtype(), DType::BF16);
        let scale =
            module.down.abs().unwrap().max_all().unwrap().to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap();
        assert!(max_abs(&got.down, &module.down) <= scale / 128.0, "{name}");
    }

    for (path, format) in [(&kohya, "kohya"), (&peft, "peft")] {
        let back = load_lora(path, &Device::Cpu).unwrap();
        assert_eq!(back.len(), a.len(), "{format}");
        for (name, module) in a.modules() {
            let got = back.get(name).unwrap_or_else(|| panic!("{format}: {name} lost"));
            assert_eq!(got.alpha, module.alpha, "{format}: {name}");
            assert_eq!(max_abs(&got.down, &module.down) + max_abs(&got.up, &module.up), 0.0, "{format}: {name}");
        }
        assert_eq!(back.metadata().get("ss_base_model_version").is_some(), format == "kohya");
        let (merged, _) = merge(&mut m.targets(), &[(&back, 0.7)]).unwrap();
        check(&format!("written {format}, merged"), &m.outputs(), "a");
        let (unet, te) = m.outputs();
        merged.unmerge(&mut m.targets()).unwrap();
        // Our outputs with the written file, for the one-off check in diffusers.
        let map = std::collections::HashMap::from([("unet".to_string(), unet), ("te".to_string(), te)]);
        candle_core::safetensors::save(&map, dir.join(format!("sd15_written_{format}_outputs.safetensors"))).unwrap();
    }
}

#[test]
fn equal_loras_are_written_as_equal_bytes() {
    // The metadata is written in key order, whatever order a HashMap would give it.
    let a = lora("sd15_kohya_a.safetensors");
    let metadata = (0..40).map(|i| (format!("ss_key_{i:02}"), format!("value \"{i}\" é"))).collect();
    let b = KohyaLora::new("b", a.modules().map(|(n, m)| (n.to_string(), m.clone())).collect(), metadata);
    let dir = written_dir();
    let paths: Vec<_> = (0..3).map(|i| dir.join(format!("sd15_deterministic_{i}.safetensors"))).collect();
    for path in &paths {
        b.save(path, DType::F16).unwrap();
    }
    let bytes: Vec<Vec<u8>> = paths.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert!(bytes.iter().all(|b| *b == bytes[0]));
    let back = load_lora(&paths[0], &Device::Cpu).unwrap();
    assert_eq!(back.metadata(), b.metadata());
    let header = String::from_utf8_lossy(&bytes[0][8..]);
    let keys: Vec<usize> = (0..40).map(|i| header.find(&format!("\"ss_key_{i:02}\"")).unwrap()).collect();
    assert!(keys.windows(2).all(|w| w[0] < w[1]), "metadata not in key order");
}

#[test]
fn conv_1x1_pairs_fit_linear_layers_and_back() {
    // SD1 files store proj_in/proj_out as 1x1 conv pairs; SD2/SDXL models have Linear
    // projections (and the reverse happens): the pair is reshaped to the layer.
    let dev = Device::Cpu;
    let path = "down_blocks.0.attentions.0.proj_in";
    let weight = Tensor::randn(0f32, 1.0, (6, 5), &dev).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(
        [(format!("{path}.weight"), weight.clone())].into_iter().collect(),
        DType::F32,
        &dev,
    );
    let mut layer = easyphoto_diffusion::layers::Linear::new(vb.pp(path), 5, 6, false).unwrap();
    let down = Tensor::randn(0f32, 1.0, (2, 5), &dev).unwrap();
    let up = Tensor::randn(0f32, 1.0, (6, 2), &dev).unwrap();
    let name = "lora_unet_down_blocks_0_attentions_0_proj_in";
    let as_conv = easyphoto_lora::KohyaModule {
        down: down.reshape((2, 5, 1, 1)).unwrap(),
        up: up.reshape((6, 2, 1, 1)).unwrap(),
        alpha: Some(1.0),
    };
    let lora = KohyaLora::new("conv pair", [(name.to_string(), as_conv)].into_iter().collect(), Default::default());
    let (merged, reports) =
        merge(&mut Targets { unet: Some(&mut layer), ..Default::default() }, &[(&lora, 2.0)]).unwrap();
    assert_eq!(reports[0].applied, 1);
    // 2 · (1/2) · up·down
    let want = (&weight + up.matmul(&down).unwrap()).unwrap();
    assert!(max_abs(layer.weight(), &want) < 1e-5);
    merged.unmerge(&mut Targets { unet: Some(&mut layer), ..Default::default() }).unwrap();
    assert_eq!(max_abs(layer.weight(), &weight), 0.0);

    // A Linear pair on a 1x1 conv.
    let w4 = weight.reshape((6, 5, 1, 1)).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(
        [(format!("{path}.weight"), w4.clone()), (format!("{path}.bias"), Tensor::zeros(6, DType::F32, &dev).unwrap())]
            .into_iter()
            .collect(),
        DType::F32,
        &dev,
    );
    let mut conv = easyphoto_diffusion::layers::Conv2d::new(vb.pp(path), 5, 6, 1, 1, 0).unwrap();
    let linear = easyphoto_lora::KohyaModule { down, up, alpha: Some(1.0) };
    let lora = KohyaLora::new("linear pair", [(name.to_string(), linear)].into_iter().collect(), Default::default());
    attach(&mut Targets { unet: Some(&mut conv), ..Default::default() }, &[(&lora, 2.0)]).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, 5, 3, 2), &dev).unwrap();
    use candle_core::Module;
    let got = conv.forward(&x).unwrap();
    let want4 = want.reshape((6, 5, 1, 1)).unwrap();
    let expect = x.conv2d(&want4, 0, 1, 1, 1).unwrap();
    assert!(max_abs(&got, &expect) < 1e-4);
}
