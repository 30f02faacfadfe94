"""The UNet as a graph definition plus flat ``{dotted.path: array}`` dicts, split into trainable and frozen.

Which parameters train is chosen by name: ``"all"``, ``"temporal"`` (the temporal res blocks, temporal
transformer blocks, ``time_pos_embed`` and ``time_mixer`` of every layer), or regular expressions searched in
each dotted path. Only the trainable dict gets gradients and optimizer state; the frozen one is passed through
unchanged.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
from flax import nnx

from svd_jax import lora
from svd_jax.checkpoint import path_key
from svd_jax.policy import Policy

TEMPORAL_PATTERNS = (r"(^|\.)(temporal_res_block|temporal_transformer_blocks|time_pos_embed|time_mixer)(\.|$)",)


def trainable_patterns(trainable: str | Sequence[str]) -> tuple[str, ...]:
    """The regular expressions for a ``trainable`` setting (``"all"``, ``"temporal"`` or a list of patterns)."""
    if trainable == "all":
        return (r".",)
    if trainable == "temporal":
        return TEMPORAL_PATTERNS
    if isinstance(trainable, str):
        raise ValueError(f"trainable must be 'all', 'temporal' or a list of patterns, got {trainable!r}")
    patterns = tuple(trainable)
    for p in patterns:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"trainable pattern {p!r} is not a valid regular expression: {e}") from None
    return patterns


class SplitModel:
    """A model's graph definition and the dotted paths of its variables; rebuilds the model from flat dicts."""

    def __init__(self, graphdef, paths: dict[str, tuple], trainable_keys: frozenset[str]):
        self.graphdef = graphdef
        self.paths = paths
        self.trainable_keys = trainable_keys

    def merge(self, *flat_dicts: dict) -> nnx.Module:
        """The module with the given flat dicts' values (together they must cover every variable)."""
        values = {self.paths[k]: v for d in flat_dicts for k, v in d.items()}
        if len(values) != len(self.paths):
            missing = sorted(set(self.paths) - {k for d in flat_dicts for k in d})
            raise ValueError(f"merge: missing {len(missing)} variables, e.g. {missing[:3]}")
        return nnx.merge(self.graphdef, nnx.State.from_flat_path(values))

    def __eq__(self, other) -> bool:
        return (isinstance(other, SplitModel) and self.graphdef == other.graphdef
                and self.trainable_keys == other.trainable_keys)

    def __hash__(self) -> int:
        return hash((self.graphdef, self.trainable_keys))


def split_model(model, trainable: str | Sequence[str] = "all") -> tuple[SplitModel, dict, dict]:
    """``(structure, trainable, frozen)``: the flat dicts hold the model's own arrays (no copy); parameters whose
    path matches ``trainable`` go to the first, every other variable to the second."""
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    patterns = [re.compile(p) for p in trainable_patterns(trainable)]
    chosen, frozen = {}, {}
    for path, var in flat:
        key = path_key(path)
        is_trainable = isinstance(var, nnx.Param) and any(p.search(key) for p in patterns)
        (chosen if is_trainable else frozen)[key] = var.get_value()
    if not chosen:
        raise ValueError(f"no parameter matches trainable={trainable!r}")
    structure = SplitModel(graphdef, {path_key(path): path for path, _ in flat}, frozenset(chosen))
    return structure, chosen, frozen


def num_values(flat: dict) -> int:
    return int(sum(a.size for a in jax.tree.leaves(flat)))


def training_policy(config, remat: str | None = None) -> Policy:
    """float32 master weights computing in ``compute_dtype``; with LoRA the frozen base stays in ``compute_dtype``
    (the adapters are the float32 masters). The UNet built with it checkpoints its layers with ``remat`` (default
    the config's)."""
    return Policy(config.compute_dtype if config.lora.enabled else "float32", config.compute_dtype,
                  remat=config.remat if remat is None else remat)


def prepare_unet(unet, config) -> tuple[SplitModel, dict, dict]:
    """A :class:`~svd_jax.train.config.TrainConfig`'s UNet (built with :func:`training_policy`) for training, in
    place: LoRA adapters (``[lora]``), then :func:`split_model` into the trainable and the frozen dict. Concrete
    or abstract (``nnx.eval_shape``) modules alike."""
    trainable = config.optimizer.trainable
    if config.lora.enabled:
        c = config.lora
        lora.add_adapters(unet, c.rank, c.scale_alpha, c.dropout, c.targets, seed=config.seed)
        trainable = [lora.ADAPTER_PATTERN]
    return split_model(unet, trainable)
