"""One run directory's owner (SPEC §5): what the directory holds (its verdict, read-only), the lock
that gives it one owner, and the owner's handle that keeps results.json and its heartbeat current.

    verdict = examine(run_dir, identity)     new | resume | done | conflict; reads only
    with RunDirectory(run_dir, identity, world) as rd:
        verdict = rd.claim(hydra_files)      examine -> lock .lock -> examine again -> own it
        rd.start(results); rd.write(...)     results.json, atomic, with a heartbeat

A run of another fingerprint, or a directory in use, is refused (RunRefused) with no byte changed;
a finished run of this fingerprint is left as it is."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch.distributed as dist

from .checkpoint import resume_point
from .distributed import World
from .errors import RunRefused, one_line
from .identity import Identity, differences
from .logs import claim_file_logs
from .machine import slurm_job_id
from .results import FINISHED, STATUSES, RunFiles, now_iso
from .storage import write_text

log = logging.getLogger(__name__)
HEARTBEAT_S = 300           # results.json's heartbeat_at is refreshed at least this often while a run lives
SAME_JOB_LOCK_WAIT_S = 120  # a requeued SLURM job waits this long for its previous incarnation's lock


# ---- what a directory holds --------------------------------------------------------------------

@dataclass
class Verdict:
    kind: str                        # new | resume | done | conflict
    results: dict | None = None      # results.json as found
    problem: str = ""                # conflict: why, naming the differing keys
    checkpoint: dict | None = None   # resume: the newest readable checkpoint of this fingerprint
    checkpoint_path: Path | None = None


def _holds_training(files: RunFiles, results: dict | None) -> bool:
    """Has anything been trained here? A run that failed before its first epoch has not."""
    if results and (results.get("status") in FINISHED or (results.get("epochs_run") or 0) > 0):
        return True
    return files.last.is_file() or any(files.checkpoints.glob("epoch_*.pt")) or bool(files.epochs.rows())


def examine(run_dir: Path, identity: Identity, checkpoint: bool = True) -> Verdict:
    """What `run_dir` holds, compared with `identity`; reads only. With `checkpoint`, the newest
    readable checkpoint's fingerprint is compared too (and the checkpoint kept for resuming)."""
    files = RunFiles(run_dir)
    results = files.read_results()
    trained = _holds_training(files, results)
    ours = results is not None and identity.matches(results)
    if trained and results is not None and not ours:
        return Verdict("conflict", results, _mismatch("results.json", results, identity))
    if ours and results.get("status") in FINISHED:
        return Verdict("done", results)
    if checkpoint:
        ckpt, path = resume_point(files.last, files.checkpoints)
        if ckpt is not None:
            if not identity.matches(ckpt):
                return Verdict("conflict", results, _mismatch(f"checkpoints/{path.name}", ckpt, identity))
            return Verdict("resume", results, checkpoint=ckpt, checkpoint_path=path)
    return Verdict("resume" if trained else "new", results)


def _mismatch(where: str, record: dict, identity: Identity) -> str:
    if not record.get("fingerprint"):
        return f"{where} has no fingerprint (written by an older coupled_net): its config cannot be checked"
    diff = differences(record.get("identity") or {}, identity.keys)
    return f"{where} is a run of another config: {'; '.join(diff) or 'fingerprint ' + record['fingerprint']}"


# ---- ownership -----------------------------------------------------------------------------------

def owner_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": slurm_job_id(),
            "process_started": psutil.Process().create_time(), "since": now_iso()}


def describe_owner(owner: dict | None) -> str:
    if not owner:
        return "another process (it has not recorded itself yet)"
    job = f", SLURM job {owner['slurm_job_id']}" if owner.get("slurm_job_id") else ""
    return f"pid {owner.get('pid')} on host {owner.get('host')}{job}, since {owner.get('since')}"


class RunLock:
    """An exclusive flock on `<run dir>/.lock`, held for the life of the process that trains there;
    the kernel releases it on any death (SIGKILL included). The holder writes who it is into the
    file once it owns the directory, so a refused process can name it."""

    def __init__(self, path: Path):
        self.path, self.fd = Path(path), None

    def holder(self) -> dict | None:
        try:
            text = self.path.read_text()
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None

    def acquire(self, wait_s: float = 0.0) -> None:
        """Take the lock or raise RunRefused naming its holder. A holder that is this very SLURM job
        (a requeue whose previous incarnation is still being torn down) is waited for up to `wait_s`."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.fd = fd
                return
            except BlockingIOError:
                pass
            except OSError as e:  # ENOLCK: a filesystem without locks (NFS mounted nolock)
                log.warning("cannot lock %s (%s): a second process starting in this directory would not be "
                            "stopped", self.path, e.strerror)
                self.fd = fd
                return
            holder = self.holder()
            mine = slurm_job_id()
            if mine and holder and holder.get("slurm_job_id") == mine and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            os.close(fd)
            raise RunRefused(f"{self.path.parent}: in use by {describe_owner(holder)}; "
                             "wait for it to end, or stop it, then start again")

    def record(self, owner: dict) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, (json.dumps(owner) + "\n").encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


class RunDirectory:
    """The owner's handle on one run directory: claim it, keep results.json (and its heartbeat)
    current, release it. Under DDP rank 0 claims and holds the lock; the other ranks follow its verdict."""

    def __init__(self, path: Path, identity: Identity, world: World = World()):
        self.files, self.identity, self.world = RunFiles(path), identity, world
        self.lock = RunLock(self.files.lock)
        self.results: dict | None = None
        self._io = threading.Lock()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=10)
        self.lock.release()

    # -- claiming

    def claim(self, hydra_files: dict[str, str] | None = None) -> Verdict:
        """Decide (rank 0) and agree (all ranks): a refusal raises RunRefused, `done` changes nothing,
        otherwise this process owns the directory and the verdict says where to resume from."""
        decision: list = [None, ""]
        if self.world.is_main:
            try:
                verdict = self._claim(hydra_files)
                decision = [verdict.kind, ""]
            except RunRefused as e:
                decision = ["refused", str(e)]
        if self.world.active:
            dist.broadcast_object_list(decision, src=0)
        kind, problem = decision
        if kind == "refused":
            raise RunRefused(problem)
        if not self.world.is_main:  # rank 0 owns the directory; the others read the same checkpoint
            verdict = examine(self.files.dir, self.identity, checkpoint=kind != "done")
        return verdict

    def _claim(self, hydra_files: dict[str, str] | None) -> Verdict:
        quick = examine(self.files.dir, self.identity)  # refuse or skip without locking (nor writing)
        if quick.kind in ("conflict", "done"):
            return self._refuse_or_skip(quick)
        quick.checkpoint = None
        self.files.dir.mkdir(parents=True, exist_ok=True)
        created = not self.lock.path.exists()
        self.lock.acquire(wait_s=SAME_JOB_LOCK_WAIT_S)
        verdict = examine(self.files.dir, self.identity)  # under the lock: authoritative
        if verdict.kind in ("conflict", "done"):  # another process got here first
            if created:
                self.lock.path.unlink(missing_ok=True)
            self.lock.release()
            return self._refuse_or_skip(verdict)
        # this process owns the directory from here on
        self.lock.record(owner_record())
        claim_file_logs(self.files.dir)
        log.info("%s: run %s owned by pid %d on %s", self.files.dir, self.identity.fingerprint, os.getpid(),
                 socket.gethostname())
        for name, text in (hydra_files or {}).items():
            write_text(self.files.hydra / name, text)
        for stale in self.files.checkpoints.glob(".*.tmp"):  # temp files of writes a kill interrupted
            stale.unlink(missing_ok=True)
        return verdict

    def _refuse_or_skip(self, verdict: Verdict) -> Verdict:
        if verdict.kind == "conflict":
            raise RunRefused(f"{self.files.dir}: {verdict.problem}; choose another directory, or start it with "
                             "the config it was made with")
        return verdict

    # -- results.json

    def write(self, **fields) -> dict:
        """Update results.json (rank 0; atomic); `heartbeat_at` is refreshed with every write."""
        with self._io:
            status = fields.get("status", self.results.get("status"))
            if status not in STATUSES:  # a typo in this package, not the user's input
                raise ValueError(f"results.json status {status!r}: not one of {STATUSES}")
            self.results.update(fields, heartbeat_at=now_iso())
            if self.world.is_main:
                self.files.write_results(self.results)
            return dict(self.results)

    def start(self, results: dict) -> None:
        self.results = results
        self.write()
        if self.world.is_main and self._beat is None:
            self._beat = threading.Thread(target=self._heartbeat, name="heartbeat", daemon=True)
            self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.write()
            except Exception as e:  # noqa: BLE001 - a full disk must not kill the run from this thread
                log.warning("could not refresh the heartbeat in %s: %s", self.files.results, one_line(e, 200))
