"""The one place attention math and kernel choice live.

Models call :func:`attention` with ``[batch, tokens, heads, head_dim]`` tensors and the policy's ``impl``;
nothing else in the project picks a kernel.

* ``"xla"``: plain einsum attention with the softmax in float32 (exact for parity); for long sequences it
  works one block of queries at a time, so it runs (on TPU, CPU, or a GPU in float32) without the full matrix.
* ``"cudnn"``: cuDNN flash attention through :func:`jax.nn.dot_product_attention` wherever cuDNN can run it
  (GPU, fp16/bf16, head_dim <= 128), any sequence length; XLA for the rest. cuDNN never materialises the
  ``tokens x tokens`` matrix, which XLA's plain path needs ~119 GB for at 9216 tokens.
* ``"auto"``: cuDNN on GPU for half-precision inputs with long sequences, XLA otherwise (CPU, TPU, fp32,
  the 14-25-token temporal attention).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Below this many key tokens the plain path is as fast and its memory is small.
CUDNN_MIN_TOKENS = 256
_HALF = (jnp.dtype("bfloat16"), jnp.dtype("float16"))


@functools.lru_cache(maxsize=None)
def _default_backend() -> str:
    return jax.default_backend()


def choose_impl(impl: str, dtype, kv_tokens: int, head_dim: int) -> str:
    """Resolve ``impl`` to a concrete kernel for these shapes.

    ``"cudnn"`` asks for cuDNN wherever it can run the attention (half precision, head_dim <= 128 and divisible
    by 8, any length: the temporal attention too) and XLA elsewhere (a float32 copy of the VAE, the VAE's
    512-wide head), so that a whole generation runs; asking for it off a GPU is an error."""
    if impl == "xla":
        return "xla"
    if impl not in ("auto", "cudnn"):
        raise ValueError(f"unknown attention impl {impl!r}; expected auto, xla or cudnn")
    on_gpu = _default_backend() == "gpu"
    if impl == "cudnn" and not on_gpu:
        raise ValueError(f"attention impl 'cudnn' needs a GPU backend (this one is {_default_backend()})")
    if not (on_gpu and jnp.dtype(dtype) in _HALF and head_dim <= 128 and head_dim % 8 == 0):
        return "xla"
    return "cudnn" if impl == "cudnn" or kv_tokens >= CUDNN_MIN_TOKENS else "xla"


def _xla_attention(q, k, v, precision):
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * scale, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=precision)


def _chunked_xla_attention(q, k, v, precision, query_chunk: int):
    """The XLA path one block of queries at a time (``lax.map``): exact, with memory for a
    ``[B, H, query_chunk, Lk]`` block of logits instead of the whole ``Lq x Lk`` matrix."""
    b, lq, h, d = q.shape
    pad = -lq % query_chunk
    q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
    blocks = q.reshape(b, -1, query_chunk, h, d).swapaxes(0, 1)
    out = jax.lax.map(lambda block: _xla_attention(block, k, v, precision), blocks)
    return out.swapaxes(0, 1).reshape(b, lq + pad, h, d)[:, :lq]


# Above this many query-key pairs per (batch, head), the XLA path works in query blocks (at 9216 spatial tokens
# of a 576x1024 video the whole matrix would need ~119 GB for the UNet's batch).
XLA_CHUNK_ABOVE = 4096 * 4096
XLA_QUERY_CHUNK = 1024


def attention(q, k, v, *, impl: str = "auto", precision=None):
    """Softmax attention of ``q [B, Lq, H, D]`` over ``k, v [B, Lk, H, D]`` with scale ``1/sqrt(D)``.

    Returns ``[B, Lq, H, D]`` in ``q``'s dtype.
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention expects q [B,Lq,H,D] and k, v [B,Lk,H,D]; got {q.shape}, {k.shape}, {v.shape}")
    kernel = choose_impl(impl, q.dtype, k.shape[1], q.shape[-1])
    if kernel == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if q.shape[1] * k.shape[1] > XLA_CHUNK_ABOVE and q.shape[1] > XLA_QUERY_CHUNK:
        return _chunked_xla_attention(q, k, v, precision, XLA_QUERY_CHUNK)
    return _xla_attention(q, k, v, precision)
