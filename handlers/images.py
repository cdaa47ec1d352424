"""Small pictures for TensorBoard, drawn with Pillow (which torchvision already needs)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

__all__ = ["confusion_matrix_image", "labelled_grid"]


def confusion_matrix_image(counts: torch.Tensor, cell: int = 36) -> torch.Tensor:
    """A (3, H, W) uint8 image of a confusion matrix: rows true, columns predicted, counts written in.

    Cells are shaded by the row-normalised rate; the diagonal is blue, errors red.
    """
    counts = counts.detach().cpu().long()
    n = counts.shape[0]
    margin = 18
    size = margin + n * cell
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    rates = counts.float() / counts.sum(1, keepdim=True).clamp(min=1)
    for i in range(n):
        draw.text((margin + i * cell + cell // 2 - 3, 3), str(i), fill="black")  # predicted
        draw.text((4, margin + i * cell + cell // 2 - 5), str(i), fill="black")  # true
        for j in range(n):
            r = float(rates[i, j])
            shade = int(255 * (1 - min(1.0, r if i == j else 5 * r)))
            color = (shade, shade, 255) if i == j else (255, shade, shade)
            x0, y0 = margin + j * cell, margin + i * cell
            draw.rectangle([x0, y0, x0 + cell - 1, y0 + cell - 1], fill=color, outline=(200, 200, 200))
            text = str(int(counts[i, j]))
            draw.text((x0 + 3, y0 + cell // 2 - 5), text, fill="black" if shade > 110 else "white")
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
    sheet = Image.new("RGB", (columns * (w + 4), rows * (h + label_h + 4)), "white")
    draw = ImageDraw.Draw(sheet)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    for k in range(n):
        r, c = divmod(k, columns)
        x0, y0 = c * (w + 4) + 2, r * (h + label_h + 4) + 2
        plane = pixels[k, 0] if channels == 1 else pixels[k].transpose(1, 2, 0)
        digit = Image.fromarray(plane).resize((w, h), Image.NEAREST).convert("RGB")
        sheet.paste(digit, (x0, y0))
        draw.text((x0, y0 + h), labels[k], fill="red")
    return torch.from_numpy(np.asarray(sheet).copy()).permute(2, 0, 1)
