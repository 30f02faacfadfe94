"""The training objective against a PyTorch reference: a tiny random diffusers UNet, converted with the real
converter, one batch with injected noise levels, noise and image-dropout mask. The reference writes sgm's
``StandardDiffusionLoss`` out in torch (``Denoiser`` with ``VScalingWithEDMcNoise``, ``VWeighting``, the mean
per clip, then over clips); loss and gradients must match in float32, with gradient checkpointing on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNetSpatioTemporalConditionModel as TorchUNet
from flax import nnx

import svd_jax
from convert import rules
from parity import convert_inprocess, max_rel_err, randomize
from svd_jax.components import abstract_model
from svd_jax.configs import UNetConfig
from svd_jax.train.conditioning import ClipFeatures, training_batch
from svd_jax.train.config import ObjectiveConfig
from svd_jax.train.objective import (DiffusionNoise, TrainBatch, diffusion_loss, draw_diffusion_noise,
                                     drop_image_conditioning, sample_log_normal, v_weighting)
from svd_jax.train.params import split_model
from train_helpers import VAE, random_model
from unet_helpers import DOWN_CROSS, tiny_unet_config

# 64 channels in 32 groups: with one channel per group the GroupNorms would cancel the time embedding exactly.
CONFIG = tiny_unet_config((64,), (2,), 1, [DOWN_CROSS], cross_dim=16, num_frames=3)
B, F, H, W = 2, 3, 8, 8


def _torch_loss(model, x0, cond, embeds, ids, sigma, noise, keep):
    """sgm's loss for v-prediction SVD, in diffusers' layout (x0 [B, F, C, h, w])."""
    k = keep.view(-1, 1, 1, 1)
    cond = cond * k
    embeds = embeds * keep.view(-1, 1, 1)
    s = sigma.view(-1, 1, 1, 1, 1)
    x = x0 + noise * s
    c_skip, c_out, c_in = 1 / (s ** 2 + 1), -s / (s ** 2 + 1) ** 0.5, 1 / (s ** 2 + 1) ** 0.5
    c_noise = 0.25 * sigma.log()
    model_in = torch.cat([x * c_in, cond[:, None].expand(-1, x.shape[1], -1, -1, -1)], dim=2)
    out = model(model_in, c_noise, encoder_hidden_states=embeds, added_time_ids=ids).sample
    denoised = out * c_out + x * c_skip
    w = (s ** 2 + 1) / s ** 2
    return (w * (denoised - x0) ** 2).reshape(x0.shape[0], -1).mean(dim=1).mean()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("objective")
    model = randomize(TorchUNet(**{k: v for k, v in CONFIG.items() if not k.startswith("_")}), seed=3)
    model.save_pretrained(root / "src" / "unet")
    convert_inprocess(root / "src", root / "dst", "--no-hash")
    return model, root / "dst"


def test_loss_and_gradients_match_pytorch(converted):
    torch_model, dst = converted
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, F, 4, H, W, generator=g) * 0.8
    cond = torch.randn(B, 4, H, W, generator=g)
    embeds = torch.randn(B, 1, 16, generator=g)
    ids = torch.tensor([[6.0, 127.0, 0.02], [9.0, 40.0, 0.11]])
    sigma = torch.tensor([0.35, 4.0])
    noise = torch.randn(B, F, 4, H, W, generator=g)
    keep = torch.tensor([1.0, 0.0])  # the second clip's image conditioning is dropped

    torch_model.zero_grad()
    expected_loss = _torch_loss(torch_model, x0, cond, embeds, ids, sigma, noise, keep)
    expected_loss.backward()
    torch_grads = {k: p.grad.numpy() for k, p in torch_model.named_parameters()}

    unet = svd_jax.load(dst, policy=svd_jax.Policy.float32(remat="block")).unet
    layers = [node for _, node in nnx.iter_graph(unet) if getattr(node, "remat", None) == "block"]
    assert len(layers) == 9  # resnets + transformers: down 1 + 1, mid 2 + 1, up 2 + 2
    structure, params, frozen = split_model(unet, "all")
    cl = lambda t: jnp.asarray(t.numpy())  # noqa: E731
    batch = TrainBatch(cl(x0.permute(0, 1, 3, 4, 2)), cl(cond.permute(0, 2, 3, 1)), cl(embeds), cl(ids))
    injected = DiffusionNoise(cl(sigma), cl(noise.permute(0, 1, 3, 4, 2)), cl(keep))

    def loss(params):
        return diffusion_loss(structure.merge(params, frozen), batch, injected)[0]

    actual_loss, grads = jax.jit(jax.value_and_grad(loss))(params)
    expected_loss = float(expected_loss.detach())
    assert abs(float(actual_loss) - expected_loss) <= 1e-4 * abs(expected_loss)

    expected = rules.fill(rules.expected_keys(abstract_model("unet", UNetConfig.from_diffusers_config(CONFIG))),
                          torch_grads.__getitem__)
    assert set(expected) == set(grads)
    chosen = ["conv_in.kernel", "conv_out.bias", "time_embedding.linear_1.kernel", "add_embedding.linear_2.kernel",
              "down_blocks.0.resnets.0.spatial_res_block.conv1.kernel",
              "down_blocks.0.resnets.0.temporal_res_block.conv2.kernel",
              "mid_block.resnets.1.time_mixer.mix_factor",
              "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.kernel",
              "up_blocks.0.attentions.1.temporal_transformer_blocks.0.ff_in.net.0.proj.kernel",
              "up_blocks.0.attentions.1.time_pos_embed.linear_1.kernel", "up_blocks.0.attentions.0.proj_out.kernel"]
    for key in chosen:
        assert float(np.max(np.abs(expected[key]))) > 0, key
        assert max_rel_err(grads[key], expected[key]) <= 1e-4, key
    # Every other leaf too. With one context token the cross-attention softmax is identically 1, so attn2's q, k
    # and the norm before it get exactly zero gradient (torch gives ~1e-11 of rounding): both must be ~0 there.
    scale = max(float(np.abs(g).max()) for g in expected.values())
    vanishing = {k for k, g in expected.items() if np.abs(g).max() < 1e-7 * scale}
    assert vanishing and all(".attn2.to_q." in k or ".attn2.to_k." in k or ".norm2." in k for k in vanishing)
    assert all(float(np.abs(grads[k]).max()) < 1e-7 * scale for k in vanishing)
    worst = max((max_rel_err(grads[k], expected[k]), k) for k in expected if k not in vanishing)
    print(f"loss {float(actual_loss):.6f} vs {expected_loss:.6f}; worst gradient leaf {worst}")
    assert worst[0] <= 1e-4, worst


def test_v_weighting_and_log_normal():
    sigma = np.array([0.01, 0.5, 1.0, 20.0], np.float32)
    np.testing.assert_allclose(v_weighting(sigma), (sigma ** 2 + 1) / sigma ** 2, rtol=1e-6)
    draws = np.log(np.asarray(sample_log_normal(jax.random.key(0), (20000,), 0.7, 1.6)))
    assert abs(draws.mean() - 0.7) < 0.05 and abs(draws.std() - 1.6) < 0.05


def test_drawn_noise_and_dropout():
    objective = ObjectiveConfig(p_mean=-1.2, p_std=1.2, cond_dropout=0.25)
    noise = draw_diffusion_noise(jax.random.key(1), (4000, 2, 1, 1, 1), objective)
    assert noise.sigma.shape == (4000,) and noise.noise.shape == (4000, 2, 1, 1, 1)
    assert abs(float(jnp.log(noise.sigma).mean()) + 1.2) < 0.08
    assert abs(float(1 - noise.keep_image.mean()) - 0.25) < 0.03
    none_dropped = draw_diffusion_noise(jax.random.key(1), (64, 1, 1, 1, 1), ObjectiveConfig(cond_dropout=0.0))
    assert float(none_dropped.keep_image.min()) == 1.0

    batch = TrainBatch(jnp.ones((2, 3, 4, 4, 4)), jnp.ones((2, 4, 4, 4)), jnp.ones((2, 1, 8)), jnp.ones((2, 3)))
    dropped = drop_image_conditioning(batch, jnp.array([0.0, 1.0]))
    assert float(jnp.abs(dropped.cond_latents[0]).max()) == 0 and float(jnp.abs(dropped.image_embeds[0]).max()) == 0
    assert float(dropped.cond_latents[1].min()) == 1 and float(dropped.image_embeds[1].min()) == 1
    assert dropped.latents is batch.latents and dropped.added_time_ids is batch.added_time_ids


def test_bad_noise_shape():
    batch = TrainBatch(jnp.ones((2, 3, 4, 4, 4)), jnp.ones((2, 4, 4, 4)), jnp.ones((2, 1, 8)), jnp.ones((2, 3)))
    noise = DiffusionNoise(jnp.ones((2,)), jnp.ones((2, 3, 4, 4, 3)), jnp.ones((2,)))
    with pytest.raises(ValueError, match="do not match latents"):
        diffusion_loss(None, batch, noise)


def test_training_batch_augments_the_conditioning_frame_in_pixels():
    """Video latents: posterior samples times scaling_factor; conditioning latent: posterior mean of the first
    frame plus Gaussian pixel noise of a per-clip std that is also the third added time id."""
    vae = random_model("vae", VAE, seed=4)
    rng = np.random.default_rng(0)
    frames = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    clean, _ = vae.encode(frames)
    mean = jnp.asarray(rng.normal(size=(2, 3, 8, 8, 4)), jnp.float32)
    logvar = jnp.asarray(rng.uniform(-3, 1, (2, 3, 8, 8, 4)), jnp.float32)
    features = ClipFeatures(mean, logvar, jnp.ones((2, 16)), frames, jnp.array([6.0, 3.0]), jnp.array([127.0, 9.0]))

    quiet = training_batch(vae, features, jax.random.key(0), ObjectiveConfig(
        latent_sample=False, cond_aug_p_mean=float(np.log(1e-6)), cond_aug_p_std=0.0))
    np.testing.assert_allclose(quiet.latents, mean * VAE.scaling_factor, rtol=1e-6)
    np.testing.assert_allclose(quiet.added_time_ids, [[6.0, 127.0, 1e-6], [3.0, 9.0, 1e-6]], rtol=1e-5)
    assert max_rel_err(quiet.cond_latents, clean) < 1e-4 and quiet.image_embeds.shape == (2, 1, 16)

    noisy = training_batch(vae, features, jax.random.key(0), ObjectiveConfig(cond_aug_p_mean=float(np.log(0.5)),
                                                                             cond_aug_p_std=0.0))
    np.testing.assert_allclose(noisy.added_time_ids[:, 2], [0.5, 0.5], rtol=1e-6)
    assert max_rel_err(noisy.cond_latents, clean) > 1e-2
    eps = (noisy.latents / VAE.scaling_factor - mean) / jnp.exp(0.5 * logvar)
    assert abs(float(eps.mean())) < 0.05 and abs(float(eps.std()) - 1) < 0.05
