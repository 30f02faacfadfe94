"""``svd-jax train CONFIG``: fine-tune the UNet from a JSON/TOML config (see :mod:`svd_jax.train.config`).

Trains on every local device (data parallel; ``shard_params = true`` in the config also splits parameters and
optimizer state), resumes from ``output_dir/checkpoints`` when a checkpoint is there, shows a progress bar,
writes ``output_dir/losses.csv`` and the periodic samples, and at the end exports ``output_dir/model`` for
``svd_jax.load``. ``--set key=value`` overrides a config value (dotted key; the value is read as JSON when it
parses, else as a string), e.g. ``--set optimizer.learning_rate=3e-5 --set data.cache_dir=cache``.
"""

from __future__ import annotations

import argparse
import json
import sys

EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", help="training config, .json or .toml")
    parser.add_argument("--steps", type=int, help="train until this many steps are done (default: the config's steps)")
    parser.add_argument("--output-dir", help="where checkpoints, losses, samples and the model go (default: the config's output_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. optimizer.learning_rate=3e-5 (repeatable; default: none)")
    parser.add_argument("--single-device", action="store_true", help="train on the first device only (default: all local devices)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _overrides(args: argparse.Namespace) -> dict:
    values = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    if args.steps is not None:
        values["steps"] = args.steps
    if args.output_dir is not None:
        values["output_dir"] = args.output_dir
    return values


def run(args: argparse.Namespace) -> int:
    import jax

    from svd_jax.loader import enable_compilation_cache
    from svd_jax.sharding import make_mesh
    from svd_jax.train.config import load_config
    from svd_jax.train.trainer import Trainer

    try:
        config = load_config(args.config, _overrides(args))
        enable_compilation_cache()
        devices = jax.local_devices()
        mesh = make_mesh(devices) if len(devices) > 1 and not args.single_device else None
        trainer = Trainer(config, mesh=mesh, progress=not args.no_progress)
        print(f"training {trainer.num_trainable:,} parameters ({trainer.num_frozen:,} frozen) on "
              f"{mesh.size if mesh is not None else 1} device(s)"
              + (f", resuming at step {trainer.restored_step}" if trainer.restored_step is not None else ""))
        trainer.run()
        path = trainer.export()
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    how = (f"svd_jax.load({config.model!r}, lora={str(path)!r})" if config.lora.enabled else "svd_jax.load")
    print(f"wrote {path} (load it with {how}); losses in {trainer.log.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="svd-jax train", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
