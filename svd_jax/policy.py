"""Runtime choices, made at load time and kept apart from architecture (:mod:`svd_jax.configs`): numerics and
gradient checkpointing.

* ``param_dtype``: the dtype weights are restored in.
* ``compute_dtype``: the dtype of activations and matmul/conv inputs. Norm statistics, softmax, the sampler
  state, EDM scalings, guidance and the Euler update always stay float32, whatever this says.
* ``attention_impl``: ``"auto"``, ``"xla"``, ``"cudnn"`` (GPU) or ``"pallas"`` (TPU); see :mod:`svd_jax.attention`.
* ``precision``: matmul/conv precision for XLA (``"highest"`` makes float32 exact on TPU and GPU, where the
  default would use bf16 passes or TF32).
* ``remat``: gradient checkpointing of the video layers (every ``SpatioTemporalResBlock`` and
  ``TransformerSpatioTemporalModel`` is one ``nnx.remat`` call): a name of :data:`REMAT_POLICIES`. It changes
  what a backward pass keeps in memory and recomputes, not what is computed, nor any parameter path.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "pallas")
PRECISIONS = ("default", "high", "highest")
# What the backward pass may keep from inside a checkpointed layer: "block" nothing (only each layer's input is
# kept, everything inside is recomputed); "dots" also the outputs of matrix multiplications without batch
# dimensions (the linear layers' outputs; attention scores and convolutions are recomputed).
CHECKPOINT_POLICIES = {"block": jax.checkpoint_policies.nothing_saveable,
                       "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}
REMAT_POLICIES = ("none", *CHECKPOINT_POLICIES)  # "none": no checkpointing, every activation is kept


@dataclasses.dataclass(frozen=True)
class Policy:
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    attention_impl: str = "auto"
    precision: str = "highest"
    remat: str = "none"

    def __post_init__(self):
        for name in ("param_dtype", "compute_dtype"):
            value = getattr(self, name)
            if not isinstance(value, str):
                object.__setattr__(self, name, jnp.dtype(value).name)
            if getattr(self, name) not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"Policy.{name} must be float32, bfloat16 or float16, not {value!r}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"Policy.attention_impl must be one of {ATTENTION_IMPLS}, not {self.attention_impl!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"Policy.precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"Policy.remat must be one of {REMAT_POLICIES}, not {self.remat!r}")

    @property
    def param(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    @property
    def compute(self) -> jnp.dtype:
        return jnp.dtype(self.compute_dtype)

    @property
    def lax_precision(self) -> jax.lax.Precision:
        return {"default": jax.lax.Precision.DEFAULT, "high": jax.lax.Precision.HIGH,
                "highest": jax.lax.Precision.HIGHEST}[self.precision]

    @classmethod
    def float32(cls, attention_impl: str = "auto", remat: str = "none") -> "Policy":
        """Exact float32: for parity with PyTorch and for CPU runs. The reference the half-precision policies are
        measured against (``benchmarks/unet_precision.py``)."""
        return cls("float32", "float32", attention_impl, "highest", remat)

    @classmethod
    def bfloat16(cls, attention_impl: str = "auto", remat: str = "none") -> "Policy":
        """bf16 weights and activations with float32 statistics: the fast path on accelerators.

        Bounds, relative L2 against float32: the tiny random test pipeline (one step, the same rounded weights, on
        CPU) stays within 1e-1 (tests/test_pipeline.py); one full-size SVD-XT UNet evaluation with random weights
        measured 1.38e-2 against PyTorch float32 on an H200 (benchmarks/README.md). bf16 keeps 8 mantissa bits."""
        return cls("bfloat16", "bfloat16", attention_impl, "default", remat)

    @classmethod
    def float16(cls, attention_impl: str = "auto", remat: str = "none") -> "Policy":
        """fp16 weights and activations with float32 statistics: diffusers' usual GPU dtype (more mantissa than
        bf16, less range: activations above 65504 overflow).

        Bounds, relative L2 against float32: the tiny random test pipeline (one step, the same rounded weights, on
        CPU) stays within 2e-2 (tests/test_pipeline.py); at full size not yet measured
        (benchmarks/unet_precision.py measures it, with non-finite counts over a whole generation)."""
        return cls("float16", "float16", attention_impl, "default", remat)

    @classmethod
    def default(cls) -> "Policy":
        """bfloat16 on GPU/TPU, float32 on CPU."""
        return cls.float32() if jax.default_backend() == "cpu" else cls.bfloat16()
