"""``svd_jax.load``: restore a converted folder's components as NNX modules under a :class:`Policy`."""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from svd_jax.checkpoint import PARAMS_DIR, Sharder, restore_model
from svd_jax.components import COMPONENT_CONFIGS, abstract_model
from svd_jax.configs import CLIPVisionConfig, UNetConfig, VAEConfig, config_from_dict
from svd_jax.errors import stage
from svd_jax.policy import Policy
from svd_jax.store import MANIFEST, atomic_file, hash_file, read_config, read_manifest, verify_component

TINY = "tiny"
# What is fetched from a diffusers repo on the Hub: configs and the weights of the three components.
HUB_COMPONENT_FILES = {
    "fp16": ["unet/diffusion_pytorch_model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
             "image_encoder/model.fp16.safetensors"],
    "fp32": ["unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
             "image_encoder/model.safetensors"],
}
# The tiny random model's own generation settings (SVDModels.settings): small enough that a whole generation
# takes seconds on a CPU. Its VAE downsamples by 2 (not 8), so at the released models' 576x1024 its UNet would
# attend over 147,456 latent tokens: many GB and many minutes for a video of noise.
TINY_SETTINGS = {"height": 64, "width": 96, "num_frames": 4, "num_inference_steps": 2}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass
class SVDModels:
    """The restored components of a converted folder (a component the folder lacks is None)."""

    path: Path
    policy: Policy
    manifest: dict[str, Any]
    image_encoder: Any = None
    unet: Any = None
    vae: Any = None
    # generation settings this model suggests for arguments a call does not give (the tiny model's small size);
    # empty for real models, which take diffusers' defaults
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)

    def require(self, *components: str) -> None:
        """Raise a clear error if a component needed for the task at hand was not converted."""
        missing = [c for c in components if getattr(self, c) is None]
        if missing:
            raise ValueError(f"{self.path} has no {', '.join(missing)} (convert a source that contains it)")


def cache_dir() -> Path:
    """Where sources converted by :func:`load` are kept: ``$SVD_JAX_CACHE`` or ``~/.cache/svd_jax``."""
    return Path(os.environ.get("SVD_JAX_CACHE", Path.home() / ".cache" / "svd_jax"))


def enable_compilation_cache() -> None:
    """Turn on JAX's persistent compilation cache in ``cache_dir()/xla``, so a second process reaches its first
    step without recompiling. This changes process-wide JAX settings, so the library never calls it on its own:
    the CLI and the benchmarks do, and a notebook or script calls ``svd_jax.enable_compilation_cache()`` once
    before its first ``generate``. A cache folder the user configured (``jax_compilation_cache_dir`` or
    ``JAX_COMPILATION_CACHE_DIR``) wins; ``SVD_JAX_COMPILATION_CACHE=0`` turns this off. Programs that compile
    in over 0.1 s are kept (JAX's default, 1 s, would recompile the preprocessing's small programs each time)
    unless ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` says otherwise."""
    if os.environ.get("SVD_JAX_COMPILATION_CACHE", "1") == "0" or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "xla"))
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)


def _file_sha256(path: Path, memo: Path) -> str:
    """The sha256 of a file's contents, remembered under ``memo`` for as long as the file's inode, size, mtime and
    ctime stay the same (ctime changes on every write and cannot be set back), so a large source is hashed once."""
    stat = path.stat()
    identity = f"{path.resolve()}:{stat.st_ino}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}"
    remembered = memo / hashlib.sha256(identity.encode()).hexdigest()
    if remembered.is_file():
        return remembered.read_text().strip()
    digest = hash_file(path)
    memo.mkdir(parents=True, exist_ok=True)
    with atomic_file(remembered) as partial:
        partial.write_text(digest.hexdigest())
    return digest.hexdigest()


def _source_key(source: Path, memo: Path) -> str:
    """A key for what a source holds: the contents of its weight and config files, by their place in the source;
    never its path or dates, so a changed file is never served from a stale conversion."""
    files = [source] if source.is_file() else sorted(p for pattern in ("*.safetensors", "*.json")
                                                     for p in source.rglob(pattern) if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        name = f.name if f == source else f.relative_to(source).as_posix()
        digest.update(f"{name}:{_file_sha256(f, memo)}\n".encode())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (waits while another process holds it; released by the kernel if
    the holder dies)."""
    with lock_path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _converted_copy(source: Path) -> Path:
    """Convert a PyTorch source once into the cache and return the converted folder. A second process asking for
    the same source meanwhile waits for the first one's conversion and then uses it."""
    from convert import convert  # the converter is only needed for unconverted sources

    root = cache_dir() / "converted"
    root.mkdir(parents=True, exist_ok=True)
    target = root / f"{source.stem}-{_source_key(source, root / '.sha256')}"
    with _exclusive(root / f".{target.name}.lock"):
        if not (target / MANIFEST).is_file():
            files = [source] if source.is_file() else list(source.rglob("*.safetensors"))
            size = sum(f.stat().st_size for f in files)
            print(f"converting {source} ({size / 2**30:.2f} GiB of safetensors) into {target} once; later loads "
                  "reuse it", file=sys.stderr, flush=True)
            convert(source, target, force=target.exists())
            written = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
            print(f"converted into {target} ({written / 2**30:.2f} GiB)", file=sys.stderr, flush=True)
    return target


def _download(repo_id: str, variant: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"loading {repo_id!r} from the Hugging Face Hub needs huggingface_hub: "
                          "pip install 'svd_jax[hub]'") from None
    patterns = ["model_index.json", "*/config.json", *HUB_COMPONENT_FILES[variant]]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # offline, gated, missing: the hub's own exception types vary by version
        reason = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RuntimeError(
            f"cannot download {repo_id!r} from the Hugging Face Hub ({type(e).__name__}: {reason}). "
            "Offline? Gated models need `hf auth login` (huggingface_hub's command) and the license accepted "
            "on the model page; "
            "or download the files yourself and pass the folder."
        ) from None


def resolve(source, hub_variant: str = "fp16") -> Path:
    """The converted folder for ``source``: a converted folder as is; a diffusers folder or original
    ``.safetensors`` file converted once into :func:`cache_dir`; a Hub id (``org/name``) downloaded, then converted."""
    path = Path(source).expanduser()
    if path.exists():
        return path if (path / MANIFEST).is_file() else _converted_copy(path)
    if isinstance(source, str) and _HUB_ID.match(source):
        if hub_variant not in HUB_COMPONENT_FILES:
            raise ValueError(f"hub_variant must be one of {sorted(HUB_COMPONENT_FILES)}, got {hub_variant!r}")
        return _converted_copy(_download(source, hub_variant))
    raise FileNotFoundError(f"{source}: no such file or folder, and not a Hugging Face repo id (org/name)")


def _standard_normal(rng: np.random.Generator, shape) -> np.ndarray:
    return rng.standard_normal(shape, dtype=np.float32)


def _random_model(component: str, config, policy: Policy, rng: np.random.Generator, draw=_standard_normal):
    """A module with small random weights drawn on the host (no per-parameter device initialisation), placed on
    the first device as :func:`load` places restored weights, so both compile to the same programs (a committed
    argument changes the compiled program, and with it the persistent cache's key)."""
    graphdef, params, rest = nnx.split(abstract_model(component, config, policy), nnx.Param, ...)
    device = jax.local_devices()[0]
    for path, var in nnx.to_flat_state(params):
        shape = var.get_value().shape
        fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        var.set_value(jax.device_put(jnp.asarray(draw(rng, shape) * np.float32(fan_in ** -0.5), policy.param), device))
    return nnx.merge(graphdef, params, rest)


def random_models(configs: dict, policy: Policy | None = None, seed: int = 0, name: str = "random",
                  draw=_standard_normal) -> SVDModels:
    """Components with random weights for ``configs`` (``{"unet": UNetConfig.svd_xt(), ...}``): for tests,
    benchmarks and trying the whole path without a checkpoint. The outputs are noise.

    ``draw(rng, shape)`` gives unit-variance float32 values (scaled by ``fan_in ** -0.5`` here); the default draws
    fresh normals, which takes tens of seconds for the full-size models."""
    policy = policy or Policy.float32()
    rng = np.random.default_rng(seed)
    models = SVDModels(Path(name), policy, {"components": {c: {"config": cfg.to_dict()} for c, cfg in configs.items()}})
    for component, config in configs.items():
        setattr(models, component, _random_model(component, config, policy, rng, draw))
    return models


def tiny_configs() -> dict:
    """The tiny model's component configs: a 2-layer CLIP tower (width 32), a 2-level UNet (32/64 channels), a
    VAE with 32/64 channels that downsamples by 2."""
    return {"image_encoder": CLIPVisionConfig.tiny(), "unet": UNetConfig.tiny(), "vae": VAEConfig.tiny()}


def tiny_models(policy: Policy | None = None, seed: int = 0) -> SVDModels:
    """Tiny randomly initialised components: the whole pipeline runs in seconds; the output is noise. Generation
    defaults to the tiny model's own small settings (:data:`TINY_SETTINGS`)."""
    models = random_models(tiny_configs(), policy, seed, name=TINY)
    models.settings = dict(TINY_SETTINGS)
    return models


def model_configs(path) -> dict:
    """``{component: config}`` of ``"tiny"`` or a converted folder, read without loading any weights (to check
    generation arguments before loading)."""
    if path == TINY:
        return tiny_configs()
    manifest = read_manifest(path)
    return {name: config_from_dict(info["config"]) for name, info in manifest.get("components", {}).items()}


def load(path, policy: Policy | None = None, components=None, sharding: Sharder | None = None,
         hub_variant: str = "fp16", lora=None, lora_scale: float = 1.0, merge_lora: bool = True,
         verify: bool = True) -> SVDModels:
    """Restore the components (all by default) of a converted folder with the policy's dtypes.

    ``path`` may also be an unconverted diffusers folder or original single file (converted once into
    :func:`cache_dir` and reused), a Hugging Face repo id (needs the ``hub`` extra), or ``"tiny"`` for tiny random
    models. The policy defaults to bfloat16 on accelerators and float32 on CPU. Each component's files are checked
    against the checksum recorded when the folder was written (a corrupted or edited folder is refused);
    ``verify=False`` skips that (it reads every byte once: about a second per GB).

    ``lora``: a UNet LoRA file (``lora.safetensors`` from ``svd-jax train``, or a diffusers/PEFT one) applied with
    ``lora_scale``: merged into the UNet's weights, or with ``merge_lora=False`` kept as adapters whose scale
    :func:`svd_jax.lora.set_scale` changes between calls.
    """
    policy = policy or Policy.default()
    adapters = None
    if lora is not None:
        from svd_jax.lora import read_adapters

        if components is not None and "unet" not in components:
            raise ValueError("lora= adapts the UNet: include 'unet' in components")
        adapters = read_adapters(lora)  # before any weight is loaded: a bad file fails fast
    models = (tiny_models(policy) if path == TINY
              else _load_folder(path, policy, components, sharding, hub_variant, verify))
    if adapters is not None:
        from svd_jax.lora import apply_adapters

        models.require("unet")
        apply_adapters(models.unet, adapters, lora_scale, merge_lora)
    return models


def _load_folder(path, policy: Policy, components, sharding: Sharder | None, hub_variant: str,
                 verify: bool) -> SVDModels:
    path = resolve(path, hub_variant)
    manifest = read_manifest(path)
    available = [c for c in COMPONENT_CONFIGS if c in manifest.get("components", {})]
    wanted = available if components is None else list(components)
    models = SVDModels(path, policy, manifest)
    configs = {}
    for component in wanted:
        if component not in available:
            raise ValueError(f"{path} has no {component} (it holds {', '.join(available) or 'nothing'})")
        folder = path / component
        if not (folder / PARAMS_DIR).is_dir():
            raise ValueError(f"{folder}: missing its {PARAMS_DIR} checkpoint")
        if verify:
            verify_component(path, manifest, component)
        configs[component] = read_config(folder, component)
    # Each restore (reads, casts, placement: mostly outside the GIL) runs in a thread of its own while the next
    # component's abstract model is built here; the largest component first, so that its restore starts first.
    largest_first = sorted(configs, key=lambda c: -manifest["components"][c].get("num_params", 0))
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(len(configs), 1)) as pool:
        restoring = {c: pool.submit(restore_model, abstract_model(c, configs[c], policy), path / c, policy, sharding)
                     for c in largest_first}
        for component, restored in restoring.items():
            with stage(f"loading the {component}", "the weights' precision (policy=Policy.bfloat16()) or split "
                       "them across devices (sharding=)"):
                setattr(models, component, restored.result())
    return models
