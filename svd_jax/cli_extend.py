"""``svd-jax extend VIDEO -o OUT --frames N``: continue a video past its end (:func:`svd_jax.extend`)."""

from __future__ import annotations

import argparse
import secrets
import sys

from svd_jax.cli_generate import DEFAULT_MODEL, EXIT_INTERRUPTED, EXIT_USAGE

# generate's sampler options that extend passes on (the size is the video's)
OPTIONS = ("num_inference_steps", "min_guidance_scale", "max_guidance_scale", "fps", "motion_bucket_id",
           "noise_aug_strength", "decode_chunk_size")


def add_arguments(e: argparse.ArgumentParser) -> argparse.ArgumentParser:
    e.add_argument("video", help="the video to continue: .mp4, .gif, .webp, or a folder of png frames")
    e.add_argument("-o", "--output", required=True, help="OUT.mp4, .gif, .webp, or a folder for png frames: the "
                   "input video followed by the new frames (required, no default)")
    e.add_argument("--frames", type=int, required=True, help="how many frames to add (required, no default)")
    e.add_argument("--overlap", type=int, default=1, help="frames of each new clip blended into the end of the "
                   "video instead of appended (default: %(default)s)")
    e.add_argument("--model", default=DEFAULT_MODEL, help="as for generate (default: %(default)s)")
    e.add_argument("--num-frames", type=int, help="length of each generated clip (default: the UNet's trained "
                   "count)")
    e.add_argument("--num-inference-steps", type=int, help="denoising steps per clip (default: the model's, "
                   "else 25)")
    e.add_argument("--min-guidance-scale", type=float, help="guidance at a clip's first frame (default: 1.0)")
    e.add_argument("--max-guidance-scale", type=float, help="guidance at a clip's last frame (default: 3.0)")
    e.add_argument("--fps", type=int, help="conditioning frame rate and the output's rate (default: 7)")
    e.add_argument("--motion-bucket-id", type=int, help="how much motion, 0-255 (default: 127)")
    e.add_argument("--noise-aug-strength", type=float, help="noise added to the conditioning frame (default: "
                   "0.02)")
    e.add_argument("--decode-chunk-size", type=int, help="frames decoded at once (default: all of a clip)")
    e.add_argument("--seed", type=int, help="seed of the first new clip, +1 per clip (default: a random one, "
                   "printed)")
    return e


def run(args: argparse.Namespace) -> int:
    from svd_jax import video
    from svd_jax.continuation import extend
    from svd_jax.loader import TINY, load, resolve

    options = {k: getattr(args, k) for k in OPTIONS if getattr(args, k) is not None}
    try:
        if args.frames < 0:
            raise ValueError(f"--frames must be >= 0, got {args.frames}")
        video.check_destination(args.output)
        video.check_fps(options.get("fps", 7))
        frames = video.read_video(args.video)
        source = args.model if args.model == TINY else resolve(args.model)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    print(f"adding {args.frames} frames to {args.video} ({len(frames)} frames), seed {seed}, model {source}",
          file=sys.stderr, flush=True)
    try:
        models = load(source)
        longer = extend(frames, models, args.frames, overlap=args.overlap, seed=seed,
                               num_frames=args.num_frames, **options)
        path = video.save_video(longer, args.output, fps=options.get("fps", 7))
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        video.discard_partial(args.output)
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(f"wrote {path} ({len(longer)} frames, seed {seed})")
    return 0
