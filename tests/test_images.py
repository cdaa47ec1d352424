"""The TensorBoard pictures: cached text draws Pillow's pixels; digits, labels and cells land where they should."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from handlers.images import confusion_matrix_image, draw_text, labelled_grid


@pytest.mark.parametrize("text, xy, fill, times", [
    ("p3 t8", (5, 7), (255, 0, 0), 1),
    ("1234", (0, 0), (0, 0, 0), 1),
    ("0", (37, 21), (255, 255, 255), 2),  # the cached mask, stamped twice, blends twice
    ("p9 t0", (44, 26), (10, 200, 30), 1),  # runs off the right and bottom edges
    ("77", (-3, -4), (0, 0, 255), 1),  # starts above and left of the image
])  # fmt: skip
def test_cached_text_draws_the_pixels_pillow_draws(text, xy, fill, times):
    background = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    ours, pillows = Image.fromarray(background), Image.fromarray(background)
    for _ in range(times):
        draw_text(ours, xy, text, fill)
        ImageDraw.Draw(pillows).text(xy, text, fill=fill)
    assert np.array_equal(np.asarray(ours), np.asarray(pillows))
    assert not np.array_equal(np.asarray(ours), background)


@pytest.mark.parametrize("n, channels, scale", [(11, 1, 2), (3, 3, 1), (8, 1, 3)])
def test_grid_holds_each_image_scaled_up_with_a_red_label_under_it(n, channels, scale):
    images = torch.rand(n, channels, 28, 28)
    grid = labelled_grid(images, [f"p{k % 10} t{(k + 1) % 10}" for k in range(n)], columns=4, scale=scale)
    h = w = 28 * scale
    rows = -(-n // 4)
    assert grid.shape == (3, rows * (h + 16), 4 * (w + 4)) and grid.dtype == torch.uint8
    expected = (images * 255).round().to(torch.uint8).repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    for k in range(n):
        r, c = divmod(k, 4)
        x0, y0 = c * (w + 4) + 2, r * (h + 16) + 2
        assert torch.equal(grid[:, y0:y0 + h, x0:x0 + w], expected[k].expand(3, h, w))
        label = grid[:, y0 + h:y0 + h + 12, x0:x0 + w]
        assert ((label[0] > 200) & (label[1] < 100) & (label[2] < 100)).any(), k  # red text


def test_confusion_matrix_shades_by_rate_blue_on_the_diagonal_red_off_it():
    counts = torch.tensor([[90, 10, 0], [0, 100, 0], [50, 0, 50]])
    image = confusion_matrix_image(counts, cell=36).permute(1, 2, 0).numpy().astype(int)
    assert image.shape == (18 + 3 * 36, 18 + 3 * 36, 3)

    def corner(i: int, j: int) -> tuple:  # inside the cell, away from the count written in it
        return tuple(image[18 + i * 36 + 33, 18 + j * 36 + 33])

    assert corner(1, 1) == (0, 0, 255) and corner(0, 0) == (25, 25, 255)  # 100% and 90% right: blue
    assert corner(1, 0) == (255, 255, 255)  # no errors: white
    assert corner(0, 1) == (255, 127, 127) and corner(2, 0) == (255, 0, 0)  # 10% and 50% wrong: red
    assert tuple(image[18, 18 + 36]) == (200, 200, 200)  # the cells' outline
    cell = image[18 + 36 + 1:18 + 72 - 1, 18 + 36 + 1:18 + 72 - 1]
    assert (cell != (0, 0, 255)).any(axis=-1).sum() > 10  # "100" written in white on the blue
