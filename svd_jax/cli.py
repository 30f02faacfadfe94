"""``svd-jax``: the command line. ``svd-jax convert SRC DST``, ``svd-jax info DST``."""

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


def build_parser() -> argparse.ArgumentParser:
    from convert.__main__ import build_parser as convert_parser

    parser = argparse.ArgumentParser(prog="svd-jax", description="Stable Video Diffusion in JAX")
    commands = parser.add_subparsers(dest="command", required=True)
    convert_parser(commands.add_parser("convert", help="convert a PyTorch checkpoint (same as python -m convert)"))
    info = commands.add_parser("info", help="describe a converted folder")
    info.add_argument("path", help="a folder written by the converter")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "convert":
        from convert.__main__ import run

        return run(args)
    return _info(args)


if __name__ == "__main__":
    sys.exit(main())
