"""``python -m convert SRC DST [--config DIR] [--unet FILE] [--force]``: PyTorch -> svd_jax.
``python -m convert --to-diffusers SRC DST [--dtype D] [--lora FILE [--lora-scale S]] [--force]``: a converted svd_jax
folder (with LoRA adapters merged into its UNet) -> a diffusers folder."""

from __future__ import annotations

import argparse
import sys


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    parser.add_argument("src", help="a diffusers folder, a component folder or file, or the original svd*.safetensors "
                                        "(with --to-diffusers: a converted svd_jax folder)")
    parser.add_argument("dst", help="the converted folder to write, or with --to-diffusers the diffusers folder "
                                        "(must not exist unless --force)")
    parser.add_argument("--config", metavar="DIR",
                        help="a folder laid out like a diffusers repo without weights (image_encoder/config.json, "
                             "unet/config.json, vae/config.json) for non-standard sizes (default: the source's "
                             "own config.json files, else the released models' configs)")
    parser.add_argument("--unet", metavar="FILE",
                        help="convert this UNet instead of SRC's (a fine-tune such as AnimateLCM-SVD-xt.safetensors: "
                             "a single file in diffusers naming, or a component folder); SRC gives the rest "
                             "(default: SRC's own UNet)")
    parser.add_argument("--force", action="store_true", help="replace an existing DST")
    parser.add_argument("--no-hash", action="store_true", help="skip the sha256 of the source files in the manifest")
    parser.add_argument("--to-diffusers", action="store_true",
                        help="the other way: SRC is a converted svd_jax folder, DST the diffusers folder to write")
    parser.add_argument("--dtype", choices=["float16", "float32", "bfloat16"],
                        help="with --to-diffusers: cast the weights (default: keep the stored dtypes)")
    parser.add_argument("--accept-diffusers-eps", action="store_true",
                        help="with --to-diffusers: export a UNet with the original (sgm) GroupNorm eps, which "
                             "diffusers cannot express; diffusers will compute with its own eps")
    parser.add_argument("--lora", metavar="FILE",
                        help="with --to-diffusers: merge this UNet LoRA file (lora.safetensors) into the exported UNet "
                             "(default: none)")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="with --lora: the adapters' scale")
    return parser


EXIT_ERROR = 2
EXIT_INTERRUPTED = 130  # as a shell reports a process ended by SIGINT


def _guarded(work):
    """``(result, exit code)``: the work's result, or None and the code after printing one line for a failure the
    user can act on (bad input, an I/O error naming the file, an interrupt); anything else is a bug and raises."""
    from convert.errors import ConversionError
    from svd_jax.errors import one_line_failures, os_error_line
    from svd_jax.interrupt import sigint_interrupts

    try:
        with sigint_interrupts(), one_line_failures():
            return work(), 0
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
    except OSError as e:
        print(f"error: {os_error_line(e)}", file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return None, EXIT_INTERRUPTED
    return None, EXIT_ERROR


def _export(args: argparse.Namespace) -> int:
    from convert.export import export

    summary, code = _guarded(lambda: export(args.src, args.dst, dtype=args.dtype, force=args.force,
                                            accept_diffusers_eps=args.accept_diffusers_eps, lora=args.lora,
                                            lora_scale=args.lora_scale))
    if code:
        return code
    for name, info in summary["components"].items():
        dtypes = ", ".join(info["dtypes"])
        print(f"{name}: {info['num_tensors']} tensors ({dtypes}) -> {args.dst}/{name}")
        if info["eps_changed_to_diffusers"]:
            print(f"warning: {name}: diffusers will compute with its own {', '.join(info['eps_changed_to_diffusers'])}",
                  file=sys.stderr)
    if not summary["pipeline"]:
        print(f"note: {args.src} holds only {', '.join(summary['components'])}: no model_index.json written; load "
              "each component with from_pretrained(DST, subfolder=...)")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.to_diffusers and (args.config or args.no_hash or args.unet):
        print("error: --config, --no-hash and --unet apply to PyTorch -> svd_jax, not to --to-diffusers",
              file=sys.stderr)
        return EXIT_ERROR
    if not args.to_diffusers and (args.dtype or args.accept_diffusers_eps or args.lora):
        print("error: --dtype, --accept-diffusers-eps and --lora apply only with --to-diffusers", file=sys.stderr)
        return EXIT_ERROR
    return _export(args) if args.to_diffusers else _convert(args)


def _convert(args: argparse.Namespace) -> int:
    from convert.api import convert

    manifest, code = _guarded(lambda: convert(args.src, args.dst, config_dir=args.config, force=args.force,
                                              hash_sources=not args.no_hash, unet=args.unet))
    if code:
        return code
    for name, info in manifest["components"].items():
        print(f"{name}: {info['num_params']:,} parameters ({info['layout']} layout) -> {args.dst}/{name}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
