"""Parity fixtures for applying LoRAs (`crates/lora/tests/apply.rs`).

Builds, with fixed seeds and random weights (no downloads), a tiny SD1.5-like UNet + CLIP text
encoder and a tiny SDXL-like UNet + two text encoders, LoRA files in kohya naming (written
here, the way sd-scripts writes them) and in diffusers/peft format (written by diffusers'
`save_lora_weights`), and the outputs of diffusers after `load_lora_weights` + `set_adapters` +
`fuse_lora` on fixed inputs.

crates/lora/tests/fixtures/apply/
  sd15_unet/, sd15_te/                      diffusers / transformers folders (float16 weights)
  sdxl_unet/, sdxl_te1/, sdxl_te2/
  sd15_kohya_a.safetensors                  kohya LoRA, rank 4, every transformer Linear/Conv,
                                            one resnet 3x3 conv, every TE attention/MLP Linear
  sd15_kohya_b.safetensors                  a second kohya LoRA, rank 2, some of the same modules
  sd15_peft.safetensors                     diffusers/peft LoRA (alphas in lora_adapter_metadata)
  sdxl_kohya.safetensors                    kohya SDXL LoRA (lora_unet_, lora_te1_, lora_te2_)
  sdxl_kohya_sgm.safetensors                the same with SGM UNet names (lora_unet_input_blocks_...)
  io.safetensors                            inputs and diffusers' outputs

Usage: .venv-ref/bin/python tools/reference/lora_apply.py
"""

import json
import sys
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ldm_layout import unet_ldm_layout  # noqa: E402

torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "crates" / "lora" / "tests" / "fixtures" / "apply"
MULTIPLIER_A = 0.7
MULTIPLIER_B = 0.4


def randomise(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Weights randn/sqrt(fan_in), biases and norms 0.1*randn (norm weights 1 + 0.1*randn),
    rounded to float16 so that the stored float16 folder holds exactly the model's values."""
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if "norm" in name and name.endswith("weight"):
                v = 1 + 0.1 * torch.randn(p.shape, generator=gen)
            elif name.endswith("bias") or "norm" in name:
                v = 0.1 * torch.randn(p.shape, generator=gen)
            else:
                v = torch.randn(p.shape, generator=gen) / max(p[0].numel(), 1) ** 0.5
            p.copy_(v.half().float())


def save_half(model: torch.nn.Module, path: Path) -> None:
    """Stores the (float16-representable) weights as float16; the model stays float32."""
    model.half().save_pretrained(path)
    model.float()


def unet_sd15() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=32,
    ).eval()


def unet_sdxl() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 2),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=32,
    ).eval()


def clip_config(projection: bool) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="gelu" if projection else "quick_gelu",
        projection_dim=32,
    )


def tiny_vae() -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4).eval()


def lora_targets(model: torch.nn.Module, unet: bool) -> list[tuple[str, torch.nn.Module]]:
    """kohya's targets: Linear/Conv2d inside Transformer2DModel (UNet), Linear inside
    CLIPAttention/CLIPMLP (text encoder); plus, for the UNet, the first resnet's 3x3 conv1."""
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if unet and (".attentions." in name or name.endswith("resnets.0.conv1") and name.startswith("down_blocks.0")):
            out.append((name, m))
        if not unet and (".self_attn." in name or ".mlp." in name):
            # kohya names come from transformers 4 module paths, which have the `text_model.`
            # level that transformers 5 leaves out.
            out.append((name if name.startswith("text_model.") else f"text_model.{name}", m))
    return out


def kohya_lora(targets, prefix: str, rank: int, gen: torch.Generator, alphas) -> dict:
    """A kohya state dict: down [r, in(, kh, kw)], up [out, r(, 1, 1)], alpha (0-dim), float16.

    The fixtures give every module of a component the same alpha (as EasyPhoto's files have):
    diffusers 0.42.1 turns mixed kohya alphas into a peft `alpha_pattern` whose keys miss the
    `transformer_blocks` modules, which then get the most common alpha instead of their own
    (24 of 49 modules of a file cycling alphas 2/4/8/1 were scaled wrongly)."""
    sd = {}
    for i, (name, m) in enumerate(targets):
        key = f"{prefix}_{name.replace('.', '_')}"
        if isinstance(m, torch.nn.Conv2d):
            k = m.kernel_size
            down = torch.randn((rank, m.in_channels, *k), generator=gen) / (m.in_channels * k[0] * k[1]) ** 0.5
            up = 0.5 * torch.randn((m.out_channels, rank, 1, 1), generator=gen) / rank**0.5
        else:
            down = torch.randn((rank, m.in_features), generator=gen) / m.in_features**0.5
            up = 0.5 * torch.randn((m.out_features, rank), generator=gen) / rank**0.5
        sd[f"{key}.lora_down.weight"] = down.half()
        sd[f"{key}.lora_up.weight"] = up.half()
        sd[f"{key}.alpha"] = torch.tensor(float(alphas[i % len(alphas)])).half()
    return sd


def save_sorted(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """safetensors.torch.save_file with the header's metadata in sorted order (the library
    writes it from a hash map, so files with two or more metadata keys are not byte-stable)."""
    dtypes = {torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16", torch.int64: "I64"}
    header, blobs, offset = {}, [], 0
    if metadata:
        header["__metadata__"] = dict(sorted(metadata.items()))
    for key in sorted(tensors):
        t = tensors[key].detach().contiguous()
        blob = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": dtypes[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def resave_sorted(path: Path) -> None:
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata()
    save_sorted(tensors, path, metadata)


def count_lora_layers(model: torch.nn.Module, adapter: str) -> int:
    """Layers into which diffusers loaded adapter `adapter` (a key it did not map is skipped)."""
    return sum(1 for m in model.modules() if hasattr(m, "lora_A") and adapter in m.lora_A)


def stable(cfg: LoraConfig) -> dict:
    """The config as diffusers stores it, with the target set sorted (byte-stable JSON)."""
    d = cfg.to_dict()
    d["target_modules"] = sorted(d["target_modules"])
    return d


def pipeline_sd15(unet, te):
    return StableDiffusionPipeline(
        vae=tiny_vae(), text_encoder=te, tokenizer=None, unet=unet, scheduler=DDPMScheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(20261130)
    io = {}

    # ---------------------------------------------------------------- SD1.5-like
    unet = unet_sd15()
    randomise(unet, gen)
    te = CLIPTextModel(clip_config(False)).eval()
    randomise(te, gen)
    save_half(unet, OUT / "sd15_unet")
    save_half(te, OUT / "sd15_te")
    sample = torch.randn((2, 4, 8, 8), generator=gen)
    timestep = torch.tensor([17.0, 803.0])
    hidden = torch.randn((2, 6, 32), generator=gen)
    ids = torch.randint(0, 1000, (2, 7), generator=gen)
    io.update(sample=sample, timestep=timestep, encoder_hidden_states=hidden, input_ids=ids)
    sdxl_hidden = torch.randn((2, 6, 64), generator=gen)
    text_embeds = torch.randn((2, 32), generator=gen)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0], [48.0, 80.0, 8.0, 0.0, 64.0, 64.0]])
    io.update(sdxl_encoder_hidden_states=sdxl_hidden, text_embeds=text_embeds, time_ids=time_ids)

    # The first pipeline fuses LoRAs into these modules: keep copies of the base weights.
    unet_base = {k: v.clone() for k, v in unet.state_dict().items()}
    te_base = {k: v.clone() for k, v in te.state_dict().items()}
    unet_targets = lora_targets(unet, True)
    te_targets = lora_targets(te, False)
    a = kohya_lora(unet_targets, "lora_unet", 4, gen, [2])
    a.update(kohya_lora(te_targets, "lora_te", 4, gen, [3]))
    b = kohya_lora(unet_targets[::3], "lora_unet", 2, gen, [1])
    # All text-encoder modules: with a subset, diffusers 0.42.1 + transformers 5 loads only the
    # `mlp.fc1` ones (the text_model-less module names defeat its target matching).
    b.update(kohya_lora(te_targets, "lora_te", 2, gen, [2]))
    meta = {"ss_base_model_version": "sd_v1", "ss_network_dim": "4", "ss_network_alpha": "2"}
    save_sorted(a, OUT / "sd15_kohya_a.safetensors", meta)
    save_sorted(b, OUT / "sd15_kohya_b.safetensors")

    def sd15_outputs(pipe):
        with torch.no_grad():
            u = pipe.unet(sample, timestep, encoder_hidden_states=hidden).sample
            t = pipe.text_encoder(ids).last_hidden_state
        return u, t

    pipe = pipeline_sd15(unet, te)
    io["sd15/unet_base"], io["sd15/te_base"] = sd15_outputs(pipe)
    pipe.load_lora_weights(str(OUT / "sd15_kohya_a.safetensors"), adapter_name="a")
    assert count_lora_layers(pipe.unet, "a") == len(unet_targets)
    assert count_lora_layers(pipe.text_encoder, "a") == len(te_targets)
    pipe.set_adapters(["a"], adapter_weights=[MULTIPLIER_A])
    io["sd15/unet_a"], io["sd15/te_a"] = sd15_outputs(pipe)
    pipe.load_lora_weights(str(OUT / "sd15_kohya_b.safetensors"), adapter_name="b")
    assert count_lora_layers(pipe.unet, "b") == len(unet_targets[::3])
    assert count_lora_layers(pipe.text_encoder, "b") == len(te_targets)
    pipe.set_adapters(["a", "b"], adapter_weights=[MULTIPLIER_A, MULTIPLIER_B])
    unfused = sd15_outputs(pipe)
    pipe.fuse_lora(components=["unet", "text_encoder"], adapter_names=["a", "b"])
    pipe.unload_lora_weights()
    io["sd15/unet_ab"], io["sd15/te_ab"] = sd15_outputs(pipe)
    for x, y in zip(unfused, (io["sd15/unet_ab"], io["sd15/te_ab"])):
        assert (x - y).abs().max() < 1e-5, (x - y).abs().max()

    # peft format: adapters added by peft, lora_B randomised, saved by diffusers with metadata.
    unet_p = unet_sd15()
    unet_p.load_state_dict(unet_base)
    te_p = CLIPTextModel(clip_config(False)).eval()
    te_p.load_state_dict(te_base)
    unet_cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out"],
                          alpha_pattern={"down_blocks.0.attentions.0.proj_in": 2})
    te_cfg = LoraConfig(r=4, lora_alpha=2, target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    unet_p.add_adapter(unet_cfg)
    inject_adapter_in_model(te_cfg, te_p)
    with torch.no_grad():
        for model in (unet_p, te_p):
            for name, p in sorted(model.named_parameters()):
                if "lora_" in name:
                    p.copy_((0.3 * torch.randn(p.shape, generator=gen)).half().float())
    StableDiffusionPipeline.save_lora_weights(
        OUT, unet_lora_layers=get_peft_model_state_dict(unet_p), text_encoder_lora_layers=get_peft_model_state_dict(te_p),
        unet_lora_adapter_metadata=stable(unet_cfg), text_encoder_lora_adapter_metadata=stable(te_cfg),
        weight_name="sd15_peft.safetensors",
    )
    resave_sorted(OUT / "sd15_peft.safetensors")
    pipe = pipeline_sd15(unet_sd15(), CLIPTextModel(clip_config(False)).eval())
    pipe.unet.load_state_dict(unet_base)
    pipe.text_encoder.load_state_dict(te_base)
    pipe.load_lora_weights(str(OUT / "sd15_peft.safetensors"), adapter_name="p")
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=MULTIPLIER_A, adapter_names=["p"])
    pipe.unload_lora_weights()
    io["sd15/unet_peft"], io["sd15/te_peft"] = sd15_outputs(pipe)

    # ---------------------------------------------------------------- SDXL-like
    unet = unet_sdxl()
    randomise(unet, gen)
    te1 = CLIPTextModel(clip_config(False)).eval()
    randomise(te1, gen)
    te2 = CLIPTextModelWithProjection(clip_config(True)).eval()
    randomise(te2, gen)
    save_half(unet, OUT / "sdxl_unet")
    save_half(te1, OUT / "sdxl_te1")
    save_half(te2, OUT / "sdxl_te2")
    sdxl_targets = [lora_targets(unet, True), lora_targets(te1, False), lora_targets(te2, False)]
    sdxl_base, te1_base, te2_base = ({k: v.clone() for k, v in m.state_dict().items()} for m in (unet, te1, te2))
    x = kohya_lora(sdxl_targets[0], "lora_unet", 4, gen, [2])
    x.update(kohya_lora(sdxl_targets[1], "lora_te1", 4, gen, [4]))
    x.update(kohya_lora(sdxl_targets[2], "lora_te2", 4, gen, [1]))
    save_sorted(x, OUT / "sdxl_kohya.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})

    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=te1, text_encoder_2=te2, tokenizer=None, tokenizer_2=None, unet=unet,
        scheduler=DDPMScheduler(),
    )

    def sdxl_outputs(pipe):
        cond = {"text_embeds": text_embeds, "time_ids": time_ids}
        with torch.no_grad():
            u = pipe.unet(sample, timestep, encoder_hidden_states=sdxl_hidden, added_cond_kwargs=cond).sample
            t1 = pipe.text_encoder(ids).last_hidden_state
            o2 = pipe.text_encoder_2(ids)
        return u, t1, o2.last_hidden_state, o2.text_embeds

    names = ("unet", "te1", "te2", "te2_embeds")
    for n, v in zip(names, sdxl_outputs(pipe)):
        io[f"sdxl/{n}_base"] = v
    pipe.load_lora_weights(str(OUT / "sdxl_kohya.safetensors"), adapter_name="x")
    for model, targets in zip((pipe.unet, pipe.text_encoder, pipe.text_encoder_2), sdxl_targets):
        assert count_lora_layers(model, "x") == len(targets)
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=MULTIPLIER_A, adapter_names=["x"])
    pipe.unload_lora_weights()
    for n, v in zip(names, sdxl_outputs(pipe)):
        io[f"sdxl/{n}_lora"] = v

    # The same LoRA with SGM (original SDXL) UNet names, as kohya's SDXL trainer writes them.
    sgm = {}
    to_ldm = {d[: -len(".weight")]: l[: -len(".weight")] for l, (d, _) in unet_ldm_layout(unet.state_dict()).items()
              if d.endswith(".weight")}
    by_kohya = {f"lora_unet_{d.replace('.', '_')}": f"lora_unet_{l.replace('.', '_')}" for d, l in to_ldm.items()}
    for key, v in x.items():
        module, rest = key.split(".", 1)
        sgm[f"{by_kohya.get(module, module)}.{rest}"] = v
    assert sum(k.startswith("lora_unet_input_blocks") for k in sgm) > 0
    save_sorted(sgm, OUT / "sdxl_kohya_sgm.safetensors", {"ss_base_model_version": "sdxl_base_v1-0"})
    unet_s = unet_sdxl()
    unet_s.load_state_dict(sdxl_base)
    te1_s, te2_s = CLIPTextModel(clip_config(False)).eval(), CLIPTextModelWithProjection(clip_config(True)).eval()
    te1_s.load_state_dict(te1_base)
    te2_s.load_state_dict(te2_base)
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=te1_s, text_encoder_2=te2_s, tokenizer=None, tokenizer_2=None, unet=unet_s,
        scheduler=DDPMScheduler(),
    )
    pipe.load_lora_weights(str(OUT / "sdxl_kohya_sgm.safetensors"), adapter_name="s")
    assert count_lora_layers(pipe.unet, "s") == len(sdxl_targets[0]), count_lora_layers(pipe.unet, "s")
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=MULTIPLIER_A, adapter_names=["s"])
    for n, v in zip(names, sdxl_outputs(pipe)):
        assert (v - io[f"sdxl/{n}_lora"]).abs().max() < 1e-5, n

    io["multipliers"] = torch.tensor([MULTIPLIER_A, MULTIPLIER_B])
    io = {k: v.contiguous() for k, v in sorted(io.items())}
    save_file(io, OUT / "io.safetensors")
    # Keep the folders free of volatile fields.
    for d in ("sd15_te", "sdxl_te1", "sdxl_te2"):
        cfg = json.loads((OUT / d / "config.json").read_text())
        (OUT / d / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
