"""Training-loop callbacks (the `callbacks` config group, SPEC §5): probes that watch a run at fixed
points of its loop and add numbers to its records, without changing what it computes.

A callback is any object with some of these methods (`LoopCallback`; subclass `Callback` for no-op
defaults):

    columns(ctx) -> list[str]          the epoch columns it adds, known before epoch 1
    on_fit_start(ctx)                  before the first epoch this process trains (a resume too)
    on_before_ke(ctx) -> dict          each epoch, after the validation before KE, just before KE
    on_epoch_end(ctx, row) -> dict     each epoch, after KE and the validation after it (`row`: the
                                       epoch's standard columns)
    on_fit_end(ctx, results) -> dict   once, on the best model, equalized, after its val/test metrics
                                       (`results`: {"val": {...}, "test": {...}})

The dicts of the two epoch hooks hold that epoch's values of the declared columns (a column not
declared is refused; one left out is an empty cell, read as NaN); epochs.csv gets them after the
standard columns as `<name>.<column>`. on_fit_end's dict goes into results.json under
`callbacks.<name>` (NaN and infinities as null). `ctx` (`Context`) gives the model, the coupling (its
layers; pair k of a layer is filters 2k and 2k+1, the first `alpha` pairs coupled), the loaders
(`train`, `val`, `test`), the device, the epoch and the run directory (None in a run without files).

Callbacks observe: each call runs under torch.no_grad (unless the callback sets `needs_grad = True`),
outside autocast, and afterwards every random generator (Python's, NumPy's, torch's on the CPU and on
each GPU) and every module's train/eval mode are as they were: adding a probe changes no metric of the
run. They are not part of a run's identity. A callback that raises fails the run with one line naming
it: `callbacks.pair_drift: ZeroDivisionError: ...` (CallbackFailed)."""

from __future__ import annotations

import contextlib
import math
import random
from dataclasses import dataclass
from numbers import Real
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from .coupling import Coupling
from .errors import RunFault, one_line


@dataclass
class Context:
    """What a callback sees of the run."""
    model: nn.Module              # the model the run trains (not its DDP or compiled wrapper)
    coupling: Coupling            # .layers: [(path, Conv2d)], .alpha, .mode, .schedule
    loaders: dict                 # "train", "val", "test": the run's loaders, (images, labels) batches (on the
                                  # device with dataset.pipeline=tensor); this rank's shard under DDP, whole
                                  # (trainer.limit_batches is the trainer's, not theirs)
    device: torch.device
    run_dir: Path | None = None   # None: a run that writes no files (a unit test's Trainer)
    epoch: int = 0                # the epoch being finished (0 before the first)


class LoopCallback(Protocol):
    """The methods a callback may have (every one is optional; see the module's docstring)."""

    def columns(self, ctx: Context) -> list[str]: ...

    def on_fit_start(self, ctx: Context) -> None: ...

    def on_before_ke(self, ctx: Context) -> dict: ...

    def on_epoch_end(self, ctx: Context, row: dict) -> dict: ...

    def on_fit_end(self, ctx: Context, results: dict) -> dict: ...


class Callback:
    """A base with every hook doing nothing: override the ones a probe needs."""
    needs_grad = False  # True: its calls run with autograd on (a probe that trains something)

    def columns(self, ctx: Context) -> list[str]:
        return []

    def on_fit_start(self, ctx: Context) -> None:
        return None

    def on_before_ke(self, ctx: Context) -> dict:
        return {}

    def on_epoch_end(self, ctx: Context, row: dict) -> dict:
        return {}

    def on_fit_end(self, ctx: Context, results: dict) -> dict:
        return {}


class CallbackFailed(RunFault):
    """A callback raised, or returned what its records cannot hold: the run fails with this line."""


@contextlib.contextmanager
def preserved_rng(loaders: dict | None = None):
    """Afterwards Python's, NumPy's and torch's random generators (the CPU's and every initialised GPU's),
    and the generators of `loaders` and their samplers, are where they were: what runs inside draws
    nothing from the run's streams (iterating a loader draws its workers' base seed; a shuffling one's
    sampler, the order)."""
    python, numpy_state, cpu = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    own, samplers = {}, {}
    for loader in (loaders or {}).values():  # a DataLoader, or coupled_net.loaders' EpochLoader / TensorLoader
        inner = getattr(loader, "loader", None)
        for holder in (loader, inner, getattr(loader, "sampler", None), getattr(inner, "sampler", None)):
            g = getattr(holder, "generator", None)
            if isinstance(g, torch.Generator):
                own[id(g)] = (g, g.get_state())
            if holder is not None and hasattr(holder, "set_epoch") and hasattr(holder, "start"):
                samplers[id(holder)] = (holder, holder.epoch, holder.start)  # coupled_net.loaders.EpochSampler
    try:
        yield
    finally:
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        for generator, state in own.values():
            generator.set_state(state)
        for sampler, epoch, start in samplers.values():
            sampler.epoch, sampler.start = epoch, start


@contextlib.contextmanager
def observing(ctx: Context, grad: bool = False):
    """Run a callback's code so that the run cannot tell: autograd off (unless `grad`), autocast off,
    and afterwards the random generators, every module's train/eval mode and the model's buffers (a
    forward pass in train mode moves BatchNorm's running statistics) as before. The weights are the
    callback's to leave alone."""
    modes = [(m, m.training) for m in ctx.model.modules()]
    buffers = [(b, b.detach().clone()) for b in ctx.model.buffers()]
    try:
        with preserved_rng(ctx.loaders), torch.set_grad_enabled(grad), \
                torch.autocast(ctx.device.type, enabled=False):
            yield
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)


class LoopCallbacks:
    """The run's callbacks by name (the `callbacks` config), called by the trainer at its fixed points;
    their columns named and checked here. Empty: every call returns nothing and costs nothing."""

    def __init__(self, named: dict | None = None):
        self.named = dict(named or {})
        self.declared: dict[str, list[str]] = {}

    def __bool__(self) -> bool:
        return bool(self.named)

    def _call(self, name: str, callback, hook: str, ctx: Context, *args):
        method = getattr(callback, hook, None)
        if method is None:
            return None
        with observing(ctx, grad=bool(getattr(callback, "needs_grad", False))):
            try:
                return method(ctx, *args)
            except Exception as e:  # noqa: BLE001 - the run fails with one line naming the callback
                raise CallbackFailed(f"callbacks.{name}: {one_line(e)}") from e

    def columns(self, ctx: Context) -> list[str]:
        """Every callback's epoch columns as epochs.csv names them (`<name>.<column>`), in config order."""
        names = []
        for name, callback in self.named.items():
            declared = self._call(name, callback, "columns", ctx) or []
            declared = declared if isinstance(declared, str) else list(declared)  # a generator read once
            if isinstance(declared, str) or not all(isinstance(c, str) and c for c in declared) or \
                    len(set(declared)) != len(declared):
                raise CallbackFailed(f"callbacks.{name}: columns() returned {declared!r}: expected a list of "
                                     "distinct column names")
            self.declared[name] = declared
            names += [f"{name}.{column}" for column in self.declared[name]]
        return names

    def fit_start(self, ctx: Context) -> None:
        for name, callback in self.named.items():
            self._call(name, callback, "on_fit_start", ctx)

    def before_ke(self, ctx: Context) -> dict:
        """The columns the callbacks give before the epoch's KE."""
        return self._epoch_values("on_before_ke", ctx)

    def epoch_end(self, ctx: Context, row: dict) -> dict:
        """The columns the callbacks give once the epoch's row is complete (a copy is what they see)."""
        return self._epoch_values("on_epoch_end", ctx, dict(row))

    def _epoch_values(self, hook: str, ctx: Context, *args) -> dict:
        values = {}
        for name, callback in self.named.items():
            got = self._call(name, callback, hook, ctx, *args)
            if got is None:
                continue
            if not isinstance(got, dict):
                raise CallbackFailed(f"callbacks.{name}: {hook}() returned {type(got).__name__}: expected a dict "
                                     "of its columns' values")
            declared = self.declared.get(name, [])
            for column, value in got.items():
                if column not in declared:
                    raise CallbackFailed(f"callbacks.{name}: {hook}() returned column {column!r}, which its "
                                         f"columns() did not declare (declared: {', '.join(declared) or 'none'})")
                values[f"{name}.{column}"] = _number(name, column, value)
        return values

    def fit_end(self, ctx: Context, results: dict) -> dict:
        """{name: what its on_fit_end returned}, for results.json's `callbacks` (callbacks without it: absent)."""
        out = {}
        for name, callback in self.named.items():
            got = self._call(name, callback, "on_fit_end", ctx, results)
            if got is None:
                continue
            if not isinstance(got, dict):
                raise CallbackFailed(f"callbacks.{name}: on_fit_end() returned {type(got).__name__}: expected a "
                                     "dict of results")
            if not got:  # nothing to record: no key of its own in results.json
                continue
            out[name] = {str(k): _plain(v) for k, v in got.items()}
        return out


def _number(name: str, column: str, value) -> float:
    """An epoch cell: a number (a one-element tensor or NumPy scalar too), None as NaN."""
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor) and value.numel() == 1 or \
            isinstance(value, (np.ndarray, np.generic)) and np.size(value) == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, Real):
        raise CallbackFailed(f"callbacks.{name}: column {column!r} got {value!r}: an epoch column holds numbers")
    return float(value)


def _plain(value):
    """A results.json value: tensors and NumPy numbers as Python numbers, containers walked."""
    if isinstance(value, (torch.Tensor, np.ndarray, np.generic)):
        return _plain(value.tolist() if getattr(value, "ndim", 0) else value.item())
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN: a reader other than Python's would refuse the file
    return value
