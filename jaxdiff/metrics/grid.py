"""Sample grids as PNG files."""

from __future__ import annotations

import math
import os

import numpy as np


def image_grid(images, nrow: int | None = None, pad: int = 1, scale: int = 1) -> np.ndarray:
    """Tile images (N, H, W, C) with values in [-1, 1] into one uint8 image.

    ``scale`` enlarges each pixel (nearest neighbour), for small images such as 8x8 digits.
    """
    x = np.asarray(images, np.float32)
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C), got shape {x.shape}")
    n, h, w, c = x.shape
    x = np.clip((x + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    if scale > 1:
        x = x.repeat(scale, axis=1).repeat(scale, axis=2)
        h, w = h * scale, w * scale
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    grid = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    return grid[..., 0] if c == 1 else grid


def save_image_grid(images, path: str, nrow: int | None = None, scale: int | None = None) -> str:
    """Write :func:`image_grid` of ``images`` to ``path`` (PNG); small images are enlarged."""
    from PIL import Image

    h = np.asarray(images).shape[1]
    if scale is None:
        scale = max(1, 64 // h)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image_grid(images, nrow=nrow, scale=scale)).save(path)
    return path


def save_scatter(points, path: str, size: int = 256, extent: float | None = None) -> str:
    """A 2-D point cloud as a density PNG (dark = many points), for the toy data sets."""
    from PIL import Image

    p = np.asarray(points, np.float64)
    if p.ndim != 2 or p.shape[1] != 2:
        raise ValueError(f"points must be (N, 2), got shape {p.shape}")
    lim = extent or float(np.percentile(np.abs(p), 99.5)) * 1.1 or 1.0
    h, _, _ = np.histogram2d(p[:, 1], p[:, 0], bins=size, range=[[-lim, lim], [-lim, lim]])
    img = 255 - (255 * np.sqrt(h / max(h.max(), 1))).astype(np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(img[::-1]).save(path)
    return path


def save_samples(samples, path: str, nrow: int | None = None) -> str:
    """Images -> a grid PNG; 2-D points -> a density PNG."""
    s = np.asarray(samples)
    if s.ndim == 2 and s.shape[1] == 2:
        return save_scatter(s, path)
    return save_image_grid(s, path, nrow=nrow)
