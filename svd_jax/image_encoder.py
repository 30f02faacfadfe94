"""CLIP vision tower with projection (transformers ``CLIPVisionModelWithProjection``), the SVD image encoder.

Pre-LN ViT: patch embedding (conv, no bias) + class token + learned positions, ``pre_layrnorm`` (sic, as
upstream), pre-norm encoder layers, ``post_layernorm`` on the class token, then ``visual_projection`` (no bias).
The output ``image_embeds`` is not L2-normalised. Attribute paths mirror transformers' names.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from svd_jax.attention import attention
from svd_jax.configs import CLIPVisionConfig
from svd_jax.layers import LayerNorm, conv, dense, gelu_exact
from svd_jax.policy import Policy

_ACTIVATIONS = {
    "gelu": gelu_exact,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, policy: Policy, rngs: nnx.Rngs):
        self.patch_size = config.patch_size
        self.dtype = policy.compute
        self.class_embedding = nnx.Param(jnp.zeros((config.hidden_size,), policy.param))
        self.patch_embedding = conv(config.num_channels, config.hidden_size, config.patch_size, policy, rngs,
                                    strides=config.patch_size, padding="VALID", use_bias=False)
        self.position_embedding = nnx.Embed(config.num_positions, config.hidden_size, dtype=policy.compute,
                                            param_dtype=policy.param, rngs=rngs)

    def __call__(self, pixel_values):
        patches = self.patch_embedding(pixel_values.astype(self.dtype))
        b = patches.shape[0]
        patches = patches.reshape(b, -1, patches.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (b, 1, patches.shape[-1]))
        tokens = jnp.concatenate([cls, patches], axis=1)
        return tokens + self.position_embedding.embedding[...].astype(self.dtype)[None]


class CLIPAttention(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, policy: Policy, rngs: nnx.Rngs):
        d = config.hidden_size
        self.heads = config.num_attention_heads
        self.impl = policy.attention_impl
        self.precision = policy.lax_precision
        self.q_proj = dense(d, d, policy, rngs)
        self.k_proj = dense(d, d, policy, rngs)
        self.v_proj = dense(d, d, policy, rngs)
        self.out_proj = dense(d, d, policy, rngs)

    def __call__(self, x):
        b, n, d = x.shape
        q, k, v = (proj(x).reshape(b, n, self.heads, -1) for proj in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, impl=self.impl, precision=self.precision)
        return self.out_proj(out.reshape(b, n, d))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, policy: Policy, rngs: nnx.Rngs):
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.fc1 = dense(config.hidden_size, config.intermediate_size, policy, rngs)
        self.fc2 = dense(config.intermediate_size, config.hidden_size, policy, rngs)

    def __call__(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, policy: Policy, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(config, policy, rngs)
        self.layer_norm1 = LayerNorm(config.hidden_size, config.layer_norm_eps, policy, rngs)
        self.mlp = CLIPMLP(config, policy, rngs)
        self.layer_norm2 = LayerNorm(config.hidden_size, config.layer_norm_eps, policy, rngs)

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, policy: Policy, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(config, policy, rngs) for _ in range(config.num_hidden_layers)])

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, config: CLIPVisionConfig, policy: Policy, rngs: nnx.Rngs):
        self.embeddings = CLIPVisionEmbeddings(config, policy, rngs)
        self.pre_layrnorm = LayerNorm(config.hidden_size, config.layer_norm_eps, policy, rngs)
        self.encoder = CLIPEncoder(config, policy, rngs)
        self.post_layernorm = LayerNorm(config.hidden_size, config.layer_norm_eps, policy, rngs)

    def __call__(self, pixel_values):
        """``pixel_values [B, S, S, C]`` -> pooled (post-LN class token) ``[B, hidden_size]``."""
        hidden = self.encoder(self.pre_layrnorm(self.embeddings(pixel_values)))
        return self.post_layernorm(hidden[:, 0])


class CLIPVisionModelWithProjection(nnx.Module):
    """``image_encoder(pixel_values [B, S, S, 3]) -> image_embeds [B, projection_dim]`` (channels-last pixels,
    already CLIP-normalised; see :func:`svd_jax.preprocess.clip_preprocess`)."""

    def __init__(self, config: CLIPVisionConfig, *, policy: Policy | None = None, rngs: nnx.Rngs):
        policy = policy or Policy.float32()
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, policy, rngs)
        self.visual_projection = dense(config.hidden_size, config.projection_dim, policy, rngs, use_bias=False)

    def __call__(self, pixel_values):
        c = self.config
        expected = (c.image_size, c.image_size, c.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"image_encoder expects pixel_values [B, {c.image_size}, {c.image_size}, "
                             f"{c.num_channels}] (channels last), got {tuple(pixel_values.shape)}")
        return self.visual_projection(self.vision_model(pixel_values))
