"""Image loading and the two image preparations of Stable Video Diffusion.

* The VAE conditioning image: Lanczos resize to height x width (PIL), then [0, 1] -> [-1, 1],
  as diffusers' ``VideoProcessor.preprocess`` does for a PIL image (`prepare_image`).
* The CLIP input: the *original* image in [-1, 1] (`clip_input`), blurred and bicubic-resized to
  224 x 224 in [-1, 1] space, mapped back to [0, 1] and normalised with the OpenAI CLIP mean/std
  (`clip_preprocess`). The resize reproduces kornia 0.6.9's antialiased bicubic resize, which is
  what diffusers' ``_resize_with_antialiasing`` and the original implementation compute.

The CLIP resize is linear and separable, so it is written as two small dense matrices per image
size (Gaussian blur with reflect padding, then bicubic interpolation with ``align_corners=True``),
built once in numpy and applied with einsum. The function is jit-able: the matrices depend only
on the static input shape.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import PIL.ImageOps

CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_MEAN.flags.writeable = False
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
CLIP_STD.flags.writeable = False

_CUBIC_A = -0.75  # Keys cubic convolution coefficient used by PyTorch's bicubic interpolation


# --------------------------------------------------------------------------------------------
# CLIP antialiased resize as matrices
# --------------------------------------------------------------------------------------------


def antialias_blur_params(in_size: int, out_size: int) -> tuple[float, int]:
    """Gaussian sigma and (odd) kernel size kornia 0.6.9 uses before resizing in_size -> out_size."""
    factor = in_size / out_size
    sigma = max((factor - 1.0) / 2.0, 0.001)
    ksize = int(max(2.0 * 2 * sigma, 3))
    if ksize % 2 == 0:
        ksize += 1
    return sigma, ksize


def _gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian at integer offsets from the centre, in float32 like the reference."""
    x = np.arange(ksize, dtype=np.float32) - np.float32(ksize // 2)
    sigma32 = np.float32(sigma)
    gauss = np.exp(-(x**2) / (np.float32(2) * sigma32**2))
    return gauss / gauss.sum(dtype=np.float32)


def _reflect_index(index: np.ndarray, size: int) -> np.ndarray:
    """numpy/PyTorch "reflect" padding (the edge sample is not repeated)."""
    if size == 1:
        return np.zeros_like(index)
    period = 2 * (size - 1)
    index = np.mod(index, period)
    return np.where(index >= size, period - index, index)


def gaussian_blur_matrix(size: int, ksize: int, sigma: float) -> np.ndarray:
    """[size, size] float64 matrix of a 1-D Gaussian blur with reflect padding."""
    kernel = _gaussian_kernel(ksize, sigma).astype(np.float64)
    pad = (ksize - 1) // 2
    rows = np.arange(size)[:, None]
    cols = _reflect_index(rows + np.arange(ksize)[None, :] - pad, size)
    matrix = np.zeros((size, size), dtype=np.float64)
    np.add.at(matrix, (np.broadcast_to(rows, cols.shape), cols), kernel[None, :])
    return matrix


def _cubic_near(t: np.ndarray) -> np.ndarray:
    a = np.float32(_CUBIC_A)
    return ((a + 2) * t - (a + 3)) * t * t + 1


def _cubic_far(t: np.ndarray) -> np.ndarray:
    a = np.float32(_CUBIC_A)
    return ((a * t - 5 * a) * t + 8 * a) * t - 4 * a


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float64 matrix of PyTorch's bicubic interpolation, align_corners=True.

    Source coordinate dst * (in - 1) / (out - 1), Keys cubic with a = -0.75, border indices
    clamped; the coordinates and weights are computed in float32 as PyTorch does on CPU.
    """
    scale = np.float32((in_size - 1) / (out_size - 1)) if out_size > 1 else np.float32(0)
    real = scale * np.arange(out_size, dtype=np.float32)
    base = np.minimum(np.floor(real).astype(np.int64), in_size - 1)
    t = np.clip(real - base.astype(np.float32), np.float32(0), np.float32(1))
    one = np.float32(1)
    weights = np.stack(
        [_cubic_far(t + one), _cubic_near(t), _cubic_near(one - t), _cubic_far((one - t) + one)], axis=1
    ).astype(np.float64)
    cols = np.clip(base[:, None] + np.arange(-1, 3)[None, :], 0, in_size - 1)
    matrix = np.zeros((out_size, in_size), dtype=np.float64)
    np.add.at(matrix, (np.broadcast_to(np.arange(out_size)[:, None], cols.shape), cols), weights)
    return matrix


@functools.lru_cache(maxsize=32)
def antialiased_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out_size, in_size] float32 matrix: Gaussian antialias blur, then bicubic resize, on one axis."""
    sigma, ksize = antialias_blur_params(in_size, out_size)
    matrix = bicubic_matrix(in_size, out_size) @ gaussian_blur_matrix(in_size, ksize, sigma)
    matrix = matrix.astype(np.float32)
    matrix.flags.writeable = False
    return matrix


def _as_image_batch(images, name: str) -> jax.Array:
    images = jnp.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{name} must have shape [B, H, W, 3] or [H, W, 3], got {tuple(images.shape)}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array in [-1, 1], got dtype {images.dtype}")
    return images.astype(jnp.float32)


def resize_with_antialiasing(image_minus1_1, size: int = 224) -> jax.Array:
    """Antialiased bicubic resize of [B, H, W, 3] (or [H, W, 3]) images to [B, size, size, 3], float32.

    Equal to diffusers' ``_resize_with_antialiasing(x, (size, size))`` (kornia 0.6.9's
    ``resize(..., "bicubic", align_corners=True, antialias=True)``). There is no clamp: bicubic
    overshoot is kept. ``size`` must be static under ``jax.jit``.
    """
    images = _as_image_batch(image_minus1_1, "image_minus1_1")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    rows = jnp.asarray(antialiased_resize_matrix(int(images.shape[1]), int(size)))
    cols = jnp.asarray(antialiased_resize_matrix(int(images.shape[2]), int(size)))
    highest = jax.lax.Precision.HIGHEST
    out = jnp.einsum("ih,bhwc->biwc", rows, images, precision=highest)
    return jnp.einsum("jw,biwc->bijc", cols, out, precision=highest)


def clip_preprocess(image_minus1_1, size: int = 224) -> jax.Array:
    """CLIP ``pixel_values`` [B, size, size, 3] float32 from images in [-1, 1], [B, H, W, 3] or [H, W, 3].

    Antialiased resize in [-1, 1] space, then (x + 1) / 2, then (x - CLIP_MEAN) / CLIP_STD. No
    crop (the aspect ratio is squashed to 1:1) and no clamp. ``size`` must be static under ``jax.jit``.
    """
    resized = resize_with_antialiasing(image_minus1_1, size)
    unit = (resized + 1.0) / 2.0
    return (unit - jnp.asarray(CLIP_MEAN)) / jnp.asarray(CLIP_STD)


# --------------------------------------------------------------------------------------------
# Loading and conditioning-image preparation
# --------------------------------------------------------------------------------------------


# The largest image file read (width x height, 8192 x 8192): the size is checked from the header before the
# pixels are decompressed, so a small file declaring a huge image (a decompression bomb) costs nothing.
MAX_IMAGE_PIXELS = 1 << 26


def _open_image_file(path) -> PIL.Image.Image:
    too_large = f"cannot read image file {os.fspath(path)!r}: it declares more than {MAX_IMAGE_PIXELS:,} pixels"
    try:
        image = PIL.Image.open(path)
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise ValueError(f"{too_large} ({image.width}x{image.height}; resize it first)")
        image.load()
    except PIL.Image.DecompressionBombError:  # beyond PIL's own limit, refused by PIL when opened
        raise ValueError(f"{too_large} (resize it first)") from None
    except (OSError, PIL.UnidentifiedImageError) as err:  # missing, a directory, not an image, truncated
        raise ValueError(f"cannot read image file {os.fspath(path)!r}: {err}") from None
    # Applies the EXIF orientation, as diffusers.utils.load_image does.
    return PIL.ImageOps.exif_transpose(image)


def _array_to_pil(array: np.ndarray) -> PIL.Image.Image:
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"image array must have shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image array must not be empty, got shape {array.shape}")
    if array.dtype == np.uint8:
        pixels = array
    elif np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise ValueError("float image array must lie in [0, 1], got non-finite values")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ValueError(f"float image array must lie in [0, 1], got range [{array.min()}, {array.max()}]")
        # Same rounding as diffusers' numpy_to_pil.
        pixels = (array * 255).round().astype(np.uint8)
    else:
        raise ValueError(f"image array must be uint8 or float in [0, 1], got dtype {array.dtype}")
    return PIL.Image.fromarray(np.ascontiguousarray(pixels))


def _eight_bit(image: PIL.Image.Image, name: str) -> PIL.Image.Image:
    """Grey images of more than 8 bits as 8-bit grey. PIL's ``convert("RGB")`` clips integer values at 255 (a
    16-bit PNG turns white) and truncates floats (an image in [0, 1] turns black); here 16-bit values are scaled
    (``round(v / 257)``) and float ones are read as [0, 1], as float arrays are."""
    if image.mode == "F":
        values = np.asarray(image)
        if not (np.all(np.isfinite(values)) and values.min() >= 0.0 and values.max() <= 1.0):
            raise ValueError(f"{name}: a float image must lie in [0, 1], got [{values.min()}, {values.max()}]")
        return _array_to_pil(values)
    if image.mode == "I" or image.mode.startswith("I;16"):
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"{name}: a {image.mode} image must lie in [0, 65535] (16-bit), got "
                             f"[{values.min()}, {values.max()}]")
        return PIL.Image.fromarray(np.round(values / 257.0).astype(np.uint8))
    return image


def load_image(image) -> PIL.Image.Image:
    """An RGB PIL image from a path, a PIL image or a numpy array.

    Arrays: [H, W] / [H, W, 1] (grey), [H, W, 3] (RGB) or [H, W, 4] (RGBA), uint8 or float in
    [0, 1]. Any mode is converted with ``convert("RGB")``: alpha is dropped, grey is replicated; 16-bit and float
    grey images are first scaled to 8 bits (16-bit values / 257, floats as [0, 1]).
    Files get their EXIF orientation applied first, as diffusers.utils.load_image does.
    """
    name = "image"
    if isinstance(image, (str, os.PathLike)):
        name = os.fspath(image)
        image = _open_image_file(image)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image)
    elif not isinstance(image, PIL.Image.Image):
        raise TypeError(f"image must be a path, a PIL.Image or a numpy array, got {type(image).__name__}")
    image = _eight_bit(image, name)
    return image if image.mode == "RGB" else image.convert("RGB")


def _pil_to_minus1_1(image: PIL.Image.Image) -> np.ndarray:
    # uint8 -> /255 in float32 -> 2x - 1, the arithmetic of diffusers' pil_to_numpy + normalize.
    unit = np.asarray(image).astype(np.float32) / 255.0
    return 2.0 * unit - 1.0


def _check_multiple_of_8(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0 or value % 8:
        raise ValueError(f"{name} must be a positive multiple of 8, got {value!r}")
    return int(value)


def prepare_image(image, height: int, width: int) -> np.ndarray:
    """The VAE conditioning image: float32 [height, width, 3] in [-1, 1].

    As diffusers' ``VideoProcessor.preprocess(image, height=height, width=width)`` for a PIL image:
    PIL Lanczos resize (a no-op when the image already has that size), /255, then 2x - 1.
    """
    height = _check_multiple_of_8(height, "height")
    width = _check_multiple_of_8(width, "width")
    pil = load_image(image)
    pil = pil.resize((width, height), resample=PIL.Image.Resampling.LANCZOS)
    return _pil_to_minus1_1(pil)


def clip_input(image) -> np.ndarray:
    """The CLIP conditioning image before `clip_preprocess`: float32 [H, W, 3] in [-1, 1] at the
    ORIGINAL size (diffusers resizes the original image for CLIP, not the height x width one)."""
    return _pil_to_minus1_1(load_image(image))
