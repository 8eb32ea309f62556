"""Diffusers -> original LDM (CompVis / Stability single-file) key layout.

This is the inverse of diffusers' ``diffusers.loaders.single_file_utils``
``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint``.  It is written
from the structure found in the state dict itself (number of levels, resnets per
level, which levels have attentions / down- / up-samplers), so it works for any
UNet2DConditionModel / AutoencoderKL layout that the forward converters accept.

UNet (keys returned WITHOUT the ``model.diffusion_model.`` prefix; use
``add_prefix``):

    time_embedding.linear_{1,2}       -> time_embed.{0,2}
    add_embedding.linear_{1,2}        -> label_emb.0.{0,2}     (SDXL text_time)
    class_embedding.linear_{1,2}      -> label_emb.0.{0,2}     (class_embed_type timestep/projection)
    class_embedding.weight            -> label_emb.weight       (num_class_embeds)
    conv_in                           -> input_blocks.0.0
    down_blocks.b.resnets.j           -> input_blocks.N.0       N = 1 + sum_{k<b}(resnets_k + has_down_k) + j
    down_blocks.b.attentions.j        -> input_blocks.N.1
    down_blocks.b.downsamplers.0.conv -> input_blocks.M.0.op    M = 1 + sum_{k<b}(...) + resnets_b
    mid_block.resnets.i               -> middle_block.{2i}
    mid_block.attentions.i            -> middle_block.{2i+1}
    up_blocks.b.resnets.j             -> output_blocks.N.0      N = sum_{k<b} resnets_k + j
    up_blocks.b.attentions.j          -> output_blocks.N.1
    up_blocks.b.upsamplers.0.conv     -> output_blocks.L.{2 if the last layer has an attention else 1}.conv
    conv_norm_out / conv_out          -> out.0 / out.2
  resnet inner names: norm1->in_layers.0, conv1->in_layers.2,
  time_emb_proj->emb_layers.1, norm2->out_layers.0, conv2->out_layers.3,
  conv_shortcut->skip_connection.  Attention (SpatialTransformer) inner names are
  identical in both layouts.

VAE (keys returned without prefix; LDM single-file SD checkpoints use
``first_stage_model.``, standalone VAE files use none):

    {encoder,decoder}.conv_in / conv_out     -> same
    {encoder,decoder}.conv_norm_out          -> {encoder,decoder}.norm_out
    encoder.down_blocks.i.resnets.j          -> encoder.down.i.block.j
    encoder.down_blocks.i.downsamplers.0.conv-> encoder.down.i.downsample.conv
    decoder.up_blocks.i.resnets.j            -> decoder.up.{n-1-i}.block.j
    decoder.up_blocks.i.upsamplers.0.conv    -> decoder.up.{n-1-i}.upsample.conv
    *.mid_block.resnets.k                    -> *.mid.block_{k+1}
    *.mid_block.attentions.0.group_norm      -> *.mid.attn_1.norm
    *.mid_block.attentions.0.to_{q,k,v}      -> *.mid.attn_1.{q,k,v}      (weight [C,C] -> [C,C,1,1])
    *.mid_block.attentions.0.to_out.0        -> *.mid.attn_1.proj_out     (weight [C,C] -> [C,C,1,1])
    quant_conv / post_quant_conv             -> same (top level)
  resnet inner names are identical except conv_shortcut -> nin_shortcut.

``unet_ldm_layout`` / ``vae_ldm_layout`` return the mapping itself as
``{ldm_key: (diffusers_key, ldm_shape)}`` (only names and shapes are looked at);
``unet_diffusers_to_ldm`` / ``vae_diffusers_to_ldm`` apply it to tensors.
"""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any, Dict, Mapping, Tuple

import torch

# ldm_key -> (diffusers_key, ldm_shape)
Layout = Dict[str, Tuple[str, Tuple[int, ...]]]

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."

_UNET_TOP = {
    "time_embedding.linear_1.": "time_embed.0.",
    "time_embedding.linear_2.": "time_embed.2.",
    "add_embedding.linear_1.": "label_emb.0.0.",
    "add_embedding.linear_2.": "label_emb.0.2.",
    "class_embedding.linear_1.": "label_emb.0.0.",
    "class_embedding.linear_2.": "label_emb.0.2.",
    "conv_in.": "input_blocks.0.0.",
    "conv_norm_out.": "out.0.",
    "conv_out.": "out.2.",
}

_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}

_VAE_ATTN = {
    "group_norm.": "norm.",
    "to_q.": "q.",
    "to_k.": "k.",
    "to_v.": "v.",
    "to_out.0.": "proj_out.",
}

_RE_BLOCK = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)$")
_RE_MID = re.compile(r"^mid_block\.(resnets|attentions)\.(\d+)\.(.*)$")


def _replace_prefix(rest: str, table: Mapping[str, str], what: str) -> str:
    for old, new in table.items():
        if rest.startswith(old):
            return new + rest[len(old):]
    raise KeyError(f"unexpected {what} parameter name: {rest!r}")


def _unet_resnet(rest: str) -> str:
    return _replace_prefix(rest, _UNET_RESNET, "UNet resnet")


def _structure(keys, kind_prefix):
    """Per block index: number of resnets, set of attention indices, has sampler."""
    n_res = defaultdict(int)
    attns = defaultdict(set)
    sampler = defaultdict(bool)
    for k in keys:
        m = _RE_BLOCK.match(k)
        if not m or m.group(1) != kind_prefix:
            continue
        b, part, j = int(m.group(2)), m.group(3), int(m.group(4))
        if part == "resnets":
            n_res[b] = max(n_res[b], j + 1)
        elif part == "attentions":
            attns[b].add(j)
        else:
            sampler[b] = True
    n_blocks = 1 + max(list(n_res) + list(attns) + list(sampler) + [-1])
    return n_blocks, n_res, attns, sampler


def _shape(v: Any) -> Tuple[int, ...]:
    return tuple(int(d) for d in (v.shape if hasattr(v, "shape") else v))


def apply_layout(layout: Mapping[str, Tuple[str, Tuple[int, ...]]], state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """{ldm_key: state_dict[diffusers_key].reshape(ldm_shape)} (reshape never changes the element count)."""
    out: Dict[str, torch.Tensor] = {}
    for k_ldm, (k_diff, shape) in layout.items():
        v = state_dict[k_diff]
        if v.numel() != (torch.Size(shape).numel()):
            raise ValueError(f"{k_ldm}: cannot reshape {k_diff} {tuple(v.shape)} to {tuple(shape)}")
        out[k_ldm] = v.reshape(tuple(shape))
    return out


def unet_ldm_layout(state_dict: Mapping[str, Any]) -> Layout:
    """LDM key (no prefix) -> (diffusers key, LDM shape) for a diffusers UNet2DConditionModel.

    ``state_dict`` maps diffusers keys to tensors or shapes."""
    keys = list(state_dict.keys())
    n_down, down_res, down_attn, down_samp = _structure(keys, "down_blocks")
    n_up, up_res, up_attn, up_samp = _structure(keys, "up_blocks")

    # LDM input_blocks index of the first layer of each down block.
    down_start, idx = {}, 1
    for b in range(n_down):
        down_start[b] = idx
        idx += down_res[b] + (1 if down_samp[b] else 0)
    up_start, idx = {}, 0
    for b in range(n_up):
        up_start[b] = idx
        idx += up_res[b]

    out: Layout = {}

    def put(k_new, v):
        if k_new in out:
            raise KeyError(f"two diffusers keys map to {k_new!r}")
        out[k_new] = (k, _shape(v))

    for k, v in state_dict.items():
        if k == "class_embedding.weight":
            put("label_emb.weight", v)
            continue
        top = next((old for old in _UNET_TOP if k.startswith(old)), None)
        if top is not None:
            put(_UNET_TOP[top] + k[len(top):], v)
            continue
        m = _RE_MID.match(k)
        if m:
            part, i, rest = m.group(1), int(m.group(2)), m.group(3)
            if part == "resnets":
                put(f"middle_block.{2 * i}." + _unet_resnet(rest), v)
            else:
                put(f"middle_block.{2 * i + 1}." + rest, v)
            continue
        m = _RE_BLOCK.match(k)
        if not m:
            raise KeyError(f"unexpected UNet key {k!r}")
        kind, b, part, j, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "down_blocks":
            if part == "resnets":
                put(f"input_blocks.{down_start[b] + j}.0." + _unet_resnet(rest), v)
            elif part == "attentions":
                put(f"input_blocks.{down_start[b] + j}.1." + rest, v)
            elif part == "downsamplers":
                if j != 0 or not rest.startswith("conv."):
                    raise KeyError(f"unexpected downsampler key {k!r}")
                put(f"input_blocks.{down_start[b] + down_res[b]}.0.op." + rest[len("conv."):], v)
            else:
                raise KeyError(k)
        else:
            if part == "resnets":
                put(f"output_blocks.{up_start[b] + j}.0." + _unet_resnet(rest), v)
            elif part == "attentions":
                put(f"output_blocks.{up_start[b] + j}.1." + rest, v)
            elif part == "upsamplers":
                if j != 0 or not rest.startswith("conv."):
                    raise KeyError(f"unexpected upsampler key {k!r}")
                last = up_res[b] - 1
                slot = 2 if last in up_attn[b] else 1
                put(f"output_blocks.{up_start[b] + last}.{slot}.conv." + rest[len("conv."):], v)
            else:
                raise KeyError(k)
    return out


def unet_diffusers_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map a diffusers UNet2DConditionModel state dict to LDM names (no prefix)."""
    return apply_layout(unet_ldm_layout(state_dict), state_dict)


def vae_ldm_layout(state_dict: Mapping[str, Any]) -> Layout:
    """LDM VAE key (no prefix) -> (diffusers key, LDM shape) for a diffusers AutoencoderKL.

    ``state_dict`` maps diffusers keys to tensors or shapes; the shapes decide the
    [C, C] -> [C, C, 1, 1] reshape of the mid-attention linear weights."""
    keys = list(state_dict.keys())
    n_up = 1 + max(
        [int(m.group(1)) for m in (re.match(r"^decoder\.up_blocks\.(\d+)\.", k) for k in keys) if m] + [-1]
    )
    out: Layout = {}

    for k, v in state_dict.items():
        v = _shape(v)

        def put(k_new, shape, k=k):
            if k_new in out:
                raise KeyError(f"two diffusers keys map to {k_new!r}")
            out[k_new] = (k, tuple(shape))

        if k.startswith(("quant_conv.", "post_quant_conv.")):
            put(k, v)
            continue
        coder, rest = k.split(".", 1)
        if coder not in ("encoder", "decoder"):
            raise KeyError(f"unexpected VAE key {k!r}")
        if rest.startswith(("conv_in.", "conv_out.")):
            put(k, v)
            continue
        if rest.startswith("conv_norm_out."):
            put(f"{coder}.norm_out." + rest[len("conv_norm_out."):], v)
            continue
        m = re.match(r"^mid_block\.resnets\.(\d+)\.(.*)$", rest)
        if m:
            put(f"{coder}.mid.block_{int(m.group(1)) + 1}." + m.group(2).replace("conv_shortcut.", "nin_shortcut."), v)
            continue
        m = re.match(r"^mid_block\.attentions\.(\d+)\.(.*)$", rest)
        if m:
            if m.group(1) != "0":
                raise KeyError(f"LDM VAE has a single mid attention: {k!r}")
            name = _replace_prefix(m.group(2), _VAE_ATTN, "VAE attention")
            if name.endswith("weight") and not name.startswith("norm.") and len(v) == 2:
                v = (v[0], v[1], 1, 1)
            put(f"{coder}.mid.attn_1." + name, v)
            continue
        m = re.match(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)$", rest)
        if not m:
            raise KeyError(f"unexpected VAE key {k!r}")
        kind, i, part, j, tail = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        if kind == "down_blocks":
            if coder != "encoder":
                raise KeyError(k)
            level = i
            lname = "down"
        else:
            if coder != "decoder":
                raise KeyError(k)
            level = n_up - 1 - i
            lname = "up"
        if part == "resnets":
            put(f"{coder}.{lname}.{level}.block.{j}." + tail.replace("conv_shortcut.", "nin_shortcut."), v)
        else:
            if j != 0 or not tail.startswith("conv."):
                raise KeyError(f"unexpected sampler key {k!r}")
            sname = "downsample" if part == "downsamplers" else "upsample"
            put(f"{coder}.{lname}.{level}.{sname}.conv." + tail[len("conv."):], v)
    return out


def vae_diffusers_to_ldm(state_dict: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Map a diffusers AutoencoderKL state dict to LDM VAE names (no prefix)."""
    return apply_layout(vae_ldm_layout(state_dict), state_dict)


def add_prefix(state_dict: Mapping[str, Any], prefix: str) -> Dict[str, Any]:
    return {prefix + k: v for k, v in state_dict.items()}


def assert_state_dicts_equal(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], what: str) -> None:
    """Same key set, and for every key the same dtype, shape and bits."""
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra:
        raise AssertionError(f"{what}: key mismatch; missing={missing[:10]} extra={extra[:10]}")
    for k in sorted(want):
        a, b = got[k], want[k]
        if a is None:
            raise AssertionError(f"{what}: {k} is None")
        if a.dtype != b.dtype or tuple(a.shape) != tuple(b.shape) or not torch.equal(a, b):
            raise AssertionError(
                f"{what}: tensor {k} differs (dtype {a.dtype} vs {b.dtype}, shape {tuple(a.shape)} vs {tuple(b.shape)})"
            )


def check_unet_roundtrip(ldm_checkpoint: Mapping[str, torch.Tensor], config: Mapping, diffusers_sd: Mapping[str, torch.Tensor], what: str) -> None:
    """Feed an LDM checkpoint (keys with ``model.diffusion_model.``) to diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    conv = convert_ldm_unet_checkpoint(dict(ldm_checkpoint), dict(config))
    assert_state_dicts_equal(conv, diffusers_sd, what)


def check_vae_roundtrip(ldm_checkpoint: Mapping[str, torch.Tensor], config: Mapping, diffusers_sd: Mapping[str, torch.Tensor], what: str) -> None:
    """Feed an LDM checkpoint (VAE keys bare or under ``first_stage_model.``) to diffusers' converter."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    conv = convert_ldm_vae_checkpoint(dict(ldm_checkpoint), dict(config))
    # the converter returns [C,C] views for the attention weights; compare values, not storage
    conv = {k: v.contiguous() for k, v in conv.items()}
    assert_state_dicts_equal(conv, diffusers_sd, what)
