"""Side-by-side measurements for launch/bench.py (SPEC §9), all in one process on the same data:
the seed's PIL pipeline vs the batched tensor pipeline, a quickstart epoch vs its compute floor,
AlexNet@224 steps as the seed's loop runs them vs the trainer, and per-epoch bookkeeping."""

from __future__ import annotations

import platform
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data, synthetic
from .coupling import Coupling
from .models import build_model
from .monitor import SystemMonitor
from .results import CsvLog, EPOCH_COLUMNS, provenance, save_torch
from .trainer import synchronize

MEAN, STD = [0.1125], [0.2285]


def _split(n_per_class: int) -> data.SplitDataset:
    images, labels = synthetic.letters(n_per_class, 0, True)
    return data.SplitDataset(data.ArraySource(images, labels), torch.arange(len(labels)), None, 1)


def _rate(fn, images: int, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return images / best


def pil_loader(split, size, batch, workers, train=True):
    train_tf, eval_tf = data.seed_transforms(size, MEAN, STD)
    ds = data.SplitDataset(split.source, split.indices, train_tf if train else eval_tf, 1)
    return data.EpochLoader(ds, batch, train, workers, False, 0)


def tensor_loader(split, size, batch, device, train=True):
    return data.TensorLoader(split, device, size, MEAN, STD, batch, train, 0)


def consume(loader, batches=None):
    for _ in islice(loader, batches):
        pass


def pipeline_rates(device, workers: int, sizes=(28, 224), n_images=4096) -> list[tuple]:
    split = _split(160)  # 4160 images
    rows = []
    for size in sizes:
        batches = n_images // 128
        pil = _rate(lambda: consume(pil_loader(split, size, 128, workers), batches), batches * 128)
        tens = _rate(lambda: consume(tensor_loader(split, size, 128, device), batches), batches * 128, repeat=7)
        rows.append((f"input pipeline @{size}px (train augmentation)", pil, tens))
    return rows


def train_steps(model, batches, device, seed_style: bool) -> None:
    """The seed's loop (`.item()` twice per batch) or the trainer's (device-side sums, read once)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    model.train()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    running = 0.0
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        out = model(images)
        loss = F.cross_entropy(out, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if seed_style:
            running += loss.item() * images.size(0)
            _ = (out.argmax(1) == labels).sum().item()
        else:
            loss_sum += loss.detach() * labels.size(0)
    loss_sum.item()
    synchronize(device)


def quickstart_epoch(device, workers: int) -> list[tuple]:
    split = _split(500)
    n = len(split)
    model = build_model("small_cnn", 1, 26, 28).to(device)
    prebuilt = list(tensor_loader(split, 28, 128, device))  # the compute floor: batches already built
    train_steps(model, prebuilt, device, False)  # warm-up
    floor = _rate(lambda: train_steps(model, prebuilt, device, False), n, repeat=2)
    pil = _rate(lambda: train_steps(model, pil_loader(split, 28, 128, workers), device, False), n)
    tens = _rate(lambda: train_steps(model, tensor_loader(split, 28, 128, device), device, False), n, repeat=2)
    return [("quickstart epoch (small_cnn @28px, 13k images)", pil, tens), ("  … its compute floor", None, floor)]


def alexnet_steps(device, steps: int, batch: int) -> list[tuple]:
    model = build_model("alexnet", 1, 26, 224).to(device)
    x = torch.randn(batch, 1, 224, 224, device=device)
    y = torch.randint(0, 26, (batch,), device=device)
    batches = [(x, y)] * steps
    train_steps(model, batches[:1], device, False)  # warm-up
    seed, ours = 0.0, 0.0
    for _ in range(3):  # interleaved, best of three each: the two loops see the same machine state
        seed = max(seed, _rate(lambda: train_steps(model, batches, device, True), steps * batch))
        ours = max(ours, _rate(lambda: train_steps(model, batches, device, False), steps * batch))
    return [(f"AlexNet@224 train steps (batch {batch})", seed, ours)]


def seed_protocol_epoch(device, workers: int, per_class: int = 4000, batch: int = 128) -> list[tuple]:
    """The seed's epoch (AlexNet@224, EMNIST-letters-sized: 26 x 4000 images) both ways: PIL
    transforms in DataLoader workers with the seed's per-batch `.item()` loop, against the tensor
    pipeline on the device with the trainer's loop. Only run on a GPU by default (minutes on a CPU)."""
    split = _split(per_class)
    model = build_model("alexnet", 1, 26, 224).to(device)
    n = len(split)
    seed = _rate(lambda: train_steps(model, pil_loader(split, 224, batch, workers), device, True), n)
    ours = _rate(lambda: train_steps(model, tensor_loader(split, 224, batch, device), device, False), n)
    prebuilt = list(islice(tensor_loader(split, 224, batch, device), 20))
    floor = _rate(lambda: train_steps(model, prebuilt, device, False), 20 * batch)
    return [(f"seed-protocol epoch (AlexNet@224, {n:,} images)", seed, ours), ("  … its compute floor", None, floor)]


def bookkeeping(device, epoch_seconds: float) -> list[tuple]:
    """KE + monitoring + CSV row + last.pt/best.pt, against one quickstart epoch."""
    model = build_model("small_cnn", 1, 26, 28).to(device)
    coupling = Coupling(model, alpha=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = SystemMonitor()
    with tempfile.TemporaryDirectory() as tmp:
        log = CsvLog(Path(tmp) / "epochs.csv", EPOCH_COLUMNS)
        start = time.perf_counter()
        for epoch in range(5):
            synchronize(device)
            coupling.equalize()
            synchronize(device)
            monitor.sample(), monitor.sample()
            log.append(dict.fromkeys(EPOCH_COLUMNS, epoch))
            save_torch(Path(tmp) / "last.pt", {"model": model.state_dict(), "optimizer": opt.state_dict()})
            save_torch(Path(tmp) / "best.pt", model.state_dict())
        per_epoch = (time.perf_counter() - start) / 5
    monitor.close()
    return [("bookkeeping per epoch (s) / share of a quickstart epoch", per_epoch, per_epoch / epoch_seconds)]


def run() -> str:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    workers = min(2, data_workers())
    rows = pipeline_rates(device, workers)
    rows += quickstart_epoch(device, workers)
    epoch_s = 13000 / rows[-2][2]  # the tensor quickstart epoch
    rows += alexnet_steps(device, steps=5 if device.type == "cpu" else 50, batch=32 if device.type == "cpu" else 128)
    rows += bookkeeping(device, epoch_s)
    if device.type == "cuda":
        rows += seed_protocol_epoch(device, data_workers())
    return table(rows, device, workers)


def data_workers() -> int:
    from .validation import usable_cpus

    return usable_cpus()


def table(rows, device, workers) -> str:
    head = (f"device: {provenance(device)['device']}, {data_workers()} CPUs, torch {torch.__version__}, "
            f"python {platform.python_version()}; PIL pipeline with {workers} DataLoader workers\n\n")
    lines = ["| measurement | seed-style / pil | coupled_net / tensor | ratio |", "|---|---:|---:|---:|"]
    for name, base, ours in rows:
        if name.startswith("bookkeeping"):
            lines.append(f"| {name} | {base:.4f} s | {100 * ours:.2f} % | |")
        elif base is None:
            lines.append(f"| {name} | | {ours:,.0f} img/s | |")
        else:
            lines.append(f"| {name} | {base:,.0f} img/s | {ours:,.0f} img/s | {ours / base:.2f}× |")
    return head + "\n".join(lines)
