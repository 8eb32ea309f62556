#!/usr/bin/env python3
"""Reference fixtures for crates/diffusion (UNet2DConditionModel + AutoencoderKL).

Builds small randomly initialised diffusers models, stores them as diffusers
folders plus, per model, the original-LDM single-file key layout
(``<m>.ldm_keys.json``, from which the Rust tests assemble the LDM checkpoint)
and one real pickle LDM checkpoint (``inpaint.ldm.ckpt``), and records float32
reference inputs/outputs computed by diffusers on CPU.

Run from anywhere:  .venv-ref/bin/python tools/reference/diffusion_unet_vae.py
Output:             crates/diffusion/tests/fixtures/
Deterministic: running it twice gives byte-identical files.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import diffusers  # noqa: E402
from diffusers import AutoencoderKL, UNet2DConditionModel  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ldm_layout  # noqa: E402

HERE = Path(__file__).resolve().parent
FIXTURES = HERE.parent.parent / "crates" / "diffusion" / "tests" / "fixtures"

torch.use_deterministic_algorithms(True)
torch.set_num_threads(1)
torch.set_default_dtype(torch.float32)
diffusers.utils.logging.set_verbosity_error()
# from_single_file(torch_dtype=float16) prints a harmless "modules ... kept in float32: []" notice
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="There are modules in")

WEIGHTS_METADATA = {"format": "pt"}

# --------------------------------------------------------------------------- configs

UNET_CONFIGS = {
    "sd15": dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    "sd21": dict(
        sample_size=16,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48,
        attention_head_dim=[2, 4],
        use_linear_projection=True,
        upcast_attention=True,
        norm_num_groups=32,
    ),
    "sdxl": dict(
        sample_size=16,
        block_out_channels=(32, 32, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, 1, 2],
        attention_head_dim=[1, 2, 2],
        cross_attention_dim=64,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,
        norm_num_groups=32,
    ),
    "inpaint": dict(
        sample_size=16,
        in_channels=9,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
}

VAE_CONFIGS = {
    "vae": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.18215,
    ),
    "vae3": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(32, 32, 32),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
        scaling_factor=0.13025,
    ),
}

MODEL_SEEDS = {"sd15": 1501, "sd21": 2101, "sdxl": 3101, "inpaint": 4101, "vae": 5101, "vae3": 6101}

# Per-model UNet inputs: (sample shape, timestep pair, encoder sequence length, seed base)
UNET_INPUTS = {
    "sd15": dict(sample=(2, 4, 16, 12), timestep=[999.0, 17.0], seq=7, seed=15000),
    "sd21": dict(sample=(2, 4, 10, 14), timestep=[500.0, 3.0], seq=7, seed=21000),
    "sdxl": dict(sample=(2, 4, 16, 8), timestep=[781.0, 42.0], seq=7, seed=31000),
    "inpaint": dict(sample=(2, 9, 12, 10), timestep=[1.0, 640.0], seq=7, seed=41000),
}

VAE_INPUTS = {
    # image [2,3,32,24]; tiled_latent/tiled_image need >= 3x2 tiles with the
    # diffusers tile sizes (see tiling.json).
    "vae": dict(image=(2, 3, 32, 24), tiled_latent=(1, 4, 28, 20), tiled_image=(1, 3, 56, 40), seed=51000),
    "vae3": dict(image=(2, 3, 32, 24), tiled_latent=(1, 4, 28, 20), tiled_image=(1, 3, 104, 72), seed=61000),
}

# --------------------------------------------------------------------------- helpers


def randn(seed: int, shape, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32) * scale


def rand_uniform(seed: int, shape, lo: float, hi: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(tuple(shape), generator=g, dtype=torch.float32) * (hi - lo) + lo


def save_tensors(path: Path, tensors: dict, metadata=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for k in sorted(tensors):
        v = tensors[k]
        assert isinstance(v, torch.Tensor), k
        out[k] = v.detach().clone().contiguous()
    save_file(out, str(path), metadata=metadata)


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise every parameter (none zero), then round through float16."""
    g = torch.Generator().manual_seed(seed)
    norm_ids = set()
    for mod in model.modules():
        if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            for p in mod.parameters(recurse=False):
                norm_ids.add(id(p))
    n_zero_fixed = 0
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            shape = tuple(p.shape)
            r = torch.randn(shape, generator=g, dtype=torch.float32)
            if id(p) in norm_ids:
                new = 1.0 + 0.1 * r if name.endswith("weight") else 0.1 * r
            elif name.endswith("bias"):
                new = 0.1 * r
            else:
                if p.ndim < 2:
                    raise AssertionError(f"unexpected non-norm 1-D weight {name} {shape}")
                fan_in = p.numel() / shape[0]
                new = r * (1.0 / math.sqrt(fan_in))
            new = new.to(torch.float16)
            # A float16 underflow to exactly 0 is possible (|x| < 2^-25); replace it
            # deterministically with the smallest normal float16 of the same sign.
            zero = new == 0
            if bool(zero.any()):
                n_zero_fixed += int(zero.sum())
                sign = torch.where(r < 0, -1.0, 1.0).to(torch.float16)
                new = torch.where(zero, sign * torch.tensor(2.0**-14, dtype=torch.float16), new)
            p.copy_(new.to(torch.float32))
    assert_no_zero_params(model)
    if n_zero_fixed:
        print(f"  note: {n_zero_fixed} float16 underflows replaced by +-2^-14")


def assert_no_zero_params(model: torch.nn.Module) -> None:
    for name, p in model.named_parameters():
        if bool((p == 0).any()):
            raise AssertionError(f"parameter {name} has exact zeros")
        if p.dtype != torch.float32:
            raise AssertionError(f"parameter {name} is {p.dtype}")
        if not torch.equal(p, p.half().float()):
            raise AssertionError(f"parameter {name} is not float16-representable")


WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def save_diffusers_folder(model, folder: Path, with_weights: bool = True) -> dict:
    """save_pretrained in float16; returns the float16 state dict read back from disk.

    with_weights=False keeps only config.json in the fixture folder (the weights are
    still saved, read back and reloaded in a temporary folder)."""
    if folder.exists():
        shutil.rmtree(folder)
    m16 = copy.deepcopy(model).to(torch.float16)
    with tempfile.TemporaryDirectory() as tmp:
        target = folder if with_weights else Path(tmp) / folder.name
        m16.save_pretrained(str(target), safe_serialization=True)
        names = sorted(os.listdir(target))
        assert names == ["config.json", WEIGHTS_FILE], names
        sd16 = load_file(str(target / WEIGHTS_FILE))
        ref = {k: v.detach().to(torch.float16) for k, v in model.state_dict().items()}
        ldm_layout.assert_state_dicts_equal(sd16, ref, f"{folder.name}: saved diffusers weights")
        # the folder must reload into the same architecture
        cls = type(model)
        reloaded = cls.from_pretrained(str(target), torch_dtype=torch.float32)
        ldm_layout.assert_state_dicts_equal(
            reloaded.state_dict(), model.state_dict(), f"{folder.name}: from_pretrained round trip"
        )
        if not with_weights:
            folder.mkdir(parents=True)
            shutil.copyfile(target / "config.json", folder / "config.json")
    return sd16


def check_from_single_file(cls, ldm_file: Path, folder: Path, sd16: dict, what: str) -> None:
    """diffusers' real single-file loader (offline, config from the fixture folder) gives the same weights."""
    m = cls.from_single_file(str(ldm_file), config=str(folder), torch_dtype=torch.float16)
    ldm_layout.assert_state_dicts_equal(m.state_dict(), sd16, f"{cls.__name__}.from_single_file({what})")


# --------------------------------------------------------------------------- LDM key lists

# model_ema keys of a real SD1.5 checkpoint are flattened ("." removed after the prefix);
# sd15 carries one such copy so that a loader is seen to ignore it.
SD15_EMA_KEY = "model_ema.diffusion_modelinput_blocks00weight"


def ldm_key_entries(layout: dict, source_folder: str, prefix: str) -> list:
    """[ldm_key, source_folder, diffusers_key, ldm_shape] for every key of an ldm_layout layout."""
    return [[prefix + k, source_folder, dk, list(shape)] for k, (dk, shape) in layout.items()]


def write_ldm_keys(name: str, entries: list, sources: dict) -> dict:
    """Check `entries` against the diffusers weights `sources` (folder -> state dict), write
    <name>.ldm_keys.json (sorted by LDM key, one entry per line) and return the LDM state dict
    assembled from the list exactly as the Rust tests do (tensor looked up, reshaped)."""
    entries = sorted(entries, key=lambda e: e[0])
    ldm_keys = [e[0] for e in entries]
    assert len(set(ldm_keys)) == len(ldm_keys), f"{name}: duplicate LDM keys"
    # complete: every diffusers tensor of every source is used (sd15's EMA copy is the one extra use)
    for src, sd in sources.items():
        used = {e[2] for e in entries if e[1] == src}
        assert used == set(sd), f"{name}: {src} keys unused {sorted(set(sd) - used)[:5]} unknown {sorted(used - set(sd))[:5]}"
    assert {e[1] for e in entries} == set(sources), name
    ldm = {}
    for k, src, dk, shape in entries:
        t = sources[src][dk]
        assert t.numel() == torch.Size(shape).numel(), (name, k, tuple(t.shape), shape)
        ldm[k] = t.reshape(shape).contiguous()
    text = "[\n" + ",\n".join("  " + json.dumps(e) for e in entries) + "\n]\n"
    path = FIXTURES / f"{name}.ldm_keys.json"
    path.write_text(text)
    assert json.loads(path.read_text()) == entries
    return ldm


def load_folder_weights(name: str) -> dict:
    return load_file(str(FIXTURES / name / WEIGHTS_FILE))


def build_unet(name: str) -> UNet2DConditionModel:
    torch.manual_seed(MODEL_SEEDS[name])
    model = UNet2DConditionModel(**UNET_CONFIGS[name])
    randomise_(model, MODEL_SEEDS[name])
    return model.eval().requires_grad_(False)


def build_vae(name: str) -> AutoencoderKL:
    torch.manual_seed(MODEL_SEEDS[name])
    model = AutoencoderKL(**VAE_CONFIGS[name])
    randomise_(model, MODEL_SEEDS[name])
    return model.eval().requires_grad_(False)


def residual_shapes(model: UNet2DConditionModel, call) -> tuple[list, tuple]:
    """Shapes of the down-block residual list diffusers builds, and of the mid output."""
    down, mid = [], []
    hooks = [model.conv_in.register_forward_hook(lambda m, i, o: down.append(tuple(o.shape)))]
    for blk in model.down_blocks:
        hooks.append(blk.register_forward_hook(lambda m, i, o: down.extend(tuple(t.shape) for t in o[1])))
    hooks.append(model.mid_block.register_forward_hook(lambda m, i, o: mid.append(tuple(o.shape))))
    try:
        with torch.no_grad():
            call()
    finally:
        for h in hooks:
            h.remove()
    assert len(mid) == 1
    return down, mid[0]


# --------------------------------------------------------------------------- UNets


def unet_io(name: str, model: UNet2DConditionModel) -> dict:
    spec = UNET_INPUTS[name]
    cfg = model.config
    s = spec["seed"]
    io = {
        "sample": randn(s + 1, spec["sample"]),
        "timestep": torch.tensor(spec["timestep"], dtype=torch.float32),
        "encoder_hidden_states": randn(s + 2, (spec["sample"][0], spec["seq"], cfg.cross_attention_dim)),
    }
    added = None
    if cfg.addition_embed_type == "text_time":
        io["text_embeds"] = randn(s + 3, (2, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim))
        io["time_ids"] = torch.tensor([[32.0, 24.0, 0.0, 0.0, 32.0, 24.0], [40.0, 16.0, 4.0, 2.0, 32.0, 24.0]])
        added = {"text_embeds": io["text_embeds"], "time_ids": io["time_ids"]}

    def fwd(**kw):
        with torch.no_grad():
            return model(
                io["sample"], io["timestep"], io["encoder_hidden_states"], added_cond_kwargs=added, **kw
            ).sample

    io["out"] = fwd()

    if name in ("sd15", "sdxl"):
        down, mid = residual_shapes(model, fwd)
        downs = [randn(s + 100 + i, shp, 0.1) for i, shp in enumerate(down)]
        for i, t in enumerate(downs):
            io[f"down_residual_{i}"] = t
        io["mid_residual"] = randn(s + 99, mid, 0.1)
        io["out_with_residuals"] = fwd(
            down_block_additional_residuals=[t.clone() for t in downs],
            mid_block_additional_residual=io["mid_residual"].clone(),
        )
        assert not torch.equal(io["out_with_residuals"], io["out"])

    if name == "sd15":
        io["sample_odd"] = randn(s + 11, (1, 4, 13, 11))
        io["timestep_odd"] = torch.tensor([250.0])
        io["encoder_hidden_states_odd"] = randn(s + 12, (1, 5, cfg.cross_attention_dim))
        with torch.no_grad():
            io["out_odd"] = model(io["sample_odd"], io["timestep_odd"], io["encoder_hidden_states_odd"]).sample
        assert tuple(io["out_odd"].shape) == (1, 4, 13, 11)

    for k, v in io.items():
        assert torch.isfinite(v).all(), (name, k)
    return io


def sd15_grad(model: UNet2DConditionModel, io: dict) -> dict:
    s = UNET_INPUTS["sd15"]["seed"] + 500
    lin = model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    delta = randn(s + 1, lin.weight.shape, 0.02)
    weights = randn(s + 2, io["out"].shape)
    d = delta.clone().requires_grad_(True)
    hook = lin.register_forward_hook(lambda m, inp, out: out + F.linear(inp[0], d))
    try:
        with torch.enable_grad():
            out = model(io["sample"], io["timestep"], io["encoder_hidden_states"]).sample
            loss = (out * weights).sum()
            loss.backward()
    finally:
        hook.remove()
    assert not torch.equal(out.detach(), io["out"]), "delta hook had no effect"
    # the same forward with W + D folded into the weight must agree (sanity check of the hook)
    with torch.no_grad():
        w0 = lin.weight.clone()
        lin.weight.add_(delta)
        out_folded = model(io["sample"], io["timestep"], io["encoder_hidden_states"]).sample
        lin.weight.copy_(w0)
    assert torch.allclose(out_folded, out.detach(), atol=1e-4, rtol=1e-4)
    return {
        "delta": delta,
        "weights": weights,
        "loss": loss.detach().reshape(1),
        "grad_delta": d.grad.detach().clone(),
        "out_delta": out.detach(),
    }


def write_unet(name: str, model: UNet2DConditionModel, vae_for_sd15: AutoencoderKL | None) -> None:
    folder = FIXTURES / name
    # inpaint's weights are committed once, as the pickle checkpoint inpaint.ldm.ckpt
    keep_weights = name != "inpaint"
    sd16 = save_diffusers_folder(model, folder, with_weights=keep_weights)
    config = dict(model.config)
    unet_layout = ldm_layout.unet_ldm_layout(sd16)

    if name == "inpaint":
        ckpt = {k: v.contiguous() for k, v in ldm_layout.add_prefix(
            ldm_layout.apply_layout(unet_layout, sd16), ldm_layout.LDM_UNET_PREFIX).items()}
        ckpt_path = FIXTURES / "inpaint.ldm.ckpt"
        torch.save({"state_dict": {k: v.clone() for k, v in sorted(ckpt.items())}, "global_step": 1}, str(ckpt_path))
        loaded = torch.load(str(ckpt_path), map_location="cpu", weights_only=True)
        assert loaded["global_step"] == 1
        ldm_layout.check_unet_roundtrip(loaded["state_dict"], config, sd16, "inpaint.ldm.ckpt -> unet")
        check_from_single_file(UNet2DConditionModel, ckpt_path, folder, sd16, "inpaint.ldm.ckpt")
    else:
        sources = {name: load_folder_weights(name)}
        ldm_layout.assert_state_dicts_equal(sources[name], sd16, f"{name}: folder weights")
        entries = ldm_key_entries(unet_layout, name, ldm_layout.LDM_UNET_PREFIX)
        if name == "sd15":
            assert vae_for_sd15 is not None
            sources["vae"] = load_folder_weights("vae")
            entries += ldm_key_entries(ldm_layout.vae_ldm_layout(sources["vae"]), "vae", ldm_layout.LDM_VAE_PREFIX)
            conv_in = unet_layout["input_blocks.0.0.weight"]
            entries.append([SD15_EMA_KEY, name, conv_in[0], list(conv_in[1])])
        ldm = write_ldm_keys(name, entries, sources)

        # Prove the list: the LDM dict assembled from it, written to and read back from a
        # temporary file, must convert back to the diffusers weights with diffusers' own code.
        what = f"{name}.ldm_keys.json"
        with tempfile.TemporaryDirectory() as tmp:
            ldm_path = Path(tmp) / f"{name}.ldm.safetensors"
            save_tensors(ldm_path, ldm, WEIGHTS_METADATA)
            on_disk = load_file(str(ldm_path))
            ldm_layout.check_unet_roundtrip(on_disk, config, sd16, f"{what} -> unet")
            check_from_single_file(UNet2DConditionModel, ldm_path, folder, sd16, what)
            if name == "sd15":
                vae_config = dict(vae_for_sd15.config)
                ldm_layout.check_vae_roundtrip(on_disk, vae_config, sources["vae"], f"{what} -> first_stage_model")
                check_from_single_file(AutoencoderKL, ldm_path, FIXTURES / "vae", sources["vae"], what)

    io = unet_io(name, model)
    save_tensors(folder / "io.safetensors", io)
    if name == "sd15":
        save_tensors(folder / "grad.safetensors", sd15_grad(model, io))


# --------------------------------------------------------------------------- VAEs


def tile_grid(n: int, step: int) -> int:
    return len(range(0, n, step))


def write_vae(name: str, model: AutoencoderKL) -> None:
    folder = FIXTURES / name
    sd16 = save_diffusers_folder(model, folder)
    config = dict(model.config)

    sources = {name: load_folder_weights(name)}
    ldm_layout.assert_state_dicts_equal(sources[name], sd16, f"{name}: folder weights")
    # standalone VAE file: bare LDM keys, no prefix
    ldm = write_ldm_keys(name, ldm_key_entries(ldm_layout.vae_ldm_layout(sd16), name, ""), sources)
    what = f"{name}.ldm_keys.json"
    with tempfile.TemporaryDirectory() as tmp:
        ldm_path = Path(tmp) / f"{name}.ldm.safetensors"
        save_tensors(ldm_path, ldm, WEIGHTS_METADATA)
        ldm_layout.check_vae_roundtrip(load_file(str(ldm_path)), config, sd16, f"{what} -> vae")
        check_from_single_file(AutoencoderKL, ldm_path, folder, sd16, what)

    spec = VAE_INPUTS[name]
    s = spec["seed"]
    f = 2 ** (len(model.config.block_out_channels) - 1)
    io = {"image": rand_uniform(s + 1, spec["image"], -1.0, 1.0)}
    with torch.no_grad():
        dist = model.encode(io["image"]).latent_dist
        io["mean"] = dist.mean.clone()
        io["logvar"] = dist.logvar.clone()
        io["noise"] = randn(s + 2, dist.mean.shape)
        io["sample"] = io["mean"] + torch.exp(0.5 * io["logvar"]) * io["noise"]
        via_diffusers = dist.sample(generator=torch.Generator().manual_seed(s + 2))
        assert torch.equal(via_diffusers, io["sample"]), "latent_dist.sample differs from mean + std * noise"
        b, _, h, w = spec["image"]
        io["latent"] = randn(s + 3, (b, model.config.latent_channels, h // f, w // f))
        io["decoded"] = model.decode(io["latent"]).sample
        assert tuple(io["decoded"].shape) == (b, 3, h, w)

        model.enable_tiling()
        tsm, tlm, tof = model.tile_sample_min_size, model.tile_latent_min_size, model.tile_overlap_factor
        io["tiled_latent"] = randn(s + 4, spec["tiled_latent"])
        io["tiled_image"] = rand_uniform(s + 5, spec["tiled_image"], -1.0, 1.0)
        dec_step = int(tlm * (1 - tof))
        enc_step = int(tsm * (1 - tof))
        lh, lw = spec["tiled_latent"][2:]
        ih, iw = spec["tiled_image"][2:]
        dec_grid = (tile_grid(lh, dec_step), tile_grid(lw, dec_step))
        enc_grid = (tile_grid(ih, enc_step), tile_grid(iw, enc_step))
        assert dec_grid[0] >= 3 and dec_grid[1] >= 2 and max(lh, lw) > tlm, dec_grid
        assert enc_grid[0] >= 3 and enc_grid[1] >= 2 and max(ih, iw) > tsm, enc_grid
        io["tiled_decoded"] = model.decode(io["tiled_latent"]).sample
        io["tiled_mean"] = model.encode(io["tiled_image"]).latent_dist.mean.clone()
        model.disable_tiling()
        # tiled results must really differ from the untiled path
        assert not torch.allclose(io["tiled_decoded"], model.decode(io["tiled_latent"]).sample)
        assert tuple(io["tiled_decoded"].shape) == (1, 3, lh * f, lw * f)
        assert tuple(io["tiled_mean"].shape) == (1, model.config.latent_channels, ih // f, iw // f)

    for k, v in io.items():
        assert torch.isfinite(v).all(), (name, k)
    save_tensors(folder / "io.safetensors", io)

    tiling = {
        "tile_sample_min_size": tsm,
        "tile_latent_min_size": tlm,
        "tile_overlap_factor": tof,
        "decode": {
            "overlap_size": dec_step,
            "blend_extent": int(tsm * tof),
            "row_limit": tsm - int(tsm * tof),
            "tiles_hw": list(dec_grid),
        },
        "encode": {
            "overlap_size": enc_step,
            "blend_extent": int(tlm * tof),
            "row_limit": tlm - int(tlm * tof),
            "tiles_hw": list(enc_grid),
        },
    }
    (folder / "tiling.json").write_text(json.dumps(tiling, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- layout self-test

# Extra structures (not saved) to show ldm_layout is general: >= 10 input blocks, the
# real SD1.5 / SDXL / SD-VAE block structures, class embeddings, a 1-level VAE.
LAYOUT_SELFTEST_UNETS = {
    "4 levels, layers_per_block=3, mixed attention": dict(
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=3,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=2,
    ),
    "SD1.5 block structure": dict(block_out_channels=(32, 64, 96, 96), layers_per_block=2, cross_attention_dim=16),
    "SDXL block structure": dict(
        block_out_channels=(32, 64, 96),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=[1, 2, 10],
        attention_head_dim=[1, 2, 3],
        cross_attention_dim=16,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16,
    ),
    "class_embed_type=projection": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        class_embed_type="projection",
        projection_class_embeddings_input_dim=12,
    ),
    "num_class_embeds (x4 upscaler style)": dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        num_class_embeds=10,
    ),
}
LAYOUT_SELFTEST_VAES = {
    "SD VAE structure (4 levels, layers_per_block=2)": dict(
        block_out_channels=(32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
    ),
    "1 level": dict(block_out_channels=(32,), layers_per_block=1),
}


def selftest_ldm_layout() -> None:
    for i, (what, cfg) in enumerate(LAYOUT_SELFTEST_UNETS.items()):
        torch.manual_seed(900 + i)
        m = UNet2DConditionModel(**cfg)
        sd = m.state_dict()
        ldm = ldm_layout.add_prefix(ldm_layout.unet_diffusers_to_ldm(sd), ldm_layout.LDM_UNET_PREFIX)
        ldm_layout.check_unet_roundtrip(ldm, dict(m.config), sd, f"selftest UNet {what}")
    for i, (what, cfg) in enumerate(LAYOUT_SELFTEST_VAES.items()):
        torch.manual_seed(950 + i)
        m = AutoencoderKL(**cfg)
        sd = m.state_dict()
        ldm = ldm_layout.vae_diffusers_to_ldm(sd)
        ldm_layout.check_vae_roundtrip(ldm, dict(m.config), sd, f"selftest VAE {what} (bare keys)")
        ldm_layout.check_vae_roundtrip(
            ldm_layout.add_prefix(ldm, ldm_layout.LDM_VAE_PREFIX), dict(m.config), sd, f"selftest VAE {what} (prefixed)"
        )
    print(f"ldm_layout self-test: {len(LAYOUT_SELFTEST_UNETS)} UNet and {len(LAYOUT_SELFTEST_VAES)} VAE structures round-trip")


# --------------------------------------------------------------------------- main


# Files of the earlier layout (LDM copies of the weights) that must not linger.
STALE_PATTERNS = ("*.ldm.safetensors",)


def main() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for pattern in STALE_PATTERNS:
        for p in sorted(FIXTURES.glob(pattern)):
            print(f"removing stale {p.relative_to(FIXTURES)}")
            p.unlink()
    selftest_ldm_layout()
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}; writing {FIXTURES}")

    vaes = {}
    for name in VAE_CONFIGS:
        print(f"[{name}]")
        vaes[name] = build_vae(name)
        write_vae(name, vaes[name])
    for name in UNET_CONFIGS:
        print(f"[{name}]")
        write_unet(name, build_unet(name), vaes["vae"] if name == "sd15" else None)

    print("\nfixture sizes:")
    total = 0
    for p in sorted(FIXTURES.rglob("*")):
        if p.is_file():
            n = p.stat().st_size
            total += n
            print(f"  {n:>10}  {p.relative_to(FIXTURES)}")
    print(f"  {total:>10}  total ({total / 1e6:.2f} MB)")
    if total > 13_000_000:
        print("  WARNING: fixtures exceed the ~12 MB budget (13 MB hard limit)")


if __name__ == "__main__":
    main()
