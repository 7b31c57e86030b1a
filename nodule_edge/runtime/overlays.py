"""PNG overlays a radiologist can read: CT planes with contour and heat map, similar-nodule strip.

Planes are cut from the LPS-aligned patch: axial in radiological convention (patient right on the
image left, anterior up), coronal and sagittal with superior up.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["plane_views", "render_overlay", "render_similar_strip", "heat_colormap"]

_SCALE = 4  # 64 px patch planes → 256 px images


def heat_colormap(values: np.ndarray) -> np.ndarray:
    """A perceptually ordered blue→red map of values in [0, 1] to RGB uint8."""
    v = np.clip(values, 0, 1)[..., None]
    stops = np.array([[0, 0, 0.5], [0, 0.4, 1], [0.2, 0.9, 0.6], [1, 0.9, 0], [0.9, 0.1, 0]])
    pos = v[..., 0] * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    rgb = stops[lo] * (1 - frac) + stops[lo + 1] * frac
    return (rgb * 255).astype(np.uint8)


def plane_views(volume: np.ndarray) -> dict[str, np.ndarray]:
    """Axial, coronal and sagittal planes through the centre of a ``[z, y, x]`` LPS volume."""
    cz, cy, cx = (s // 2 for s in volume.shape)
    return {
        "axial": volume[cz],
        "coronal": volume[::-1, cy, :],
        "sagittal": volume[::-1, :, cx],
    }


def _upscale(plane: np.ndarray) -> np.ndarray:
    """Nearest-neighbour enlargement by ``_SCALE`` along the first two axes."""
    return np.repeat(np.repeat(plane, _SCALE, axis=0), _SCALE, axis=1)


def _contour(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
    return mask & ~inner


def render_overlay(
    ct_lung_window: np.ndarray, segmentation: np.ndarray, saliency: np.ndarray, title: str
) -> Image.Image:
    """Three planes side by side: CT (lung window) + saliency heat map + segmentation contour."""
    ct_planes = plane_views(ct_lung_window)
    seg_planes = plane_views(segmentation >= 0.5)
    sal_planes = plane_views(saliency)
    tiles = []
    for name in ("axial", "coronal", "sagittal"):
        gray = (np.clip(ct_planes[name], 0, 1) * 255).astype(np.uint8)
        rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
        heat = heat_colormap(sal_planes[name]).astype(np.float32)
        alpha = 0.45 * np.clip(sal_planes[name], 0, 1)[..., None]
        small = (rgb * (1 - alpha) + heat * alpha).astype(np.uint8)
        big = _upscale(small)
        big[_contour(_upscale(seg_planes[name]))] = (0, 255, 0)
        tile = Image.fromarray(big)
        ImageDraw.Draw(tile).text((4, 4), name, fill=(255, 255, 0))
        tiles.append(tile)
    width = sum(t.width for t in tiles)
    canvas = Image.new("RGB", (width, tiles[0].height + 18), (0, 0, 0))
    ImageDraw.Draw(canvas).text((4, 3), title, fill=(255, 255, 255))
    x = 0
    for tile in tiles:
        canvas.paste(tile, (x, 18))
        x += tile.width
    return canvas


def render_similar_strip(thumbnails: Sequence[np.ndarray | None], captions: Sequence[str], title: str) -> Image.Image:
    """A row of similar-nodule thumbnails (axial lung window, uint8) with their captions."""
    size = 64 * 2
    n = max(1, len(captions))
    canvas = Image.new("RGB", (size * n, size + 44), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), title, fill=(255, 255, 255))
    for i, (thumb, caption) in enumerate(zip(thumbnails, captions)):
        if thumb is not None:
            tile = Image.fromarray(np.asarray(thumb, np.uint8)).resize((size, size), Image.Resampling.BILINEAR)
            canvas.paste(tile, (i * size, 18))
        else:
            draw.text((i * size + 8, 18 + size // 2), "no image", fill=(128, 128, 128))
        for j, line in enumerate(caption.split("\n")[:2]):
            draw.text((i * size + 3, size + 20 + 11 * j), line, fill=(255, 255, 255))
    return canvas
