"""The attention function: exact against a direct softmax, chunked equals whole, and kernel choice."""

import jax
import numpy as np
import pytest

from svd_jax import attention as attn


def reference(q, k, v):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


def random_qkv(lq, lk, b=2, h=3, d=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(b, lq, h, d)).astype(np.float32), rng.normal(size=(b, lk, h, d)).astype(np.float32),
            rng.normal(size=(b, lk, h, d)).astype(np.float32))


def test_xla_matches_direct_softmax():
    q, k, v = random_qkv(7, 5)
    out = attn.attention(q, k, v, impl="xla", precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(out, reference(q, k, v), atol=1e-5)


@pytest.mark.parametrize("max_elements", [2 * 3 * 16 * 9, 3 * 9 * 2])  # query blocks of 16; batch blocks of 2 rows
def test_large_attention_is_blocked_and_exact(monkeypatch, max_elements):
    q, k, v = random_qkv(70, 9, b=5)  # 70 queries: four full blocks and a padded one; 5 rows: two and a padded one
    monkeypatch.setattr(attn, "XLA_BLOCK_ELEMENTS", max_elements)
    blocked = attn.attention(q, k, v, impl="auto", precision=jax.lax.Precision.HIGHEST)
    assert "scan" in str(jax.make_jaxpr(lambda *a: attn.attention(*a, impl="xla"))(q, k, v))
    np.testing.assert_allclose(blocked, reference(q, k, v), atol=1e-5)


def test_xla_blocks_follow_the_whole_footprint():
    budget = attn.XLA_BLOCK_ELEMENTS
    assert attn.xla_blocks(2, 5, 576, 576) == (2, 576)  # small: all at once
    # the same per-row size blocks once the batch (frames x guidance halves) grows
    batch, block = attn.xla_blocks(400, 5, 576, 576)
    assert batch == 400 and block < 576 and 400 * 5 * block * 576 <= budget
    assert attn.xla_blocks(50, 5, 9216, 9216)[1] * 50 * 5 * 9216 <= budget
    # so many rows that one query each is too much: rows are blocked too
    batch, block = attn.xla_blocks(10 ** 6, 8, 200, 200)
    assert block == 1 and batch * 8 * 200 <= budget


def test_kernel_choice_on_gpu(monkeypatch):
    monkeypatch.setattr(attn, "_default_backend", lambda: "gpu")
    bf16 = jax.numpy.bfloat16
    assert attn.choose_impl("auto", bf16, 9216, 64) == "cudnn"  # the UNet's spatial attention
    assert attn.choose_impl("auto", bf16, 25, 64) == "xla"  # its temporal attention
    assert attn.choose_impl("cudnn", bf16, 25, 64) == "cudnn"
    assert attn.choose_impl("cudnn", bf16, 9216, 512) == "xla"  # the VAE's mid-block head
    assert attn.choose_impl("cudnn", np.float32, 9216, 64) == "xla"  # the float32 VAE copy that encodes
    assert attn.choose_impl("xla", bf16, 9216, 64) == "xla"


def test_kernel_choice_on_cpu():
    assert attn.choose_impl("auto", np.float32, 9216, 64) == "xla"
    assert attn.choose_impl("auto", jax.numpy.bfloat16, 9216, 64) == "xla"  # no GPU here
    with pytest.raises(ValueError, match="cudnn' needs a GPU"):
        attn.choose_impl("cudnn", jax.numpy.bfloat16, 9216, 64)
    with pytest.raises(ValueError, match="'pallas' needs a TPU"):
        attn.choose_impl("pallas", jax.numpy.bfloat16, 9216, 64)
    with pytest.raises(ValueError, match="unknown attention impl"):
        attn.choose_impl("flash", np.float32, 10, 64)
    with pytest.raises(ValueError, match="attention expects"):
        attn.attention(*random_qkv(4, 4)[:2], random_qkv(4, 5)[2])


def test_kernel_choice_on_tpu(monkeypatch):
    monkeypatch.setattr(attn, "_default_backend", lambda: "tpu")
    bf16 = jax.numpy.bfloat16
    for tokens in (9216, 2304, 576, 144):  # the UNet's spatial attentions at 576x1024
        assert attn.choose_impl("auto", bf16, tokens, 64) == "pallas"
    assert attn.choose_impl("auto", bf16, 9216, 512) == "pallas"  # the VAE's mid-block head
    assert attn.choose_impl("auto", bf16, 25, 64) == "xla"  # temporal attention
    assert attn.choose_impl("auto", np.float32, 9216, 64) == "xla"  # exact float32 stays on XLA unless asked
    assert attn.choose_impl("pallas", np.float32, 9216, 64) == "pallas"
    with pytest.raises(ValueError, match="'cudnn' needs a GPU"):
        attn.choose_impl("cudnn", bf16, 9216, 64)


# token counts that are a multiple of the kernel's block (128) and that are not (padded and masked)
@pytest.mark.parametrize("dtype, lq, lk", [("float32", 256, 256), ("float32", 200, 300), ("bfloat16", 144, 144),
                                           ("bfloat16", 256, 384)])
def test_pallas_tpu_kernel_equals_xla_in_interpret_mode(monkeypatch, dtype, lq, lk):
    """The library's TPU flash kernel, run by Pallas' TPU interpreter on CPU, against the XLA path."""
    from jax.experimental.pallas import tpu as pltpu

    monkeypatch.setattr(attn, "_default_backend", lambda: "tpu")
    q, k, v = (jax.numpy.asarray(a, dtype) for a in random_qkv(lq, lk, b=1, h=2, d=64, seed=lq))
    with pltpu.force_tpu_interpret_mode():
        out = attn.attention(q, k, v, impl="pallas")
    assert "pallas_call" in str(jax.make_jaxpr(lambda *a: attn.attention(*a, impl="pallas"))(q, k, v))
    expected = attn.attention(q, k, v, impl="xla", precision=jax.lax.Precision.HIGHEST)
    out, expected = np.asarray(out, np.float64), np.asarray(expected, np.float64)
    relative = np.abs(out - expected).max() / np.abs(expected).max()
    # float32: the block budget; bfloat16: the ladder's bf16 relative budget (both sides round to bf16)
    assert relative <= (1e-5 if dtype == "float32" else 1e-2), relative
