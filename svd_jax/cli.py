"""``svd-jax``: the command line.

``svd-jax generate IMAGE -o OUT.mp4 [--model PATH|HUB_ID|tiny] [--preset NAME] [generate options]``,
``svd-jax batch JOBS -o OUTDIR [generate options] [--coordinator HOST:PORT --num-processes N --process-id I]``,
``svd-jax convert SRC DST`` (as ``python -m convert``), ``svd-jax info DST``, ``svd-jax clean [FOLDER ...]``,
``svd-jax train CONFIG``, ``svd-jax compile --target tpu:v5e:2x2`` (memory and FLOPs of a generation on a target,
compiled without running).

Each subcommand is one ``_add_<name>`` function that builds its parser and names the function that runs it
(``set_defaults(run=...)``); :func:`build_parser` lists them. Every option's help states its default
(:class:`HelpFormatter` adds it where the help text does not).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Appends ``(default: X)`` to an option's help unless the text already says its default; a flag's default
    is "off". Options whose default is None must say in words what happens when they are not given."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return f"{text} (default: off)"
        if action.default is not None and action.default != []:
            return f"{text} (default: %(default)s)"
        return text


def _subcommand(commands, name: str, help: str, description: str | None = None) -> argparse.ArgumentParser:
    return commands.add_parser(name, help=help, description=description or help, formatter_class=HelpFormatter)


def _add_generate(commands) -> None:
    from svd_jax.cli_generate import add_arguments, run

    add_arguments(_subcommand(commands, "generate", "generate a video from an image")).set_defaults(run=run)


def _add_batch(commands) -> None:
    from svd_jax.cli_batch import add_arguments, run

    add_arguments(_subcommand(commands, "batch", "generate a video per image of a folder or jobs file, resumable, "
                                                 "on one or several processes")).set_defaults(run=run)


def _add_extend(commands) -> None:
    from svd_jax.cli_extend import add_arguments, run

    add_arguments(_subcommand(commands, "extend", "continue a video past its end, conditioned on its last "
                              "frame")).set_defaults(run=run)


def _add_convert(commands) -> None:
    from convert.__main__ import build_parser, run

    build_parser(_subcommand(commands, "convert", "convert a PyTorch checkpoint (same as python -m convert)"))
    commands.choices["convert"].set_defaults(run=run)


def _info(args: argparse.Namespace) -> int:
    from svd_jax.loader import read_manifest

    try:
        manifest = read_manifest(args.path)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    source = manifest.get("source", {})
    print(f"{args.path}: converted by svd_jax converter v{manifest.get('converter_version')}"
          + (f" from {source['path']}" if source.get("path") else ""))
    for f in source.get("files", []):
        # manifests written before "components" and "path" (relative to the source) were recorded name the file only
        used_by = ", ".join(f.get("components", [])) or "component not recorded"
        print(f"  source {f.get('path', f['name'])} -> {used_by} "
              f"({f['bytes']:,} bytes, sha256 {f.get('sha256') or 'not recorded'})")
    for name, info in manifest["components"].items():
        config = info.get("config") if isinstance(info.get("config"), dict) else {}
        dtypes = ", ".join(f"{k} x{v}" for k, v in dict(info.get("dtypes", {})).items())
        print(f"  {name}: {config.get('kind')}, {info.get('num_params', 0):,} parameters ({dtypes}), "
              f"from {info.get('layout')} layout")
        details = {k: v for k, v in config.items() if k != "kind"}
        print("    " + ", ".join(f"{k}={v}" for k, v in details.items()))
    return 0


def _add_info(commands) -> None:
    info = _subcommand(commands, "info", "describe a converted folder: its source files and components")
    info.add_argument("path", help="a folder written by the converter")
    info.set_defaults(run=_info)


def _clean(args: argparse.Namespace) -> int:
    from svd_jax.loader import cache_dir
    from svd_jax.store import remove_stale_scratch
    from svd_jax.train.checkpoints import IN_USE, remove_stale_temporaries

    converted = cache_dir() / "converted"
    missing = [f for f in args.folders if not Path(f).is_dir()]
    if missing:
        print(f"error: {missing[0]}: no such folder", file=sys.stderr)
        return EXIT_USAGE
    folders = [Path(f) for f in args.folders] or [Path.cwd(), converted, converted / ".sha256"]
    removed = [path for folder in folders for path in remove_stale_scratch(folder)]
    # a training run's checkpoint folder (FOLDER/checkpoints for its output folder): orbax's unfinished saves
    checkpoints = [f for folder in folders for f in (folder, folder / "checkpoints") if (f / IN_USE).is_file()]
    removed += [path for folder in checkpoints for path in remove_stale_temporaries(folder)]
    for path in removed:
        print(f"removed {path}")
    print(f"{len(removed)} leftover{'s' if len(removed) != 1 else ''} of stopped runs removed from "
          f"{', '.join(map(str, folders))}")
    return 0


def _add_clean(commands) -> None:
    clean = _subcommand(commands, "clean", "remove the partial files and folders that killed runs left behind")
    clean.add_argument("folders", nargs="*", help="where to look (default: the current folder and the conversion "
                                                  "cache), and in a training output folder its checkpoints; only "
                                                  "leftovers of stopped processes are removed")
    clean.set_defaults(run=_clean)


def _add_train(commands) -> None:
    from svd_jax.train.cli import add_arguments, run

    add_arguments(_subcommand(commands, "train", "fine-tune the UNet (see svd_jax.train.config)")).set_defaults(
        run=run)


def _add_compile(commands) -> None:
    from svd_jax.generation_plan import add_arguments, run

    add_arguments(_subcommand(commands, "compile", "compile a generation for a target (a TPU slice, gpu, cpu) "
                                                   "and report per-device memory and FLOPs")).set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="svd-jax", description="Stable Video Diffusion in JAX",
                                     formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_generate, _add_batch, _add_extend, _add_convert, _add_info, _add_clean, _add_train,
                _add_compile):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    from svd_jax.interrupt import sigint_interrupts

    args = build_parser().parse_args(argv)
    with sigint_interrupts():  # Ctrl-C, and SIGTERM/SIGHUP as Ctrl-C: each command cleans up and exits 130
        return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
