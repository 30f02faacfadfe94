"""``svd-jax generate IMAGE -o OUT``: one video from one image, its settings written next to it.

Everything a user can get wrong (image, output path, model folder, sizes) is checked before any weights are
loaded. The denoising, decoding and saving run in a worker thread while the main thread waits, so Ctrl-C is
acted on at once: the worker stops at its next step, or, when it is inside one long call (a compilation, a
step on a slow device), the process exits after removing what the interrupted save left. Either way the output
is complete or absent, one ``interrupted`` line is printed and the exit code is 130.
"""

from __future__ import annotations

import argparse
import functools
import os
import secrets
import sys
import threading
import warnings

from svd_jax.samplers import SAMPLERS
from svd_jax.scheduler import SCHEDULE_KINDS
from svd_jax.settings import PRESETS

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for a process ended by Ctrl-C
# How long an interrupted run waits for the worker to reach a step boundary before exiting without it.
INTERRUPT_GRACE_S = 2.0
DEFAULT_MODEL = "stabilityai/stable-video-diffusion-img2vid-xt"
# The sampler options taken from the command line; each is None unless given, so a preset or the model's own
# settings fill it.
OPTIONS = ("height", "width", "num_frames", "num_inference_steps", "min_guidance_scale", "max_guidance_scale",
           "guidance", "fps", "motion_bucket_id", "noise_aug_strength", "decode_chunk_size", "sampler", "schedule",
           "cache_interval", "keyframe_guidance_scale", "window_size", "window_stride")


def add_arguments(g: argparse.ArgumentParser) -> argparse.ArgumentParser:
    g.add_argument("image", help="the conditioning image (png, jpg, ...); e.g. assets/landscape.png")
    g.add_argument("-o", "--output", required=True, help="OUT.mp4, .gif, .webp, or a folder for png frames; the "
                   "settings (seed included) go to OUT.mp4.json next to it (required, no default)")
    add_generation_options(g)
    g.add_argument("--last-image", help="an end keyframe: the video goes from IMAGE to this image "
                   "(bidirectional keyframe sampling, two UNet evaluations per step; default: none)")
    g.add_argument("--loop", action="store_true", help="a video that returns to IMAGE at its end (keyframe "
                   "sampling with IMAGE as the end keyframe)")
    g.add_argument("-v", "--verbose", action="store_true", help="print each denoising step's time under the "
                   "progress bar (the first includes compiling the step)")
    g.add_argument("--ignore-memory-estimate", action="store_true", help="run even when the size asked for needs "
                   "more memory than the machine has free (it is refused otherwise, with both figures)")
    return g


def add_generation_options(g: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The model, numerics and sampler options, shared by ``generate`` and ``batch``."""
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="a converted folder, a diffusers folder or original .safetensors (converted once and "
                        "cached), a Hugging Face repo id, or 'tiny' (a tiny random model for trying the tool: its "
                        "video is noise)")
    g.add_argument("--preset", choices=list(PRESETS),
                   help="sampler settings of the original code per model, diffusers' defaults, or animatelcm "
                        "(AnimateLCM-SVD-xt's 4-step consistency sampler, for its UNet); the options below override "
                        "it (default: diffusers' defaults)")
    g.add_argument("--policy", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="numerics: auto = bfloat16 on GPU/TPU, float32 on CPU")
    g.add_argument("--height", type=int, help="frame height in pixels, a multiple of the model's factor (64 for "
                   "the released models, 8 for tiny) (default: the model's own: 576; tiny: 64)")
    g.add_argument("--width", type=int, help="frame width in pixels, same rule (default: the model's own: 1024; "
                   "tiny: 96)")
    g.add_argument("--num-frames", type=int, help="frames to generate (default: the preset's, else the UNet's "
                   "trained count: 14 for SVD, 25 for SVD-XT; tiny: 4)")
    g.add_argument("--num-inference-steps", type=int, help="denoising steps (default: the preset's, else 25; "
                   "tiny: 2)")
    g.add_argument("--min-guidance-scale", type=float, help="guidance scale at the first frame (default: the "
                   "preset's, else 1.0)")
    g.add_argument("--max-guidance-scale", type=float, help="guidance scale at the last frame; <= 1 turns "
                   "guidance off (default: the preset's, else 3.0)")
    g.add_argument("--guidance", choices=["linear", "triangle"], help="how the scale goes from min to max over "
                   "the frames: diffusers' linear ramp or the original code's triangle (default: linear)")
    g.add_argument("--fps", type=int, help="frame rate: the model is conditioned on fps - 1, and the video plays "
                   "at it (default: the preset's, else 7)")
    g.add_argument("--motion-bucket-id", type=int, help="how much motion, 0-255 (default: the preset's, else 127)")
    g.add_argument("--noise-aug-strength", type=float, help="noise added to the conditioning image (default: the "
                   "preset's, else 0.02)")
    g.add_argument("--decode-chunk-size", type=int, help="frames decoded at once; smaller needs less memory and "
                   "changes the pixels slightly (default: the preset's, else all frames)")
    g.add_argument("--sampler", choices=list(SAMPLERS), help="euler is the original code's; heun and "
                   "dpmpp_2s_ancestral evaluate the UNet twice per step; lcm is for consistency-distilled UNets "
                   "(default: the preset's, else euler)")
    g.add_argument("--schedule", choices=list(SCHEDULE_KINDS), help="the noise levels: karras (the original "
                   "code's), ays (Align Your Steps for SVD, e.g. with 10 steps), exponential, polyexponential, "
                   "animatelcm (default: the preset's, else karras)")
    g.add_argument("--cache-interval", type=int, help="step caching: the whole UNet every N evaluations, its "
                   "shallow branch in between (fewer FLOPs, approximate; default: 1, no caching)")
    g.add_argument("--keyframe-guidance-scale", type=float, help="with --last-image or --loop: the guidance "
                   "scale on every frame, CFG++ (default: 1.0)")
    g.add_argument("--window-size", type=int, help="sample overlapping windows of this many frames together, "
                   "for --num-frames beyond the UNet's trained count (default: the trained count when a "
                   "--num-frames given exceeds it, else one window of all frames)")
    g.add_argument("--window-stride", type=int, help="frames between the starts of two windows (default: half a "
                   "window)")
    g.add_argument("--seed", type=int, help="random seed; the same seed and settings give the same video "
                   "(default: a random one, printed and written to OUT.mp4.json)")
    return g


class _Interrupted(Exception):
    """Raised in the worker at a step boundary after Ctrl-C."""


def sampler_settings(args: argparse.Namespace) -> dict:
    from svd_jax import pipeline

    options = dict(pipeline.PRESETS[args.preset]) if args.preset else {}
    options.update({k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None})
    return options


def _prepare(args: argparse.Namespace):
    """Check everything from the arguments and the model's configs alone; returns (source, image, options)."""
    from svd_jax import pipeline, video
    from svd_jax.loader import TINY, TINY_SETTINGS, model_configs, resolve
    from svd_jax.preprocess import load_image
    from svd_jax.scheduler import guidance_scales
    from svd_jax.settings import check_conditioning, positive_int, seeds

    video.check_destination(args.output)
    image = load_image(args.image)
    source = args.model if args.model == TINY else resolve(args.model)
    configs = model_configs(source)
    missing = [c for c in ("image_encoder", "unet", "vae") if c not in configs]
    if missing:
        raise ValueError(f"{source} has no {', '.join(missing)}: generation needs all three components")
    options = sampler_settings(args)
    options.update(pipeline.resolve_settings(TINY_SETTINGS if source == TINY else {}, configs["unet"],
                                             **{k: options.get(k) for k in pipeline.DIFFUSERS_DEFAULTS}))
    pipeline.check_size(options["height"], options["width"], configs["unet"], configs["vae"])
    if args.last_image is not None:
        load_image(args.last_image)  # readable, before any model is loaded
        options["last_image"] = str(args.last_image)
    if args.loop:
        options["loop"] = True
    trained = configs["unet"].num_frames
    if (args.num_frames is not None and args.num_frames > trained and options.get("window_size") is None
            and args.last_image is None and not args.loop):
        options["window_size"] = trained  # a long video asked for: windows of the trained length, not one pass
    with warnings.catch_warnings():  # only the errors here; generate warns about untrained values itself
        warnings.simplefilter("ignore")
        check_conditioning(options.get("fps", 7), options.get("motion_bucket_id", 127),
                           options.get("noise_aug_strength", 0.02))
    video.check_fps(options.get("fps", 7))  # also the video's frame rate
    for name in ("num_frames", "num_inference_steps", "decode_chunk_size", "cache_interval", "window_size",
                 "window_stride"):
        if options.get(name) is not None:
            positive_int(options[name], name)
    guidance_scales(options.get("min_guidance_scale", 1.0), options.get("max_guidance_scale", 3.0), 1)
    if args.seed is not None:
        seeds(args.seed, 1)
    _check_memory(configs, options, policy_named(args.policy), source == TINY, args.ignore_memory_estimate)
    return source, image, options


def _check_memory(configs: dict, options: dict, policy, tiny: bool, ignore: bool) -> None:
    """Refuse up front, with the figures, a size that will not fit (see :mod:`svd_jax.memory`); with
    ``--ignore-memory-estimate`` say so and go on."""
    from svd_jax import memory
    from svd_jax.loader import TINY_SETTINGS
    from svd_jax.policy import Policy

    estimate = memory.attention_estimate(
        configs["unet"], configs["vae"], policy or Policy.default(), options["height"], options["width"],
        options["num_frames"], guided=options.get("max_guidance_scale", 3.0) > 1.0,
        decode_chunk_size=options.get("decode_chunk_size"))
    own = f"the tiny model's own size is {TINY_SETTINGS['height']}x{TINY_SETTINGS['width']}" if tiny else ""
    warning = memory.size_warning(estimate, memory.available_bytes(), options["height"], options["width"],
                                  own or "use a smaller --height and --width")
    if warning and not ignore:
        raise MemoryError(f"{warning} (--ignore-memory-estimate tries anyway)")
    if warning:
        print(f"warning: {warning}", file=sys.stderr, flush=True)


def policy_named(name: str):
    from svd_jax.policy import Policy

    return {"auto": None, "float32": Policy.float32(), "bfloat16": Policy.bfloat16(),
            "float16": Policy.float16()}[name]


def _render(models, image, options: dict, seed: int, output: str, verbose: bool, cancelled: threading.Event):
    """The worker: sample, decode and save; stops at the next step once ``cancelled`` is set."""
    from svd_jax import pipeline, video

    def stop_if_cancelled(step, sigma, latents):
        if cancelled.is_set():
            raise _Interrupted

    frames = pipeline.generate(image, models, output_type="uint8", seed=seed, progress="verbose" if verbose else True,
                               callback_on_step_end=stop_if_cancelled, **options)
    if cancelled.is_set():
        raise _Interrupted
    return frames, video.save_video(frames[0], output, fps=options.get("fps", 7))


def _run_in_worker(work, output: str):
    """``work(cancelled)`` in a thread while this (main) thread waits for it, so Ctrl-C is seen at once.
    Returns its result, re-raises its error, or exits with 130 on Ctrl-C."""
    from svd_jax import video

    result: dict = {}
    cancelled = threading.Event()

    def target():
        try:
            result["value"] = work(cancelled)
        except BaseException as e:  # handed to the main thread
            result["error"] = e

    worker = threading.Thread(target=target, name="svd-jax generate", daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.1)
    except KeyboardInterrupt:
        cancelled.set()
        try:
            worker.join(INTERRUPT_GRACE_S)  # the next step boundary, or the end of a save in progress
        except KeyboardInterrupt:
            pass
        video.discard_partial(output)
        print("\ninterrupted", file=sys.stderr, flush=True)  # a progress bar may hold the current line
        sys.stdout.flush()
        # The worker may still be inside a compilation or a device call that cannot be stopped from Python;
        # exiting here does not wait for it (what it was writing was removed above).
        os._exit(EXIT_INTERRUPTED)
    if "error" in result:
        raise result["error"]
    return result["value"]


def run(args: argparse.Namespace) -> int:
    from svd_jax import __version__, video
    from svd_jax.loader import TINY, enable_compilation_cache, load

    try:  # everything a user can get wrong is checked before the models are loaded
        source, image, options = _prepare(args)
    except (OSError, ValueError, RuntimeError, ImportError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # e.g. during a download or a conversion, which clean up after themselves
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    if source == TINY:
        print("note: --model tiny is a tiny randomly initialised model; the video it makes is noise", file=sys.stderr)
    print(f"generating {options['num_frames']} frames at {options['width']}x{options['height']}, "
          f"{options['num_inference_steps']} steps, seed {seed}, model {source}", file=sys.stderr, flush=True)
    try:
        enable_compilation_cache()
        models = load(source, policy=policy_named(args.policy))
        render = functools.partial(_render, models, image, options, seed, args.output, args.verbose)
        frames, path = _run_in_worker(render, args.output)
        settings = {"svd_jax": __version__, "image": str(args.image), "model": str(args.model), "seed": seed,
                    "policy": str(models.policy), **options}
        sidecar = video.write_settings(path, settings)
    except (OSError, ValueError, RuntimeError, ImportError, MemoryError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)  # out of memory (naming the stage), non-finite output: one line too
        return EXIT_USAGE
    except (KeyboardInterrupt, _Interrupted):
        video.discard_partial(args.output)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"wrote {path} ({frames.shape[1]} frames, {frames.shape[3]}x{frames.shape[2]}, seed {seed}); "
          f"settings in {sidecar}")
    return 0
