"""The seed's augmentation family (horizontal flip p=0.5, rotation ±20°, translate ±10 %, scale
0.8–1.2, shear ±10°) for a whole batch at once: per-sample parameters, one composed affine map
per image, one bilinear `grid_sample`, then the resize to the model's input size and the
normalization. Angles and shears follow torchvision's `affine` (clockwise, degrees); translations
are fractions of the image size."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AffineRanges:
    """The seed's RandomHorizontalFlip(), RandomRotation(20), RandomAffine(0, (0.1, 0.1), (0.8, 1.2), 10)."""
    flip_p: float = 0.5
    degrees: float = 20.0
    translate: float = 0.1
    scale: tuple[float, float] = (0.8, 1.2)
    shear: float = 10.0


def sample_params(n: int, generator: torch.Generator, r: AffineRanges = AffineRanges()) -> dict[str, torch.Tensor]:
    """Per-sample parameters, drawn on the CPU (the same on every device)."""
    def u(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=generator, dtype=torch.float64)
    return {"flip": torch.rand(n, generator=generator, dtype=torch.float64) < r.flip_p,
            "angle": u(-r.degrees, r.degrees), "tx": u(-r.translate, r.translate), "ty": u(-r.translate, r.translate),
            "scale": u(*r.scale), "shear": u(-r.shear, r.shear)}


def affine_theta(p: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, 2, 3] maps output to input coordinates (affine_grid's normalized, y down), for
    out = translate(shear_scale(rotate(flip(in))))."""
    a, sh = torch.deg2rad(p["angle"]), torch.deg2rad(p["shear"])
    n = a.numel()
    flip = torch.ones(n, dtype=torch.float64).masked_fill(p["flip"], -1.0)
    cos, sin = torch.cos(a), torch.sin(a)
    # forward map: S·Shx (torchvision's affine with angle 0) after R(angle) after the flip
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    shear = torch.stack([torch.stack([torch.ones(n, dtype=torch.float64), -torch.tan(sh)], -1),
                         torch.stack([torch.zeros(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)], -1)], -2)
    forward = p["scale"].view(n, 1, 1) * shear @ rot @ torch.diag_embed(torch.stack([flip, torch.ones_like(flip)], -1))
    inverse = torch.linalg.inv(forward)
    t = torch.stack([2 * p["tx"], 2 * p["ty"]], -1).unsqueeze(-1)  # fractions of the size -> [-1, 1] units
    return torch.cat([inverse, -inverse @ t], dim=-1).float()


def warp(images: torch.Tensor, theta: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Bilinear warp of float images [N, C, H, W] (zeros outside), to `size` x `size` if given."""
    n, c, h, w = images.shape
    out = (n, c, size or h, size or w)
    grid = F.affine_grid(theta.to(images.device), list(out), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_batch(images_u8: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor,
                  generator: torch.Generator | None, dtype=torch.float32) -> torch.Tensor:
    """uint8 [N, C, h, w] -> normalized `dtype` [N, C, size, size]; random affine when `generator`
    is given (training), plain resize otherwise. On a GPU the warp samples the output grid
    directly (one op). On a CPU it warps and normalizes at the native size, then resizes: the
    bilinear resize is linear with weights summing to one, so normalizing first gives the same
    values while touching the large output only once."""
    x = images_u8.float()
    n, _, h, w = x.shape
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
    shift = (mean / std).view(1, -1, 1, 1)
    if generator is not None:
        theta = affine_theta(sample_params(n, generator))
        if x.is_cuda and size != h:
            return warp(x, theta, size).mul_(scale).sub_(shift).to(dtype)
        x = warp(x, theta)  # on raw 0..255 values: the zero fill stays black after normalizing
    x = x.mul_(scale).sub_(shift)
    if size != h or size != w:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < h)
    return x.to(dtype)
