"""One-off check that LoRA files written by the Rust crate load in diffusers and reproduce the
Rust outputs (it writes no fixture; CI never runs it).

  cargo test -p easyphoto-lora --test apply written_kohya_and_peft_files_round_trip
  .venv-ref/bin/python tools/reference/lora_check_written.py [target/tmp/lora_written]

For each of `sd15_written_{kohya,peft}.safetensors` it loads the fixture models of
`lora_apply.py`, applies the file with diffusers' `load_lora_weights` at weight 0.7, fuses it,
and compares the UNet and text-encoder outputs with `sd15_written_<format>_outputs.safetensors`.
"""

import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_apply  # noqa: E402

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "crates" / "lora" / "tests" / "fixtures" / "apply"


def main() -> None:
    written = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "target" / "tmp" / "lora_written"
    io = load_file(FIXTURES / "io.safetensors")
    worst = 0.0
    for fmt in ("kohya", "peft"):
        unet = UNet2DConditionModel.from_pretrained(FIXTURES / "sd15_unet").float().eval()
        te = CLIPTextModel.from_pretrained(FIXTURES / "sd15_te").float().eval()
        pipe = lora_apply.pipeline_sd15(unet, te)
        pipe.load_lora_weights(str(written / f"sd15_written_{fmt}.safetensors"), adapter_name="w")
        n_unet = lora_apply.count_lora_layers(pipe.unet, "w")
        n_te = lora_apply.count_lora_layers(pipe.text_encoder, "w")
        pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.7, adapter_names=["w"])
        pipe.unload_lora_weights()
        with torch.no_grad():
            u = pipe.unet(io["sample"], io["timestep"], encoder_hidden_states=io["encoder_hidden_states"]).sample
            t = pipe.text_encoder(io["input_ids"]).last_hidden_state
        ours = load_file(written / f"sd15_written_{fmt}_outputs.safetensors")
        eu, et = (u - ours["unet"]).abs().max().item(), (t - ours["te"]).abs().max().item()
        print(f"{fmt}: {n_unet} UNet + {n_te} TE layers loaded; max abs error unet {eu:.3e}, text encoder {et:.3e}")
        worst = max(worst, eu, et)
    assert worst < 1e-4, worst
    print("ok")


if __name__ == "__main__":
    main()
