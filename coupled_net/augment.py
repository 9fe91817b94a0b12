"""Training augmentation policies (the `augment` config group), each serving both pipelines:

* the tensor pipeline (`Policy.batch`): a whole uint8 batch on the training device, per-sample
  parameters drawn on the CPU from the loader's torch.Generator (the same on every device), then the
  resize to the model's input size and the normalization;
* the pil pipeline (`Policy.pil`): torchvision transforms v2 applied image by image in DataLoader
  workers, their random draws seeded per sample (data.SplitDataset).

`Letters` is the seed's family (horizontal flip p=0.5, rotation ±20°, translate ±10 %, scale 0.8–1.2,
shear ±10°): per-sample parameters, one composed affine map per image, one bilinear `grid_sample`.
Angles and shears follow torchvision's `affine` (clockwise, degrees); translations are fractions of
the image size. `CropFlip` is the CIFAR/SVHN recipe (zero-pad, random crop back to the image's own
size, horizontal flip); `NoAugment` trains on images prepared exactly like validation images."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from .errors import ConfigError


def eval_transforms(size: int, mean, std) -> v2.Compose:
    """The seed's val/test transforms (and every policy's tail): resize to `size` x `size`, normalize."""
    return v2.Compose([v2.Resize((size, size)), *_finish(mean, std)])


def _finish(mean, std) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]


# ---- Letters: the seed's affine family ---------------------------------------------------------

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


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small CPU tensor (a batch's drawn parameters) on `device` without stalling the host: on a GPU
    copied from pinned memory, asynchronously (a pageable copy waits for every queued kernel, so the
    host could not queue step k+1 before step k drained; the caching host allocator keeps the pinned
    block until the copy is done)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def warp(images: torch.Tensor, theta: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Bilinear warp of float images [N, C, H, W] (zeros outside), to `size` x `size` if given."""
    n, c, h, w = images.shape
    out = (n, c, size or h, size or w)
    grid = F.affine_grid(to_device(theta, images.device), list(out), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def augment_batch(images_u8: torch.Tensor, size: int, mean: torch.Tensor, std: torch.Tensor,
                  generator: torch.Generator | None, dtype=torch.float32,
                  ranges: AffineRanges = AffineRanges()) -> torch.Tensor:
    """uint8 [N, C, h, w] -> normalized `dtype` [N, C, size, size]; a random affine drawn from `ranges`
    when `generator` is given (training), plain resize otherwise (the eval path of every policy).
    The warp samples the `size` x `size` output grid directly from the stored image (one bilinear
    pass), on a GPU and on a CPU alike: `trainer.device` is not part of a run's identity, so both
    devices must train on the same images (a warp at the stored size followed by a resize is a
    second bilinear pass, other images)."""
    x = images_u8.float()
    n, _, h, w = x.shape
    scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
    shift = (mean / std).view(1, -1, 1, 1)
    if generator is not None:  # on raw 0..255 values: the zero fill stays black after normalizing
        theta = affine_theta(sample_params(n, generator, ranges))
        return warp(x, theta, size).mul_(scale).sub_(shift).to(dtype)
    x = x.mul_(scale).sub_(shift)
    if size != h or size != w:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=size < h)
    return x.to(dtype)


def _number(key: str, value, lo: int, hi: int, hi_open: bool = False) -> None:
    """`value` in [lo, hi] (or [lo, hi)), refused in validation.py's words (a policy built from Python)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and lo <= value and \
        (value < hi if hi_open else value <= hi)
    if not ok:
        raise ConfigError(f"augment.{key}", value, f"must be a number in [{lo}, {hi}{')' if hi_open else ']'}")


@dataclass(frozen=True)
class Letters(AffineRanges):
    """augment=letters: the seed's family (AffineRanges' numbers, checked), drawn per sample."""

    def __post_init__(self):
        _number("flip_p", self.flip_p, 0, 1)
        _number("degrees", self.degrees, 0, 180)
        _number("translate", self.translate, 0, 1, hi_open=True)
        _number("shear", self.shear, 0, 90, hi_open=True)
        scale = tuple(self.scale) if isinstance(self.scale, (list, tuple)) else ()
        if len(scale) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0
                                      for v in scale) or scale[0] > scale[1]:
            raise ConfigError("augment.scale", self.scale, "must be a list of two numbers > 0, the smaller first")
        object.__setattr__(self, "scale", (float(scale[0]), float(scale[1])))  # a YAML list arrives as a list

    def batch(self, images_u8, size, mean, std, generator, dtype=torch.float32):
        return augment_batch(images_u8, size, mean, std, generator, dtype, self)

    def pil(self, size: int, mean, std) -> v2.Compose:
        """The seed notebook's train transforms (with this policy's numbers)."""
        return v2.Compose([
            v2.Resize((size, size)),
            v2.RandomHorizontalFlip(self.flip_p),
            v2.RandomRotation(self.degrees),
            v2.RandomAffine(degrees=0, translate=(self.translate, self.translate), scale=self.scale,
                            shear=self.shear),
            *_finish(mean, std),
        ])


# ---- CropFlip: the CIFAR / SVHN recipe ---------------------------------------------------------

def sample_crop_params(n: int, generator: torch.Generator, padding: int, flip_p: float) -> dict[str, torch.Tensor]:
    """Per-sample crop offsets into the padded image (top, left: 0 … 2·padding) and flips, on the CPU."""
    top = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (n,), generator=generator)
    return {"top": top, "left": left, "flip": torch.rand(n, generator=generator, dtype=torch.float64) < flip_p}


def pad_crop_flip(images: torch.Tensor, padding: int, p: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, C, h, w] -> [N, C, h, w]: each image zero-padded by `padding`, the h x w window at (top, left)
    of the padded image, mirrored left-right where `flip`. One gather for the whole batch, any dtype;
    on raw uint8 values, so the zero fill is black after normalizing, as torchvision's fill=0 is."""
    n, _, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = p["top"].view(n, 1) + torch.arange(h)
    cols = p["left"].view(n, 1) + torch.arange(w)
    cols = torch.where(p["flip"].view(n, 1), cols.flip(1), cols)  # flipping the crop = reading its columns backwards
    out = padded[torch.arange(n, device=dev).view(n, 1, 1), :, to_device(rows, dev).view(n, h, 1),
                 to_device(cols, dev).view(n, 1, w)]
    return out.permute(0, 3, 1, 2).contiguous()  # advanced indexing put the channels last: [N, h, w, C]


class RandomPadCrop(torch.nn.Module):
    """Zero-pad an image by `padding` pixels on every side, then crop a random window of the image's own
    size (torchvision's RandomCrop(size, padding) for whatever size the image has, so it works on files
    of any size). Draws from torch's default generator, which data.SplitDataset seeds per sample."""

    def __init__(self, padding: int):
        super().__init__()
        self.padding = padding

    def forward(self, img):
        h, w = TF.get_size(img)
        top, left = (int(v) for v in torch.randint(0, 2 * self.padding + 1, (2,)))
        return TF.crop(TF.pad(img, [self.padding], fill=0), top, left, h, w)

    def extra_repr(self) -> str:
        return f"padding={self.padding}"


@dataclass(frozen=True)
class CropFlip:
    """augment=crop_flip: zero-pad `padding` pixels (of the stored image), crop back to its size at a
    random offset, flip horizontally with probability `flip_p`; then resize to the input size."""
    padding: int = 4
    flip_p: float = 0.5

    def __post_init__(self):
        if isinstance(self.padding, bool) or not isinstance(self.padding, int) or self.padding < 0:
            raise ConfigError("augment.padding", self.padding, "must be an integer >= 0")
        _number("flip_p", self.flip_p, 0, 1)

    def batch(self, images_u8, size, mean, std, generator, dtype=torch.float32):
        if generator is not None:
            images_u8 = pad_crop_flip(images_u8, self.padding,
                                      sample_crop_params(len(images_u8), generator, self.padding, self.flip_p))
        return augment_batch(images_u8, size, mean, std, None, dtype)

    def pil(self, size: int, mean, std) -> v2.Compose:
        # crop and flip at the stored size, as the tensor pipeline does: `padding` means the same in both
        return v2.Compose([RandomPadCrop(self.padding), v2.RandomHorizontalFlip(self.flip_p), v2.Resize((size, size)),
                           *_finish(mean, std)])


# ---- NoAugment --------------------------------------------------------------------------------

@dataclass(frozen=True)
class NoAugment:
    """augment=none (and trainer.overfit_batches): training images are prepared exactly like eval images."""

    def batch(self, images_u8, size, mean, std, generator, dtype=torch.float32):
        return augment_batch(images_u8, size, mean, std, None, dtype)

    def pil(self, size: int, mean, std) -> v2.Compose:
        return eval_transforms(size, mean, std)


Policy = Letters | CropFlip | NoAugment
