"""Side-by-side measurements for launch/bench.py (SPEC §9), all in one process on the same data:
the seed's PIL pipeline (with the seed notebook's own loader settings) vs the batched tensor
pipeline; runs built by coupled_net's own build path (resolve, build, make_trainer) and timed through
their Trainer: the training pass, its compute floor (the same step on batches built beforehand) and
the whole epoch, each with deterministic on and off, the checkpoint's share of an epoch, and the
pass against the seed's (PIL loader, per-batch `.item()` loop, cudnn flags); AlexNet@224 steps as the
seed's loop runs them vs the Trainer's step; per-epoch bookkeeping; packed sweeps.

Every comparison measures its sides with one protocol (`compare`): one untimed warm-up pass per
side, then the same number of timed passes per side, interleaved (a, b, a, b, ...) so that load from
other processes on a shared host falls on both alike; each side reports its median images/s and the
slowest and fastest pass, and the ratio is that of the medians. Every pass of a side runs under that
side's flags (`switches`: what trainer.deterministic sets, or the seed's), restored after the pass,
so the sides never leak into each other."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from . import data, synthetic
from .benchtree import make_tree
from . import trainer as trainer_module
from .build import build, make_trainer, resolve
from .checkpoint import save_torch
from .coupling import Coupling
from .epochlog import EPOCH_COLUMNS, CsvLog
from .lifecycle import execute_run
from .loaders import EpochLoader, TensorLoader
from .machine import provenance, resolve_device, usable_cpus
from .models import build_model
from .monitor import SystemMonitor
from .pool import Pool, PoolJob
from .results import RunFiles
from .slots import gpu_inventory, plan_slots, visible_gpus
from .trainer import LoopState, Trainer, evaluate_batches, synchronize

MEAN, STD = [0.1125], [0.2285]
CONF = Path(__file__).resolve().parents[1] / "conf"
REPEATS = 5        # timed passes per side for the rows that take seconds
EPOCH_REPEATS = 3  # ... and for the rows that are whole epochs (the quickstart's: ~5 s a pass on 2 cores)
SEED_REPEATS = 2   # ... and for the seed-size section (an EMNIST-size epoch of AlexNet@224 a pass, 7 sides)
WARMUP_BATCHES = 1  # an epoch row's warm-up pass: starts the workers, allocates, runs every op once
SEED_WORKERS = 16   # the seed notebook's DataLoader: num_workers=16, pin_memory=True (its cells 177, 241-259)
SECTIONS = ("pipeline", "quickstart", "steps", "seed", "bookkeeping", "sweep", "collect")
COLLECT_SIZES = (100, 2_000, 10_000)  # run directories the collect section reviews (issue 21: <= 5 s at 2,000)
COLLECT = Path(__file__).resolve().parents[1] / "launch" / "collect.py"

# The runs the trainer sections build (the user's overrides are added to each):
QUICKSTART_TRAIN = ["experiment=quickstart"]  # small_cnn @28 px, 11,050 training images, batch 128
# the seed's protocol at EMNIST letters' size (4,800 + 800 images per class; 85 % of the 124,800 trained
# on: 106,080) without the download: the default run's AlexNet@224, batch 128, tensor pipeline, flags
SEED_TRAIN = ["dataset=synthetic_letters", "dataset.train_per_class=4800", "dataset.test_per_class=800"]
# the sync check's run: the default run (AlexNet@224, tensor pipeline, batch 128), 2,210 training images
SYNC_CHECK_RUN = ["dataset=synthetic_letters", "dataset.train_per_class=100", "dataset.test_per_class=20"]


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


class Ratio(float):
    """A ratio of two medians, printed as 1.23×."""


class Seconds(float):
    """A median duration, printed in seconds."""


class Share(float):
    """A fraction of something else's median, printed as a percentage."""


class Megabytes(float):
    """A peak memory, printed in MB."""


class Header(NamedTuple):
    """A row that starts a new table: what its rows measure, and what its two columns hold."""
    title: str
    left: str
    right: str
    ratio: str = "ratio"


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(sides, images, repeats: int = REPEATS, warmups=None) -> list[Rate]:
    """The protocol every comparison uses: each side's warm-up (by default one full pass of the side
    itself), then `repeats` timed passes of each side, interleaved; one Rate per side. `images`: the
    images one pass handles, for every side or (a list) for each."""
    counts = list(images) if isinstance(images, (list, tuple)) else [images] * len(sides)
    for warm in warmups or sides:
        warm()
    seconds = [[] for _ in sides]
    for _ in range(repeats):
        for times, fn in zip(seconds, sides):
            times.append(_seconds(fn))
    return [Rate(n, times) for n, times in zip(counts, seconds)]


# ---- the flags a run sets (trainer.deterministic) and the seed's -----------------------------------

def flag_state() -> tuple[bool, bool, bool, bool]:
    """The process-wide switches trainer.deterministic sets (coupled_net.build.seed_everything):
    (cudnn.deterministic, cudnn.benchmark, torch's deterministic algorithms, their warn_only)."""
    return (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())


def set_flag_state(state) -> None:
    cudnn_deterministic, benchmark, algorithms, warn_only = state
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_deterministic, benchmark
    torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)


def run_switches(deterministic: bool) -> tuple[bool, bool, bool, bool]:
    """What a run with trainer.deterministic=`deterministic` switches on (seed_everything; a test holds
    the two equal)."""
    return (deterministic, not deterministic, deterministic, True)


# the seed notebook: torch.backends.cudnn.deterministic = True, .benchmark = False, nothing else
SEED_SWITCHES = (True, False, False, False)


@contextmanager
def flags_restored():
    """Whatever the block sets process-wide (a build sets the run's flags), undone after it."""
    before = flag_state()
    try:
        yield
    finally:
        set_flag_state(before)


@contextmanager
def switches(state):
    """One side's flags for one pass; the previous ones back after it, whatever happens."""
    with flags_restored():
        set_flag_state(state)
        yield


def under(state, fn):
    """`fn` as a side run under the flags `state`."""
    def side():
        with switches(state):
            return fn()
    return side


def run_flags(cfg: DictConfig) -> dict:
    """The settings of a run that decide its speed, as its config says them."""
    t = cfg.trainer
    return {"deterministic": bool(t.deterministic), "precision": str(t.get("precision", "fp32")),
            "channels_last": bool(t.get("channels_last", False)), "compile": bool(t.get("compile", False)),
            "pipeline": str(cfg.dataset.get("pipeline", "tensor"))}


def describe(flags: dict) -> str:
    return ", ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in flags.items())


def seed_workers() -> int:
    """The seed's num_workers (16), clamped to the CPUs this process may use."""
    return min(SEED_WORKERS, usable_cpus())


def _split(n_per_class: int) -> data.SplitDataset:
    images, labels = synthetic.letters(n_per_class, 0, True)
    return data.SplitDataset(data.ArraySource(images, labels), torch.arange(len(labels)), None, 1)


def pil_loader(split, size, batch, workers, train=True, pin_memory=False):
    train_tf, eval_tf = data.pil_transforms(size, MEAN, STD)
    ds = data.SplitDataset(split.source, split.indices, train_tf if train else eval_tf, 1)
    return EpochLoader(ds, batch, train, workers, pin_memory, 0)


def tensor_loader(split, size, batch, device, train=True):
    return TensorLoader(split, device, size, MEAN, STD, batch, train, 0)


def consume(loader, batches=None):
    for _ in islice(loader, batches):
        pass


def pipeline_rates(device, workers: int, sizes=(28, 224), n_images=4096, repeats: int = REPEATS,
                   pin_memory: bool = False) -> list[tuple]:
    """The loaders alone: the seed's PIL pipeline (`workers`, `pin_memory`: the seed's settings) against
    the tensor pipeline on `device`."""
    split = _split(160)  # 4160 images
    rows = []
    batches = n_images // 128
    for size in sizes:
        pil, tens = compare([lambda: consume(pil_loader(split, size, 128, workers, pin_memory=pin_memory), batches),
                             lambda: (consume(tensor_loader(split, size, 128, device), batches), synchronize(device))],
                            batches * 128, repeats)
        rows.append((f"input pipeline @{size}px (train augmentation)", pil, tens))
    return rows


def seed_steps(model, optimizer, batches, device) -> None:
    """The seed notebook's training loop: per batch, zero_grad, forward, cross-entropy, backward, step,
    then `loss.item()` and `(predictions == labels).sum().item()` (two host syncs a batch)."""
    model.train()
    running, correct = 0.0, 0
    for images, labels in batches:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad()
        outputs = model(images)
        loss = F.cross_entropy(outputs, labels)
        loss.backward()
        optimizer.step()
        running += loss.item() * images.size(0)
        correct += (outputs.argmax(dim=1) == labels).sum().item()
    synchronize(device)


def seed_optimizer(model) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=0.0001)  # the seed's


# ---- runs built and trained by coupled_net's own code -------------------------------------------------

@dataclass
class BenchRun:
    """A run of the bench: its config, its Trainer and the flags it sets."""
    cfg: DictConfig
    trainer: Trainer

    @property
    def flags(self) -> dict:
        return run_flags(self.cfg)

    @property
    def switches(self) -> tuple:
        return run_switches(bool(self.cfg.trainer.deterministic))


def compose_run(overrides) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("train", overrides=list(overrides))


def bench_run_of(overrides, device: torch.device, run_dir: Path | None = None) -> BenchRun:
    """The run `python launch/train.py OVERRIDES trainer.device=…` would train, built as it builds it
    (coupled_net.build: resolve, build, make_trainer); with `run_dir` its epochs write their files
    there (epochs.csv, last.pt, best.pt), as a run's do, else none. The flags the build sets
    process-wide are undone: each side of a comparison sets its own for each pass."""
    cfg = compose_run([*overrides, f"trainer.device={device}", "trainer.progress=false"])
    with flags_restored():
        spec = resolve(cfg)
        files = {} if run_dir is None else {"files": RunFiles(run_dir)}
        trainer = make_trainer(spec, build(spec), **files)
    return BenchRun(cfg, trainer)


class Prebuilt:
    """Batches built beforehand (on the device, augmented) in a loader's place: a pass of `steps`
    steps cycles through them. What the compute floor trains on."""

    def __init__(self, batches: list, steps: int | None = None):
        self.batches, self.steps = batches, len(batches) if steps is None else steps
        self.batch_size = len(batches[0][1])
        self.images = sum(len(batches[i % len(batches)][1]) for i in range(self.steps))

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        pass

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        return (self.batches[i % len(self.batches)] for i in range(self.steps))


def prebuilt_batches(trainer: Trainer, batches: int, steps: int | None = None) -> Prebuilt:
    """The first `batches` batches of an epoch of the trainer's own training loader, kept."""
    loader = trainer.loaders["train"]
    loader.set_epoch(0)
    return Prebuilt(list(islice(loader, batches)), steps)


def pass_images(trainer: Trainer) -> int:
    """The training images one pass of the trainer handles (its limit_batches honoured)."""
    loader = trainer.loaders["train"]
    n = loader.images if isinstance(loader, Prebuilt) else len(loader.sampler)
    return n if trainer.limit is None else min(n, trainer.limit * loader.batch_size)


def training_pass(trainer: Trainer, loader=None) -> None:
    """Trainer.train_one_epoch, the run's own step, over its training loader (or `loader` in its place)."""
    own = trainer.loaders["train"]
    trainer.loaders["train"] = own if loader is None else loader
    try:
        trainer.train_one_epoch(1, LoopState())
    finally:
        trainer.loaders["train"] = own
    synchronize(trainer.device)


def whole_epoch(trainer: Trainer) -> float:
    """One epoch as a run trains it (Trainer.fit): training pass, validation, KE, validation after KE,
    the scheduler, and (with a run directory) its epochs.csv row and checkpoints: last.pt, and best.pt
    (a fresh loop state: every pass improves). Returns the checkpoints' seconds as the trainer times
    them (its row's checkpoint_time_s)."""
    trainer.epochs = 1
    trainer.fit(LoopState())
    synchronize(trainer.device)
    return float(trainer.rows[-1].get("checkpoint_time_s", math.nan))


@contextmanager
def limited(trainer: Trainer, batches: int | None):
    """At most `batches` batches per phase (a warm-up pass)."""
    before, trainer.limit = trainer.limit, batches
    try:
        yield
    finally:
        trainer.limit = before


def _images(left: int, right: int) -> str:
    return f"{left:,} images" if left == right else f"{left:,} and {right:,} images"


def _sides(name: str, left: Rate, right: Rate) -> tuple:
    """A row of a section's table: both sides' medians and their ratio, right over left."""
    return name, left, right, Ratio(right / left)


class Side(NamedTuple):
    """One side of a trainer section: timed passes, its warm-up, images per pass."""
    run: object
    warm: object
    images: int


def _trainer_side(state, trainer: Trainer, fn, images: int, shapes=None) -> Side:
    """`fn` as a side under `state`; its warm-up: `fn` cut to WARMUP_BATCHES batches a phase, after
    `shapes` (the other batch sizes the pass meets: see batch_shapes)."""
    def warm():
        if shapes is not None:
            shapes()
        with limited(trainer, WARMUP_BATCHES):
            fn()
    return Side(under(state, fn), under(state, warm), images)


def batch_shapes(trainer: Trainer, batch: tuple):
    """A warm-up of every batch size an epoch of `trainer` meets besides its first batch's (the last,
    shorter batch of training and of validation), a training step and an evaluation each, cut from
    `batch`: with cudnn.benchmark each new shape is autotuned once, which a timed pass must not pay."""
    x, y = batch
    train, val = trainer.loaders["train"], trainer.loaders["val"]
    sizes = {n for n in (len(train.sampler) % train.batch_size, len(val.sampler) % val.batch_size) if 0 < n <= len(y)}

    def warm():
        for n in sorted(sizes):
            training_pass(trainer, Prebuilt([(x[:n], y[:n])]))
            evaluate_batches(trainer.model, [(x[:n], y[:n])], trainer.device, trainer.numerics)
    return warm


def _baseline_side(kind: str, overrides, device, workers: int):
    """The pass the trainer's is set against: `pil`: the Trainer with dataset.pipeline=pil (the run's
    flags); `seed`: the seed's loop with its optimizer and cudnn flags, plain fp32 NCHW, over the pil
    pipeline. Either way the DataLoader has the seed's settings: `workers` (its 16, clamped to the
    CPUs), pinned memory on CUDA. (side, its column title)."""
    seeds = ["trainer.precision=fp32", "trainer.channels_last=false", "trainer.compile=false"] if kind == "seed" else []
    # the last value of a key wins: these over the run's own
    pil = bench_run_of([*overrides, "dataset.pipeline=pil", f"trainer.num_workers={workers}", *seeds], device)
    loader, pin = pil.trainer.loaders["train"], device.type == "cuda"
    settings = f"num_workers={workers}, pin_memory={str(pin).lower()}"
    if kind == "pil":
        return (_trainer_side(pil.switches, pil.trainer, lambda: training_pass(pil.trainer), pass_images(pil.trainer)),
                f"pil pipeline ({settings}), Trainer")
    optimizer = seed_optimizer(pil.trainer.model)
    t = pil.trainer
    side = _trainer_side(SEED_SWITCHES, t, lambda: seed_steps(t.model, optimizer, islice(loader, t.limit), device),
                         pass_images(t))
    return side, f"the seed's loop: pil ({settings}), .item() per batch, cudnn.deterministic"


def trainer_section(label: str, overrides, device: torch.device, repeats: int = EPOCH_REPEATS, *,
                    baseline: str | None = None, workers: int = 0, floor_batches: int = 20,
                    floor_steps: int | None = None, checkpoint_dir: Path | None = None) -> tuple[list, dict]:
    """The run of `overrides`, built and trained by coupled_net's own code, timed with deterministic on
    and off side by side: its training pass (Trainer.train_one_epoch over its own loader), its compute
    floor (the same step over `floor_batches` batches of that loader built beforehand, cycled for
    `floor_steps` steps), its whole epoch (Trainer.fit: train, validate, KE, validate), the pass and the
    epoch over the floor (time per image), and the checkpoint's share of an epoch. With `baseline`
    ("pil" or "seed", see _baseline_side) the training pass is also set against that, in the same
    interleaved passes. (rows, a summary of the figures for --json)."""
    with tempfile.TemporaryDirectory(dir=checkpoint_dir, prefix="bench-run-") as run_dir:
        run = bench_run_of(overrides, device, Path(run_dir))
        trainer = run.trainer
        prebuilt = prebuilt_batches(trainer, floor_batches, floor_steps)
        images = pass_images(trainer)
        shapes = batch_shapes(trainer, prebuilt.batches[0])
        sides, titles, ckpt = {}, {}, {True: [], False: []}
        if baseline:
            sides["baseline"], titles["baseline"] = _baseline_side(baseline, overrides, device, workers)
        for det in (True, False):
            state = run_switches(det)
            sides[f"pass {det}"] = _trainer_side(state, trainer, lambda: training_pass(trainer), images, shapes)
            sides[f"floor {det}"] = _trainer_side(state, trainer, lambda: training_pass(trainer, prebuilt),
                                                  prebuilt.images)
            sides[f"epoch {det}"] = _trainer_side(state, trainer, functools.partial(
                lambda times: times.append(whole_epoch(trainer)), ckpt[det]), images, shapes)
        rates = dict(zip(sides, compare([s.run for s in sides.values()], [s.images for s in sides.values()], repeats,
                                        [s.warm for s in sides.values()])))
    where = checkpoint_dir or tempfile.gettempdir()
    ckpt_s = {det: Seconds(statistics.median(times[-repeats:])) for det, times in ckpt.items()}  # not the warm-up's
    epoch_s = {det: images / rates[f"epoch {det}"] for det in (True, False)}
    over = {kind: {det: Ratio(rates[f"floor {det}"] / rates[f"{kind} {det}"]) for det in (True, False)}
            for kind in ("pass", "epoch")}
    flags = run.flags
    rows = [Header(f"{label}; the run's flags: {describe(flags)}", "deterministic=true", "deterministic=false",
                   "false / true"),
            _sides(f"training pass: Trainer.train_one_epoch, {flags['pipeline']} pipeline, {images:,} images",
                   rates["pass True"], rates["pass False"]),
            _sides(f"  … compute floor: the same step on {len(prebuilt.batches)} batches built beforehand, "
                   f"{prebuilt.steps} steps", rates["floor True"], rates["floor False"]),
            ("  … training pass / floor (time per image)", over["pass"][True], over["pass"][False], None),
            _sides("whole epoch: Trainer.fit (train, val, KE, val after KE, epochs.csv row, checkpoints), "
                   "training images/s", rates["epoch True"], rates["epoch False"]),
            ("  … whole epoch / floor (time per image)", over["epoch"][True], over["epoch"][False], None),
            (f"  … of which checkpoints (last.pt + best.pt into {where}; the trainer's checkpoint_time_s, median "
             f"{ckpt_s[True]:.3f} s and {ckpt_s[False]:.3f} s): share of the epoch",
             Share(ckpt_s[True] / epoch_s[True]), Share(ckpt_s[False] / epoch_s[False]), None)]
    summary = {"label": label, "flags": flags, "overrides": list(overrides), "images": images,
               "pass_img_s": {str(d).lower(): float(rates[f"pass {d}"]) for d in (True, False)},
               "floor_img_s": {str(d).lower(): float(rates[f"floor {d}"]) for d in (True, False)},
               "epoch_img_s": {str(d).lower(): float(rates[f"epoch {d}"]) for d in (True, False)},
               "epoch_s": {str(d).lower(): epoch_s[d] for d in (True, False)},
               "pass_over_floor": {str(d).lower(): float(over["pass"][d]) for d in (True, False)},
               "epoch_over_floor": {str(d).lower(): float(over["epoch"][d]) for d in (True, False)},
               "checkpoint_s": {str(d).lower(): float(ckpt_s[d]) for d in (True, False)},
               "checkpoint_share_of_epoch": {str(d).lower(): float(ckpt_s[d] / epoch_s[d]) for d in (True, False)}}
    if baseline:
        det = flags["deterministic"]
        base = rates["baseline"]
        rows += [Header(f"{label}: the training pass against {'the pil pipeline' if baseline == 'pil' else 'the seed'}",
                        titles["baseline"], f"Trainer, {flags['pipeline']}, deterministic={str(det).lower()}"),
                 _sides(f"training pass ({_images(sides['baseline'].images, images)})", base, rates[f"pass {det}"])]
        summary.update(baseline=titles["baseline"], baseline_img_s=float(base),
                       pass_over_baseline=float(rates[f"pass {det}"] / base))
    return rows, summary


def alexnet_steps(device, steps: int, batch: int, repeats: int = EPOCH_REPEATS, overrides=()) -> list[tuple]:
    """AlexNet@224 training steps on one batch built beforehand: the seed's loop (its `.item()`s, its
    optimizer and cudnn flags) against the Trainer's step (a run built by coupled_net.build, its flags)."""
    run = bench_run_of(["dataset=synthetic_letters", f"dataset.train_per_class={batch // 20 + 2}",
                        "dataset.test_per_class=2", f"trainer.batch_size={batch}", *overrides], device)
    m = run.cfg.model
    x = torch.randn(batch, run.cfg.dataset.channels, m.input_size, m.input_size, device=device)
    y = torch.randint(0, run.cfg.dataset.num_classes, (batch,), device=device)
    batches = Prebuilt([(x, y)], steps)
    model = build_model("alexnet", run.cfg.dataset.channels, run.cfg.dataset.num_classes, m.input_size).to(device)
    optimizer = seed_optimizer(model)
    seed, ours = compare([under(SEED_SWITCHES, lambda: seed_steps(model, optimizer, batches, device)),
                          under(run.switches, lambda: training_pass(run.trainer, batches))], steps * batch, repeats,
                         warmups=[under(SEED_SWITCHES, lambda: seed_steps(model, optimizer, islice(batches, 1), device)),
                                  under(run.switches, lambda: training_pass(run.trainer, Prebuilt([(x, y)])))])
    return [(f"AlexNet@{m.input_size} train steps (batch {batch}): the seed's loop vs the Trainer's step "
             f"({describe(run.flags)})", seed, ours)]


class Checked:
    """A training loader that turns torch.cuda.set_sync_debug_mode(`mode`) on once its first batch is
    made: the epoch's setup (its order sent to the device, once) is not a per-step sync; every step,
    and every later batch, is watched."""

    def __init__(self, loader, mode: str):
        self.loader, self.mode = loader, mode

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.loader.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        batches = iter(self.loader)
        first = next(batches, None)
        if first is None:
            return
        torch.cuda.set_sync_debug_mode(self.mode)
        yield first
        yield from batches


def sync_check(overrides=SYNC_CHECK_RUN, device: str = "cuda") -> dict:
    """One training pass of the run of `overrides` (by default the default run: tensor pipeline,
    AlexNet@224, deterministic) with every host-device synchronisation inside the steps an error
    (torch.cuda.set_sync_debug_mode("error") once the epoch's first batch is made: Checked); the read of the
    device-side sums once per phase (coupled_net.trainer._summed_over_ranks) is the one sync allowed.
    A pass under "warn" before it lists every line of coupled_net that synchronises, with how often
    (as often as there are steps: a per-step sync). Without CUDA: skipped."""
    if not torch.cuda.is_available():
        return {"passed": None, "skipped": "no CUDA GPU"}
    run = bench_run_of(overrides, torch.device(device))
    trainer = run.trainer
    original, own = trainer_module._summed_over_ranks, trainer.loaders["train"]

    def allowed(*args, **kwargs):  # the once-per-phase read: not a per-step sync
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(0)
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    seen: dict[str, int] = {}

    def note(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):  # "called a synchronizing CUDA operation"; not others' warnings
            return
        package = str(Path(__file__).resolve().parent)
        frames = [f for f in traceback.extract_stack()[:-1] if f.filename.startswith(package)
                  and f.filename != str(Path(__file__).resolve())]
        where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].line}" if frames \
            else f"{filename}:{lineno}"
        seen[where] = seen.get(where, 0) + 1

    def one_pass(mode: str) -> None:
        trainer.loaders["train"] = Checked(own, mode)
        try:
            trainer.train_one_epoch(1, LoopState())
        finally:
            torch.cuda.set_sync_debug_mode(0)
            trainer.loaders["train"] = own

    result = {"run": list(overrides), "flags": run.flags, "steps": len(own)}
    trainer_module._summed_over_ranks = allowed
    try:
        with switches(run.switches):
            training_pass(trainer)  # warm-up: allocations, kernels chosen
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = note
                one_pass("warn")
            result["syncs_under_warn"] = dict(sorted(seen.items(), key=lambda kv: -kv[1]))
            try:
                one_pass("error")
                result["error"] = None
            except RuntimeError as e:
                result["error"] = "".join(traceback.format_exception(e)[-8:])
    finally:
        trainer_module._summed_over_ranks = original
    result["passed"] = result["error"] is None and not seen
    return result


def bookkeeping(device, epoch_seconds: float | None, epochs: int = REPEATS) -> list[tuple]:
    """KE + monitoring + CSV row + last.pt/best.pt, against one quickstart epoch (the quickstart
    section's whole epoch with deterministic=true; None: not measured, no share): the median over
    `epochs` timed epochs after one warm-up epoch."""
    model = build_model("small_cnn", 1, 26, 28).to(device)
    coupling = Coupling(model, alpha=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    monitor = SystemMonitor(device)
    with tempfile.TemporaryDirectory() as tmp:
        log = CsvLog(Path(tmp) / "epochs.csv", EPOCH_COLUMNS)

        def one_epoch(epoch: int) -> None:
            synchronize(device)
            coupling.equalize()
            synchronize(device)
            monitor.begin_epoch(), monitor.end_epoch()  # the sampler's start and stop, and its row
            log.append(dict.fromkeys(EPOCH_COLUMNS, epoch))
            save_torch(Path(tmp) / "last.pt", {"model": model.state_dict(), "optimizer": opt.state_dict()})
            save_torch(Path(tmp) / "best.pt", model.state_dict())
        one_epoch(0)
        per_epoch = statistics.median(_seconds(lambda: one_epoch(e)) for e in range(1, epochs + 1))
    monitor.close()
    return [("bookkeeping per epoch (s) / share of a quickstart epoch", per_epoch,
             None if epoch_seconds is None else per_epoch / epoch_seconds)]


QUICKSTART_RUN = ["experiment=quickstart", "trainer.epochs=1", "trainer.progress=false"]
# the seed's protocol (AlexNet@224, batch 128) cut to a few hundred steps: 4,000 training images x 8 epochs
SEED_PROTOCOL_RUN = ["dataset=synthetic_letters", "dataset.train_per_class=160", "dataset.test_per_class=20",
                     "trainer.epochs=8", "trainer.progress=false"]


def bench_run(overrides: list[str], run_dir: str) -> dict:
    """One run as a sweep's job trains it (coupled_net.lifecycle), in a pool's process; its metrics."""
    return execute_run(compose_run(overrides), run_dir)["metrics"]


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


def collect_rows(sizes=COLLECT_SIZES) -> list:
    """launch/collect.py end to end (every summary file and plot) over N synthetic run directories
    (coupled_net.benchtree) for each N in `sizes`, each in its own process so that its peak memory is
    its own: wall seconds (and CPU seconds: a shared host's load inflates the wall time), peak RSS, and the
    growth: seconds per 1,000 runs more than the previous size (none for the first: its time is mostly the
    fixed cost of imports and figures). One pass per
    size: a pass is the whole review, seconds to minutes."""
    rows = [Header("collect: launch/collect.py, every summary file and plot, synthetic runs (one process per "
                   "size, one pass)", "seconds", "peak RSS", "s per 1,000 runs more")]
    previous = None
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            tree = Path(tmp) / f"runs_{n}"
            make_tree(tree, n)
            seconds, cpu, peak_mb = collect_once(tree, Path(tmp) / f"summary_{n}")
            shutil.rmtree(tree)  # 10,000 runs are ~300 MB of small files
            growth = None if previous is None else Seconds(1000 * (seconds - previous[1]) / (n - previous[0]))
            rows.append((f"{n:,} runs (CPU {cpu:.1f} s)", Seconds(seconds), Megabytes(peak_mb),
                         growth))
            previous = (n, seconds)
    return rows


# runs launch/collect.py as `python launch/collect.py TREE --out OUT` would, then writes the process's
# peak RSS (VmHWM, KiB): getrusage's ru_maxrss would carry the bench's own peak across fork and exec
_PEAK = """import runpy, sys
tree, out = sys.argv[1:]
sys.argv = [{collect!r}, tree, "--out", out]
try:
    runpy.run_path({collect!r}, run_name="__main__")
finally:
    hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")]
    open(out + "/peak_kib", "w").write(hwm[0] if hwm else "nan")
"""


def collect_once(tree: Path, out: Path) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, peak RSS in MB) of `launch/collect.py tree --out out` in a child process."""
    out.mkdir(parents=True)
    with open(out / "collect.log", "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-c", _PEAK.format(collect=str(COLLECT)), str(tree), str(out)],
                                stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"collect bench: launch/collect.py exited {proc.returncode}: "
                           f"{(out / 'collect.log').read_text()[-2000:]}")
    return seconds, usage.ru_utime + usage.ru_stime, float((out / "peak_kib").read_text()) / 1024


@dataclass
class Options:
    """What launch/bench.py measures (its command line)."""
    size: str = "auto"                     # auto: seed on CUDA, small otherwise | small | seed
    only: tuple[str, ...] | None = None    # sections (SECTIONS); None: all (seed only at seed size)
    repeats: int | None = None             # timed passes per side; None: each section's default
    overrides: tuple[str, ...] = ()        # Hydra overrides of every run the trainer sections build
    checkpoint_dir: Path | None = None     # where the trainer sections' runs write checkpoints (local disk)
    collect_sizes: tuple[int, ...] = COLLECT_SIZES  # run directories the collect section reviews


def measure(options: Options | None = None) -> tuple[list, dict, dict]:
    """(table rows, summaries of the trainer sections, the settings the run used) for `options`."""
    o = options or Options()
    device = resolve_device("auto")
    seed_size = o.size == "seed" or (o.size == "auto" and device.type == "cuda")
    only = o.only or tuple(s for s in SECTIONS if s != "seed" or seed_size)
    torch.manual_seed(0)
    workers, pin = seed_workers(), device.type == "cuda"
    extra = list(o.overrides)
    rows, summaries = [], {}

    def reps(default: int) -> int:
        return o.repeats or default

    if "pipeline" in only:
        rows += pipeline_rates(device, workers, repeats=reps(REPEATS), pin_memory=pin)
    if "quickstart" in only:
        section, summaries["quickstart"] = trainer_section(
            "quickstart (small_cnn @28px, synthetic letters, batch 128)", [*QUICKSTART_TRAIN, *extra], device,
            reps(EPOCH_REPEATS), baseline="pil", workers=workers, checkpoint_dir=o.checkpoint_dir)
        rows += section
    if "steps" in only:
        rows += alexnet_steps(device, steps=50 if seed_size else 5, batch=128 if seed_size else 32,
                              repeats=reps(EPOCH_REPEATS), overrides=extra)
    if "seed" in only:
        section, summaries["seed"] = trainer_section(
            "the seed's protocol (AlexNet@224, EMNIST-size synthetic letters, batch 128)", [*SEED_TRAIN, *extra],
            device, reps(SEED_REPEATS), baseline="seed", workers=workers, floor_steps=100,
            checkpoint_dir=o.checkpoint_dir)
        rows += section
    if "bookkeeping" in only:
        epoch_s = summaries["quickstart"]["epoch_s"]["true"] if "quickstart" in summaries else None
        rows += bookkeeping(device, epoch_s)
    if "sweep" in only:
        rows += sweep_rows(device, "quickstart-size", QUICKSTART_RUN)
        if seed_size:
            rows += sweep_rows(device, "seed-protocol-size (AlexNet@224, 250 steps)", SEED_PROTOCOL_RUN)
    if "collect" in only:
        rows += collect_rows(o.collect_sizes)
    settings = {"device": provenance(device)["device"], "cpus": data_workers(), "torch": torch.__version__,
                "python": platform.python_version(), "size": "seed" if seed_size else "small", "sections": list(only),
                "pil_workers": workers, "pin_memory": pin, "overrides": extra,
                "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG")}
    return rows, summaries, settings


def measure_all(options: Options | None = None) -> str:
    rows, _, settings = measure(options)
    return table(rows, resolve_device("auto"), settings["pil_workers"], settings["pin_memory"])


def data_workers() -> int:
    return usable_cpus()


def _cell(rate) -> str:
    spread = rate.spread() if isinstance(rate, Rate) else ""
    return f"{rate:,.0f} img/s" + (f" ({spread})" if spread else "")


def _value(v) -> str:
    if v is None:
        return ""
    if isinstance(v, Ratio):
        return f"{v:.2f}×"
    if isinstance(v, Share):
        return f"{100 * v:.2f} %"
    if isinstance(v, Seconds):
        return f"{v:.3f} s"
    if isinstance(v, Megabytes):
        return f"{v:,.0f} MB"
    return _cell(v)


def _header(h: Header) -> list[str]:
    return ["", f"| {h.title} | {h.left} | {h.right} | {h.ratio} |", "|---|---:|---:|---:|"]


def table(rows, device, workers, pin_memory: bool = False) -> str:
    head = (f"device: {provenance(device)['device']}, {data_workers()} CPUs, torch {torch.__version__}, "
            f"python {platform.python_version()}\n"
            f"PIL baseline: the seed notebook's DataLoader settings, num_workers={SEED_WORKERS} clamped to the "
            f"{data_workers()} usable CPUs = {workers}, pin_memory={str(pin_memory).lower()} (true on CUDA only)\n"
            "trainer rows: runs built by coupled_net.build and timed through their Trainer; every pass under its "
            "side's flags, restored after it (deterministic=true: cudnn.deterministic, no cudnn.benchmark, "
            "torch.use_deterministic_algorithms(warn_only); false: cudnn.benchmark; the seed's: "
            f"cudnn.deterministic only); CUBLAS_WORKSPACE_CONFIG={os.environ.get('CUBLAS_WORKSPACE_CONFIG')} "
            "for the whole process, as in every run\n"
            "each side: a warm-up pass, then n timed passes interleaved with the other sides'; "
            "median images/s (slowest–fastest pass, n); ratio of the medians\n\n")
    main = Header("measurement", "seed-style / pil", "coupled_net / tensor")
    lines, under_main = [], False
    for row in rows:
        if isinstance(row, Header):  # a section's table; its rows have four cells, the ratio given
            lines += _header(row)[0 if lines else 1:]
            under_main = False
            continue
        if len(row) == 4:
            name, left, right, ratio = row
            lines.append(f"| {name} | {_value(left)} | {_value(right)} | {_value(ratio)} |")
            continue
        if not under_main:  # three cells: the main table's (again, after a section's)
            lines += _header(main)[0 if lines else 1:]
            under_main = True
        name, base, ours = row
        if name.startswith("bookkeeping"):
            lines.append(f"| {name} | {base:.4f} s | {'' if ours is None else f'{100 * ours:.2f} %'} | |")
        elif name.startswith(("sweep", "  … packed")):
            lines.append(f"| {name} | {'' if base is None else f'{base:,.0f}'} | {ours:,.0f} | "
                         f"{'' if base is None else f'{ours / base:.2f}×'} |")
        elif base is None:
            lines.append(f"| {name} | | {_cell(ours)} | |")
        else:
            lines.append(f"| {name} | {_value(base)} | {_value(ours)} | {ours / base:.2f}× |")
    return head + "\n".join(lines)


def _jsonable(v):
    if isinstance(v, Rate):
        return {"median": float(v), "lo": v.lo, "hi": v.hi, "n": v.n}
    if isinstance(v, Header):
        return {"table": v.title, "left": v.left, "right": v.right, "ratio": v.ratio}
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return float(v) if isinstance(v, float) else v


def _sizes(text: str) -> tuple[int, ...]:
    """--collect-sizes: ascending positive run counts."""
    try:
        sizes = tuple(int(x.replace("_", "")) for x in text.split(",") if x)
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1 or list(sizes) != sorted(set(sizes)):
        raise argparse.ArgumentTypeError(f"{text!r}: ascending positive run counts, e.g. 100,2000,10000")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="launch/bench.py", description="Side-by-side speed measurements (SPEC §9), printed as Markdown "
        "tables with ratios; each side: one warm-up pass, then n timed passes interleaved with the others'.")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run the trainer sections build "
                        "(the run's flags: trainer.precision=bf16 trainer.channels_last=true ...)")
    parser.add_argument("--size", choices=["auto", "small", "seed"], default="auto",
                        help="seed: the seed's protocol at EMNIST size (AlexNet@224, batch 128; minutes on a "
                        "GPU, hours on a CPU); small: CPU-sized; auto (default): seed on CUDA, else small")
    parser.add_argument("--only", type=lambda s: tuple(x for x in s.split(",") if x),
                        help=f"comma-separated sections of {','.join(SECTIONS)} (default: all; seed only at seed size)")
    parser.add_argument("--repeats", type=int, help="timed passes per side (default: 5 for the pipeline, 3 for "
                        f"epochs, {SEED_REPEATS} at seed size)")
    parser.add_argument("--checkpoint-dir", type=Path, help="where the trainer sections' runs write their "
                        "checkpoints (default: the system's temporary directory; use a local disk)")
    parser.add_argument("--json", type=Path, dest="json_path", help="also write the rows and figures here")
    parser.add_argument("--collect-sizes", type=_sizes, default=COLLECT_SIZES, metavar="N,N,...",
                        help="run directories the collect section reviews, one size per pass (default: "
                        f"{','.join(map(str, COLLECT_SIZES))})")
    parser.add_argument("--sync-check", action="store_true", help="instead: one training pass of the default "
                        "run (tensor pipeline) on CUDA with every per-step host sync an error; prints JSON")
    args = parser.parse_args(argv)
    if args.only and set(args.only) - set(SECTIONS):
        parser.error(f"--only: unknown section(s) {sorted(set(args.only) - set(SECTIONS))}; of {', '.join(SECTIONS)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats: at least 1")
    if args.sync_check:
        result = sync_check([*SYNC_CHECK_RUN, *args.overrides])
        print(json.dumps(result, indent=2))
        if args.json_path:
            args.json_path.write_text(json.dumps(result, indent=2) + "\n")
        return 0 if result["passed"] is not False else 1
    options = Options(args.size, args.only, args.repeats, tuple(args.overrides), args.checkpoint_dir,
                      args.collect_sizes)
    rows, summaries, settings = measure(options)
    text = table(rows, resolve_device("auto"), settings["pil_workers"], settings["pin_memory"])
    print(text)
    if args.json_path:
        args.json_path.write_text(json.dumps({"settings": settings, "sections": summaries,
                                              "rows": [_jsonable(r) for r in rows], "table": text}, indent=2) + "\n")
    return 0
