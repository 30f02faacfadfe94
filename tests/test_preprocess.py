"""Image loading and CLIP / VAE input preparation against diffusers and transformers."""

import types

import jax
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
    StableVideoDiffusionPipeline,
    _resize_with_antialiasing,
)
from diffusers.utils import load_image as diffusers_load_image
from diffusers.video_processor import VideoProcessor
from transformers import CLIPImageProcessor

from svd_jax import preprocess
from svd_jax.preprocess import clip_input, clip_preprocess, load_image, prepare_image


def _random_images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1.0, 1.0, shape).astype(np.float32)


def _random_pil(height, width, mode="RGB", seed=0):
    channels = {"RGB": 3, "RGBA": 4}.get(mode)
    shape = (height, width) if channels is None else (height, width, channels)
    pixels = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    return PIL.Image.fromarray(pixels, mode=mode)


def _reference_pixel_values(images_nhwc):
    """diffusers' CLIP path: antialiased resize in [-1, 1], back to [0, 1], CLIPImageProcessor normalisation."""
    x = torch.from_numpy(images_nhwc).permute(0, 3, 1, 2)
    x = _resize_with_antialiasing(x, (224, 224))
    x = (x + 1.0) / 2.0
    pixel_values = CLIPImageProcessor()(
        images=x, do_normalize=True, do_center_crop=False, do_resize=False, do_rescale=False, return_tensors="pt"
    ).pixel_values
    return pixel_values.permute(0, 2, 3, 1).numpy()


# ------------------------------------------------------------------------------------------------
# clip_preprocess
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("height,width", [(576, 1024), (320, 512), (333, 517), (128, 300), (1080, 1920)])
def test_clip_preprocess_matches_diffusers(height, width):
    images = _random_images((2, height, width, 3), seed=height)
    expected = _reference_pixel_values(images)
    got = np.asarray(clip_preprocess(images))
    assert got.shape == (2, 224, 224, 3) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def test_clip_preprocess_jit_and_unbatched_input():
    image = _random_images((333, 517, 3), seed=1)
    eager = np.asarray(clip_preprocess(image))
    jitted = np.asarray(jax.jit(clip_preprocess, static_argnames="size")(image))
    assert eager.shape == (1, 224, 224, 3)
    np.testing.assert_allclose(jitted, eager, rtol=0, atol=1e-6)
    np.testing.assert_allclose(eager, _reference_pixel_values(image[None]), rtol=0, atol=1e-5)


def test_blur_parameters_for_svd_resolution():
    # 576x1024 -> 224: sigma (0.786, 1.786), kernel (3, 7) (kornia 0.6.9 formula).
    sigma_h, ksize_h = preprocess.antialias_blur_params(576, 224)
    sigma_w, ksize_w = preprocess.antialias_blur_params(1024, 224)
    assert (ksize_h, ksize_w) == (3, 7)
    np.testing.assert_allclose((sigma_h, sigma_w), (0.7857142857, 1.7857142857), rtol=1e-9)


@pytest.mark.parametrize(
    "shape,dtype", [((2, 64, 64, 4), np.float32), ((64, 64), np.float32), ((1, 64, 64, 3), np.uint8)]
)
def test_clip_preprocess_rejects_bad_input(shape, dtype):
    with pytest.raises(ValueError, match="image_minus1_1"):
        clip_preprocess(np.zeros(shape, dtype))


# ------------------------------------------------------------------------------------------------
# Whole conditioning path against the pipeline's own code
# ------------------------------------------------------------------------------------------------


class _EchoImageEncoder(torch.nn.Module):
    """Stands in for the CLIP tower: returns the pixel values it was given as the embedding."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values):
        return types.SimpleNamespace(image_embeds=pixel_values.flatten(1))


def test_clip_conditioning_matches_pipeline_encode_image():
    pil = _random_pil(300, 417, seed=3)
    pipeline_like = types.SimpleNamespace(
        video_processor=VideoProcessor(do_resize=True, vae_scale_factor=8),
        feature_extractor=CLIPImageProcessor(),
        image_encoder=_EchoImageEncoder(),
    )
    embeds = StableVideoDiffusionPipeline._encode_image(pipeline_like, pil, "cpu", 1, False)
    expected = embeds.reshape(1, 3, 224, 224).permute(0, 2, 3, 1).numpy()
    got = np.asarray(clip_preprocess(clip_input(pil)))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# prepare_image / clip_input
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source_size", [(300, 417), (320, 512)])
def test_prepare_image_matches_video_processor(source_size):
    pil = _random_pil(*source_size, seed=4)
    expected = VideoProcessor(do_resize=True, vae_scale_factor=8).preprocess(pil, height=320, width=512)
    expected = expected[0].permute(1, 2, 0).numpy()
    got = prepare_image(pil, height=320, width=512)
    assert got.shape == (320, 512, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_clip_input_is_original_image_in_minus1_1():
    pil = _random_pil(301, 419, seed=5)
    processor = VaeImageProcessor()
    expected = processor.numpy_to_pt(processor.pil_to_numpy(pil)) * 2.0 - 1.0
    got = clip_input(pil)
    assert got.shape == (301, 419, 3) and got.dtype == np.float32
    np.testing.assert_array_equal(got, expected[0].permute(1, 2, 0).numpy())


@pytest.mark.parametrize("height,width", [(0, 512), (-8, 512), (320, 500), (321, 512), (320.0, 512), (True, 512)])
def test_prepare_image_rejects_bad_size(height, width):
    with pytest.raises(ValueError, match="height|width"):
        prepare_image(_random_pil(16, 16), height=height, width=width)


# ------------------------------------------------------------------------------------------------
# load_image
# ------------------------------------------------------------------------------------------------


def test_load_image_rgba_drops_alpha_and_grey_replicates():
    rgba = _random_pil(20, 30, mode="RGBA", seed=6)
    loaded = load_image(rgba)
    assert loaded.mode == "RGB"
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(rgba)[..., :3])

    grey = _random_pil(20, 30, mode="L", seed=7)
    loaded = np.asarray(load_image(grey))
    np.testing.assert_array_equal(loaded, np.repeat(np.asarray(grey)[..., None], 3, axis=-1))


def test_load_image_path_matches_diffusers(tmp_path):
    pil = _random_pil(24, 40, seed=8)
    png = tmp_path / "image.png"
    pil.save(png)
    # A JPEG whose EXIF orientation (6: rotate 90) must be applied.
    jpg = tmp_path / "rotated.jpg"
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    pil.save(jpg, exif=exif)
    for path in (png, str(png), jpg):
        loaded = load_image(path)
        assert loaded.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(loaded), np.asarray(diffusers_load_image(str(path))))
    assert load_image(jpg).size == (24, 40)
    np.testing.assert_array_equal(np.asarray(load_image(png)), np.asarray(pil))


def test_load_image_numpy_inputs():
    rng = np.random.default_rng(9)
    rgb = rng.integers(0, 256, (12, 18, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(rgb)), rgb)
    rgba = rng.integers(0, 256, (12, 18, 4), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(rgba)), rgba[..., :3])
    grey = rng.integers(0, 256, (12, 18), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(grey)), np.repeat(grey[..., None], 3, axis=-1))
    np.testing.assert_array_equal(np.asarray(load_image(grey[..., None])), np.asarray(load_image(grey)))

    unit = rng.uniform(0.0, 1.0, (12, 18, 3))
    expected = VaeImageProcessor.numpy_to_pil(unit[None])[0]
    np.testing.assert_array_equal(np.asarray(load_image(unit)), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(load_image(unit.astype(np.float32))), np.asarray(expected))


def test_load_image_file_errors(tmp_path):
    missing = tmp_path / "missing.png"
    with pytest.raises(ValueError, match="missing.png"):
        load_image(missing)
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    with pytest.raises(ValueError, match="notes.png"):
        load_image(str(not_image))
    with pytest.raises(ValueError, match=str(tmp_path.name)):
        load_image(tmp_path)
    with pytest.raises(TypeError, match="list"):
        load_image([1, 2, 3])


def _png_declaring(path, width: int, height: int):
    """A small valid PNG whose header is then rewritten to declare ``width x height`` (a decompression bomb's
    header: the pixel data would be decompressed only when loaded)."""
    import struct
    import zlib

    PIL.Image.new("L", (8, 8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data[12:29]  # b"IHDR" + 13 bytes of fields
    ihdr[4:12] = struct.pack(">II", width, height)
    data[12:33] = bytes(ihdr) + struct.pack(">I", zlib.crc32(bytes(ihdr)))
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("size", [(100_000, 100_000), (9000, 9000), (2 ** 31 - 1, 2 ** 31 - 1)])
def test_load_image_refuses_huge_declared_sizes(tmp_path, size):
    bomb = _png_declaring(tmp_path / "bomb.png", *size)
    with pytest.raises(ValueError) as error:
        load_image(bomb)
    assert str(bomb) in str(error.value) and "resize it first" in str(error.value)
    assert len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((8, 8, 2), np.uint8),
        np.zeros((1, 8, 8, 3), np.uint8),
        np.zeros((8,), np.uint8),
        np.zeros((0, 8, 3), np.uint8),
    ],
)
def test_load_image_rejects_bad_shapes(array):
    with pytest.raises(ValueError, match=r"shape .*" + str(array.shape).replace("(", r"\(").replace(")", r"\)")):
        load_image(array)


@pytest.mark.parametrize(
    "array", [np.full((8, 8, 3), 1.5), np.full((8, 8, 3), -0.1), np.full((8, 8, 3), np.nan), np.zeros((8, 8, 3), np.int32)]
)
def test_load_image_rejects_bad_values(array):
    with pytest.raises(ValueError, match="image array"):
        load_image(array)


def test_load_image_scales_16_bit_and_float_grey_files(tmp_path):
    """PIL's convert("RGB") would clip a 16-bit PNG to near white and truncate a float TIFF in [0, 1] to black;
    they are scaled to 8 bits instead, as the same image saved in 8 bits reads."""
    ramp = np.linspace(0.0, 1.0, 12 * 18).reshape(12, 18)
    eight = np.round(ramp * 255).astype(np.uint8)
    PIL.Image.fromarray(np.round(ramp * 65535).astype(np.uint16)).save(tmp_path / "sixteen.png")
    PIL.Image.fromarray(ramp.astype(np.float32), "F").save(tmp_path / "float.tiff")
    for name in ("sixteen.png", "float.tiff"):
        assert PIL.Image.open(tmp_path / name).mode in ("I;16", "I", "F")
        loaded = np.asarray(load_image(tmp_path / name))
        assert np.abs(loaded.astype(int) - eight[..., None]).max() <= 1, name
    PIL.Image.fromarray(np.full((8, 8), 2.0, np.float32), "F").save(tmp_path / "bright.tiff")
    with pytest.raises(ValueError) as error:
        load_image(tmp_path / "bright.tiff")
    assert str(error.value).startswith(f"{tmp_path / 'bright.tiff'}: a float image must lie in [0, 1]")
