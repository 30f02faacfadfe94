"""Gradient checkpointing of the UNet's layers without changing its parameter paths.

Every ``SpatioTemporalResBlock`` and ``TransformerSpatioTemporalModel`` instance gets a subclass whose
``__call__`` is wrapped in ``nnx.remat``: the backward pass recomputes each layer's activations instead of
keeping them, so activation memory grows with the number of layers' inputs rather than with everything inside
them. Attribute paths (and so checkpoints and the optimizer state) are unchanged; the split graph definition
records the subclasses, so the model rebuilt inside ``jax.jit`` is checkpointed too.
"""

from __future__ import annotations

import jax
from flax import nnx

from svd_jax.layers import SpatioTemporalResBlock
from svd_jax.unet_blocks import TransformerSpatioTemporalModel

# Both take (self, x, num_frames, temb_or_context); num_frames is a Python int.
CHECKPOINTED_LAYERS = (SpatioTemporalResBlock, TransformerSpatioTemporalModel)
_NUM_FRAMES_ARG = 2
# What the backward pass may keep inside a checkpointed layer: "block" nothing (only each layer's input is kept,
# everything inside is recomputed), "dots" the outputs of matrix multiplications without batch dimensions (the
# linear layers' outputs; attention scores and convolutions are recomputed).
POLICIES = {"block": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
_SUBCLASSES: dict[tuple[type, str], type] = {}


def _checkpointed(cls: type, policy: str) -> type:
    if (cls, policy) not in _SUBCLASSES:
        call = nnx.remat(cls.__call__, static_argnums=(_NUM_FRAMES_ARG,), policy=POLICIES[policy])

        def __call__(self, x, num_frames, extra=None):
            return call(self, x, num_frames, extra)

        name = f"Checkpointed{cls.__name__}" + ("" if policy == "block" else policy.capitalize())
        _SUBCLASSES[(cls, policy)] = type(name, (cls,),
                                          {"__call__": __call__, "__module__": __name__, "__doc__": cls.__doc__})
    return _SUBCLASSES[(cls, policy)]


def checkpoint_layers(model, policy: str = "block") -> int:
    """Checkpoint every resnet and transformer of ``model`` in place with a policy of :data:`POLICIES`; returns
    how many layers were changed."""
    if policy not in POLICIES:
        raise ValueError(f"remat policy must be one of {sorted(POLICIES)}, got {policy!r}")
    count = 0
    for _, node in nnx.iter_graph(model):
        if type(node) in CHECKPOINTED_LAYERS:
            node.__class__ = _checkpointed(type(node), policy)
            count += 1
    return count
