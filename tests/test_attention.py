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


def test_long_sequences_are_chunked_and_exact(monkeypatch):
    q, k, v = random_qkv(70, 9)
    monkeypatch.setattr(attn, "XLA_CHUNK_ABOVE", 100)
    monkeypatch.setattr(attn, "XLA_QUERY_CHUNK", 16)  # 70 queries: four full blocks and a padded one
    chunked = attn.attention(q, k, v, impl="auto", precision=jax.lax.Precision.HIGHEST)
    assert "scan" in str(jax.make_jaxpr(lambda *a: attn.attention(*a, impl="xla"))(q, k, v))
    np.testing.assert_allclose(chunked, reference(q, k, v), atol=1e-5)


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
    with pytest.raises(ValueError, match="unknown attention impl"):
        attn.choose_impl("flash", np.float32, 10, 64)
    with pytest.raises(ValueError, match="attention expects"):
        attn.attention(*random_qkv(4, 4)[:2], random_qkv(4, 5)[2])
