"""Helpers for parity tests: random PyTorch weights, the real converter, and scale-relative comparison."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def randomize(module: torch.nn.Module, seed: int = 0, scale: float = 0.5) -> torch.nn.Module:
    """Give every parameter (including those upstream initialises to zero or one) a random value, so a
    parameter that is mapped to the wrong place cannot go unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            std = scale / max(fan_in, 1) ** 0.5 if p.ndim > 1 else scale
            # 1-D "weight"s are norm scales: keep them around 1 so activations stay well scaled.
            offset = 1.0 if p.ndim == 1 and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=gen) * std + offset)
    return module.eval()


def convert_cli(src, dst, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``python -m convert SRC DST ...`` in a subprocess, as a user would."""
    result = subprocess.run([sys.executable, "-m", "convert", str(src), str(dst), *extra], cwd=REPO,
                            capture_output=True, text=True)
    if check and result.returncode != 0:
        raise AssertionError(f"convert failed ({result.returncode}): {result.stderr}")
    return result


def convert_inprocess(src, dst, *extra: str) -> None:
    """The same entry point as ``python -m convert``, without a new interpreter (faster for many cases)."""
    from convert.__main__ import main

    assert main([str(src), str(dst), *extra]) == 0


def write_config_dir(root: Path, component: str, config: dict) -> Path:
    """A ``--config`` folder: ``root/<component>/config.json``."""
    (root / component).mkdir(parents=True, exist_ok=True)
    (root / component / "config.json").write_text(json.dumps(config))
    return root


def max_rel_err(actual, expected) -> float:
    """max |actual - expected| relative to the output's scale (max |expected|)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12))


def nchw_to_nhwc(x: torch.Tensor) -> np.ndarray:
    return x.detach().permute(0, 2, 3, 1).numpy()


def load_open_clip_transformer():
    """``open_clip.transformer`` without the package's ``__init__``.

    Importing ``open_clip`` pulls torchvision (for ``FrozenBatchNorm2d`` in ``open_clip.utils``), and PyPI's
    torchvision does not match the pinned CPU torch. The vision transformer needs neither, so the package is
    registered without running its ``__init__`` and, when torchvision is unavailable, ``torchvision.ops.misc``
    is given a stand-in class that the vision tower never uses.
    """
    if "open_clip.transformer" in sys.modules:
        return sys.modules["open_clip.transformer"]
    spec = importlib.util.find_spec("open_clip")
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("open_clip", package)
    try:
        import torchvision.ops.misc  # noqa: F401
    except Exception:
        misc = types.ModuleType("torchvision.ops.misc")
        misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
        for name in ("torchvision", "torchvision.ops"):
            sys.modules.setdefault(name, types.ModuleType(name))
        sys.modules["torchvision.ops.misc"] = misc
    return importlib.import_module("open_clip.transformer")


def load_k_diffusion_sampling():
    """``k_diffusion.sampling`` without the package's ``__init__``.

    k-diffusion's ``__init__`` imports its training, evaluation and augmentation modules (torchvision, kornia,
    clean-fid, wandb, ...), and ``k_diffusion.utils`` imports torchvision; it is installed with ``--no-deps`` (see
    README). The samplers need only torch, scipy, torchdiffeq, torchsde and ``utils.append_dims``, so the package
    is registered without running its ``__init__`` and ``k_diffusion.utils`` gets a stand-in with that function.
    """
    if "k_diffusion.sampling" in sys.modules:
        return sys.modules["k_diffusion.sampling"]
    spec = importlib.util.find_spec("k_diffusion")
    package = types.ModuleType("k_diffusion")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules.setdefault("k_diffusion", package)
    utils = types.ModuleType("k_diffusion.utils")
    utils.append_dims = lambda x, target_dims: x[(...,) + (None,) * (target_dims - x.ndim)]
    sys.modules.setdefault("k_diffusion.utils", utils)
    package.utils = sys.modules["k_diffusion.utils"]
    return importlib.import_module("k_diffusion.sampling")


def tiny_clip_folder(root: Path) -> Path:
    """A tiny random transformers ``image_encoder`` folder (CLIP vision tower with projection) under ``root``."""
    from transformers import CLIPVisionConfig as HFCLIPVisionConfig, CLIPVisionModelWithProjection

    folder = root / "image_encoder"
    config = HFCLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=24, num_hidden_layers=2,
                                num_attention_heads=4, image_size=30, patch_size=10)
    randomize(CLIPVisionModelWithProjection(config)).save_pretrained(folder)
    return folder
