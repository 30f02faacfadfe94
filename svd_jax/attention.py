"""The one place attention math and kernel choice live.

Models call :func:`attention` with ``[batch, tokens, heads, head_dim]`` tensors and the policy's ``impl``;
nothing else in the project picks a kernel.

* ``"xla"``: plain einsum attention with the softmax in float32 (exact for parity). When the whole
  ``batch x heads x Lq x Lk`` matrix of logits would exceed :data:`XLA_BLOCK_ELEMENTS`, it works one block of
  queries (and, if need be, of batch rows) at a time, so frames and batch can grow until the activations, not
  the attention matrix, fill the device.
* ``"cudnn"``: cuDNN flash attention through :func:`jax.nn.dot_product_attention` wherever cuDNN can run it
  (GPU, fp16/bf16, head_dim <= 128), any sequence length; XLA for the rest. cuDNN never materialises the
  ``tokens x tokens`` matrix, which XLA's plain path needs ~119 GB for at 9216 tokens.
* ``"pallas"``: JAX's Pallas TPU flash attention (``jax.experimental.pallas.ops.tpu``) for sequences of at least
  :data:`PALLAS_MIN_TOKENS` keys, padded to its block size with the padding masked; XLA for the rest (the
  14-25-token temporal attention). Under a mesh (``jax.set_mesh``) the kernel runs per device in ``shard_map``,
  split over the batch (or the heads when the batch does not divide).
* ``"auto"``: cuDNN on GPU and Pallas on TPU for half-precision inputs with long sequences, XLA otherwise (CPU,
  float32 for exactness, the temporal attention).

The platform is the one the program is built for: the devices of the mesh in context when there is one (so a
program compiled here for a TPU topology takes the TPU kernel), else JAX's default backend.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from svd_jax.policy import ATTENTION_IMPLS

# Below this many key tokens the plain path is as fast and its memory is small.
CUDNN_MIN_TOKENS = 256
# The spatial attentions of a 576x1024 video have 9216, 2304, 576 and 144 tokens; the temporal ones 14-25.
PALLAS_MIN_TOKENS = 128
# The Pallas kernel's sequence blocks: lengths are padded to a multiple of the smallest, and the largest of these
# dividing the padded length is used (bigger blocks keep the TPU's matrix units busier).
PALLAS_BLOCKS = (512, 256, 128)
PALLAS_MAX_HEAD_DIM = 512
# The XLA path materialises at most this many float32 logits at once (1 GiB).
XLA_BLOCK_ELEMENTS = 2 ** 28
_HALF = (jnp.dtype("bfloat16"), jnp.dtype("float16"))


@functools.lru_cache(maxsize=None)
def _default_backend() -> str:
    return jax.default_backend()


def target_platform() -> str:
    """The platform the program being traced is for: the context mesh's devices, else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    return device.platform if device is not None else _default_backend()


def choose_impl(impl: str, dtype, kv_tokens: int, head_dim: int, platform: str | None = None) -> str:
    """Resolve ``impl`` to a concrete kernel for these shapes on ``platform`` (default: :func:`target_platform`).

    ``"cudnn"`` asks for cuDNN wherever it can run the attention (half precision, head_dim <= 128 and divisible
    by 8, any length: the temporal attention too) and XLA elsewhere (a float32 copy of the VAE, the VAE's
    512-wide head), so that a whole generation runs; ``"pallas"`` asks for the TPU kernel for every long
    attention, float32 too. Asking for either off its platform is an error."""
    if impl == "xla":
        return "xla"
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {', '.join(ATTENTION_IMPLS)}")
    platform = platform or target_platform()
    if impl == "cudnn" and platform != "gpu":
        raise ValueError(f"attention impl 'cudnn' needs a GPU backend (this one is {platform})")
    if impl == "pallas" and platform != "tpu":
        raise ValueError(f"attention impl 'pallas' needs a TPU backend (this one is {platform})")
    if platform == "tpu":
        served = kv_tokens >= PALLAS_MIN_TOKENS and head_dim <= PALLAS_MAX_HEAD_DIM
        return "pallas" if served and (impl == "pallas" or jnp.dtype(dtype) in _HALF) else "xla"
    if not (platform == "gpu" and jnp.dtype(dtype) in _HALF and head_dim <= 128 and head_dim % 8 == 0):
        return "xla"
    return "cudnn" if impl == "cudnn" or kv_tokens >= CUDNN_MIN_TOKENS else "xla"


def _xla_attention(q, k, v, precision):
    scale = q.shape[-1] ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=precision, preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits * scale, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=precision)


def xla_blocks(batch: int, heads: int, q_tokens: int, kv_tokens: int,
               max_elements: int = XLA_BLOCK_ELEMENTS) -> tuple[int, int]:
    """``(batch_block, query_block)`` whose ``batch_block x heads x query_block x kv_tokens`` logits fit in
    ``max_elements``: the whole problem when it fits, else query blocks, and batch blocks of single queries when
    even one query per row is too much."""
    per_query = batch * heads * kv_tokens
    if per_query * q_tokens <= max_elements:
        return batch, q_tokens
    if per_query <= max_elements:
        return batch, max(1, max_elements // per_query)
    return max(1, max_elements // (heads * kv_tokens)), 1


def _blocked(x, axis: int, block: int):
    """``x`` padded along ``axis`` to a multiple of ``block`` and split there into ``[n_blocks, ..., block, ...]``
    with the block index first (for ``lax.map``)."""
    pad = -x.shape[axis] % block
    x = jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)])
    x = x.reshape(*x.shape[:axis], -1, block, *x.shape[axis + 1:])
    return jnp.moveaxis(x, axis, 0)


def _unblocked(x, axis: int, length: int):
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])[(slice(None),) * axis + (slice(0, length),)]


def _blocked_xla_attention(q, k, v, precision, batch_block: int, query_block: int):
    """The XLA path one block at a time (``lax.map``): exact, with memory for a
    ``[batch_block, H, query_block, Lk]`` block of logits instead of the whole matrix."""
    b, lq = q.shape[:2]
    if batch_block < b:
        out = jax.lax.map(lambda qkv: _blocked_xla_attention(*qkv, precision, batch_block, query_block),
                          tuple(_blocked(a, 0, batch_block) for a in (q, k, v)))
        return _unblocked(out, 0, b)
    if query_block < lq:
        out = jax.lax.map(lambda block: _xla_attention(block, k, v, precision), _blocked(q, 1, query_block))
        return _unblocked(out, 1, lq)
    return _xla_attention(q, k, v, precision)


def _pallas_attention(q, k, v):
    """The library's Pallas TPU flash attention on ``[B, L, H, D]`` tensors, lengths padded to its block size and
    the padded keys masked out through segment ids (padded queries attend normally and are dropped)."""
    from jax.experimental.pallas.ops.tpu import flash_attention as tpu_flash

    b, lq, h, d = q.shape
    lk = k.shape[1]
    unit = PALLAS_BLOCKS[-1]
    lq_pad, lk_pad = lq + (-lq % unit), lk + (-lk % unit)

    def heads_first(x, length):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    segment_ids = None
    if lk_pad != lk:
        keys = jnp.broadcast_to((jnp.arange(lk_pad) < lk).astype(jnp.int32), (b, lk_pad))
        segment_ids = tpu_flash.SegmentIds(q=jnp.ones((b, lq_pad), jnp.int32), kv=keys)
    block_q = next(n for n in PALLAS_BLOCKS if lq_pad % n == 0)
    block_k = next(n for n in PALLAS_BLOCKS if lk_pad % n == 0)
    sizes = tpu_flash.BlockSizes(block_q=block_q, block_k_major=block_k, block_k=block_k, block_b=1)
    out = tpu_flash.flash_attention(heads_first(q, lq_pad), heads_first(k, lk_pad), heads_first(v, lk_pad),
                                    segment_ids=segment_ids, sm_scale=d ** -0.5, block_sizes=sizes)
    return out.transpose(0, 2, 1, 3)[:, :lq]


def _per_device(fn, q, k, v):
    """``fn`` on each device's share under the context mesh (``shard_map``): split over the batch when it divides
    the devices, else over the heads, else every device computes all of it. Without a mesh, ``fn`` as is."""
    mesh = jax.sharding.get_abstract_mesh()
    axes = () if mesh.empty else tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    if size == 1:
        return fn(q, k, v)
    if q.shape[0] % size == 0:
        spec = PartitionSpec(axes)
    elif q.shape[2] % size == 0:
        spec = PartitionSpec(None, None, axes)
    else:
        spec = PartitionSpec()
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, axis_names=set(axes),
                         check_vma=False)(q, k, v)


def attention(q, k, v, *, impl: str = "auto", precision=None):
    """Softmax attention of ``q [B, Lq, H, D]`` over ``k, v [B, Lk, H, D]`` with scale ``1/sqrt(D)``.

    Returns ``[B, Lq, H, D]`` in ``q``'s dtype.
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention expects q [B,Lq,H,D] and k, v [B,Lk,H,D]; got {q.shape}, {k.shape}, {v.shape}")
    kernel = choose_impl(impl, q.dtype, k.shape[1], q.shape[-1])
    if kernel == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if kernel == "pallas":
        return _per_device(_pallas_attention, q, k, v)
    (b, lq, h, _), lk = q.shape, k.shape[1]
    return _blocked_xla_attention(q, k, v, precision, *xla_blocks(b, h, lq, lk, XLA_BLOCK_ELEMENTS))
