"""``svd-jax compile``: will a generation fit a target, and how long would a step take at best?

For a target (:mod:`svd_jax.compile_plan`), the guided denoising step is compiled for the mesh that
:func:`svd_jax.generate` would use there, and the VAE decode of one chunk for the one device it runs on; the table
gives per-device memory from XLA's analysis against the chip's memory, FLOPs per step, and a step time at the chip's
bf16 peak. Nothing is run and no weights are needed, so a TPU slice can be checked from a laptop.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import SingleDeviceSharding

from svd_jax import compile_plan, sharding
from svd_jax.compile_plan import GiB, ProgramReport, Target
from svd_jax.denoiser import Conditioning, _euler_step
from svd_jax.vae import _decode

EXIT_USAGE = 2
QUICK = {"exec_time_optimization_effort": -1.0}


@dataclasses.dataclass
class GenerationPlan:
    target: str
    chip: str
    memory_bytes: int | None
    peak_bf16_flops: float | None
    target_devices: int
    mesh_devices: int
    model: str
    policy: str
    batch: int
    num_frames: int
    height: int
    width: int
    guided: bool
    rows: int
    shard_params: bool
    param_bytes_per_device: int
    step: ProgramReport
    decode: ProgramReport | None
    decode_chunk_size: int
    notes: list[str]

    @property
    def rows_per_device(self) -> int:
        return self.rows // self.mesh_devices

    @property
    def fits(self) -> bool | None:
        if self.memory_bytes is None:
            return None
        programs = [self.step] + ([self.decode] if self.decode else [])
        return all(p.fits(self.memory_bytes) for p in programs)

    @property
    def step_seconds_at_peak(self) -> float | None:
        """FLOPs per device over the chip's bf16 peak: no step can be faster (a bound, not a measurement)."""
        return self.step.flops / self.peak_bf16_flops if self.peak_bf16_flops else None

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out.update(rows_per_device=self.rows_per_device, fits=self.fits,
                   step_seconds_at_peak=self.step_seconds_at_peak, step_peak_bytes=self.step.peak_bytes,
                   decode_peak_bytes=self.decode.peak_bytes if self.decode else None)
        return out


def _step_program(models, mesh, *, batch, num_frames, height, width, guided, shard_params, options):
    """The denoising step as :func:`svd_jax.generate` lowers it on ``mesh``."""
    unet = models["unet"]
    placement = sharding.param_sharder(mesh, shard_params)
    graph, state = compile_plan.placed_state(unet, placement)
    rows = batch * (2 if guided else 1)
    factor = models["vae"].config.downsample_factor
    h, w = height // factor, width // factor

    def rows_sds(shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding.rows(mesh, shape[0], len(shape)))

    latents = rows_sds((batch, num_frames, h, w, unet.config.out_channels))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=sharding.replicated(mesh))
    cond = Conditioning(rows_sds((rows, 1, unet.config.cross_attention_dim[0])),
                                 rows_sds((rows, h, w, unet.config.in_channels - unet.config.out_channels)),
                                 rows_sds((rows, 3)),
                                 jax.ShapeDtypeStruct((num_frames,), jnp.float32, sharding=sharding.replicated(mesh))
                                 if guided else None)
    with sharding.mesh_context(mesh):
        lowered = _euler_step.lower(graph, mesh, state, latents, scalar, scalar, scalar, cond)
    report = compile_plan.program_report("denoising step", lowered, mesh.size, options)
    return report, compile_plan.per_device_bytes(state)


def _decode_program(target: Target, models, *, chunk, height, width, options):
    """One ``decode_chunk_size`` chunk of the VAE decode, on the first device (where generate decodes)."""
    vae = models["vae"]
    device = SingleDeviceSharding(target.devices[0])
    graph, state = compile_plan.placed_state(vae, device)
    factor = vae.config.downsample_factor
    z = jax.ShapeDtypeStruct((chunk, height // factor, width // factor, vae.config.latent_channels), jnp.float32,
                             sharding=device)
    with sharding.mesh_context(sharding.make_mesh(target.devices[:1])):  # the target's kernels (not this host's)
        lowered = _decode.lower(graph, state, z, chunk)
    return compile_plan.program_report(f"VAE decode x{chunk}", lowered, 1, options)


def _fitting_decode(target: Target, models, whole: ProgramReport, chunk: int, *, height, width, options):
    """``(chunk, report)``: a decode chunk below ``chunk`` that compiles within the chip's memory, or 1 frame.

    The memory a chunk needs is not proportional to its frames (the TPU compiler needs 22.7 GiB for 25 frames
    of SVD-XT at 576x1024 but 17.1 GiB for 17): each try takes the line through the last two chunks' needs (the
    first through the fixed arguments and code) to the chip's memory, until one compiles and fits."""
    limit = target.chip.memory_bytes
    fixed = whole.peak_bytes - whole.temp_bytes - whole.output_bytes
    tried = [(0, fixed), (chunk, whole.peak_bytes)]
    report = whole
    while chunk > 1 and not report.fits(limit):
        (c0, need0), (c1, need1) = tried[-2:]
        per_frame = max(1.0, (need1 - need0) / (c1 - c0))
        chunk = max(1, min(c1 - 1, c1 - math.ceil((need1 - limit) / per_frame)))
        report = _decode_program(target, models, chunk=chunk, height=height, width=width, options=options)
        tried.append((chunk, report.peak_bytes))
    return chunk, report


def plan_generation(target: Target, *, model: str = "svd_xt", policy: str = "bfloat16", batch: int = 1,
                    num_frames: int | None = None, height: int = 576, width: int = 1024, guided: bool = True,
                    shard_params: bool = False, decode_chunk_size: int | None = None,
                    decode: bool = True, compiler_options: dict | None = None) -> GenerationPlan:
    """Compile a generation's step (and decode) for ``target`` and report them (see the module's docstring).

    Without ``decode_chunk_size`` the decode is compiled for all frames at once, as :func:`svd_jax.generate`
    decodes by default; when that does not fit, for smaller chunks until one does, which the notes name.
    ``compiler_options`` go to XLA (``{"exec_time_optimization_effort": -1.0}`` compiles faster)."""
    if policy not in compile_plan.POLICIES:
        raise ValueError(f"--policy {policy!r}: expected one of {', '.join(compile_plan.POLICIES)}")
    numerics = compile_plan.POLICIES[policy]()
    models = compile_plan.abstract_models(model, numerics)
    num_frames = num_frames or models["unet"].config.num_frames
    multiple = models["vae"].config.downsample_factor * models["unet"].config.downsample_factor
    for value, name in ((batch, "batch"), (num_frames, "num-frames"), (height, "height"), (width, "width"),
                        (decode_chunk_size or 1, "decode-chunk-size")):
        if value < 1:
            raise ValueError(f"--{name} must be positive, got {value}")
    if height % multiple or width % multiple:
        raise ValueError(f"--height and --width must be multiples of {multiple}, got {height}x{width}")
    chunk = decode_chunk_size or num_frames
    notes: list[str] = []
    rows = batch * (2 if guided else 1)
    mesh = compile_plan.generation_mesh(target.devices, rows)
    step, param_bytes = _step_program(models, mesh, batch=batch, num_frames=num_frames, height=height,
                                      width=width, guided=guided, shard_params=shard_params, options=compiler_options)
    decoded = None
    if decode:
        decoded = _decode_program(target, models, chunk=chunk, height=height, width=width, options=compiler_options)
        if decoded.fits(target.chip.memory_bytes) is False and chunk > 1 and decode_chunk_size is None:
            whole = decoded
            chunk, decoded = _fitting_decode(target, models, whole, chunk, height=height, width=width,
                                             options=compiler_options)
            advice = (f"pass decode_chunk_size={chunk} (--decode-chunk-size {chunk})" if decoded.fits(
                target.chip.memory_bytes) else "not even one frame fits")
            notes.append(f"decoding all {num_frames} frames at once needs {_gib(whole.peak_bytes)} per device: "
                         + advice)
    return GenerationPlan(target.name, target.chip.name, target.chip.memory_bytes, target.chip.peak_bf16_flops,
                          len(target.devices), mesh.size, model, policy, batch, num_frames, height, width, guided,
                          rows, shard_params, param_bytes, step, decoded, chunk, notes)


def _gib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2 ** 20:.1f} MiB"


def format_plan(plan: GenerationPlan) -> str:
    memory = _gib(plan.memory_bytes)
    split = f"{plan.rows} UNet rows ({plan.batch} video{'s' if plan.batch > 1 else ''}"
    split += " x 2 guidance halves)" if plan.guided else ")"
    params = "sharded across the mesh (FSDP)" if plan.shard_params else "replicated"
    lines = [
        f"target        {plan.target}: {plan.target_devices} x {plan.chip}, {memory} each (compiled, not run)",
        f"generation    {plan.model}, {plan.num_frames} frames {plan.height}x{plan.width}, {plan.policy}, "
        f"guidance {'on' if plan.guided else 'off'}",
        f"mesh          {plan.mesh_devices} of {plan.target_devices} devices ('data' axis): {split}, "
        f"{plan.rows_per_device} per device",
        f"parameters    {params}: {_gib(plan.param_bytes_per_device)} per device",
        "",
        f"{'program':<16}{'devices':>8}{'arguments':>12}{'temporaries':>13}{'outputs':>11}{'peak':>11}"
        f"{'TFLOP/device':>14}  attention",
    ]
    for p in [plan.step] + ([plan.decode] if plan.decode else []):
        kernels = ", ".join(f"{k} x{n}" for k, n in p.kernels.items()) or "xla"
        kernels += "  (refused by the compiler: temporaries exceed the chip)" if p.refused else ""
        lines.append(f"{p.name:<16}{p.devices:>8}{_gib(p.argument_bytes):>12}{_gib(p.temp_bytes):>13}"
                     f"{_gib(p.output_bytes):>11}{_gib(p.peak_bytes):>11}{p.flops / 1e12:>14.2f}  {kernels}")
    lines.append("")
    if plan.fits is None:
        lines.append("fits          unknown (the device reports no memory limit)")
    else:
        lines.append(f"fits          {'yes' if plan.fits else 'NO'}: peak per device vs {memory}")
    if plan.step_seconds_at_peak is not None:
        steps = plan.step_seconds_at_peak
        lines.append(f"step estimate >= {steps:.3f} s per step at the chip's bf16 peak "
                     f"({plan.peak_bf16_flops / 1e12:.0f} TFLOP/s; an estimate, not a measurement)")
    lines.extend(f"note          {note}" for note in plan.notes)
    if plan.fits is False:
        lines.append("does not fit: " + _advice(plan))
    return "\n".join(lines)


def _advice(plan: GenerationPlan) -> str:
    tips = []
    if plan.step.fits(plan.memory_bytes) is False:
        if plan.mesh_devices < plan.rows and plan.target_devices > plan.mesh_devices:
            tips.append("more devices to split the rows (guidance halves on two chips: a target with >= 2 chips)")
        if not plan.shard_params and plan.mesh_devices > 1:
            tips.append("--shard-params (FSDP: each device holds 1/N of the parameters)")
        tips.append("fewer frames or a smaller size")
    if plan.decode and plan.decode.fits(plan.memory_bytes) is False:
        tips.append(f"a --decode-chunk-size below {plan.decode_chunk_size}")
    return "; ".join(tips)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--target", required=True,
                        help="tpu:CHIP:TOPOLOGY (chips v4, v5e, v5p, v6e; e.g. tpu:v5e:2x2, tpu:v5p:2x2x1), "
                             "gpu or cpu (the local devices) (required, no default)")
    parser.add_argument("--devices", type=int, help="use only the target's first N devices (e.g. 1 chip of a host; "
                        "default: all of them)")
    parser.add_argument("--model", default="svd_xt", choices=compile_plan.MODELS, help="architecture (no weights)")
    parser.add_argument("--policy", default="bfloat16", choices=list(compile_plan.POLICIES),
                        help="numerics the programs are compiled in")
    parser.add_argument("--num-frames", type=int, help="default: the model's trained frame count")
    parser.add_argument("--height", type=int, default=576, help="frame height in pixels")
    parser.add_argument("--width", type=int, default=1024, help="frame width in pixels")
    parser.add_argument("--batch", type=int, default=1, help="videos generated together")
    parser.add_argument("--no-guidance", action="store_true", help="max_guidance_scale <= 1: no unconditional half")
    parser.add_argument("--shard-params", action="store_true", help="split parameters across the mesh (FSDP)")
    parser.add_argument("--decode-chunk-size", type=int, help="frames per VAE decode (default: all frames)")
    parser.add_argument("--no-decode", action="store_true", help="compile the denoising step only")
    parser.add_argument("--quick", action="store_true",
                        help="XLA's lowest optimisation effort: compiles several times faster; figures less exact")
    parser.add_argument("--json", type=Path, help="also write the report to this JSON file (default: none)")
    return parser


def run(args: argparse.Namespace) -> int:
    try:
        if args.json is not None and not args.json.parent.is_dir():
            raise ValueError(f"--json {args.json}: no folder {args.json.parent}")
        target = compile_plan.resolve_target(args.target, args.devices)
        plan = plan_generation(target, model=args.model, policy=args.policy, batch=args.batch,
                               num_frames=args.num_frames, height=args.height, width=args.width,
                               guided=not args.no_guidance, shard_params=args.shard_params,
                               decode_chunk_size=args.decode_chunk_size, decode=not args.no_decode,
                               compiler_options=QUICK if args.quick else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(format_plan(plan))
    if args.json is not None:
        args.json.write_text(json.dumps(plan.to_json(), indent=2) + "\n")
    return 0
