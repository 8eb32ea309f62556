"""One-off check that LoRA files written by the Rust crate load in diffusers and reproduce the
Rust outputs (it writes no fixture; CI never runs it).

  cargo test -p easyphoto-lora --test apply written_kohya_and_peft_files_round_trip
  .venv-ref/bin/python tools/reference/lora_check_written.py [target/tmp/lora_written]

For each of `sd15_written_{kohya,peft}.safetensors` it loads the fixture models of
`lora_apply.py`, applies the file with diffusers' `load_lora_weights` at weight 0.7, fuses it,
and compares the UNet and text-encoder outputs with `sd15_written_<format>_outputs.safetensors`.
The SDXL checkpoint written by the trainer (`sdxl_trained_kohya.safetensors`, from
`cargo test -p easyphoto-lora --test train sdxl_training_writes`) goes through
`StableDiffusionXLPipeline.load_lora_weights` at weight 1.0, and the UNet and both encoders'
outputs are compared with `sdxl_trained_kohya_outputs.safetensors`.
"""

import sys
from pathlib import Path

import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection

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
    worst = max(worst, check_sdxl(written, io))
    assert worst < 1e-4, worst
    print("ok")


def check_sdxl(written: Path, io: dict) -> float:
    """The trainer's SDXL checkpoint in diffusers' SDXL pipeline; the worst output error."""
    pipe = StableDiffusionXLPipeline(
        vae=lora_apply.tiny_vae(),
        text_encoder=CLIPTextModel.from_pretrained(FIXTURES / "sdxl_te1").float().eval(),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(FIXTURES / "sdxl_te2").float().eval(),
        tokenizer=None,
        tokenizer_2=None,
        unet=UNet2DConditionModel.from_pretrained(FIXTURES / "sdxl_unet").float().eval(),
        scheduler=DDPMScheduler(),
    )
    pipe.load_lora_weights(str(written / "sdxl_trained_kohya.safetensors"), adapter_name="t")
    counts = [lora_apply.count_lora_layers(m, "t") for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)]
    pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"], lora_scale=1.0, adapter_names=["t"])
    pipe.unload_lora_weights()
    cond = {"text_embeds": io["text_embeds"], "time_ids": io["time_ids"]}
    with torch.no_grad():
        u = pipe.unet(io["sample"], io["timestep"], encoder_hidden_states=io["sdxl_encoder_hidden_states"],
                      added_cond_kwargs=cond).sample
        t1 = pipe.text_encoder(io["input_ids"]).last_hidden_state
        o2 = pipe.text_encoder_2(io["input_ids"])
    ours = load_file(written / "sdxl_trained_kohya_outputs.safetensors")
    errors = {n: (v - ours[n]).abs().max().item()
              for n, v in (("unet", u), ("te1", t1), ("te2", o2.last_hidden_state), ("te2_embeds", o2.text_embeds))}
    print(f"sdxl trained: {counts} UNet/TE1/TE2 layers loaded; max abs errors {errors}")
    assert counts == [88, 12, 12], counts
    return max(errors.values())


if __name__ == "__main__":
    main()
