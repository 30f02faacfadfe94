"""``svd-jax batch JOBS -o OUTDIR``: one video per job of a folder of images or a JSONL/CSV file (see
:mod:`svd_jax.bulk`), resumable, on one process or several (``--coordinator``/``--num-processes``/
``--process-id`` on one machine, ``--distributed`` on a cluster that JAX sets up from its environment).

Exit code: 0 when every job is done or was already there, 1 when some failed (each named with its reason;
process 0 reports every process's jobs, the others their own),
2 for bad input found before any work (a malformed jobs file, an unknown model), 130 after Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys

from svd_jax import processes

EXIT_FAILED_JOBS = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def add_arguments(g: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from svd_jax.cli_generate import add_generation_options

    g.add_argument("jobs", help="a folder of images (one video each, named after the image) or a .jsonl/.csv file "
                   "with one job per line: image, optional output, seed, num_frames, motion_bucket_id, fps, ...")
    g.add_argument("-o", "--output", required=True, help="the folder the videos, their settings (VIDEO.json) and "
                   "batch-summary.json go to; videos already there are skipped (required, no default)")
    g.add_argument("--suffix", default=".mp4", help="format of outputs a job does not name: .mp4, .gif, .webp, or "
                   "'' for folders of png frames")
    g.add_argument("--batch-size", type=int, help="videos generated together (default: one per local device)")
    add_generation_options(g)
    seed = next(a for a in g._actions if a.dest == "seed")
    seed.default, seed.help = 0, "job i without its own seed uses SEED + i, so a rerun makes the same videos"
    processes.add_arguments(g, "the jobs")
    return g


def run(args: argparse.Namespace) -> int:
    from svd_jax import __version__
    from svd_jax.bulk import batch, read_jobs
    from svd_jax.cli_generate import policy_named, sampler_settings
    from svd_jax.loader import TINY, enable_compilation_cache, load, model_configs, resolve
    from svd_jax.video import check_fps

    try:  # everything a user can get wrong is checked before the models are loaded
        jobs = read_jobs(args.jobs, seed=args.seed, suffix=args.suffix)
        source = args.model if args.model == TINY else resolve(args.model)
        missing = [c for c in ("image_encoder", "unet", "vae") if c not in model_configs(source)]
        if missing:
            raise ValueError(f"{source} has no {', '.join(missing)}: generation needs all three components")
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be a positive integer, got {args.batch_size}")
        check_fps(sampler_settings(args).get("fps", 7))  # every video's frame rate, before any is made
        processes.initialize(args)
    except (OSError, ValueError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    try:
        enable_compilation_cache()
        models = load(source, policy=policy_named(args.policy))
        summary = batch(jobs, models, args.output, batch_size=args.batch_size,
                        record={"svd_jax": __version__, "model": str(args.model), "policy": str(models.policy)},
                        **sampler_settings(args))
    except (OSError, ValueError, RuntimeError, ImportError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:  # every video is written atomically: what is there is complete
        print("\ninterrupted; run the same command again to finish the remaining jobs", file=sys.stderr)
        return EXIT_INTERRUPTED
    for name, reason in sorted(summary.failed.items()):
        print(f"failed: {name}: {reason}", file=sys.stderr)
    print(f"{args.output}: {summary.line()}")
    return EXIT_FAILED_JOBS if summary.failed else 0
