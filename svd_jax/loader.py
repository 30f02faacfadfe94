"""``svd_jax.load``: restore a converted folder's components as NNX modules under a :class:`Policy`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from svd_jax.checkpoint import PARAMS_DIR, Sharder, restore_model
from svd_jax.components import COMPONENT_CONFIGS, abstract_model
from svd_jax.configs import config_from_dict
from svd_jax.policy import Policy

MANIFEST = "manifest.json"


@dataclasses.dataclass
class SVDModels:
    """The restored components of a converted folder (a component the folder lacks is None)."""

    path: Path
    policy: Policy
    manifest: dict[str, Any]
    image_encoder: Any = None
    unet: Any = None
    vae: Any = None

    def require(self, *components: str) -> None:
        """Raise a clear error if a component needed for the task at hand was not converted."""
        missing = [c for c in components if getattr(self, c) is None]
        if missing:
            raise ValueError(f"{self.path} has no {', '.join(missing)} (convert a source that contains it)")


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such folder")
    if not (path / MANIFEST).is_file():
        raise ValueError(f"{path} is not a converted svd_jax folder (no {MANIFEST}); "
                         "convert a checkpoint first: python -m convert SRC DST")
    return json.loads((path / MANIFEST).read_text())


def load(path, policy: Policy | None = None, components=None, sharding: Sharder | None = None) -> SVDModels:
    """Restore the components of the converted folder ``path`` (all by default) with the policy's dtypes."""
    path = Path(path)
    policy = policy or Policy.default()
    manifest = read_manifest(path)
    available = [c for c in COMPONENT_CONFIGS if c in manifest.get("components", {})]
    wanted = available if components is None else list(components)
    models = SVDModels(path, policy, manifest)
    for component in wanted:
        if component not in available:
            raise ValueError(f"{path} has no {component} (it holds {', '.join(available) or 'nothing'})")
        folder = path / component
        if not (folder / PARAMS_DIR).is_dir():
            raise ValueError(f"{folder}: missing its {PARAMS_DIR} checkpoint")
        config = config_from_dict(json.loads((folder / "config.json").read_text()))
        model = restore_model(abstract_model(component, config, policy), folder, policy, sharding)
        setattr(models, component, model)
    return models
