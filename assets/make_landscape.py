"""Draws assets/landscape.png, the example image the README's first run uses: sky, sun, hills and a lake,
made from a few formulas so the repository needs no photograph. Run from the repository root:
``python assets/make_landscape.py``."""

from pathlib import Path

import numpy as np
from PIL import Image

HEIGHT, WIDTH = 288, 512  # 16:9 like the released models' 576x1024, at half size


def landscape() -> np.ndarray:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    u, v = x / WIDTH, y / HEIGHT
    sky = np.stack([0.35 + 0.5 * v, 0.55 + 0.35 * v, 0.95 - 0.15 * v], -1)  # deep blue above, pale at the horizon
    sun = np.exp(-(((u - 0.72) * 1.78) ** 2 + (v - 0.28) ** 2) / 0.004)[..., None]
    image = sky * (1 - sun) + np.array([1.0, 0.92, 0.6]) * sun
    far = 0.55 + 0.06 * np.sin(u * 9.0 + 1.0) + 0.03 * np.sin(u * 23.0)
    near = 0.68 + 0.05 * np.sin(u * 5.0 + 2.5) + 0.02 * np.sin(u * 31.0 + 0.7)
    image = np.where((v > far)[..., None], np.array([0.35, 0.45, 0.62]) - 0.1 * (v - far)[..., None], image)
    image = np.where((v > near)[..., None], np.array([0.22, 0.5, 0.2]) - 0.25 * (v - near)[..., None], image)
    lake = (v > 0.82) & (np.abs(u - 0.4) < 0.3 - (v - 0.82))
    ripple = 0.04 * np.sin(y * 1.3 + 4 * np.sin(x * 0.05))
    image = np.where(lake[..., None], np.array([0.3, 0.55, 0.85]) + ripple[..., None], image)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


if __name__ == "__main__":
    Image.fromarray(landscape()).save(Path(__file__).with_name("landscape.png"), optimize=True)
