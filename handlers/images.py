"""Small pictures for TensorBoard, drawn with Pillow (which torchvision already needs).

Both are drawn at the end of a run, when nothing else is left to overlap with, so they are built
as arrays (cells and digits by slicing) and each distinct label is rendered by Pillow once per
process and then stamped: the same pixels as ``ImageDraw.text``, at a fraction of its cost.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["confusion_matrix_image", "draw_text", "labelled_grid"]


@functools.cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font, loaded once: ``ImageDraw`` loads it again for each new drawing (0.2 ms)."""
    return ImageFont.load_default()


@functools.lru_cache(maxsize=4096)
def _glyphs(text: str) -> tuple[Image.Image, int, int]:
    """``text`` in Pillow's default font as a coverage mask ("L"), and where it sits relative to the
    point it is drawn at (what ``ImageDraw.text`` computes for every call)."""
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=_font())
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, fill=255, font=_font())
    return mask, left, top


def draw_text(image: Image.Image, xy: tuple[int, int], text: str, fill: tuple[int, int, int]) -> None:
    """``ImageDraw.Draw(image).text(xy, text, fill=fill)`` for an RGB image, from a cached rendering."""
    mask, left, top = _glyphs(text)
    image.paste(fill, (xy[0] + left, xy[1] + top), mask)


_BLACK, _WHITE, _RED, _GRID = (0, 0, 0), (255, 255, 255), (255, 0, 0), (200, 200, 200)


def confusion_matrix_image(counts: torch.Tensor, cell: int = 36) -> torch.Tensor:
    """A (3, H, W) uint8 image of a confusion matrix: rows true, columns predicted, counts written in.

    Cells are shaded by the row-normalised rate; the diagonal is blue, errors red.
    """
    counts = counts.detach().cpu().long()
    n = counts.shape[0]
    margin = 18
    size = margin + n * cell
    rates = (counts.float() / counts.sum(1, keepdim=True).clamp(min=1)).double().numpy()
    diagonal = np.eye(n, dtype=bool)
    shade = (255 * (1 - np.minimum(1.0, np.where(diagonal, rates, 5 * rates)))).astype(np.int64).astype(np.uint8)
    full = np.full_like(shade, 255)
    colours = np.stack([np.where(diagonal, shade, full), shade, np.where(diagonal, full, shade)], axis=-1)
    canvas = np.full((size, size, 3), 255, dtype=np.uint8)
    cells = canvas[margin:, margin:].reshape(n, cell, n, cell, 3)
    cells[:] = np.asarray(_GRID, dtype=np.uint8)  # each cell's one-pixel outline, then its inside
    cells[:, 1:-1, :, 1:-1] = colours[:, None, :, None]
    img = Image.fromarray(canvas)
    written = counts.tolist()
    for i in range(n):
        draw_text(img, (margin + i * cell + cell // 2 - 3, 3), str(i), _BLACK)  # predicted
        draw_text(img, (4, margin + i * cell + cell // 2 - 5), str(i), _BLACK)  # true
        for j in range(n):
            draw_text(img, (margin + j * cell + 3, margin + i * cell + cell // 2 - 5), str(written[i][j]),
                      _BLACK if shade[i, j] > 110 else _WHITE)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def labelled_grid(images: torch.Tensor, labels: list[str], columns: int = 8, scale: int = 2) -> torch.Tensor:
    """A (3, H, W) uint8 grid of (N, C, h, w) images in [0, 1] (C = 1: grey, 3: colour), each labelled underneath."""
    if images.shape[0] != len(labels):
        raise ValueError(f"{images.shape[0]} images but {len(labels)} labels")
    n, channels, h, w = images.shape
    if channels not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got {channels}")
    h, w = h * scale, w * scale
    label_h = 12
    rows = max(1, -(-n // columns))
    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    pixels = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3).expand(n, 3, h, w)  # nearest
    pixels = pixels.permute(0, 2, 3, 1).numpy()
    sheet = np.full((rows * (h + label_h + 4), columns * (w + 4), 3), 255, dtype=np.uint8)
    for k in range(n):
        r, c = divmod(k, columns)
        x0, y0 = c * (w + 4) + 2, r * (h + label_h + 4) + 2
        sheet[y0:y0 + h, x0:x0 + w] = pixels[k]
    img = Image.fromarray(sheet)
    for k in range(n):
        r, c = divmod(k, columns)
        draw_text(img, (c * (w + 4) + 2, r * (h + label_h + 4) + 2 + h), labels[k], _RED)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
