"""``python -m convert SRC DST [--config DIR] [--force]``."""

from __future__ import annotations

import argparse
import sys


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    parser.add_argument("src", help="a diffusers folder, a component folder or file, or the original svd*.safetensors")
    parser.add_argument("dst", help="the converted folder to write (must not exist unless --force)")
    parser.add_argument("--config", metavar="DIR",
                        help="a folder laid out like a diffusers repo without weights (image_encoder/config.json, "
                             "unet/config.json, vae/config.json) for non-standard sizes")
    parser.add_argument("--force", action="store_true", help="replace an existing DST")
    parser.add_argument("--no-hash", action="store_true", help="skip the sha256 of the source files in the manifest")
    return parser


def run(args: argparse.Namespace) -> int:
    from convert.api import convert
    from convert.errors import ConversionError

    try:
        manifest = convert(args.src, args.dst, config_dir=args.config, force=args.force,
                           hash_sources=not args.no_hash)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, info in manifest["components"].items():
        print(f"{name}: {info['num_params']:,} parameters ({info['layout']} layout) -> {args.dst}/{name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
