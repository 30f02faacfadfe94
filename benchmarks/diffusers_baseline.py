"""The diffusers baseline: ``StableVideoDiffusionPipeline`` (PyTorch) with random weights (speed does not depend
on their values), the same settings as the svd_jax figures. ``bench_generate.py`` runs it as a child process on
the same card, after svd_jax's processes have exited, and records what it prints under ``"diffusers"``.

Measures, each printed as one JSON line as soon as it is known: the eager pipeline's seconds per video and peak
memory; its UNet on the guided batch (one denoising step's UNet work) and its VAE decode; then, unless
``--no-compile`` or past ``--budget-s``, the UNet under ``torch.compile`` (diffusers' documented speed-up for
SVD): compile seconds (reported apart), the compiled UNet's step, and the pipeline's seconds per video with it.
fp16 on CUDA (diffusers' usual GPU dtype); float32 on a CPU, where it only checks the code path.

    python benchmarks/diffusers_baseline.py --size tiny --settings '{"num_frames": 4, ...}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                       UNetSpatioTemporalConditionModel)
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

# The released SVD-XT components; the tiny ones are the shape of diffusers' own test models.
UNET_KWARGS = {
    "full": {},
    "tiny": dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=32, num_attention_heads=(4, 8),
                 addition_time_embed_dim=32, projection_class_embeddings_input_dim=96, num_frames=2, sample_size=8,
                 down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                 up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal")),
}
VAE_KWARGS = {
    "full": dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 layers_per_block=2, latent_channels=4),
    "tiny": dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=1,
                 latent_channels=4),
}
CLIP_KWARGS = {
    "full": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                 patch_size=14, image_size=224, projection_dim=1024, hidden_act="gelu", layer_norm_eps=1e-5),
    "tiny": dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, patch_size=32,
                 image_size=224, projection_dim=32),
}
# The released checkpoints' scheduler (scheduler/scheduler_config.json of the SVD repositories).
SVD_SCHEDULER = dict(prediction_type="v_prediction", timestep_type="continuous", use_karras_sigmas=True,
                     sigma_min=0.002, sigma_max=700.0, timestep_spacing="leading", steps_offset=1,
                     beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                     interpolation_type="linear")
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def log(key: str, value) -> None:
    print(json.dumps({key: value}), flush=True)


def build_pipeline(size: str, device: str, dtype) -> StableVideoDiffusionPipeline:
    torch.manual_seed(0)
    with torch.device(device):  # built in place; .to() then moves what the legacy constructors kept on the CPU
        unet = UNetSpatioTemporalConditionModel(**UNET_KWARGS[size])
        vae = AutoencoderKLTemporalDecoder(**VAE_KWARGS[size])
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_KWARGS[size]))
    for module in (unet, vae):  # default init is too loud for fp16 over 25 steps: tame it so frames stay finite
        with torch.no_grad():
            for p in module.parameters():
                p.mul_(0.5)
    pipe = StableVideoDiffusionPipeline(
        vae=vae.to(device, dtype).eval(), image_encoder=image_encoder.to(device, dtype).eval(),
        unet=unet.to(device, dtype).eval(), scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER),
        feature_extractor=CLIPImageProcessor(crop_size=224, size={"shortest_edge": 224}, image_mean=CLIP_MEAN,
                                             image_std=CLIP_STD, resample=3, do_center_crop=True))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Timer:
    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn, repeats: int = 1) -> float:
        """Median seconds of ``repeats`` calls of ``fn`` (the caller warms up)."""
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return float(np.median(times))


def main(argv=None) -> int:
    start = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(UNET_KWARGS), default="full")
    parser.add_argument("--settings", required=True, help="JSON: num_frames, height, width, num_inference_steps, "
                                                          "decode_chunk_size (bench_generate.SIZES)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile measurements")
    parser.add_argument("--budget-s", type=float, default=400.0, help="start no torch.compile after this many s")
    args = parser.parse_args(argv)
    settings = json.loads(args.settings)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    import diffusers
    import transformers

    log("versions", {"torch": torch.__version__, "diffusers": diffusers.__version__,
                     "transformers": transformers.__version__,
                     "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "dtype": str(dtype)})
    pipe = build_pipeline(args.size, device, dtype)
    log("init_s", round(time.perf_counter() - start, 1))
    timer = Timer(device)
    image = Image.fromarray((np.random.default_rng(0).random((settings["height"], settings["width"], 3))
                             * 255).astype(np.uint8))

    def video(steps=settings["num_inference_steps"]):
        generator = torch.Generator(device).manual_seed(0)
        return pipe(image, num_frames=settings["num_frames"], height=settings["height"], width=settings["width"],
                    num_inference_steps=steps, decode_chunk_size=settings["decode_chunk_size"],
                    generator=generator, output_type="np").frames

    video(2)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    log("seconds_per_video", round(timer(video), 3))
    if device == "cuda":
        log("peak_device_gib", round(torch.cuda.max_memory_allocated() / 2 ** 30, 2))

    unet, vae = pipe.unet, pipe.vae
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    frames, h, w = settings["num_frames"], settings["height"] // scale, settings["width"] // scale
    g = torch.Generator().manual_seed(1)
    unet_in = (torch.randn(2, frames, 8, h, w, generator=g).to(device, dtype), torch.tensor([1.0, 1.0], device=device),
               torch.randn(2, 1, unet.config.cross_attention_dim, generator=g).to(device, dtype),
               torch.tensor([[6.0, 127.0, 0.02]] * 2, device=device, dtype=dtype))
    latents = torch.randn(frames, 4, h, w, generator=g).to(device, dtype)
    chunk = settings["decode_chunk_size"]
    with torch.no_grad():
        def decode():
            for i in range(0, frames, chunk):
                vae.decode(latents[i:i + chunk], num_frames=latents[i:i + chunk].shape[0])

        unet(*unet_in)
        log("unet_guided_step_s", round(timer(lambda: unet(*unet_in), 3), 4))
        decode()
        log("vae_decode_s", round(timer(decode, 3), 3))

        if args.no_compile:
            return 0
        if time.perf_counter() - start > args.budget_s:
            log("compile_skipped", f"past the {args.budget_s:.0f} s budget")
            return 0
        compiled = torch.compile(unet, mode="default")
        log("compile_s", round(timer(lambda: compiled(*unet_in)), 1))  # the first call compiles
        log("unet_guided_step_compiled_s", round(timer(lambda: compiled(*unet_in), 3), 4))
    pipe.unet = compiled
    # the first pipeline call (2 steps) with the compiled UNet: any recompilation for the pipeline's own inputs
    log("compiled_first_call_s", round(timer(lambda: video(2)), 1))
    log("seconds_per_video_compiled", round(timer(video), 3))
    log("total_s", round(time.perf_counter() - start, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
