#!/usr/bin/env python3
"""Reference fixtures for the CLIP text encoders of crates/diffusion.

Builds two small randomly initialised transformers models, a CLIP-L-like
``CLIPTextModel`` (``clip_l``) and an OpenCLIP-bigG-like
``CLIPTextModelWithProjection`` (``clip_g``), stores them as transformers folders
(as in a diffusers pipeline's ``text_encoder/`` / ``text_encoder_2/``), writes the
single-file layouts (key lists for the HF-named CLIP-L, the fused OpenCLIP
tensors for bigG), proves them with diffusers' own single-file conversion, and
records float32 reference inputs/outputs computed by transformers on CPU.

Run from anywhere:  .venv-ref/bin/python tools/reference/clip_text.py
Output:             crates/diffusion/tests/fixtures/clip_*
Deterministic: running it twice gives byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402

import diffusers  # noqa: E402
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_ldm_clip_checkpoint,
    create_diffusers_clip_model_from_ldm,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ldm_layout  # noqa: E402
from diffusion_unet_vae import FIXTURES, WEIGHTS_METADATA, randomise_, save_tensors  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

WEIGHTS_FILE = "model.safetensors"
SEQ = 77

# bos/eos below are the "tokenizer" ids used in the inputs: like CLIP's 49406/49407 they are the
# two highest ids of the vocabulary. clip_l's config keeps the SD1.5 / SDXL hub value
# eos_token_id = 2, which makes transformers pool at the highest id (argmax); clip_g's config names
# the real end token, which makes transformers pool at its first occurrence.
MODELS = {
    "clip_l": dict(
        cls=CLIPTextModel,
        seed=7101,
        config=dict(
            vocab_size=1000,
            hidden_size=32,
            intermediate_size=64,
            projection_dim=32,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=SEQ,
            hidden_act="quick_gelu",
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
        ),
        # (position of the end token per row, padding id): SD1 pads with the end token
        rows=[(5, 999), (14, 999)],
    ),
    "clip_g": dict(
        cls=CLIPTextModelWithProjection,
        seed=7201,
        config=dict(
            vocab_size=1000,
            hidden_size=48,
            intermediate_size=192,
            projection_dim=40,
            num_hidden_layers=4,
            num_attention_heads=3,
            max_position_embeddings=SEQ,
            hidden_act="gelu",
            bos_token_id=998,
            eos_token_id=999,
            pad_token_id=0,
        ),
        # SDXL's second tokenizer pads with "!" (id 0)
        rows=[(7, 0), (40, 0)],
    ),
}
BOS, EOS = 998, 999

CLIP_L_LAYOUTS = {
    # name -> checkpoint prefix of the HF names (all with the `text_model.` level)
    "clip_l_sd15": "cond_stage_model.transformer.",
    "clip_l_sdxl": "conditioner.embedders.0.transformer.",
}
# Some old SD1 checkpoints have no `text_model.` level.
CLIP_L_LEGACY = "clip_l_sd15_legacy"
# AUTOMATIC1111's `checkpoint_dict_replacements` (modules/sd_models.py) for such files.
A1111_REPLACEMENTS = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}
OPEN_CLIP_SDXL_PREFIX = "conditioner.embedders.1.model."
OPEN_CLIP_SD2_PREFIX = "cond_stage_model.model."
LOGIT_SCALE = 4.6052  # ln(100), as stored by OpenCLIP; loaders ignore it


def build(name: str):
    spec = MODELS[name]
    torch.manual_seed(spec["seed"])
    config = CLIPTextConfig(**spec["config"], attn_implementation="eager")
    model = spec["cls"](config)
    randomise_(model, spec["seed"])
    return model.eval().requires_grad_(False)


def save_folder(name: str, model) -> dict:
    """save_pretrained in float16; returns the float16 state dict read back from disk."""
    folder = FIXTURES / name
    if folder.exists():
        shutil.rmtree(folder)
    m16 = type(model)(model.config)
    m16.load_state_dict(model.state_dict())
    m16 = m16.to(torch.float16)
    m16.save_pretrained(str(folder), safe_serialization=True)
    names = sorted(os.listdir(folder))
    assert names == ["config.json", WEIGHTS_FILE], names
    sd16 = load_file(str(folder / WEIGHTS_FILE))
    ref = {k: v.to(torch.float16) for k, v in model.state_dict().items()}
    ldm_layout.assert_state_dicts_equal(sd16, ref, f"{name}: saved weights")
    reloaded = type(model).from_pretrained(str(folder), dtype=torch.float32)
    ldm_layout.assert_state_dicts_equal(reloaded.state_dict(), model.state_dict(), f"{name}: from_pretrained")
    return sd16


def with_text_model_level(key: str) -> str:
    """transformers >= 5.6 saves `CLIPTextModel` without the `text_model.` level that hub folders
    and single files have (`CLIPTextModelWithProjection` keeps it)."""
    return key if key.startswith(("text_model.", "text_projection.")) else "text_model." + key


def input_ids(name: str) -> torch.Tensor:
    spec = MODELS[name]
    g = torch.Generator().manual_seed(spec["seed"] + 1)
    rows = []
    for end, pad in spec["rows"]:
        words = torch.randint(3, BOS, (end - 1,), generator=g)
        row = torch.cat([torch.tensor([BOS]), words, torch.tensor([EOS]), torch.full((SEQ - end - 1,), pad)])
        rows.append(row)
    ids = torch.stack(rows).to(torch.int64)
    if name == "clip_l":
        # the legacy rule pools at the highest id, not at id 2 (= config eos_token_id): put one early
        ids[0, 2] = 2
        ids[1, 9] = 2
    return ids


def text_model(model):
    return model.text_model if hasattr(model, "text_model") else model


def reference_io(name: str, model) -> dict:
    ids = input_ids(name)
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        inner = text_model(model)(ids)
        hs = out.hidden_states
        assert len(hs) == model.config.num_hidden_layers + 1
        assert torch.equal(inner.last_hidden_state, out.last_hidden_state)
        io = {
            "input_ids": ids,
            "last_hidden_state": out.last_hidden_state,
            "pooler_output": inner.pooler_output,
            # SD1 clip skip 2 / SD2's encoder: the final norm on the penultimate layer
            "penultimate_normed": text_model(model).final_layer_norm(hs[-2]),
        }
        for i, h in enumerate(hs):
            io[f"hidden_states_{i}"] = h
        if hasattr(out, "text_embeds"):
            io["text_embeds"] = out.text_embeds
    # the pooled rows are the end tokens the inputs were built with
    for b, (end, _) in enumerate(MODELS[name]["rows"]):
        assert torch.equal(io["pooler_output"][b], io["last_hidden_state"][b, end]), (name, b)
    assert not torch.equal(io["last_hidden_state"], hs[-1])
    for k, v in io.items():
        assert torch.isfinite(v.float()).all(), (name, k)
    return io


# --------------------------------------------------------------------------- single-file layouts


def write_key_list(name: str, prefix: str, sd16: dict, level: bool) -> dict:
    """<name>.ldm_keys.json: [checkpoint_key, "clip_l", folder_key, shape], sorted; returns the
    checkpoint dict assembled from it."""
    entries = []
    for k in sd16:
        full = with_text_model_level(k) if level else k
        entries.append([prefix + full, "clip_l", k, list(sd16[k].shape)])
    entries.sort(key=lambda e: e[0])
    text = "[\n" + ",\n".join("  " + json.dumps(e) for e in entries) + "\n]\n"
    path = FIXTURES / f"{name}.ldm_keys.json"
    path.write_text(text)
    assert json.loads(path.read_text()) == entries
    return {e[0]: sd16[e[2]].reshape(e[3]).contiguous() for e in entries}


def diffusers_single_file(cls, checkpoint: dict, config_folder: Path):
    return create_diffusers_clip_model_from_ldm(
        cls, checkpoint, config=str(config_folder), torch_dtype=torch.float16, local_files_only=True
    )


def on_disk(tensors: dict) -> dict:
    """Written to and read back from a temporary safetensors file."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt.safetensors"
        save_tensors(path, tensors, WEIGHTS_METADATA)
        return load_file(str(path))


def check_clip_l_layouts(sd16: dict) -> dict:
    folder = FIXTURES / "clip_l"
    checkpoints = {}
    for name, prefix in CLIP_L_LAYOUTS.items():
        ckpt = on_disk(write_key_list(name, prefix, sd16, level=True))
        conv = {k.removeprefix("text_model."): v for k, v in convert_ldm_clip_checkpoint(ckpt).items()}
        ldm_layout.assert_state_dicts_equal(conv, sd16, f"{name}: convert_ldm_clip_checkpoint")
        m = diffusers_single_file(CLIPTextModel, ckpt, folder)
        ldm_layout.assert_state_dicts_equal(m.state_dict(), sd16, f"{name}: create_diffusers_clip_model_from_ldm")
        checkpoints[name] = ckpt

    legacy = on_disk(write_key_list(CLIP_L_LEGACY, CLIP_L_LAYOUTS["clip_l_sd15"], sd16, level=False))
    try:
        diffusers_single_file(CLIPTextModel, legacy, folder)
        raise AssertionError("diffusers now detects SD1 text encoders without the text_model. level")
    except ValueError:
        pass
    fixed = {}
    for k, v in legacy.items():
        for old, new in A1111_REPLACEMENTS.items():
            if k.startswith(old):
                k = new + k[len(old):]
        fixed[k] = v
    ldm_layout.assert_state_dicts_equal(fixed, checkpoints["clip_l_sd15"], f"{CLIP_L_LEGACY}: A1111 replacements")
    return checkpoints


def open_clip_layout(sd16: dict, prefix: str) -> dict:
    """HF CLIPTextModelWithProjection weights in OpenCLIP names: q/k/v fused into in_proj,
    text_projection transposed, plus the unused logit_scale."""
    out = {
        prefix + "token_embedding.weight": sd16["text_model.embeddings.token_embedding.weight"],
        prefix + "positional_embedding": sd16["text_model.embeddings.position_embedding.weight"],
        prefix + "ln_final.weight": sd16["text_model.final_layer_norm.weight"],
        prefix + "ln_final.bias": sd16["text_model.final_layer_norm.bias"],
        prefix + "text_projection": sd16["text_projection.weight"].T.contiguous(),
        prefix + "logit_scale": torch.tensor(LOGIT_SCALE, dtype=torch.float16),
    }
    names = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    layers = 1 + max(int(k.split(".")[3]) for k in sd16 if k.startswith("text_model.encoder.layers."))
    for i in range(layers):
        hf = f"text_model.encoder.layers.{i}."
        oc = f"{prefix}transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            out[f"{oc}attn.in_proj_{p}"] = torch.cat([sd16[f"{hf}self_attn.{x}_proj.{p}"] for x in "qkv"]).contiguous()
            for a, b in names.items():
                out[f"{oc}{b}.{p}"] = sd16[f"{hf}{a}.{p}"]
    return out


def check_open_clip(sd16: dict, model_g, io_g: dict, clip_l_sdxl: dict) -> None:
    folder = FIXTURES / "clip_g"
    tensors = open_clip_layout(sd16, OPEN_CLIP_SDXL_PREFIX)
    path = folder / "openclip.safetensors"
    save_tensors(path, tensors, WEIGHTS_METADATA)
    ckpt = load_file(str(path))
    # every HF tensor is used once: q/k/v weights and biases are 2 fused tensors per layer
    assert len(tensors) - 1 + 4 * model_g.config.num_hidden_layers == len(sd16)
    m = diffusers_single_file(CLIPTextModelWithProjection, ckpt, folder)
    ldm_layout.assert_state_dicts_equal(m.state_dict(), sd16, "openclip.safetensors: create_diffusers_clip_model_from_ldm")

    # a whole SDXL file holds both encoders; each is found by its own prefix (and width)
    both = {**ckpt, **clip_l_sdxl}
    m = diffusers_single_file(CLIPTextModelWithProjection, both, folder)
    ldm_layout.assert_state_dicts_equal(m.state_dict(), sd16, "SDXL file: text_encoder_2")
    m = diffusers_single_file(CLIPTextModel, both, FIXTURES / "clip_l")
    ldm_layout.assert_state_dicts_equal(m.state_dict(), load_file(str(FIXTURES / "clip_l" / WEIGHTS_FILE)), "SDXL file: text_encoder")

    # SD2 stores OpenCLIP ViT-H under cond_stage_model.model.; its diffusers text encoder is a
    # CLIPTextModel with one layer fewer (the last resblock and text_projection go unused), so its
    # last_hidden_state is the final norm on the penultimate layer.
    sd2 = {OPEN_CLIP_SD2_PREFIX + k[len(OPEN_CLIP_SDXL_PREFIX):]: v for k, v in ckpt.items()}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = CLIPTextConfig(**{**MODELS["clip_g"]["config"], "num_hidden_layers": model_g.config.num_hidden_layers - 1})
        cfg.save_pretrained(tmp)
        m = diffusers_single_file(CLIPTextModel, sd2, Path(tmp)).float()
    last = f"text_model.encoder.layers.{model_g.config.num_hidden_layers - 1}."
    want = {k.removeprefix("text_model."): v for k, v in sd16.items() if not k.startswith((last, "text_projection."))}
    ldm_layout.assert_state_dicts_equal({k: v.half() for k, v in m.state_dict().items()}, want, "SD2 layout")
    with torch.no_grad():
        out = m(io_g["input_ids"]).last_hidden_state
    err = (out - io_g["penultimate_normed"]).abs().max().item()
    assert err < 1e-5, f"SD2 layout: last_hidden_state differs from penultimate_normed by {err}"


# --------------------------------------------------------------------------- main


def main() -> None:
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, diffusers {diffusers.__version__}")
    models, sds, ios = {}, {}, {}
    for name in MODELS:
        print(f"[{name}]")
        models[name] = build(name)
        sds[name] = save_folder(name, models[name])
        ios[name] = reference_io(name, models[name])
        save_tensors(FIXTURES / name / "io.safetensors", ios[name])
    checkpoints = check_clip_l_layouts(sds["clip_l"])
    check_open_clip(sds["clip_g"], models["clip_g"], ios["clip_g"], checkpoints["clip_l_sdxl"])

    print("\nfixture sizes:")
    total = 0
    files = sorted(p for p in FIXTURES.glob("clip_*") if p.is_file()) + sorted(
        p for d in sorted(FIXTURES.glob("clip_*")) if d.is_dir() for p in d.rglob("*") if p.is_file()
    )
    for p in files:
        n = p.stat().st_size
        total += n
        print(f"  {n:>10}  {p.relative_to(FIXTURES)}")
    print(f"  {total:>10}  total ({total / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
