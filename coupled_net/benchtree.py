"""A tree of N realistic synthetic run directories for the collect bench and the collector's scale tests:
each run's files are a real quickstart run's (results.json, epochs.csv with every column and several
epochs, .hydra/config.yaml with its interpolations, train.log), with model, alpha, seed, metrics and
timings varied and a few statuses besides `done`: failed, interrupted, running with an owner that is
gone (a pid no process can have, on this host, so the reason is the same whenever it is collected),
and one run whose results.json is not JSON. Deterministic: the same N gives the same bytes (save the
host name)."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import socket
from pathlib import Path

MODELS = ("small_cnn", "alexnet", "resnet18")
ALPHAS = (0, 2, 4, 8)
EPOCHS = 10
# above any pid_max Linux allows (2**22): never a live process, so the owner is always gone
DEAD_PID = 99_999_999

# .hydra/config.yaml of a quickstart run as Hydra writes it (interpolations unresolved); {model}, {alpha},
# {seed} are filled in per run
CONFIG = """model:
  _target_: coupled_net.models.build_model
  name: {model}
  in_channels: ${{dataset.channels}}
  num_classes: ${{dataset.num_classes}}
  input_size: 28
  width: 32
augment:
  _target_: coupled_net.augment.Letters
  flip_p: 0.5
  degrees: 20.0
  translate: 0.1
  scale:
  - 0.8
  - 1.2
  shear: 10.0
dataset:
  name: synthetic_letters
  root: ${{oc.env:COUPLED_NET_DATA,./data}}
  download: false
  channels: 1
  num_classes: 26
  label_offset: 1
  mean:
  - 0.1125
  std:
  - 0.2285
  val_fraction: 0.15
  pipeline: tensor
  train_per_class: 500
  test_per_class: 100
  generator_seed: 0
optimizer:
  _target_: torch.optim.SGD
  _partial_: true
  lr: 0.05
  momentum: 0.9
  weight_decay: 0.0001
scheduler:
  _target_: torch.optim.lr_scheduler.CosineAnnealingLR
  _partial_: true
  T_max: ${{coupled_net.minus:${{trainer.epochs}},${{scheduler.warmup_epochs}}}}
  eta_min: 0.0
  warmup_epochs: 0
coupling:
  alpha: {alpha}
  layer: null
  mode: copy
  schedule: epoch
trainer:
  epochs: {epochs}
  patience: 4
  select_by: val_loss
  label_smoothing: 0.0
  grad_clip_norm: null
  batch_size: 128
  eval_batch_size: ${{trainer.batch_size}}
  device: auto
  num_workers: auto
  threads: auto
  deterministic: true
  precision: fp32
  channels_last: false
  compile: false
  checkpoint_every: 2
  last_every: 1
  limit_batches: null
  overfit_batches: 0
  progress: auto
logger: {{}}
seed: {seed}
optimized_metric: val_top1
"""

IDENTITY = {
    "coupling.alpha": 0, "coupling.layer": None, "coupling.mode": "copy", "coupling.schedule": "epoch",
    "dataset.channels": 1, "dataset.generator_seed": 0, "dataset.label_offset": 1, "dataset.mean": [0.1125],
    "dataset.name": "synthetic_letters", "dataset.num_classes": 26, "dataset.pipeline": "tensor",
    "dataset.std": [0.2285], "dataset.test_per_class": 100, "dataset.train_per_class": 500,
    "dataset.val_fraction": 0.15, "model._target_": "coupled_net.models.build_model", "model.in_channels": 1,
    "model.input_size": 28, "model.name": "small_cnn", "model.num_classes": 26, "model.width": 32,
    "optimizer._partial_": True, "optimizer._target_": "torch.optim.SGD", "optimizer.lr": 0.05,
    "optimizer.momentum": 0.9, "optimizer.weight_decay": 0.0001, "scheduler.T_max": EPOCHS,
    "scheduler._partial_": True, "scheduler._target_": "torch.optim.lr_scheduler.CosineAnnealingLR",
    "scheduler.eta_min": 0.0, "seed": 42, "trainer.batch_size": 128, "trainer.checkpoint_every": 2,
    "trainer.deterministic": True, "trainer.epochs": EPOCHS, "trainer.eval_batch_size": 128,
    "trainer.limit_batches": None, "trainer.patience": 4, "trainer.precision": "fp32",
    "trainer.select_by": "val_loss",
}

RESULTS = {
    "status": "done", "stopped_early": False, "epochs_run": EPOCHS, "best_epoch": EPOCHS, "resumes": 0,
    "model": "small_cnn", "dataset": "synthetic_letters", "alpha": 0, "coupling_mode": "copy",
    "coupling_schedule": "epoch", "seed": 42, "coupled_layers": ["features.0"], "metrics": None,
    "ke_time_s_mean": None, "epoch_time_s_mean": None, "total_time_s": None, "best_val_acc": None,
    "best_ke_val_acc": None, "error": None, "fingerprint": "", "identity": IDENTITY, "labels": {},
    "owner": {"host": "vm", "pid": 12854, "slurm_job_id": None, "process_started": 1796308433.05,
              "since": "2026-12-03T14:34:03+0000"},
    "heartbeat_at": "2026-12-03T14:39:11+0000", "started_at": "2026-12-03T14:34:03+0000", "finished_at": None,
    "world_size": 1,
    "provenance": {"git_commit": "7044eb5af6b281a9061f1198214bd94f770ecc71", "git_dirty": False,
                   "python": "3.11.7", "torch": "2.14.1+cu130", "torchvision": "0.29.1+cu130",
                   "device": "cpu (AMD EPYC)", "host": "vm", "slurm_job_id": None, "gpu": None,
                   "sharing": {"shared_by": 1, "parallel": 1, "packed_in": None, "slot_gpu": None,
                               "slot_cpus": None, "cuda_visible_devices": None}},
}

EPOCH_HEADER = ("epoch,lr,train_loss,train_acc,val_loss,val_acc,ke_val_loss,ke_val_acc,epoch_time_s,ke_time_s,"
                "ke_eval_time_s,checkpoint_time_s\n")
LOG_LINE = ("[2026-12-03 14:34:38,408][coupled_net.trainer][INFO] - epoch {e}/{n}  lr 0.05  train loss 2.3078 "
            "acc 27.24%  val loss 1.6185 acc 47.74%  after KE: val loss 1.6185 acc 47.74%  (26.2s, KE 2.4e-05s, "
            "checkpoints 0.027s)\n")


def status_of(i: int) -> str:
    """The status of run i: about 2 % failed, 1 % interrupted, 1 % running with its owner gone,
    the rest done."""
    if i % 50 == 7:
        return "failed"
    if i % 100 == 13:
        return "interrupted"
    if i % 100 == 29:
        return "running"
    return "done"


def make_tree(root: Path, n: int, epochs: int = EPOCHS) -> list[Path]:
    """N run directories below `root` (root/<model>/run_<i>), as a sweep of models x alphas x seeds
    lays them out; the last is unreadable (its results.json cut short). Returns them in order."""
    root = Path(root)
    host = socket.gethostname()
    runs = []
    for i in range(n):
        model, alpha = MODELS[i % len(MODELS)], ALPHAS[(i // len(MODELS)) % len(ALPHAS)]
        seed = i // (len(MODELS) * len(ALPHAS)) + 1
        run_dir = root / model / f"run_{i:05d}"
        (run_dir / ".hydra").mkdir(parents=True)
        rng = random.Random(i)
        status = status_of(i)
        ran = epochs if status == "done" else rng.randint(1, epochs - 1)
        rows, best = _epochs(rng, alpha, ran)
        (run_dir / "epochs.csv").write_text(EPOCH_HEADER + "".join(rows))
        (run_dir / ".hydra" / "config.yaml").write_text(CONFIG.format(model=model, alpha=alpha, seed=seed,
                                                                      epochs=epochs))
        (run_dir / ".hydra" / "overrides.yaml").write_text(f"- model={model}\n- coupling.alpha={alpha}\n- seed={seed}\n")
        (run_dir / "train.log").write_text("".join(LOG_LINE.format(e=e, n=epochs) for e in range(1, ran + 1)))
        res = _results(rng, model, alpha, seed, status, ran, best, epochs, host)
        text = json.dumps(res, indent=2)
        if i == n - 1 and n > 1:
            text = text[: len(text) // 2]  # a write cut short: the one unreadable run
        (run_dir / "results.json").write_text(text)
        runs.append(run_dir)
    return runs


def _epochs(rng: random.Random, alpha: int, ran: int) -> tuple[list[str], int]:
    rows, best, best_loss = [], 1, float("inf")
    for e in range(1, ran + 1):
        val_acc = min(99.0, 40 + 45 * (1 - 0.7 ** e) + rng.gauss(0, 1.5))
        val_loss = 2.5 * 0.8 ** e + rng.uniform(0, 0.05)
        ke_val_acc = val_acc - alpha * rng.uniform(0.0, 0.3)
        epoch_s = (14.0 if e == 1 else 5.8) + rng.uniform(-0.3, 0.3)  # the first epoch carries the warm-up
        if val_loss < best_loss:
            best, best_loss = e, val_loss
        rows.append(",".join(map(str, [
            e, 0.05, 2.3 * 0.8 ** e, val_acc - 3, val_loss, val_acc, val_loss + 0.01 * alpha, ke_val_acc,
            round(epoch_s, 6), round(rng.uniform(1e-5, 5e-5), 9), round(0.6 + rng.uniform(0, 0.05), 6),
            round(0.027 + rng.uniform(0, 0.01), 6)])) + "\n")
    return rows, best


def _results(rng, model, alpha, seed, status, ran, best, epochs, host) -> dict:
    res = copy.deepcopy(RESULTS)
    identity = {**IDENTITY, "model.name": model, "coupling.alpha": alpha, "seed": seed, "trainer.epochs": epochs,
                "scheduler.T_max": epochs}
    res.update(model=model, alpha=alpha, seed=seed, status=status, epochs_run=ran, best_epoch=best,
               identity=identity, fingerprint=_fingerprint(model, alpha, seed))
    if status in ("done", "interrupted", "failed"):
        res["owner"] = {**res["owner"], "host": host}
        res["finished_at"] = "2026-12-03T15:34:03+0000"
    if status == "done":
        top1 = 80 - 0.4 * alpha + rng.gauss(0, 1.0)
        res["metrics"] = {split: {"top1": round(top1 + d, 4), "top5": round(min(100.0, top1 + 15 + d), 4),
                                  "loss": round(0.6 + rng.uniform(0, 0.1), 6)}
                          for split, d in (("val", 1.0), ("test", 0.0))}
        res["total_time_s"] = round(6 * ran + rng.uniform(5, 10), 3)
        res["epoch_time_s_mean"] = 6.6
    elif status == "failed":
        res["error"] = "RuntimeError: CUDA error: an illegal memory access was encountered"
    elif status == "interrupted":
        res["error"] = "SIGTERM (preempted); the same command resumes it"
    elif status == "running":
        res["owner"] = {**res["owner"], "host": host, "pid": DEAD_PID}
    return res


def _fingerprint(model: str, alpha: int, seed: int) -> str:
    return hashlib.sha256(f"{model}/{alpha}/{seed}".encode()).hexdigest()[:16]
