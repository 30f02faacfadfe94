"""A tiny random diffusers StableVideoDiffusionPipeline, for pipeline and notebook tests."""

from diffusers import (AutoencoderKLTemporalDecoder, EulerDiscreteScheduler, StableVideoDiffusionPipeline,
                       UNetSpatioTemporalConditionModel)
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from parity import randomize

SVD_SCHEDULER = dict(prediction_type="v_prediction", timestep_type="continuous", use_karras_sigmas=True,
                     sigma_min=0.002, sigma_max=700.0, timestep_spacing="leading", steps_offset=1,
                     beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
                     interpolation_type="linear")


def tiny_pipeline(seed=0):
    unet = UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=8, out_channels=4,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
        cross_attention_dim=32, num_attention_heads=(2, 4), projection_class_embeddings_input_dim=48,
        addition_time_embed_dim=16, num_frames=3)
    vae = AutoencoderKLTemporalDecoder(block_out_channels=(32, 64), in_channels=3, out_channels=3, layers_per_block=1,
                                       down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=4)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=32, projection_dim=32, num_hidden_layers=2, num_attention_heads=4, image_size=224,
        intermediate_size=37, patch_size=32))
    for i, module in enumerate((unet, vae, image_encoder)):
        randomize(module, seed=seed + i, scale=0.3)
    return StableVideoDiffusionPipeline(vae=vae, image_encoder=image_encoder, unet=unet,
                                        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER),
                                        feature_extractor=CLIPImageProcessor(crop_size=224, size=224))


def random_image(seed, height=36, width=44):
    """A PIL image of uniform random pixels."""
    import numpy as np
    import PIL.Image

    return PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def tiny_reference_and_pipeline(root):
    """The tiny diffusers UNet, and an ``svd_jax.Pipeline`` (float32) of the whole tiny pipeline converted from
    diffusers through the real converter into ``root``."""
    import svd_jax
    from parity import convert_inprocess

    reference = tiny_pipeline()
    reference.save_pretrained(root / "diffusers")
    convert_inprocess(root / "diffusers", root / "converted", "--no-hash")
    return reference.unet, svd_jax.Pipeline(svd_jax.load(root / "converted", policy=svd_jax.Policy.float32()))
