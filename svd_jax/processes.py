"""Several processes running one program (JAX's multi-controller runtime: one process per host or per GPU, the
same command on every process): the command-line options that set it up, and a barrier.

``svd-jax batch`` and ``svd-jax train`` take the same options: ``--coordinator HOST:PORT --num-processes N
--process-id I`` for processes started by hand (``jax.distributed.initialize`` with those values), or
``--distributed`` on a cluster JAX reads its set-up from (SLURM, Open MPI, Kubernetes, Cloud TPU:
``jax.distributed.initialize()`` with no arguments). Initialisation must come before anything touches a device.
"""

from __future__ import annotations

import argparse

# Processes that arrive first wait this long for the others (a week: one process's share of a bulk run may end
# hours before another's, and the coordination service's barrier has no cost while waiting).
BARRIER_TIMEOUT_S = 7 * 24 * 3600


def add_arguments(parser: argparse.ArgumentParser, shared: str) -> None:
    """The set-up options, in their own group; ``shared`` says what the processes share (for the help)."""
    group = parser.add_argument_group(f"several processes (each started with the same options; they share {shared})")
    group.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, for processes started by "
                       "hand; needs --num-processes and --process-id (default: one process)")
    group.add_argument("--num-processes", type=int, help="how many processes, with --coordinator (default: 1)")
    group.add_argument("--process-id", type=int, help="this process's index, 0 to N-1, with --coordinator (default: 0)")
    group.add_argument("--distributed", action="store_true", help="set up from the cluster's environment "
                       "(SLURM, TPU pod slices, ...: jax.distributed.initialize() with no arguments)")


def initialize(args: argparse.Namespace) -> None:
    """``jax.distributed.initialize`` as the options of :func:`add_arguments` say (nothing without them); a
    ValueError for an incomplete or contradictory set."""
    given = [args.coordinator, args.num_processes, args.process_id]
    if any(v is not None for v in given) and not all(v is not None for v in given):
        raise ValueError("--coordinator, --num-processes and --process-id go together")
    if args.coordinator is not None and args.distributed:
        raise ValueError("--distributed reads the set-up from the environment: give it or --coordinator, not both")
    if args.coordinator is not None and not 0 <= args.process_id < args.num_processes:
        raise ValueError(f"--process-id must be in [0, {args.num_processes}), got {args.process_id}")
    import jax

    if args.coordinator is not None:
        jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                                   process_id=args.process_id)
    elif args.distributed:
        jax.distributed.initialize()


def wait_for_all(name: str, timeout_s: int = BARRIER_TIMEOUT_S) -> None:
    """Wait until every process has called this with the same ``name`` (use each name once per run). A barrier
    of the coordination service, not a device collective (``multihost_utils.sync_global_devices``), which the
    CPU collectives abandon after 30 s. Nothing to wait for in a single process."""
    import jax

    if jax.process_count() == 1:
        return
    from orbax.checkpoint import multihost

    multihost.get_barrier_sync_fn()(key=name, timeout_ms=int(timeout_s * 1000))
