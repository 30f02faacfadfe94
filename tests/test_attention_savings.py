"""The exact savings in the UNet's attention, each against the unfused computation it replaces (float32):

* self-attention projects q, k and v with one matmul over the concatenated kernels;
* a one-token cross-attention context gives ``to_out(to_v(context))`` broadcast over the tokens (softmax over one
  key is 1), with no query projection and no attention;
* the context is carried once per video and shared by the frames and positions that use it, instead of repeated
  per frame (spatial blocks) and per position (temporal blocks).

The unfused computation is the textbook one: separate q, k, v projections, the context repeated to every row of
tokens, softmax attention, ``to_out``. Parameters are random torch values placed by the converter's rules.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention as TorchAttention
from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel as TorchTransformer
from flax import nnx

from parity import randomize
from svd_jax import Policy
from svd_jax.attention import attention
from svd_jax.layers import Attention
from svd_jax.unet_blocks import BasicTransformerBlock, TransformerSpatioTemporalModel
from unet_helpers import filled_block

POLICY = Policy.float32()
C, HEADS, CROSS = 64, 4, 20
BOUND = 1e-6  # relative L2, float32


def _rel_l2(actual, expected) -> float:
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def unfused_attention(self, x, context=None):
    """Separate projections, the context repeated to every row of ``x``, softmax attention, ``to_out``."""
    context = x if context is None else jnp.repeat(context, x.shape[0] // context.shape[0], axis=0)
    q, k, v = (proj(t) for proj, t in ((self.to_q, x), (self.to_k, context), (self.to_v, context)))
    q, k, v = (t.reshape(*t.shape[:2], self.heads, -1) for t in (q, k, v))
    out = attention(q, k, v, impl="xla", precision=jax.lax.Precision.HIGHEST).reshape(*x.shape[:2], -1)
    for layer in self.to_out:
        out = layer(out)
    return out


def unfused_block(self, x, context):
    """The transformer block with its cross-attention always normalising and attending."""
    x = self.attn1(self.norm1(x)) + x
    x = self.attn2(self.norm2(x), context) + x
    return self.ff(self.norm3(x)) + x


def _attention(bias: bool, cross: int | None, seed: int) -> Attention:
    torch_module = randomize(TorchAttention(C, cross_attention_dim=cross, heads=HEADS, dim_head=C // HEADS, bias=bias),
                             seed=seed)
    return filled_block(lambda r: Attention(C, HEADS, C // HEADS, POLICY, r, cross_attention_dim=cross, bias=bias),
                        torch_module)


def _normal(seed: int, *shape) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("bias", [False, True])  # the UNet's attention has no q/k/v bias; the VAE's has
def test_self_attention_projects_qkv_in_one_matmul(bias):
    module = _attention(bias, None, seed=1)
    x = _normal(2, 3, 10, C)
    jaxpr = str(jax.make_jaxpr(lambda x: module(x))(x))
    assert jaxpr.count("dot_general") == 4, jaxpr  # q|k|v, two in the attention, to_out
    assert _rel_l2(module(x), unfused_attention(module, x)) <= BOUND


@pytest.mark.parametrize("tokens,repeat", [(1, 1), (1, 5), (3, 5)])
def test_cross_attention_with_a_shared_context(tokens, repeat):
    """Each context row serves ``repeat`` consecutive rows of tokens; one context token takes the shortcut."""
    module = _attention(False, CROSS, seed=3)
    x, context = _normal(4, 2 * repeat, 7, C), _normal(5, 2, tokens, CROSS)
    actual = module(x, context)
    assert _rel_l2(actual, unfused_attention(module, x, context)) <= BOUND
    if tokens == 1:  # no query projection and no attention: to_v and to_out only
        assert str(jax.make_jaxpr(lambda c: module(x, c))(context)).count("dot_general") == 2
        # and the tokens' values do not matter
        assert np.array_equal(actual, module(x * 3.0 - 1.0, context))


def test_attention_rejects_contexts_that_do_not_divide_the_rows():
    module = _attention(False, CROSS, seed=3)
    with pytest.raises(ValueError, match="6 rows of tokens cannot share 4 contexts"):
        module(_normal(4, 6, 7, C), _normal(5, 4, 1, CROSS))


def test_transformer_carries_one_context_per_video(monkeypatch):
    """The spatio-temporal transformer (spatial and temporal blocks) given each video's one-token context once,
    against the unfused computation given the context repeated per frame."""
    b, frames, height, width = 2, 3, 4, 5
    torch_block = randomize(TorchTransformer(HEADS, C // HEADS, in_channels=C, num_layers=2, cross_attention_dim=CROSS),
                            seed=6)
    block = filled_block(lambda r: TransformerSpatioTemporalModel(C, HEADS, CROSS, 2, 1e-6, 1e-5, POLICY, r),
                         torch_block)
    x, context = _normal(7, b * frames, height, width, C), _normal(8, b, 1, CROSS)
    graph, state = nnx.split(block)

    def run(state, x, context):
        return nnx.merge(graph, state)(x, frames, context)

    actual = jax.jit(run)(state, x, context)
    with monkeypatch.context() as patch:  # traced while patched
        patch.setattr(Attention, "__call__", unfused_attention)
        patch.setattr(BasicTransformerBlock, "__call__", unfused_block)
        expected = jax.jit(run)(state, x, np.repeat(context, frames, axis=0))
    assert _rel_l2(actual, expected) <= BOUND
    with torch.no_grad():  # and the whole block still is diffusers' (whose context is per frame)
        torch_out = torch_block(torch.from_numpy(x).permute(0, 3, 1, 2),
                                encoder_hidden_states=torch.from_numpy(np.repeat(context, frames, axis=0)),
                                image_only_indicator=torch.zeros(b, frames)).sample
    assert _rel_l2(actual, torch_out.permute(0, 2, 3, 1).numpy()) <= 1e-5
