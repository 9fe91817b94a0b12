"""synthetic_letters: an offline stand-in for EMNIST letters.

26 classes (upper and lower case together, as in EMNIST), 28x28 grayscale, labelled 1..26. Each
image is a glyph rendered once with the font Pillow ships, then warped by a per-image random affine
map plus a smooth elastic field, thickened or thinned, dimmed, occluded and noised, all drawn from
one seeded torch.Generator, so the same seed gives the same bytes on every machine."""

from __future__ import annotations

import math
import string
from functools import lru_cache

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

GLYPH = 64       # glyphs are rendered at this size, warped at 2 * SIZE, then averaged down
SIZE = 28


@lru_cache(maxsize=1)
def glyphs() -> torch.Tensor:
    """[26, 2, 3, GLYPH, GLYPH] float masks in [0, 1]: upper and lower case of each letter, centred,
    with thin, regular and bold strokes."""
    font = ImageFont.load_default(size=44)
    out = torch.zeros(26, 2, GLYPH, GLYPH)
    for c, (upper, lower) in enumerate(zip(string.ascii_uppercase, string.ascii_lowercase)):
        for case, ch in enumerate((upper, lower)):
            img = Image.new("L", (GLYPH, GLYPH), 0)
            draw = ImageDraw.Draw(img)
            left, top, right, bottom = draw.textbbox((0, 0), ch, font=font)
            draw.text(((GLYPH - (right - left)) / 2 - left, (GLYPH - (bottom - top)) / 2 - top), ch,
                      fill=255, font=font)
            out[c, case] = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(GLYPH, GLYPH) / 255.0
    bold = F.max_pool2d(out, 5, stride=1, padding=2)
    thin = -F.max_pool2d(-out, 3, stride=1, padding=1)
    return torch.stack([thin, out, bold], dim=2)


def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def generate(per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` images of each letter: (uint8 [N, 28, 28], int64 labels 1..26)."""
    g = torch.Generator().manual_seed(seed)
    n = 26 * per_class
    labels = torch.arange(26).repeat_interleave(per_class)
    labels = labels[torch.randperm(n, generator=g)]
    case = torch.randint(0, 2, (n,), generator=g)
    stroke = torch.randint(0, 3, (n,), generator=g)
    src = glyphs()[labels, case, stroke].unsqueeze(1)             # [N, 1, 64, 64]

    angle = _uniform(g, n, -12, 12) * math.pi / 180
    scale = _uniform(g, n, 0.6, 1.0)                            # > 1 shrinks the letter
    shear = _uniform(g, n, -0.2, 0.2)
    aspect = _uniform(g, n, 0.8, 1.25)
    tx, ty = _uniform(g, n, -0.1, 0.1), _uniform(g, n, -0.1, 0.1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([
        torch.stack([scale * aspect * cos, scale * (shear * cos - sin), tx], 1),
        torch.stack([scale * aspect * sin, scale * (shear * sin + cos), ty], 1),
    ], 1)
    grid = F.affine_grid(theta, [n, 1, 2 * SIZE, 2 * SIZE], align_corners=False)
    # a smooth random displacement field: coarse noise upsampled to the grid
    field = torch.randn(n, 2, 4, 4, generator=g) * _uniform(g, n, 0.0, 0.05).view(n, 1, 1, 1)
    grid = grid + F.interpolate(field, size=(2 * SIZE, 2 * SIZE), mode="bilinear",
                                align_corners=False).permute(0, 2, 3, 1)
    x = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = F.avg_pool2d(x, 2)                                         # anti-aliased 28x28

    x = x * _uniform(g, n, 0.55, 1.0).view(n, 1, 1, 1)
    # occlude a random rectangle in a fifth of the images
    ys, xs = torch.arange(SIZE).view(1, SIZE, 1), torch.arange(SIZE).view(1, 1, SIZE)
    y0, x0 = torch.randint(0, SIZE - 8, (n, 1, 1), generator=g), torch.randint(0, SIZE - 8, (n, 1, 1), generator=g)
    h, w = torch.randint(3, 8, (n, 1, 1), generator=g), torch.randint(3, 8, (n, 1, 1), generator=g)
    box = (ys >= y0) & (ys < y0 + h) & (xs >= x0) & (xs < x0 + w)
    occlude = (torch.rand(n, 1, 1, generator=g) < 0.2) & box
    x = x.squeeze(1).masked_fill(occlude, 0.0)
    x = x + torch.randn(x.shape, generator=g) * _uniform(g, n, 0.02, 0.1).view(n, 1, 1)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return images, labels + 1


@lru_cache(maxsize=4)
def letters(per_class: int, seed: int, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The train or test split; the two are drawn from different streams of the same seed."""
    return generate(per_class, 2 * seed + (0 if train else 1))
