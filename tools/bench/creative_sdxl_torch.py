"""Reference timing for `crates/pipeline/examples/bench_creative.rs`: diffusers' SDXL txt2img on the
same tiny random components (the lora crate's SDXL UNet and text encoders, the diffusion crate's
VAE and tokenizer), the same kohya LoRA loaded at weight 1, DPM++ 2M (DPMSolverMultistep), CFG 7.

    .venv-ref/bin/python tools/bench/creative_sdxl_torch.py <size> <steps> <runs> <threads>
"""
import statistics
import sys
import time

import torch
from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

size, steps, runs, threads = (int(a) for a in sys.argv[1:5])
torch.set_num_threads(threads)
lora_dir = "crates/lora/tests/fixtures/apply/"
diffusion_dir = "crates/diffusion/tests/fixtures/"
tokenizer = CLIPTokenizer.from_pretrained(diffusion_dir + "tokenizer/folder_vocab_merges")
pipe = StableDiffusionXLPipeline(
    vae=AutoencoderKL.from_pretrained(diffusion_dir + "vae"),
    text_encoder=CLIPTextModel.from_pretrained(lora_dir + "sdxl_te1"),
    text_encoder_2=CLIPTextModelWithProjection.from_pretrained(lora_dir + "sdxl_te2"),
    tokenizer=tokenizer,
    tokenizer_2=tokenizer,
    unet=UNet2DConditionModel.from_pretrained(lora_dir + "sdxl_unet"),
    scheduler=DPMSolverMultistepScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
)
pipe.load_lora_weights(lora_dir + "sdxl_kohya.safetensors")
pipe.to(torch.float32)  # the LoRA file is f16; run everything in f32, as ours
pipe.set_progress_bar_config(disable=True)
# Our prompt and negative (`CreativeConfig::prompt`), the LoRA tag left out: diffusers has the LoRA loaded.
prompt = ("look at viewer, easyphoto_face, easyphoto, 1person, film photography, a clear face, minor acne, "
          "(high resolution detail of human skin texture:1.4, rough skin:1.2), (portrait, :1.8), (indirect lighting)")
negative = ("(bokeh:2), cgi, illustration, cartoon, deformed, distorted, disfigured, poorly drawn, bad anatomy, "
            "wrong anatomy,ugly, deformed, blurry,Noisy, log, text")
times = []
for k in range(runs + 1):
    start = time.perf_counter()
    with torch.no_grad():
        pipe(prompt, negative_prompt=negative, width=size, height=size, num_inference_steps=steps,
             guidance_scale=7.0, generator=torch.Generator().manual_seed(k), output_type="np")
    if k > 0:  # the first call warms up
        times.append(time.perf_counter() - start)
print(f"diffusers SDXL txt2img {size}x{size}, {steps} steps, {threads} threads: median {statistics.median(times):.3f} s per image ({runs} runs)")
