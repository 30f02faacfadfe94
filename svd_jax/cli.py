"""``svd-jax``: the command line.

``svd-jax generate IMAGE -o OUT.mp4 [--model PATH|HUB_ID|tiny] [--preset NAME] [generate options]``,
``svd-jax convert SRC DST`` (as ``python -m convert``), ``svd-jax info DST``, ``svd-jax train CONFIG``.
"""

from __future__ import annotations

import argparse
import sys

EXIT_USAGE = 2


def _info(args: argparse.Namespace) -> int:
    from svd_jax.loader import read_manifest

    try:
        manifest = read_manifest(args.path)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{args.path}: converted by svd_jax converter v{manifest.get('converter_version')}")
    for f in manifest.get("source", {}).get("files", []):
        print(f"  source {f['name']} ({f['bytes']:,} bytes, sha256 {f.get('sha256') or 'not recorded'})")
    for name, info in manifest.get("components", {}).items():
        config = info["config"]
        dtypes = ", ".join(f"{k} x{v}" for k, v in info["dtypes"].items())
        print(f"  {name}: {config['kind']}, {info['num_params']:,} parameters ({dtypes}), from {info['layout']} layout")
        details = {k: v for k, v in config.items() if k != "kind"}
        print("    " + ", ".join(f"{k}={v}" for k, v in details.items()))
    return 0


def _add_generate(commands) -> None:
    g = commands.add_parser("generate", help="generate a video from an image")
    g.add_argument("image", help="the conditioning image (png, jpg, ...)")
    g.add_argument("-o", "--output", required=True, help="OUT.mp4, .gif, .webp, or a folder for png frames")
    g.add_argument("--model", default="stabilityai/stable-video-diffusion-img2vid-xt",
                   help="a converted folder, a diffusers folder or original .safetensors (converted once and "
                        "cached), a Hugging Face repo id, or 'tiny' (random tiny model: the output is noise)")
    g.add_argument("--preset", choices=["diffusers", "svd", "svd_xt", "svd_xt_1_1"],
                   help="sampler settings of the original code per model (or diffusers' defaults); "
                        "explicit options below override it")
    g.add_argument("--policy", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="numerics: auto = bfloat16 on GPU/TPU, float32 on CPU")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--num-frames", type=int)
    g.add_argument("--num-inference-steps", type=int)
    g.add_argument("--min-guidance-scale", type=float)
    g.add_argument("--max-guidance-scale", type=float)
    g.add_argument("--guidance", choices=["linear", "triangle"])
    g.add_argument("--fps", type=int, help="conditioning frame rate (the model sees fps - 1) and the video's rate")
    g.add_argument("--motion-bucket-id", type=int)
    g.add_argument("--noise-aug-strength", type=float)
    g.add_argument("--decode-chunk-size", type=int)
    g.add_argument("--seed", type=int)


_GENERATE_OPTIONS = ("height", "width", "num_frames", "num_inference_steps", "min_guidance_scale",
                     "max_guidance_scale", "guidance", "fps", "motion_bucket_id", "noise_aug_strength",
                     "decode_chunk_size", "seed")


def _generate(args: argparse.Namespace) -> int:
    from svd_jax import pipeline, video
    from svd_jax.loader import TINY, load, read_manifest, resolve
    from svd_jax.policy import Policy
    from svd_jax.preprocess import load_image

    options = dict(pipeline.PRESETS[args.preset]) if args.preset else {}
    options.update({k: getattr(args, k) for k in _GENERATE_OPTIONS if getattr(args, k) is not None})
    if args.model == TINY:
        options.setdefault("height", 64)
        options.setdefault("width", 96)
        options.setdefault("num_inference_steps", 2)
        options.setdefault("num_frames", 4)
        print("note: --model tiny is a tiny randomly initialised model; the video it makes is noise", file=sys.stderr)
    try:  # everything a user can get wrong is checked before the models are loaded
        video.check_destination(args.output)
        image = load_image(args.image)
        policy = {"auto": None, "float32": Policy.float32(), "bfloat16": Policy.bfloat16()}[args.policy]
        source = args.model
        if source != TINY:
            source = resolve(source)
            missing = [c for c in ("image_encoder", "unet", "vae") if c not in read_manifest(source)["components"]]
            if missing:
                raise ValueError(f"{source} has no {', '.join(missing)}: generation needs all three components")
        models = load(source, policy=policy)
        frames = pipeline.generate(image, models, output_type="uint8", **options)
        path = video.save_video(frames[0], args.output, fps=options.get("fps", 7))
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {path} ({frames.shape[1]} frames, {frames.shape[3]}x{frames.shape[2]})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from convert.__main__ import build_parser as convert_parser

    parser = argparse.ArgumentParser(prog="svd-jax", description="Stable Video Diffusion in JAX")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_generate(commands)
    convert_parser(commands.add_parser("convert", help="convert a PyTorch checkpoint (same as python -m convert)"))
    info = commands.add_parser("info", help="describe a converted folder")
    info.add_argument("path", help="a folder written by the converter")
    from svd_jax.train.cli import add_arguments as train_arguments

    train_arguments(commands.add_parser("train", help="fine-tune the UNet (see svd_jax.train.config)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        from convert.__main__ import run

        return run(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "train":
        from svd_jax.train.cli import run as train

        return train(args)
    return _info(args)


if __name__ == "__main__":
    sys.exit(main())
