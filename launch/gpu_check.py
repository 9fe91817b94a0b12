"""Every check that needs a GPU, in one go, for a session that has a GPU machine for a few minutes
(one H200, ~15 minutes of device time, at most 10 minutes a command):

    python launch/gpu_check.py [OUT_DIR]        # default: $OUT; about 9 minutes at most (--budget)
    python launch/gpu_check.py --dry-run        # the steps and their commands, nothing run (any machine)

Steps, each with its own time limit (and never past the overall budget), each logging to
OUT_DIR/<step>/log.txt:

  1. gpu_tests  pytest -m requires_gpu: the GPU tests (tests/test_gpu.py and the others so marked)
  2. torchrun   two DDP ranks of a tiny quickstart run (torchrun --standalone --nproc_per_node=2);
                only with two GPUs or more: two ranks on one GPU fail NCCL's duplicate-GPU check
  3. sync       one training pass of the default run (tensor pipeline, AlexNet@224) with every host
                sync inside a step an error (torch.cuda.set_sync_debug_mode; launch/bench.py --sync-check)
  4. bench      launch/bench.py at the seed's size, deterministic on and off (not its sweep section)
  5. sweep      8 quickstart runs packed 4 to the GPU (hydra/launcher=local hydra.launcher.runs_per_gpu=4)

OUT_DIR/gpu_check_summary.json says, per step: passed / failed / timeout / skipped, the exit code,
seconds, the command, and what it found (test counts, the sync lines, the bench's epoch/floor ratios,
the runs' statuses). Exit code 0 when no step failed or timed out."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BUDGET_S = 540   # all steps together: leaves a 10-minute command a minute to start and copy back
MIN_STEP_S = 20  # a step with less time left than this is skipped, not started
TINY = ["experiment=quickstart", "dataset.train_per_class=40", "dataset.test_per_class=10", "trainer.batch_size=64",
        "trainer.epochs=1", "trainer.progress=false"]
PACKED_RUNS = 8


@dataclass
class Step:
    name: str
    what: str
    argv: list[str]
    limit_s: int
    gpus: int = 1                   # GPUs it needs
    check: object = None            # (step, out dir) -> (ok, details): what the step left, read after it
    result: dict = field(default_factory=dict)


def _junit(path: Path) -> dict:
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    return {**counts, "failed": failed}


def check_tests(step: Step, out: Path):
    details = _junit(out / "junit.xml") if (out / "junit.xml").exists() else {"junit": "not written"}
    return details.get("tests", 0) > 0 and not details.get("failed"), details


def _results(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None


def check_torchrun(step: Step, out: Path):
    res = _results(out / "run") or {}
    details = {"status": res.get("status"), "world_size": res.get("world_size"), "error": res.get("error")}
    return res.get("status") == "done" and res.get("world_size") == 2, details


def check_sync(step: Step, out: Path):
    try:
        found = json.loads((out / "sync_check.json").read_text())
    except (OSError, ValueError):
        return False, {"sync_check.json": "not written"}
    return found.get("passed") is True, found


def check_bench(step: Step, out: Path):
    try:
        found = json.loads((out / "bench.json").read_text())
    except (OSError, ValueError):
        return False, {"bench.json": "not written"}
    keys = ("flags", "images", "pass_over_floor", "epoch_over_floor", "checkpoint_share_of_epoch", "epoch_s",
            "baseline", "pass_over_baseline")
    return True, {"settings": found.get("settings"),
                  "sections": {name: {k: s.get(k) for k in keys} for name, s in found.get("sections", {}).items()}}


def check_sweep(step: Step, out: Path):
    sweep = out / "sweep"
    dirs = sorted(p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")) if sweep.is_dir() else []
    runs = {p.name: _results(p) or {} for p in dirs}
    details = {"runs": {name: {"status": r.get("status"), "shared_by": (r.get("provenance") or {}).get(
        "sharing", {}).get("shared_by"), "total_time_s": r.get("total_time_s")} for name, r in runs.items()}}
    return len(runs) == PACKED_RUNS and all(r.get("status") == "done" for r in runs.values()), details


def plan(out: Path) -> list[Step]:
    py = sys.executable
    return [
        Step("gpu_tests", "the GPU tests: pytest -m requires_gpu",
             [py, "-m", "pytest", "-m", "requires_gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests",
              f"--junitxml={out / 'gpu_tests' / 'junit.xml'}"], 150, check=check_tests),
        Step("torchrun", "two DDP ranks (NCCL) of a tiny quickstart run",
             [py, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "launch/train.py", *TINY,
              "trainer.device=cuda", f"hydra.run.dir={out / 'torchrun' / 'run'}"], 90, gpus=2, check=check_torchrun),
        Step("sync", "one training pass of the default tensor pipeline under torch.cuda.set_sync_debug_mode('error')",
             [py, "launch/bench.py", "--sync-check", "--json", str(out / "sync" / "sync_check.json")], 60,
             check=check_sync),
        Step("bench", "launch/bench.py at the seed's size, deterministic on and off (all but its sweep section)",
             [py, "launch/bench.py", "--size", "seed", "--only", "pipeline,quickstart,steps,seed,bookkeeping",
              "--json", str(out / "bench" / "bench.json")], 210, check=check_bench),
        Step("sweep", f"{PACKED_RUNS} quickstart runs packed 4 to one GPU (hydra/launcher=local)",
             [py, "launch/train.py", "-m", "hydra/launcher=local", "hydra.launcher.runs_per_gpu=4",
              "experiment=quickstart", "trainer.epochs=1", "trainer.progress=false", "trainer.device=cuda",
              f"seed={','.join(str(i) for i in range(PACKED_RUNS))}", f"hydra.sweep.dir={out / 'sweep' / 'sweep'}"],
             120, check=check_sweep),
    ]


def visible_gpus() -> int:
    """GPUs torch sees here (CUDA_VISIBLE_DEVICES honoured), asked in a child: this process never
    touches CUDA, so every step finds the GPU free."""
    try:
        proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"],
                              capture_output=True, text=True, timeout=120)
        return int(proc.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return 0


def gpu_names() -> list[str]:
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
        return [line.strip() for line in proc.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.SubprocessError):
        return []


def run_step(step: Step, out: Path, limit: float) -> dict:
    """The step's command in its own process group, output to out/log.txt, killed (the whole group)
    at `limit` seconds; then what it left is checked."""
    out.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(out / "log.txt", "w") as log:
        log.write(f"$ {shlex.join(step.argv)}\n")
        log.flush()
        proc = subprocess.Popen(step.argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            rc, timed_out = proc.wait(timeout=limit), False
        except subprocess.TimeoutExpired:
            timed_out = True
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            rc = proc.returncode
    seconds = round(time.monotonic() - start, 1)
    try:
        ok, details = step.check(step, out) if step.check else (rc == 0, {})
    except Exception as e:  # noqa: BLE001 - a check that cannot read what the step left says so
        ok, details = False, {"check": f"{type(e).__name__}: {e}"}
    status = "timeout" if timed_out else "passed" if rc == 0 and ok else "failed"
    tail = (out / "log.txt").read_text(errors="replace")[-3000:] if status != "passed" else None
    return {"status": status, "rc": rc, "seconds": seconds, "limit_s": round(limit), "details": details,
            "log": str(out / "log.txt"), **({"log_tail": tail} if tail else {})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, default=os.environ.get("OUT") or None,
                        help="where every step writes (default: $OUT)")
    parser.add_argument("--dry-run", action="store_true", help="print the steps and their commands; run nothing")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for all steps (default {BUDGET_S})")
    parser.add_argument("--skip", default="", help="comma-separated steps not to run")
    args = parser.parse_args(argv)
    out = Path(args.out or "gpu_check_out").resolve()
    steps = plan(out)
    skip = {s for s in args.skip.split(",") if s}
    unknown = skip - {s.name for s in steps}
    if unknown:
        parser.error(f"--skip: unknown step(s) {sorted(unknown)}; of {', '.join(s.name for s in steps)}")
    if args.dry_run:
        print(f"gpu_check (dry run): {len(steps)} steps, {args.budget:.0f} s in all, output under {out}")
        for i, step in enumerate(steps, 1):
            when = "skipped (--skip)" if step.name in skip else \
                f"only with >= {step.gpus} GPUs" if step.gpus > 1 else "needs a CUDA GPU"
            print(f"{i}. {step.name} (limit {step.limit_s} s; {when}): {step.what}\n   $ {shlex.join(step.argv)}")
        return 0
    gpus = visible_gpus()
    if gpus == 0:
        print("gpu_check: no CUDA GPU visible: nothing to check (--dry-run lists the steps)", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    summary = {"started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "out": str(out), "visible_gpus": gpus,
               "gpus": gpu_names(), "python": sys.version.split()[0], "budget_s": args.budget, "steps": {}}
    deadline = time.monotonic() + args.budget
    for i, step in enumerate(steps, 1):
        left = deadline - time.monotonic()
        if step.name in skip:
            result = {"status": "skipped", "why": "--skip"}
        elif gpus < step.gpus:
            result = {"status": "skipped", "why": f"{gpus} GPU(s) visible, {step.gpus} needed: two ranks on one GPU "
                                                  "fail NCCL's duplicate-GPU check"}
        elif left < MIN_STEP_S:
            result = {"status": "skipped", "why": f"the budget is spent ({left:.0f} s left)"}
        else:
            print(f"[{i}/{len(steps)}] {step.name}: {step.what} (limit {min(step.limit_s, left):.0f} s)", flush=True)
            result = run_step(step, out / step.name, min(step.limit_s, left))
        summary["steps"][step.name] = {"what": step.what, "command": shlex.join(step.argv), **result}
        print(f"    {step.name}: {result['status']}"
              + (f" in {result['seconds']} s" if "seconds" in result else f" ({result.get('why')})"), flush=True)
        (out / "gpu_check_summary.json").write_text(json.dumps(summary, indent=2) + "\n")  # kept if killed later
    bad = [name for name, r in summary["steps"].items() if r["status"] in ("failed", "timeout")]
    summary["passed"] = not bad
    (out / "gpu_check_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"gpu_check: {'all steps run passed' if not bad else 'FAILED: ' + ', '.join(bad)}; "
          f"summary in {out / 'gpu_check_summary.json'}")
    return 0 if not bad else 1


if __name__ == "__main__":
    raise SystemExit(main())
