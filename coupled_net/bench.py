"""Side-by-side measurements for launch/bench.py (SPEC §9), all in one process on the same data:
the seed's PIL pipeline vs the batched tensor pipeline, a quickstart epoch vs its compute floor,
AlexNet@224 steps as the seed's loop runs them vs the trainer, and per-epoch bookkeeping.

Every comparison measures its sides with one protocol (`compare`): one untimed warm-up pass per
side, then the same number of timed passes per side, interleaved (a, b, a, b, ...) so that load from
other processes on a shared host falls on both alike; each side reports its median images/s and the
slowest and fastest pass, and the ratio is that of the medians."""

from __future__ import annotations

import functools
import os
import platform
import statistics
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from . import data, synthetic
from .checkpoint import save_torch
from .coupling import Coupling
from .epochlog import EPOCH_COLUMNS, CsvLog
from .lifecycle import execute_run
from .loaders import EpochLoader, TensorLoader
from .machine import provenance, resolve_device, usable_cpus
from .models import build_model
from .monitor import SystemMonitor
from .pool import Pool, PoolJob
from .slots import gpu_inventory, plan_slots, visible_gpus
from .trainer import synchronize

MEAN, STD = [0.1125], [0.2285]
REPEATS = 5        # timed passes per side for the rows that take seconds
EPOCH_REPEATS = 3  # ... and for the rows that are whole epochs (the quickstart's: ~10 s a pass on 2 cores)
WARMUP_BATCHES = 1  # an epoch row's warm-up pass: starts the workers, allocates, runs every op once


class Rate(float):
    """Images per second: the median over `n` timed passes (the float's value), with the slowest
    (`lo`) and fastest (`hi`) pass."""

    lo: float
    hi: float
    n: int

    def __new__(cls, images: int, seconds: list[float]) -> "Rate":
        rates = [images / s for s in seconds]
        rate = super().__new__(cls, statistics.median(rates))
        rate.lo, rate.hi, rate.n = min(rates), max(rates), len(rates)
        return rate

    def spread(self) -> str:
        return f"{self.lo:,.0f}–{self.hi:,.0f}, n={self.n}" if self.n > 1 else "n=1"


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(sides, images: int, repeats: int = REPEATS, warmups=None) -> list[Rate]:
    """The protocol every comparison uses: each side's warm-up (by default one full pass of the side
    itself), then `repeats` timed passes of each side, interleaved; one Rate per side."""
    for warm in warmups or sides:
        warm()
    seconds = [[] for _ in sides]
    for _ in range(repeats):
        for times, fn in zip(seconds, sides):
            times.append(_seconds(fn))
    return [Rate(images, times) for times in seconds]


def _split(n_per_class: int) -> data.SplitDataset:
    images, labels = synthetic.letters(n_per_class, 0, True)
    return data.SplitDataset(data.ArraySource(images, labels), torch.arange(len(labels)), None, 1)


def pil_loader(split, size, batch, workers, train=True):
    train_tf, eval_tf = data.pil_transforms(size, MEAN, STD)
    ds = data.SplitDataset(split.source, split.indices, train_tf if train else eval_tf, 1)
    return EpochLoader(ds, batch, train, workers, False, 0)


def tensor_loader(split, size, batch, device, train=True):
    return TensorLoader(split, device, size, MEAN, STD, batch, train, 0)


def consume(loader, batches=None):
    for _ in islice(loader, batches):
        pass


def pipeline_rates(device, workers: int, sizes=(28, 224), n_images=4096, repeats: int = REPEATS) -> list[tuple]:
    split = _split(160)  # 4160 images
    rows = []
    batches = n_images // 128
    for size in sizes:
        pil, tens = compare([lambda: consume(pil_loader(split, size, 128, workers), batches),
                             lambda: (consume(tensor_loader(split, size, 128, device), batches), synchronize(device))],
                            batches * 128, repeats)
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


def _epoch_sides(model, split, size, batch, device, workers, seed_style: bool, floor_batches: int | None = None):
    """(sides, warm-ups, prebuilt batches) of an epoch comparison: the PIL pipeline (with the seed's loop when
    `seed_style`), the tensor pipeline with the trainer's loop, and the compute floor (the trainer's
    loop over `floor_batches` tensor batches built beforehand; all of them when None). Warm-ups are
    WARMUP_BATCHES-batch passes of each side: a whole extra epoch would double the run for nothing."""
    prebuilt = list(islice(tensor_loader(split, size, batch, device), floor_batches))

    def pil(n=None):
        return lambda: train_steps(model, islice(pil_loader(split, size, batch, workers), n), device, seed_style)

    def tens(n=None):
        return lambda: train_steps(model, islice(tensor_loader(split, size, batch, device), n), device, False)

    def floor(n=None):
        return lambda: train_steps(model, prebuilt[:n], device, False)
    return [pil(), tens(), floor()], [pil(WARMUP_BATCHES), tens(WARMUP_BATCHES), floor(WARMUP_BATCHES)], prebuilt


def quickstart_epoch(device, workers: int, repeats: int = EPOCH_REPEATS) -> list[tuple]:
    split = _split(500)
    n = len(split)
    model = build_model("small_cnn", 1, 26, 28).to(device)
    sides, warmups, _ = _epoch_sides(model, split, 28, 128, device, workers, seed_style=False)
    pil, tens, floor = compare(sides, n, repeats, warmups)
    return [("quickstart epoch (small_cnn @28px, 13k images)", pil, tens), ("  … its compute floor", None, floor)]


def alexnet_steps(device, steps: int, batch: int, repeats: int = EPOCH_REPEATS) -> list[tuple]:
    model = build_model("alexnet", 1, 26, 224).to(device)
    x = torch.randn(batch, 1, 224, 224, device=device)
    y = torch.randint(0, 26, (batch,), device=device)
    batches = [(x, y)] * steps
    seed, ours = compare([lambda: train_steps(model, batches, device, True),
                          lambda: train_steps(model, batches, device, False)], steps * batch, repeats,
                         warmups=[lambda: train_steps(model, batches[:1], device, seed_style)
                                  for seed_style in (True, False)])
    return [(f"AlexNet@224 train steps (batch {batch})", seed, ours)]


def seed_protocol_epoch(device, workers: int, per_class: int = 4000, batch: int = 128,
                        repeats: int = 1) -> list[tuple]:
    """The seed's epoch (AlexNet@224, EMNIST-letters-sized: 26 x 4000 images) both ways: PIL
    transforms in DataLoader workers with the seed's per-batch `.item()` loop, against the tensor
    pipeline on the device with the trainer's loop. Only run on a GPU by default (minutes on a CPU).
    The floor is 20 prebuilt batches (an epoch's worth would not fit in memory)."""
    split = _split(per_class)
    model = build_model("alexnet", 1, 26, 224).to(device)
    n = len(split)
    sides, warmups, prebuilt = _epoch_sides(model, split, 224, batch, device, workers, seed_style=True,
                                            floor_batches=20)
    seed, ours = compare(sides[:2], n, repeats, warmups[:2])
    floor, = compare(sides[2:], sum(len(y) for _, y in prebuilt), repeats, warmups[2:])
    return [(f"seed-protocol epoch (AlexNet@224, {n:,} images)", seed, ours), ("  … its compute floor", None, floor)]


def bookkeeping(device, epoch_seconds: float, epochs: int = REPEATS) -> list[tuple]:
    """KE + monitoring + CSV row + last.pt/best.pt, against one quickstart epoch: the median over
    `epochs` timed epochs after one warm-up epoch."""
    model = build_model("small_cnn", 1, 26, 28).to(device)
    coupling = Coupling(model, alpha=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = SystemMonitor()
    with tempfile.TemporaryDirectory() as tmp:
        log = CsvLog(Path(tmp) / "epochs.csv", EPOCH_COLUMNS)

        def one_epoch(epoch: int) -> None:
            synchronize(device)
            coupling.equalize()
            synchronize(device)
            monitor.sample(), monitor.sample()
            log.append(dict.fromkeys(EPOCH_COLUMNS, epoch))
            save_torch(Path(tmp) / "last.pt", {"model": model.state_dict(), "optimizer": opt.state_dict()})
            save_torch(Path(tmp) / "best.pt", model.state_dict())
        one_epoch(0)
        per_epoch = statistics.median(_seconds(lambda: one_epoch(e)) for e in range(1, epochs + 1))
    monitor.close()
    return [("bookkeeping per epoch (s) / share of a quickstart epoch", per_epoch, per_epoch / epoch_seconds)]


QUICKSTART_RUN = ["experiment=quickstart", "trainer.epochs=1", "trainer.progress=false"]
# the seed's protocol (AlexNet@224, batch 128) cut to a few hundred steps: 4,000 training images x 8 epochs
SEED_PROTOCOL_RUN = ["dataset=synthetic_letters", "dataset.train_per_class=160", "dataset.test_per_class=20",
                     "trainer.epochs=8", "trainer.progress=false"]


def bench_run(overrides: list[str], run_dir: str) -> dict:
    """One run as a sweep's job trains it (coupled_net.lifecycle), in a pool's process; its metrics."""
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(__file__).resolve().parents[1] / "conf")):
        cfg = compose("train", overrides=overrides)
    return execute_run(cfg, run_dir)["metrics"]


def sweep_rows(device, label: str, overrides: list[str], n_runs: int = 8, ks=(2, 4, 8)) -> list[tuple]:
    """The same `n_runs` runs (seeds 0 …) one at a time, then packed k at a time through the pool of
    hydra/launcher=local (on a GPU: k runs share it; on a CPU: the cores split k ways), after one
    untimed run; each side timed once, wall-clock from the first start to the last end (a sweep is
    one pass: its sides are not interleaved). Rows: runs per hour of each side, the
    packed/sequential ratio, each packed run's mean duration over a sequential run's (its slowdown),
    and whether every packed run's metrics equal its sequential twin's."""
    cores = sorted(os.sched_getaffinity(0))
    gpus = visible_gpus(gpu_inventory(), os.environ.get("CUDA_VISIBLE_DEVICES"))[:1] if device.type == "cuda" else []
    device_key = [f"trainer.device={'cuda' if device.type == 'cuda' else 'cpu'}"]
    seen, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        warm = PoolJob(-1, "warm-up", functools.partial(bench_run, [*overrides, *device_key], f"{tmp}/warm"))
        Pool(plan_slots(gpus=gpus, present=gpus, runs_per_gpu=1, max_parallel=1, cpus_per_run=None, cores=cores),
             Path(tmp) / "warm-pool").run([warm])  # untimed: the first run reads the libraries from disk
        for k in (1, *ks):
            slots = plan_slots(gpus=gpus, present=gpus, runs_per_gpu=k if gpus else 1, max_parallel=k,
                               cpus_per_run=None, cores=cores)
            jobs = [PoolJob(i, f"seed={i}", functools.partial(bench_run, [*overrides, *device_key, f"seed={i}"],
                                                              f"{tmp}/k{k}/run{i}")) for i in range(n_runs)]
            start = time.perf_counter()
            outcomes = Pool(slots, Path(tmp) / f"k{k}" / "pool").run(jobs)
            wall = time.perf_counter() - start
            failed = [o.error or f"exit code {o.returncode}" for o in outcomes if not isinstance(o.value, dict)]
            if failed:
                raise RuntimeError(f"sweep bench, k={k}: {failed[0]}")
            seen[k] = (wall, statistics.mean(o.ended - o.started for o in outcomes), [o.value for o in outcomes])
    wall1, run1, metrics1 = seen[1]
    rows.append((f"sweep of {n_runs} {label} runs, one at a time: runs/hour", None, 3600 * n_runs / wall1))
    for k in ks:
        wall, run, metrics = seen[k]
        rows.append((f"  … packed {k} at a time: runs/hour, ratio; per-run slowdown {run / run1:.2f}×, metrics "
                     f"{'identical' if metrics == metrics1 else 'DIFFERENT'}", 3600 * n_runs / wall1,
                     3600 * n_runs / wall))
    return rows


def measure_all() -> str:
    device = resolve_device("auto")
    torch.manual_seed(0)
    workers = min(2, data_workers())
    rows = pipeline_rates(device, workers)
    rows += quickstart_epoch(device, workers)
    epoch_s = 13000 / rows[-2][2]  # the tensor quickstart epoch (median)
    rows += alexnet_steps(device, steps=5 if device.type == "cpu" else 50, batch=32 if device.type == "cpu" else 128)
    rows += bookkeeping(device, epoch_s)
    if device.type == "cuda":
        rows += seed_protocol_epoch(device, data_workers())
    rows += sweep_rows(device, "quickstart-size", QUICKSTART_RUN)
    if device.type == "cuda":
        rows += sweep_rows(device, "seed-protocol-size (AlexNet@224, 250 steps)", SEED_PROTOCOL_RUN)
    return table(rows, device, workers)


def data_workers() -> int:
    return usable_cpus()


def _cell(rate) -> str:
    spread = rate.spread() if isinstance(rate, Rate) else ""
    return f"{rate:,.0f} img/s" + (f" ({spread})" if spread else "")


def table(rows, device, workers) -> str:
    head = (f"device: {provenance(device)['device']}, {data_workers()} CPUs, torch {torch.__version__}, "
            f"python {platform.python_version()}; PIL pipeline with {workers} DataLoader workers\n"
            "each side: a warm-up pass, then n timed passes interleaved with the other side's; "
            "median images/s (slowest–fastest pass, n); ratio of the medians\n\n")
    lines = ["| measurement | seed-style / pil | coupled_net / tensor | ratio |", "|---|---:|---:|---:|"]
    for name, base, ours in rows:
        if name.startswith("bookkeeping"):
            lines.append(f"| {name} | {base:.4f} s | {100 * ours:.2f} % | |")
        elif name.startswith(("sweep", "  … packed")):
            lines.append(f"| {name} | {'' if base is None else f'{base:,.0f}'} | {ours:,.0f} | "
                         f"{'' if base is None else f'{ours / base:.2f}×'} |")
        elif base is None:
            lines.append(f"| {name} | | {_cell(ours)} | |")
        else:
            lines.append(f"| {name} | {_cell(base)} | {_cell(ours)} | {ours / base:.2f}× |")
    return head + "\n".join(lines)
