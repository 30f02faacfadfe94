"""``svd-jax train CONFIG --plan``: will a fine-tuning run fit, before any weight is loaded or step is run?

The training step of the config (its frames, size, batch, trainable set or LoRA, remat policy, compute dtype
and parameter sharding) is built from abstract models (shapes only), placed on a target's devices as
:class:`~svd_jax.train.trainer.Trainer` places it, lowered and compiled (never run). Per device it reports the
bytes of the trainable parameters, the frozen parameters, the optimizer state and the step's inputs (from the
placed shapes), the activations and temporaries XLA allocates (``memory_analysis``: everything the backward pass
keeps, minus what remat recomputes), the peak (arguments + outputs - donated + temporaries), the FLOPs per step
(``cost_analysis``), and whether the peak fits a budget. Targets are those of ``svd-jax compile``
(:func:`svd_jax.compile_plan.resolve_target`): the local devices, or a TPU slice described without a TPU.

``remat="auto"`` compiles the policies from the least recomputation to the most (none, dots, block) and keeps
the first that fits the budget (or the smallest, when none does).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import SingleDeviceSharding

from svd_jax import sharding
from svd_jax.compile_plan import GiB, ProgramReport, Target, per_device_bytes, program_report
from svd_jax.components import abstract_model
from svd_jax.configs import UNetConfig, VAEConfig
from svd_jax.store import MANIFEST, read_config, read_manifest
from svd_jax.policy import Policy
from svd_jax.train.conditioning import ClipFeatures
from svd_jax.train.config import TrainConfig
from svd_jax.train.params import prepare_unet, training_policy
from svd_jax.train.placement import Layout, check_batch_size, tree_shardings
from svd_jax.train.step import TrainStep, init_state

# Architectures by name, for plans without a converted folder.
PRESETS = {"svd": (UNetConfig.svd, VAEConfig.svd), "svd_xt": (UNetConfig.svd_xt, VAEConfig.svd),
           "tiny": (UNetConfig.tiny, VAEConfig.tiny)}
# From the least recomputation (most memory) to the most.
AUTO_ORDER = ("none", "dots", "block")
QUICK_COMPILE = {"exec_time_optimization_effort": -1.0}  # the analyses do not need an optimised schedule


@dataclasses.dataclass
class TrainPlan:
    target: str
    chip: str
    devices: int
    remat: str
    trainable: str
    num_trainable: int
    num_frozen: int
    batch_size: int
    num_frames: int
    height: int
    width: int
    compute_dtype: str
    shard_params: bool
    trainable_bytes: int  # per device, like every byte count here
    frozen_bytes: int
    optimizer_bytes: int
    input_bytes: int  # the clip features and the VAE (for the conditioning latent)
    step: ProgramReport
    budget_bytes: int | None

    @property
    def peak_bytes(self) -> int:
        return self.step.peak_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.peak_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(peak_bytes=self.peak_bytes, fits=self.fits, activation_bytes=self.step.temp_bytes,
                   flops_per_step=self.step.flops * self.devices)
        return out

    def table(self) -> str:
        def gib(n):
            return f"{n / GiB:8.2f} GiB" if n >= GiB / 10 else f"{n / 2 ** 20:8.2f} MiB"

        budget = "" if self.budget_bytes is None else (
            f" -> {'fits' if self.fits else 'does NOT fit'} {self.budget_bytes / GiB:.0f} GiB")
        lines = [
            f"train step plan (compiled, not run) for {self.target} ({self.chip}), {self.devices} device(s)",
            f"  {self.batch_size} x {self.num_frames} frames {self.height}x{self.width}, compute {self.compute_dtype}, "
            f"remat {self.remat}, {self.trainable}: {self.num_trainable:,} trainable / {self.num_frozen:,} frozen"
            + (", parameters sharded" if self.shard_params else ""),
            "  per device:",
            f"    trainable parameters     {gib(self.trainable_bytes)}",
            f"    frozen parameters        {gib(self.frozen_bytes)}",
            f"    optimizer state          {gib(self.optimizer_bytes)}",
            f"    inputs (features, VAE)   {gib(self.input_bytes)}",
            f"    activations/temporaries  {gib(self.step.temp_bytes)}",
            f"    peak                     {gib(self.peak_bytes)}{budget}",
            f"  {self.step.flops * self.devices / 1e12:.4g} TFLOP per step ({self.step.flops / 1e12:.4g} per device)",
        ]
        return "\n".join(lines)


def model_configs(model: str) -> tuple[UNetConfig, VAEConfig]:
    """The UNet and VAE architectures of ``model``: a preset name, or a converted folder's configs."""
    if model in PRESETS:
        unet, vae = PRESETS[model]
        return unet(), vae()
    folder = Path(model)
    if not (folder / MANIFEST).is_file():
        raise ValueError(f"--plan reads the architecture from a converted folder or a preset "
                         f"({', '.join(PRESETS)}); {model!r} is neither")
    read_manifest(folder)
    return read_config(folder / "unet", "unet"), read_config(folder / "vae", "vae")


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _placed(tree, where):
    """``tree`` as ``ShapeDtypeStruct``s with the sharding ``where(leaf)``."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where(a)), tree)


def plan_step(config: TrainConfig, target: Target, remat: str | None = None,
              budget_bytes: int | None = None) -> TrainPlan:
    """Compile ``config``'s training step for ``target`` with ``remat`` (default: the config's)."""
    remat = config.remat if remat is None else remat
    unet_config, vae_config = model_configs(config.model)
    unet = abstract_model("unet", unet_config, training_policy(config, remat))
    structure, trainable, frozen = prepare_unet(unet, config)
    vae = abstract_model("vae", vae_config, Policy.float32())

    devices = list(target.devices)
    mesh = sharding.make_mesh(devices) if len(devices) > 1 else None
    layout = Layout(mesh, config.shard_params, config.shard_min_size)
    check_batch_size(config.batch_size, layout)
    step = TrainStep(structure, vae, config.objective, config.optimizer, layout)
    state = jax.eval_shape(lambda p: init_state(p, step.optimizer, config.seed), _abstract(trainable))
    frozen, vae_state = _abstract(frozen), _abstract(nnx.split(vae)[1])
    if mesh is None:
        one = SingleDeviceSharding(devices[0])
        state, frozen, vae_state = (_placed(t, lambda a: one) for t in (state, frozen, vae_state))
    else:  # as the trainer places them (svd_jax.train.placement)
        state, frozen = (jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), t,
                                      tree_shardings(t, layout)) for t in (state, frozen))
        replicated = sharding.replicated(mesh)
        vae_state = _placed(vae_state, lambda a: replicated)
    features = _features(config, unet_config, vae_config, mesh, devices[0])
    lowered = step.lower(state, frozen, vae_state, features)
    report = program_report("train_step", lowered, len(devices), QUICK_COMPILE)
    c = config
    return TrainPlan(
        target.name, target.chip.name, len(devices), remat,
        f"LoRA rank {c.lora.rank} ({', '.join(c.lora.targets)})" if c.lora.enabled else f"trainable {c.optimizer.trainable}",
        sum(a.size for a in jax.tree.leaves(state.params)), sum(a.size for a in jax.tree.leaves(frozen)),
        c.batch_size, c.data.num_frames, c.data.height, c.data.width, c.compute_dtype, c.shard_params,
        per_device_bytes(state.params), per_device_bytes(frozen), per_device_bytes(state.opt_state),
        per_device_bytes(features) + per_device_bytes(vae_state), report, budget_bytes)


def _features(config: TrainConfig, unet_config: UNetConfig, vae_config: VAEConfig, mesh, device) -> ClipFeatures:
    b, f, d = config.batch_size, config.data.num_frames, config.data
    factor = vae_config.downsample_factor
    if d.height % factor or d.width % factor:
        raise ValueError(f"data.height and data.width must be multiples of {factor}, got {d.height}x{d.width}")
    latent = (b, f, d.height // factor, d.width // factor, vae_config.latent_channels)
    shapes = ClipFeatures(latent, latent, (b, unet_config.cross_attention_dim[0]), (b, d.height, d.width, 3), (b,), (b,))

    def placed(shape):
        where = SingleDeviceSharding(device) if mesh is None else sharding.rows(mesh, b, len(shape))
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=where)

    return ClipFeatures(*(placed(s) for s in shapes))


def plan(config: TrainConfig, target: Target, remat: str | None = None, budget_bytes: int | None = None,
         log=None) -> list[TrainPlan]:
    """One plan, or with ``remat="auto"`` the plans compiled until one fits ``budget_bytes`` (the chosen one last)."""
    if remat != "auto":
        return [plan_step(config, target, remat, budget_bytes)]
    plans = []
    for policy in AUTO_ORDER:
        plans.append(plan_step(config, target, policy, budget_bytes))
        if log:
            log(f"remat {policy}: peak {plans[-1].peak_bytes / GiB:.2f} GiB per device")
        if budget_bytes is None or plans[-1].fits:
            break
    if not plans[-1].fits:
        plans.append(min(plans, key=lambda p: p.peak_bytes))
    return plans


def parse_bytes(text: str) -> int:
    """``"80GiB"``, ``"24GB"``, ``"512MiB"``, ``"1e9"`` -> bytes."""
    units = {"kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40, "kb": 10 ** 3, "mb": 10 ** 6,
             "gb": 10 ** 9, "tb": 10 ** 12, "b": 1, "": 1}
    s = text.strip().lower()
    number = s.rstrip("kmgtib")
    unit = s[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise ValueError(f"--budget {text!r}: expected a size like 80GiB, 24GB or 512MiB")
    return int(value * units[unit])
