"""Compile the generation's programs for a target without running them: per-device memory, FLOPs, a step estimate.

A target is a TPU slice (``"tpu:v5e:2x2"``, ``"tpu:v5p:2x2x1"``, ``"tpu:v6e:2x4"``), described by libtpu on any
machine (``pip install "svd_jax[tpu]"``; no TPU needed: the programs are compiled, never run), or the local
``"gpu"``/``"cpu"`` devices. The models are built abstractly (shapes only, no weights), placed on the mesh that
:func:`svd_jax.generate` would use there, and the guided denoising step and the VAE decode are lowered and
compiled for it. XLA's ``memory_analysis`` gives the bytes each device holds (arguments, outputs, temporaries),
``cost_analysis`` the FLOPs; the step time is estimated at the chip's published bf16 peak, a lower bound.

The pieces are reusable: :func:`resolve_target`, :func:`generation_mesh`, :func:`abstract_models`,
:func:`placed_state` and :func:`program_report` serve any program (a training step as well).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from svd_jax import sharding
from svd_jax.components import abstract_model
from svd_jax.configs import UNetConfig, VAEConfig
from svd_jax.policy import Policy

GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One device's memory and its dense bf16 peak (None where not published or not known)."""

    name: str
    memory_bytes: int | None
    peak_bf16_flops: float | None


# Per chip, as Google publishes them (HBM, dense bf16 FLOP/s).
TPU_CHIPS = {
    "v4": Chip("TPU v4", 32 * GiB, 275e12),
    "v5e": Chip("TPU v5e", 16 * GiB, 197e12),
    "v5p": Chip("TPU v5p", 95 * GiB, 459e12),
    "v6e": Chip("TPU v6e", 32 * GiB, 918e12),
}
# Local GPUs report their memory; their dense bf16 peak (SXM parts) is looked up by device kind.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}
MODELS = ("svd", "svd_xt", "tiny")
POLICIES = {"bfloat16": Policy.bfloat16, "float32": Policy.float32, "float16": Policy.float16}


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str
    devices: tuple
    chip: Chip


def resolve_target(spec: str, num_devices: int | None = None) -> Target:
    """``"tpu:<chip>:<topology>"`` (a slice of ``TPU_CHIPS``, e.g. ``tpu:v5e:2x2``), ``"gpu"`` or ``"cpu"`` (the
    local devices); ``num_devices`` takes the first devices only (a slice smaller than one host is described as
    the host's first devices: libtpu refuses ``v5e:1x1``)."""
    kind, _, rest = spec.partition(":")
    if kind == "tpu":
        chip_name, _, topology = rest.partition(":")
        if chip_name not in TPU_CHIPS or not topology:
            raise ValueError(f"--target {spec!r}: expected tpu:CHIP:TOPOLOGY with CHIP one of "
                             f"{', '.join(TPU_CHIPS)} and TOPOLOGY like 2x2 or 2x2x1")
        devices = _tpu_topology_devices(chip_name, topology, spec)
        chip = TPU_CHIPS[chip_name]
    elif kind in ("gpu", "cpu") and not rest:
        try:
            devices = jax.devices(kind)
        except RuntimeError as e:
            raise ValueError(f"--target {spec}: no {kind} devices here ({e})") from None
        chip = _local_chip(devices[0])
    else:
        raise ValueError(f"--target {spec!r}: expected tpu:CHIP:TOPOLOGY (e.g. tpu:v5e:2x2), gpu or cpu")
    if num_devices is not None:
        if not 1 <= num_devices <= len(devices):
            raise ValueError(f"--devices {num_devices}: the target has {len(devices)} devices")
        devices = devices[:num_devices]
    return Target(spec, kind, tuple(devices), chip)


def _tpu_topology_devices(chip_name: str, topology: str, spec: str):
    from jax.experimental import topologies

    # Only compiled for, never run: several processes (parallel tests) may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=f"{chip_name}:{topology}").devices
    except Exception as e:  # libtpu missing, or a topology it does not know
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--target {spec}: libtpu cannot describe it ({first}); it needs "
                         f"pip install 'jax[tpu]' and a topology of whole hosts (e.g. 2x2)") from None


def _local_chip(device) -> Chip:
    stats = {}
    try:
        stats = device.memory_stats() or {}
    except Exception:  # the CPU backend reports no memory statistics
        pass
    memory = stats.get("bytes_limit")
    if memory is None and device.platform == "cpu":
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    peak = next((p for name, p in GPU_PEAK_BF16.items() if name in device.device_kind), None)
    return Chip(device.device_kind, memory, peak)


def mesh_size(num_devices: int, rows: int) -> int:
    """How many devices split ``rows`` (the UNet's videos x guidance halves) evenly: the most, up to all."""
    return max(d for d in range(1, num_devices + 1) if rows % d == 0)


def generation_mesh(devices: Sequence, rows: int) -> Mesh:
    """The mesh to give :func:`svd_jax.generate` on these devices: the first :func:`mesh_size` of them, one
    ``"data"`` axis (more devices than rows would only hold copies)."""
    return sharding.make_mesh(list(devices)[:mesh_size(len(devices), rows)])


def abstract_models(model: str, policy: Policy) -> dict[str, Any]:
    """The UNet and VAE of a preset (``svd``, ``svd_xt`` or ``tiny``), built abstractly under ``policy``."""
    if model not in MODELS:
        raise ValueError(f"--model {model!r}: expected one of {', '.join(MODELS)}")
    unet = {"svd": UNetConfig.svd, "svd_xt": UNetConfig.svd_xt, "tiny": UNetConfig.tiny}[model]()
    vae = VAEConfig.tiny() if model == "tiny" else VAEConfig.svd()
    return {"unet": abstract_model("unet", unet, policy), "vae": abstract_model("vae", vae, policy)}


def placed_state(module, placement) -> tuple[Any, Any]:
    """``(graphdef, state)`` of an abstract module with each leaf a ``ShapeDtypeStruct`` carrying its sharding:
    ``placement`` is a sharding for every leaf, or ``sharding(path, shape)`` (:func:`sharding.param_sharder`)."""
    graph, state = nnx.split(module)

    def place(path, leaf):
        where = placement(jax.tree_util.keystr(path), leaf.shape) if callable(placement) else placement
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=where)

    return graph, jax.tree_util.tree_map_with_path(place, state)


def per_device_bytes(tree) -> int:
    """Bytes one device holds of the ``ShapeDtypeStruct`` leaves of ``tree`` (its shard of each)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize
    return total


# Custom calls that are attention kernels, by the name they lower to.
ATTENTION_KERNELS = {"tpu_custom_call": "pallas", "__cudnn$fmha": "cudnn"}


@dataclasses.dataclass
class ProgramReport:
    """One compiled program, per device: XLA's memory and cost analyses, and the attention kernels in it.
    ``refused``: the TPU compiler would not build it because its temporaries exceed the chip's memory;
    ``temp_bytes`` is then what it asked for, and the other sizes are unknown (0)."""

    name: str
    devices: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    code_bytes: int
    flops: float
    bytes_accessed: float
    kernels: dict[str, int]
    refused: bool = False

    def fits(self, memory_bytes: int | None) -> bool | None:
        """Whether the program fits a device of ``memory_bytes`` (None: unknown)."""
        if memory_bytes is None:
            return None
        return not self.refused and self.peak_bytes <= memory_bytes

    @property
    def peak_bytes(self) -> int:
        """What one device holds while the program runs: donated arguments are reused for outputs."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def program_report(name: str, lowered, devices: int, compiler_options: dict | None = None) -> ProgramReport:
    """Compile ``lowered`` (a ``jax.jit(...).lower(...)``) and read its per-device analyses."""
    text = lowered.as_text()
    kernels = {kind: text.count(call) for call, kind in ATTENTION_KERNELS.items() if call in text}
    try:
        compiled = lowered.compile(compiler_options=compiler_options)
    except jax.errors.JaxRuntimeError as e:
        # The TPU compiler refuses a program whose temporaries exceed the chip's memory: report what it needs.
        needed = _HBM_NEEDED.search(str(e))
        if needed is None:
            raise
        cost = _cost_dict(lowered.cost_analysis())
        return ProgramReport(name, devices, 0, 0, int(float(needed.group(1)) * GiB), 0, 0,
                             float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)), kernels,
                             refused=True)
    memory = compiled.memory_analysis()
    cost = _cost_dict(compiled.cost_analysis())
    return ProgramReport(name, devices, memory.argument_size_in_bytes, memory.output_size_in_bytes,
                         memory.temp_size_in_bytes, memory.alias_size_in_bytes, memory.generated_code_size_in_bytes,
                         float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0)), kernels)


# libtpu's words when a program cannot fit: "... memory required for HLO temporaries (22.71G) exceeds available HBM"
_HBM_NEEDED = re.compile(r"required for HLO temporaries \(([0-9.]+)G\) exceeds available HBM")


def _cost_dict(cost) -> dict:
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    return cost or {}
