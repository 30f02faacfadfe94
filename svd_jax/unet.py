"""The SVD denoiser: diffusers ``UNetSpatioTemporalConditionModel`` (sgm ``VideoUNet``), channels-last.

``unet(sample [B, F, h, w, in], timestep [B], encoder_hidden_states [B, L, D], added_time_ids [B, 3])
-> [B, F, h, w, out]``. The timestep and added-time-id embeddings ([cos | sin] sinusoids, shift 0) are summed,
broadcast to every frame, and fed to every resnet; the context stays one per video (``[B, L, D]``): the spatial
and temporal cross-attentions project it once per video and share it across frames and positions. Frames are folded into the batch
(row ``b*F + f``) for the spatial layers. Any number of frames and any latent size that the down path can halve
exactly are accepted.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from svd_jax.configs import UNetConfig
from svd_jax.layers import GroupNorm, TimestepEmbedding, conv, sinusoidal_embedding
from svd_jax.policy import Policy
from svd_jax.unet_blocks import (DownBlockSpatioTemporal, UNetMidBlockSpatioTemporal, UpBlockSpatioTemporal,
                                 transformer_settings)


def _has_attention(block_type: str) -> bool:
    return block_type.startswith("CrossAttn")


class UNetSpatioTemporalConditionModel(nnx.Module):
    """Attribute paths are diffusers' (``down_blocks.0.attentions.1.proj_in``); see :mod:`svd_jax.unet_blocks`.
    ``policy.remat`` (:mod:`svd_jax.policy`) chooses the gradient checkpointing of every resnet and transformer."""

    def __init__(self, config: UNetConfig, *, policy: Policy | None = None, rngs: nnx.Rngs):
        policy = policy or Policy.float32()
        self.config = config
        self.dtype = policy.compute
        channels = config.block_out_channels
        groups = config.norm_num_groups
        temb = channels[0] * 4
        n = len(channels)

        def attention(level: int) -> dict:
            return transformer_settings(config.num_attention_heads[level], config.cross_attention_dim[level],
                                        config.transformer_layers_per_block[level], config.transformer_norm_eps,
                                        config.layer_norm_eps)

        self.conv_in = conv(config.in_channels, channels[0], 3, policy, rngs)
        self.time_embedding = TimestepEmbedding(channels[0], temb, policy, rngs)
        self.add_embedding = TimestepEmbedding(config.projection_class_embeddings_input_dim, temb, policy, rngs)

        down = []
        for i, block_type in enumerate(config.down_block_types):
            down.append(DownBlockSpatioTemporal(
                channels[max(i - 1, 0)], channels[i], temb, config.layers_per_block[i], config.down_resnet_eps[i],
                i < n - 1, policy, rngs, attention=attention(i) if _has_attention(block_type) else None,
                groups=groups))
        self.down_blocks = nnx.List(down)

        self.mid_block = UNetMidBlockSpatioTemporal(channels[-1], temb, config.mid_resnet_eps, attention(n - 1),
                                                    policy, rngs, groups=groups)

        up = []
        output_channels = channels[-1]
        for i, block_type in enumerate(config.up_block_types):
            level = n - 1 - i  # the down level this up block mirrors
            prev_output_channels, output_channels = output_channels, channels[level]
            up.append(UpBlockSpatioTemporal(
                channels[max(level - 1, 0)], prev_output_channels, output_channels, temb,
                config.layers_per_block[level] + 1, config.up_resnet_eps[i], i < n - 1, policy, rngs,
                attention=attention(level) if _has_attention(block_type) else None, groups=groups))
        self.up_blocks = nnx.List(up)

        self.conv_norm_out = GroupNorm(channels[0], groups, config.out_norm_eps, policy, rngs)
        self.conv_out = conv(channels[0], config.out_channels, 3, policy, rngs)

    def _check_inputs(self, sample, timestep, encoder_hidden_states, added_time_ids) -> None:
        c = self.config
        if sample.ndim != 5:
            raise ValueError(f"unet: sample must be [B, F, h, w, {c.in_channels}] (channels last), "
                             f"got shape {tuple(sample.shape)}")
        b, f, h, w, channels = sample.shape
        if channels != c.in_channels:
            raise ValueError(f"unet: sample has {channels} channels, the model takes {c.in_channels} "
                             f"(noisy latent and conditioning latent, channels last): shape {tuple(sample.shape)}")
        factor = c.downsample_factor
        if h % factor or w % factor:
            raise ValueError(f"unet: latent size {h}x{w} must be a multiple of {factor} "
                             f"({len(c.block_out_channels) - 1} halvings in the down path)")
        if jnp.ndim(timestep) not in (0, 1) or (jnp.ndim(timestep) == 1 and jnp.shape(timestep)[0] != b):
            raise ValueError(f"unet: timestep must be a scalar or [{b}] (one per video), got shape "
                             f"{tuple(jnp.shape(timestep))}")
        d = c.cross_attention_dim[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b or encoder_hidden_states.shape[2] != d:
            hint = " (one context per video, not per frame)" if encoder_hidden_states.shape[0] == b * f != b else ""
            raise ValueError(f"unet: encoder_hidden_states must be [{b}, L, {d}]{hint}, got shape "
                             f"{tuple(encoder_hidden_states.shape)}")
        if tuple(added_time_ids.shape) != (b, c.num_added_time_ids):
            raise ValueError(f"unet: added_time_ids must be [{b}, {c.num_added_time_ids}] (fps-1, motion_bucket_id, "
                             f"noise_aug_strength per video), got shape {tuple(added_time_ids.shape)}")

    def _embedding(self, timestep, added_time_ids, batch: int):
        """Time embedding plus added-time-ids embedding, ``[B, 4 * C0]``."""
        c = self.config
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (batch,))
        emb = self.time_embedding(sinusoidal_embedding(timestep, c.block_out_channels[0]).astype(self.dtype))
        ids = jnp.asarray(added_time_ids, jnp.float32).reshape(-1)
        ids_emb = sinusoidal_embedding(ids, c.addition_time_embed_dim).reshape(batch, -1)
        return emb + self.add_embedding(ids_emb.astype(self.dtype))

    def __call__(self, sample, timestep, encoder_hidden_states, added_time_ids):
        return self.call_with_deep_features(sample, timestep, encoder_hidden_states, added_time_ids)[0]

    def call_with_deep_features(self, sample, timestep, encoder_hidden_states, added_time_ids, deep_features=None):
        """``(output, deep_features)``; with ``deep_features`` given, only the shallow branch runs.

        The deep features are the input of the last up block (everything below the first level's skips, at full
        latent resolution). Without ``deep_features`` the whole UNet runs and they are returned with its output;
        with them (from an earlier call: DeepCache-style step caching), only ``conv_in``, the first down block's
        layers, the last up block and the output convolution run, and the given features stand in for the rest.
        """
        self._check_inputs(sample, timestep, encoder_hidden_states, added_time_ids)
        b, f, h, w, channels = sample.shape
        temb = jnp.repeat(self._embedding(timestep, added_time_ids, b), f, axis=0)
        context = encoder_hidden_states.astype(self.dtype)
        last = self.up_blocks[-1]
        shallow = deep_features is not None

        x = self.conv_in(sample.astype(self.dtype).reshape(b * f, h, w, channels))
        skips = [x]
        for block in self.down_blocks[:1] if shallow else self.down_blocks:
            x, block_skips = block(x, f, temb, context)
            skips.extend(block_skips)
        if shallow:  # the first block's downsampled output feeds only the deep branch (and is compiled away)
            x, skips = deep_features, skips[:len(last.resnets)]
        else:
            x = self.mid_block(x, f, temb, context)
            for block in self.up_blocks[:-1]:
                count = len(block.resnets)
                x = block(x, tuple(skips[-count:]), f, temb, context)
                del skips[-count:]
        deep_features = x
        x = last(x, tuple(skips), f, temb, context)

        x = self.conv_out(jax.nn.silu(self.conv_norm_out(x)))
        return x.reshape(b, f, h, w, -1), deep_features
