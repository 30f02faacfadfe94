"""``svd-jax train CONFIG``: fine-tune the UNet from a JSON/TOML config (see :mod:`svd_jax.train.config`).

Trains on every local device (data parallel; ``shard_params = true`` in the config also splits parameters and
optimizer state), or with several processes (``--coordinator HOST:PORT --num-processes N --process-id I``, or
``--distributed`` on a cluster JAX reads its set-up from: :mod:`svd_jax.processes`) on every device of every
process, each reading its own part of every batch; resumes from ``output_dir/checkpoints`` when a checkpoint is there, shows a progress bar,
writes ``output_dir/losses.csv`` and the periodic samples, and at the end exports ``output_dir/model`` for
``svd_jax.load``. ``--set key=value`` overrides a config value (dotted key; the value is read as JSON when it
parses, else as a string), e.g. ``--set optimizer.learning_rate=3e-5 --set data.cache_dir=cache``.

``--plan [--target T] [--devices N] [--budget 80GiB] [--remat none|block|dots|auto] [--json PATH]`` trains nothing:
it compiles the config's step without weights and prints its per-device memory and FLOPs
(:mod:`svd_jax.train.plan`).
"""

from __future__ import annotations

import argparse
import json
import sys

from svd_jax import processes

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("config", help="training config, .json or .toml")
    parser.add_argument("--steps", type=int, help="train until this many steps are done (default: the config's steps)")
    parser.add_argument("--output-dir", help="where checkpoints, losses, samples and the model go (default: the config's output_dir)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. optimizer.learning_rate=3e-5 (repeatable; default: none)")
    parser.add_argument("--single-device", action="store_true", help="train on the first device only (default: all local devices)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    processes.add_arguments(parser, "one run: output_dir must be a folder every host sees")
    plan = parser.add_argument_group("memory plan (--plan: compile the train step without weights, do not train)")
    plan.add_argument("--plan", action="store_true",
                      help="print per-device memory (parameters, optimizer state, activations) and FLOPs per step, "
                           "train nothing")
    plan.add_argument("--target", default="local",
                      help="local (default: this machine's devices), gpu, cpu, or a TPU slice like tpu:v5p:2x2x1")
    plan.add_argument("--devices", type=int,
                      help="use this many of the target's devices (with --target cpu: simulate that many; "
                           "default: all of them)")
    plan.add_argument("--budget", help="per-device memory to fit, e.g. 80GiB or 24GB (default: none, no verdict)")
    plan.add_argument("--remat", choices=["none", "block", "dots", "auto"],
                      help="remat policy to plan (default: the config's); auto: the least recomputation that fits "
                           "--budget")
    plan.add_argument("--json", metavar="PATH", help="also write the plan(s) as JSON (default: print only)")
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


def _plan(args: argparse.Namespace) -> int:
    import jax

    if args.target == "cpu" and args.devices:  # simulated CPU devices: must be set before the backend starts
        try:
            jax.config.update("jax_num_cpu_devices", args.devices)
        except RuntimeError:  # started already (in a library user's process): resolve_target checks the count
            pass
    from svd_jax.compile_plan import resolve_target
    from svd_jax.train.config import load_config
    from svd_jax.train.plan import parse_bytes, plan

    try:
        budget = parse_bytes(args.budget) if args.budget else None
        if args.remat == "auto" and budget is None:
            raise ValueError("--remat auto chooses the policy for a --budget; give one")
        config = load_config(args.config, _overrides(args))
        target = resolve_target(jax.default_backend() if args.target == "local" else args.target, args.devices)
        plans = plan(config, target, args.remat, budget, log=print)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(plans[-1].table())
    if args.json:
        from pathlib import Path

        Path(args.json).write_text(json.dumps([p.to_dict() for p in plans], indent=2) + "\n")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.plan and (args.coordinator is not None or args.distributed):
        print("error: --plan compiles in this process alone; start it without --coordinator or --distributed",
              file=sys.stderr)
        return EXIT_USAGE
    if args.plan:
        return _plan(args)
    if any(getattr(args, k) not in (None, False, "local") for k in ("target", "devices", "budget", "remat", "json")):
        print("error: --target, --devices, --budget, --remat and --json apply only with --plan", file=sys.stderr)
        return EXIT_USAGE
    if args.single_device and (args.coordinator is not None or args.distributed):
        print("error: --single-device trains in one process; it does not go with --coordinator or --distributed",
              file=sys.stderr)
        return EXIT_USAGE
    import jax

    from svd_jax.loader import enable_compilation_cache
    from svd_jax.sharding import make_mesh
    from svd_jax.train.config import load_config
    from svd_jax.train.trainer import Trainer

    try:
        config = load_config(args.config, _overrides(args))
        processes.initialize(args)
        if jax.process_count() == 1 or jax.default_backend() == "gpu":
            # Several processes share the cache only where JAX gives them one key per program (GPU); elsewhere
            # only process 0 (its writer) would find its programs, and it would wait for the others' compilations
            # at the first collective, which the CPU collectives give up on after 30 s.
            enable_compilation_cache()
        devices = jax.devices()  # every process's (the local ones in a single process)
        mesh = make_mesh(devices) if len(devices) > 1 and not args.single_device else None
        trainer = Trainer(config, mesh=mesh, progress=not args.no_progress)
        if trainer.primary:
            print(f"training {trainer.num_trainable:,} parameters ({trainer.num_frozen:,} frozen) on "
                  f"{mesh.size if mesh is not None else 1} device(s)"
                  + (f" of {jax.process_count()} processes" if jax.process_count() > 1 else "")
                  + (f", resuming at step {trainer.restored_step}" if trainer.restored_step is not None else ""))
        trainer.run()
        path = trainer.export()
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # the run waited for a checkpoint save in progress: the next run resumes from it
        print("\ninterrupted; run the same command again to resume from the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    if trainer.primary:
        how = (f"svd_jax.load({config.model!r}, lora={str(path)!r})" if config.lora.enabled else "svd_jax.load")
        print(f"wrote {path} (load it with {how}); losses in {trainer.log.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = add_arguments(argparse.ArgumentParser(prog="svd-jax train", description=__doc__.splitlines()[0]))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
