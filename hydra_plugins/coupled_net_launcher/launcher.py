"""hydra-submitit-launcher's launchers, plus what a long sweep on a cluster needs:

- `detach: true` submits the job array and returns at once, writing `manifest.json` (job id ↔
  overrides ↔ run dir ↔ submission time) into the sweep directory for `launch/collect.py`.
- What sbatch would refuse is refused before anything is written or submitted, in one line with the
  way out: no SLURM client here, GPUs asked of a cluster (or partition) without any, an unknown
  partition, two memory keys. `mem_gb` (hydra-submitit-launcher's key) replaces our default
  `mem_per_cpu`; jobs are named `coupled_net:<experiment, else the sweep directory's name>`.
- A sweep larger than the cluster's `MaxArraySize` is submitted as several arrays (chunks) that
  together run at most `array_parallelism` tasks at once; the manifest lists every chunk's jobs.

Finished runs are left out, and conflicting ones refused, before this launcher sees the jobs
(the coupled_net sweeper, coupled_net.sweep); each job checks its directory again when it starts.
Under a search (hparams_search=optuna_lr: hydra-optuna-sweeper calls `launch` once per batch of
trials) each JobReturn carries the job's float (coupled_net.cli.train_task: optimized_metric), and
`detach` is refused: a search needs every value before it samples on.

Hydra imports every module of hydra_plugins/ when any Hydra app starts (plugin discovery): this one
imports coupled_net's light leaves at the top, and the sweep planner and the pool (torch, the
models) only where a sweep is launched.

hydra/launcher=local is not submitit's local executor but a pool of run processes over this
machine's GPU and CPU slots (coupled_net.slots, coupled_net.pool); the same pool runs the runs packed
into one SLURM array task (hydra.launcher.runs_per_task, Packed)."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job, setup_globals
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf, open_dict

import coupled_net.identity  # noqa: F401 - registers the minus and direction resolvers in SLURM job processes too (the
# run-name resolver, coupled_net.identify, arrives with the pickled task function: coupled_net.cli)
from coupled_net.errors import ConfigError, fail
from coupled_net.storage import read_json, write_json
from coupled_net.sweepfiles import (FAIL_FAST_FILE, LAUNCH_FILE, fail_fast_line, fail_fast_reason, read_fail_fast,
                                    write_fail_fast)

if TYPE_CHECKING:
    from coupled_net.pool import Outcome, PoolJob
    from coupled_net.slots import Slot

log = logging.getLogger(__name__)
OWN_KEYS = ("detach", "runs_per_task", "gpus", "runs_per_gpu", "max_parallel", "cpus_per_run")
# sbatch takes one of --mem (per node), --mem-per-cpu, --mem-per-gpu
MEM_KEYS = ("mem_gb", "mem_per_cpu", "mem_per_gpu")


class _SacctOnce(logging.Filter):
    """Clusters without accounting make submitit warn at every poll; say it once."""
    said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Bypassing sacct error" not in record.getMessage():
            return True
        if _SacctOnce.said:
            return False
        _SacctOnce.said = True
        record.msg, record.args = "sacct is unavailable (no SLURM accounting): job states come from result files", ()
        return True


class SweepAwareLauncher(BaseSubmititLauncher):
    numbers_jobs_as_planned = True  # each job gets its number in the whole launch (the coupled_net sweeper reads it)

    def __init__(self, **params: Any) -> None:
        own = {k: params.pop(k) for k in OWN_KEYS if k in params}
        super().__init__(**params)
        self.own = {k: (OmegaConf.to_container(v) if OmegaConf.is_config(v) else v) for k, v in own.items()}
        self.detach = bool(own.get("detach", False))
        self.slots: list[Slot] = []
        self.gpus: dict = {}

    def __getstate__(self) -> dict:
        """What a job's process gets (pickled): the slots are the launching process's business, and
        unpickling them would import torch (coupled_net.slots) into every job, a second each."""
        return {**self.__dict__, "slots": [], "gpus": {}}

    def setup(self, *, hydra_context, task_function, config) -> None:
        """Hydra calls this before the sweep writes anything (multirun.yaml, the sweep directory):
        the place to refuse what sbatch would, so that a refusal leaves no trace."""
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        from coupled_net.sweep import searching  # the planner: only where a sweep is launched (see above)

        if self.detach and searching(config.hydra.sweeper):
            # a search samples each trial from the values of those before: it cannot leave them running
            fail(str(ConfigError("hydra.launcher.detach", True, "a search (hparams_search=...) needs every trial's "
                                 "value before it samples the next one: leave detach out (the sweep waits)")))
        if self._EXECUTOR == "local":
            if self.detach:
                fail(str(ConfigError("hydra.launcher.detach", True, "hydra/launcher=local runs the sweep's runs as "
                                     "children of this process, which waits for them: detach is for "
                                     "hydra/launcher=slurm")))
            try:
                self.slots, self.gpus = local_slots(self.own, self.params)
            except ConfigError as e:
                fail(str(e))
            return
        try:
            check_packing(self.own.get("runs_per_task", 1), self.params)
            check_slurm_client()
            settle_memory(self.params, given_keys(config))
            check_partition_and_gpus(self.params, sinfo_partitions())
        except ConfigError as e:
            fail(str(e))
        if self.params.get("name") is None:
            choice = config.hydra.runtime.choices.get("experiment")
            self.params["name"] = f"coupled_net:{choice or Path(str(config.hydra.sweep.dir)).name}"

    def parallelism(self) -> int:
        """How many runs can run at once: local, one per slot; SLURM, array_parallelism tasks of runs_per_task."""
        if self._EXECUTOR == "local":
            return max(1, len(self.slots))
        return int(self.params.get("array_parallelism") or 1) * int(self.own.get("runs_per_task") or 1)

    def run_dir(self, overrides: Sequence[str], job_num: int) -> Path:
        """The directory Hydra will give job `job_num` of this sweep."""
        from coupled_net.sweep import job_config  # the planner: only where a sweep is launched (see above)

        return job_config(self.hydra_context.config_loader, self.config, overrides, job_num)[0]

    def __call__(self, sweep_overrides: List[str], job_dir_key: str, job_num: int, job_id: str,
                 singleton_state: dict) -> JobReturn:
        """One job, as BaseSubmititLauncher runs it, also outside a submitit job (a run of the local
        scheduler, or one packed into a SLURM task: coupled_net.pool): hydra.job.id is the submitit
        job's, else the process id."""
        import submitit

        Singleton.set_state(singleton_state)
        setup_globals()
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(sweep_overrides))
        try:
            job_id = str(submitit.JobEnvironment().job_id)
        except RuntimeError:  # not a submitit job: a run of the local scheduler
            job_id = str(os.getpid())
        with open_dict(sweep_config.hydra.job) as job:
            job.id = job_id
            job.num = job_num
        return run_job(hydra_context=self.hydra_context, task_function=self.task_function, config=sweep_config,
                       job_dir_key=job_dir_key, job_subdir_key="hydra.sweep.subdir")

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        logging.getLogger("submitit").addFilter(_SacctOnce())

        from coupled_net.sweep import planned_num  # the planner: only where a sweep is launched (see above)

        nums = [planned_num(o, num) for num, o in enumerate(job_overrides, start=initial_job_idx)]
        todo = [(num, list(o), self.run_dir(o, num)) for num, o in zip(nums, job_overrides)]
        for num, overrides, _ in todo:
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        if not todo:
            return []
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:  # as upstream's launch does (hydra.sweep.mode, octal)
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        if self._EXECUTOR == "local":
            return self._run_here(todo, sweep_dir)
        submitted = self._submit(todo, sweep_dir)
        tasks = list(dict.fromkeys(submitted))  # packed: one job (array task) per runs_per_task runs
        if not self.detach:
            runs = {}
            for (_, overrides, run_dir), job in zip(todo, submitted):
                runs.setdefault(job, []).append((overrides, run_dir))
            try:
                returns = [_task_result(job, runs[job], sweep_dir) for job in tasks]
            except KeyboardInterrupt:
                self._interrupted(tasks, sweep_dir)
                raise
            return [ret for returned in returns for ret in (returned if isinstance(returned, list) else [returned])]
        log.info("detached: %d job(s) submitted (%s); follow them with `python launch/collect.py %s`",
                 len(tasks), ", ".join(j.job_id for j in tasks), sweep_dir)
        return [_finished(overrides, f"submitted as SLURM job {job.job_id}") for (_, overrides, _), job in
                zip(todo, submitted)]

    def _run_here(self, todo, sweep_dir: Path) -> list[JobReturn]:
        """hydra/launcher=local: the runs over this machine's slots (coupled_net.pool)."""
        from coupled_net.pool import Pool, PoolJob  # torch (machine): only where a sweep is launched (see above)

        state = Singleton.get_state()
        jobs = [PoolJob(num, " ".join(filter_overrides(overrides)),
                        functools.partial(self, overrides, "hydra.sweep.dir", num, str(num), state))
                for num, overrides, _ in todo]
        folder = Path(str(self.params["submitit_folder"]).replace("%j", "local"))
        timeout = self.params.get("timeout_min")
        from coupled_net.failfast import fail_fast_limit  # torch (machine): only where a sweep is launched (see above)

        progress = LocalProgress(sweep_dir, {num: run_dir for num, _, run_dir in todo}, self.parallelism(),
                                 fail_fast_limit(self.config.hydra.sweeper))
        pool = Pool(self.slots, folder, gpus=self.gpus, timeout_s=timeout * 60 if timeout else None,
                    should_stop=progress.ended, on_stop=progress.stopped)
        gpus = sorted({s.gpu for s in self.slots if s.gpu is not None})
        log.info("%d run(s) over %d slot(s): %s", len(jobs), len(self.slots),
                 f"GPU(s) {', '.join(map(str, gpus))}" if gpus else "CPUs only")
        outcomes = {o.num: o for o in pool.run(jobs)}
        return [_returned(overrides, outcomes.get(num)) for num, overrides, _ in todo]

    def _submit(self, todo, sweep_dir: Path) -> list:
        """One job array per chunk (one chunk unless the sweep has more tasks than the cluster's
        MaxArraySize), each chunk's jobs added to manifest.json as soon as it is submitted. With
        runs_per_task=k, each array task packs k runs (Packed). Returns each run's job (a task's
        job once per run it holds)."""
        limit = max_array_size() if self._EXECUTOR == "slurm" else None
        k = self.own.get("runs_per_task") or 1
        tasks = [todo[i:i + k] for i in range(0, len(todo), k)]
        plan = chunk_plan(len(tasks), limit, self.params.get("array_parallelism"))
        if len(plan) > 1:
            log.info("%d array tasks, more than this cluster's MaxArraySize=%d allows in one array: submitting %d "
                     "arrays", len(tasks), limit, len(plan))
        submitted, arrays = [], []
        for n, (start, stop, throttle, after) in enumerate(plan):
            chunk_tasks = tasks[start:stop]
            chunk = [job for task in chunk_tasks for job in task]
            extra = {} if len(plan) == 1 else {"array_parallelism": throttle}
            if after is not None:  # at most array_parallelism tasks at once over all chunks: wait for a lane
                extra["dependency"] = f"afterany:{arrays[after]}"
            if k == 1:
                fn, params = self, [(o, "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state())
                                    for num, o, _ in chunk]
            else:
                fn, params = Packed(self), [([(o, num) for num, o, _ in task],) for task in chunk_tasks]
            jobs = self._map_array(fn, params, extra, chunk, n, len(plan), arrays)
            per_run = [job for job, task in zip(jobs, chunk_tasks) for _ in task]
            arrays.append(jobs[0].job_id.split("_")[0])
            self._write_manifest(sweep_dir, chunk, per_run, k)
            submitted += per_run
        return submitted

    def _map_array(self, fn, params, extra: dict, chunk, k: int, n_chunks: int, arrays: list[str]) -> list:
        """executor.map_array, with sbatch's refusal as one line (submitit prints sbatch's stderr, then
        raises with it): what was refused, why, and what is already submitted."""
        from submitit.core.utils import FailedJobError, JobPaths

        executor = self._executor(**extra)
        folder = JobPaths.get_first_id_independent_folder(executor.folder)
        existed = folder.is_dir()
        before = set(folder.iterdir()) if existed else set()
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                return executor.map_array(fn, *zip(*params))
        except FailedJobError as e:
            for path in set(folder.iterdir()) - before if folder.is_dir() else ():  # its pickles, its script
                path.unlink(missing_ok=True)
            if not existed:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            if not arrays:  # nothing of this launch was submitted: no launch to describe (the sweeper wrote it)
                (Path(str(self.config.hydra.sweep.dir)) / LAUNCH_FILE).unlink(missing_ok=True)
            what = f"job #{chunk[0][0]}" if len(chunk) == 1 else f"jobs #{chunk[0][0]}-#{chunk[-1][0]}"
            if n_chunks > 1:
                what += f" (array {k + 1} of {n_chunks})"
            done = (f"; arrays {', '.join(arrays)} were submitted before it (in manifest.json): `scancel "
                    f"{' '.join(arrays)}` stops them" if arrays else "; nothing was submitted")
            fail(f"sbatch refused {what}: {sbatch_error(str(e) or stderr.getvalue())}: "
                 f"{sbatch_way_out(str(e))}{done}", code=1)

    def _interrupted(self, submitted, sweep_dir: Path) -> None:
        """Ctrl-C while waiting: SLURM jobs are the cluster's and keep running (say so). (Local runs
        are the pool's children: it stops them, coupled_net.pool.)"""
        ids = " ".join(sorted({j.job_id.split("_")[0] for j in submitted}, key=lambda i: (len(i), i)))
        log.warning("the sweep's SLURM jobs keep running: `scancel %s` stops them; `python launch/collect.py %s` "
                    "follows them", ids, sweep_dir)

    def _executor(self, **extra: Any):
        """Built as BaseSubmititLauncher.launch builds it; `extra`: launcher keys for this submission only."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        specific_init = {"max_num_timeout"}
        init = {"folder": self.params["submitit_folder"],
                **{f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in specific_init}}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v
                                      for k, v in {**self.params, **extra}.items()
                                      if k not in specific_init | {"submitit_folder"}})
        return executor

    def _write_manifest(self, sweep_dir: Path, todo, submitted, runs_per_task: int = 1) -> None:
        path = sweep_dir / "manifest.json"
        manifest = read_json(path) or {"sweep_dir": str(sweep_dir), "jobs": []}
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for (num, overrides, run_dir), job in zip(todo, submitted):
            manifest["jobs"].append({"job_id": str(job.job_id), "job_num": num, "overrides": overrides,
                                     "run_dir": str(run_dir), "submitted_at": now, "executor": self._EXECUTOR,
                                     "runs_per_task": runs_per_task})
        write_json(path, manifest)


def _returned(overrides, outcome: Optional[Outcome]) -> JobReturn:
    """The JobReturn of a run of the pool: the one its process returned, else (it ended without one:
    killed, crashed, stopped before it started) a completed job whose value is NaN (an optimizing
    sweeper fails that trial; the sweep's verdict reads the run directory)."""
    if outcome is not None and isinstance(outcome.value, JobReturn):
        return outcome.value
    if outcome is not None:
        why = outcome.error or f"exit code {outcome.returncode}"
        log.error("#%d: its process ended without a result (%s); its output: %s", outcome.num, why, outcome.log_path)
    return _finished(overrides, float("nan"))


def local_slots(own: dict, params: dict) -> tuple[list[Slot], dict]:
    """hydra/launcher=local's slots from its keys (coupled_net.slots.plan_slots), and the GPUs by
    physical index. `gpus` null: those this process sees (CUDA_VISIBLE_DEVICES honoured);
    `gpus_per_node: 0` (submitit's key, kept for old command lines): no GPU."""
    from coupled_net.slots import gpu_inventory, plan_slots, visible_gpus  # torch: only where a sweep is launched

    inventory = gpu_inventory()
    present = visible_gpus(inventory, os.environ.get("CUDA_VISIBLE_DEVICES"))
    gpus = own.get("gpus")
    per_node = params.get("gpus_per_node")
    if per_node not in (None, 0, 1):
        raise ConfigError("hydra.launcher.gpus_per_node", per_node, "hydra/launcher=local gives each run one GPU "
                          "(or none: 0); for several GPUs per run use `torchrun --nproc_per_node=N launch/train.py`")
    if gpus is None:
        gpus = [] if per_node == 0 else present
    if not isinstance(gpus, (list, tuple)):
        gpus = [gpus]
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    slots = plan_slots(gpus=list(gpus), present=present, runs_per_gpu=own.get("runs_per_gpu", 1),
                       max_parallel=own.get("max_parallel"), cpus_per_run=own.get("cpus_per_run"), cores=cores,
                       free_bytes={g.index: g.free_bytes for g in inventory})
    return slots, {g.index: g for g in inventory}


def check_packing(runs_per_task, params: dict) -> None:
    """hydra.launcher.runs_per_task: k runs share one array task's allocation (one process each)."""
    if isinstance(runs_per_task, bool) or not isinstance(runs_per_task, int) or runs_per_task < 1:
        raise ConfigError("hydra.launcher.runs_per_task", runs_per_task, "runs packed into one SLURM array task: an "
                          "integer of at least 1")
    tasks = params.get("tasks_per_node") or 1
    if runs_per_task > 1 and tasks > 1:
        raise ConfigError("hydra.launcher.runs_per_task", runs_per_task, f"packs runs of one process each, but "
                          f"hydra.launcher.tasks_per_node={tasks} makes every run a DistributedDataParallel job of "
                          f"{tasks} processes: set one of them to 1")


def task_slots(k: int) -> tuple[list[Slot], dict]:
    """The slots of a SLURM task packing `k` runs: its GPUs (those SLURM gave it: CUDA_VISIBLE_DEVICES;
    none if unset) round-robin, its cores split."""
    from coupled_net.slots import gpu_inventory, plan_slots, visible_gpus  # torch: only in the task's process

    inventory = gpu_inventory()
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible_gpus(inventory, given) if given else []
    cores = sorted(os.sched_getaffinity(0))
    allocated = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if allocated.isdigit() and 0 < int(allocated) < len(cores):  # a cluster that allocates without binding
        cores = cores[:int(allocated)]
    slots = plan_slots(gpus=gpus, present=gpus, runs_per_gpu=math.ceil(k / len(gpus)) if gpus else 1,
                       max_parallel=k, cpus_per_run=None, cores=cores, packed_in="slurm task",
                       free_bytes={g.index: g.free_bytes for g in inventory})
    return slots, {g.index: g for g in inventory}


@dataclass
class Packed:
    """The callable of an array task that packs several runs (hydra.launcher.runs_per_task): each run
    in its own process over the task's slots (coupled_net.pool). SLURM's requeue signal (pre-timeout,
    preemption) reaches the runs, which save last.pt at their step's end and end `interrupted`; once
    all have ended, submitit requeues the task (`checkpoint`), which resumes them and skips the
    finished ones. A run that fails leaves its task-mates running."""

    launcher: "SweepAwareLauncher"
    jobs: list = field(default_factory=list)  # (overrides, job_num)

    def __call__(self, jobs: list) -> list[JobReturn]:
        import submitit

        from coupled_net.pool import Pool, PoolJob  # torch: only in the task's process (see above)

        self.jobs = jobs
        slots, gpus = task_slots(len(jobs))
        env = submitit.JobEnvironment()
        folder = Path(str(self.launcher.params["submitit_folder"]).replace("%j", str(env.job_id))) / "packed"
        pool = Pool(slots, folder, gpus=gpus)
        state = Singleton.get_state()
        pool_jobs = [PoolJob(num, " ".join(filter_overrides(o)),
                             functools.partial(self.launcher, o, "hydra.sweep.dir", num, str(env.job_id), state))
                     for o, num in jobs]
        requeue = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGUSR2)}

        def hold(signum, frame):  # the runs first: they save, end; then submitit's handler requeues
            if pool.stop_requested is None:
                log.warning("caught %s: the task's %d run(s) save a checkpoint and end; then it is requeued",
                            signal.Signals(signum).name, len(pool.running))
                pool.stop(signum)

        for sig in requeue:
            signal.signal(sig, hold)
        try:
            outcomes = {o.num: o for o in pool.run(pool_jobs)}
        finally:
            for sig, handler in requeue.items():
                signal.signal(sig, handler)
        if pool.stop_requested is not None and callable(requeue.get(pool.stop_requested)):
            requeue[pool.stop_requested](pool.stop_requested, None)  # submitit: checkpoint, requeue, exit
        return [_returned(o, outcomes.get(num)) for o, num in jobs]

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


class LocalProgress:
    """hydra/launcher=local's bookkeeping as each run ends (Pool.should_stop): the `run k/N ended` line
    with an ETA, and fail-fast (hydra.sweeper.fail_fast): at `limit` failed runs, start no more."""

    def __init__(self, sweep_dir: Path, run_dirs: dict[int, Path], parallel: int, limit: Optional[int]) -> None:
        self.sweep_dir, self.run_dirs, self.parallel, self.limit = sweep_dir, run_dirs, parallel, limit
        self.durations: list[float] = []
        self.failures: list[dict] = []

    def ended(self, outcome: Outcome) -> Optional[str]:
        from coupled_net.results import RunFiles  # pandas (epochlog): only where a sweep is launched (see above)
        from coupled_net.sweep import eta_s, hms  # the planner: likewise

        run_dir = self.run_dirs.get(outcome.num)
        results = (RunFiles(run_dir).read_results() if run_dir is not None else None) or {}
        status = results.get("status") or f"exit {outcome.returncode}"
        took = outcome.ended - outcome.started
        self.durations.append(took)
        k, total = len(self.durations), len(self.run_dirs)
        remaining = total - k
        eta = eta_s(self.durations, remaining, self.parallel)
        log.info("run %d/%d ended (#%d, %s) after %.0f s; ETA ~ %s (%d left, %d at once)", k, total, outcome.num,
                 status, took, hms(eta), remaining, self.parallel)
        if status == "failed":
            self.failures.append({"run_dir": str(run_dir), "error": str(results.get("error"))})
        if self.limit is not None and len(self.failures) >= self.limit:
            return fail_fast_reason(self.limit, self.failures)
        return None

    def stopped(self, reason: str, jobs: Sequence[PoolJob]) -> None:
        """fail-fast tripped: the pool starts none of `jobs`; say so once, and write fail_fast.json."""
        log.error("%s", fail_fast_line(self.limit, self.failures))
        try:
            write_fail_fast(self.sweep_dir, self.limit, self.failures, [self.run_dirs[j.num] for j in jobs])
        except OSError as e:
            log.warning("could not write %s: %s", self.sweep_dir / FAIL_FAST_FILE, e)


def _task_result(job, runs: list, sweep_dir: Path) -> Any:
    """What a SLURM task returned (`runs`: its (overrides, run dir)s); a task cancelled before it ran
    (fail-fast, `scancel`) returned nothing: a NaN per run, and the sweep's verdict reads the run
    directories. A cluster without accounting never says a cancelled task has ended (submitit asks
    sacct): a task whose runs fail-fast lists as not started counts as ended (its value is NaN anyway)."""
    from submitit.core.utils import UncompletedJobError

    nan = [_finished(overrides, float("nan")) for overrides, _ in runs]
    while not job.done():
        skipped = set((read_fail_fast(sweep_dir) or {}).get("not_started") or ())
        if all(str(run_dir) in skipped for _, run_dir in runs):
            return nan
        time.sleep(1)
    try:
        return job.results()[0]
    except UncompletedJobError:
        log.warning("SLURM task %s ended without a result (cancelled?): %d run(s) not run", job.job_id, len(runs))
        return nan


def _finished(overrides, value) -> JobReturn:
    ret = JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED)
    ret.return_value = value
    return ret


def check_slurm_client() -> None:
    """submitit needs sbatch to submit and srun in the job script (it checks for srun itself, with a traceback)."""
    missing = [tool for tool in ("sbatch", "srun") if shutil.which(tool) is None]
    if missing:
        raise ConfigError("hydra/launcher", "slurm", f"{' and '.join(missing)} not on PATH (no SLURM client on this "
                          "machine): launch from the cluster's login node, or leave out hydra/launcher=slurm to run "
                          "the sweep here")


def given_keys(config) -> set[str]:
    """The hydra.* keys set on the command line (`+`/`++`/`~` stripped). Read as typed, unresolved
    (as Hydra reads them): a value may interpolate what only a job has (`hydra.sweep.subdir=run_${hydra.job.num}`)."""
    return {str(o).split("=", 1)[0].lstrip("+~")
            for o in OmegaConf.to_container(config.hydra.overrides.hydra, resolve=False)}


def settle_memory(params: dict, given: set[str]) -> None:
    """sbatch takes one memory option: one set on the command line (a launcher key, or an sbatch option
    in additional_parameters) replaces those config files set (our default mem_per_cpu); two set the
    same way are refused. Edits `params`."""
    extra = params.get("additional_parameters") or {}
    found = {f"hydra.launcher.{k}": params[k] for k in MEM_KEYS if params.get(k) is not None}
    found.update({f"hydra.launcher.additional_parameters.{k}": v for k, v in extra.items()
                  if k.replace("-", "_") in ("mem", "mem_per_cpu", "mem_per_gpu") and v is not None})
    if len(found) < 2:
        return
    chosen = [k for k in found if k in given] or list(found)
    if len(chosen) > 1:
        a, b = chosen[:2]
        raise ConfigError(a, found[a], f"conflicts with {b}={found[b]!r}: sbatch takes one memory key (mem_gb per "
                          "node, mem_per_cpu or mem_per_gpu): set only one")
    for key in found:
        if key != chosen[0]:
            log.debug("%s=%s replaces %s=%s", chosen[0], found[chosen[0]], key, found[key])
            name = key.rsplit(".", 1)[1]
            if name in extra:
                del extra[name]
            else:
                params[name] = None


def sinfo_partitions() -> Optional[dict[str, dict]]:
    """partition -> {default, gpu (a node with gres/gpu), cpus (its largest node's)}, from sinfo; None
    when sinfo cannot tell."""
    try:
        # -a: hidden partitions too (a user may be allowed one that sinfo would not list)
        out = subprocess.run(["sinfo", "-a", "-h", "-N", "-o", "%P|%c|%G"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    parts: dict[str, dict] = {}
    for line in out.stdout.splitlines():
        name, cpus, gres = (line.strip().split("|") + ["", ""])[:3]
        part = parts.setdefault(name.rstrip("*"), {"default": False, "gpu": False, "cpus": 0})
        part["default"] |= name.endswith("*")
        part["gpu"] |= "gpu" in gres
        part["cpus"] = max(part["cpus"], int(cpus) if cpus.isdigit() else 0)
    return parts


def check_partition_and_gpus(params: dict, parts: Optional[dict[str, dict]]) -> None:
    """What sbatch would refuse (an unknown partition; GPUs asked of partitions without any: "Invalid
    generic resource (gres) specification") or leave pending forever (more CPUs than a node has):
    say which key to change, and to what."""
    if parts is None:
        return
    partition = params.get("partition")
    targets = ([p for p in str(partition).split(",") if p] if partition
               else [p for p, v in parts.items() if v["default"]])
    unknown = [p for p in targets if p not in parts]
    if partition and unknown:
        raise ConfigError("hydra.launcher.partition", partition, f"not a partition of this cluster: allowed: "
                          f"{', '.join(sorted(parts))}")
    if not targets:
        return
    where = f"partition {','.join(targets)}" + ("" if partition else " (the default)")
    asked = [(k, params[k]) for k in ("gpus_per_node", "gpus_per_task") if params.get(k)]
    asked += [("gres", params["gres"])] if "gpu" in str(params.get("gres") or "") else []
    if asked and not any(parts[p]["gpu"] for p in targets):
        key, value = asked[0]
        off = "hydra.launcher.gpus_per_node=0" if key == "gpus_per_node" else f"hydra.launcher.{key}=null"
        with_gpus = sorted(p for p, v in parts.items() if v["gpu"])
        if not with_gpus:
            raise ConfigError(f"hydra.launcher.{key}", value, f"this cluster has no GPUs (no gres/gpu on any node): "
                              f"add {off}")
        raise ConfigError(f"hydra.launcher.{key}", value, f"{where} has no GPUs (no gres/gpu on its nodes): choose "
                          f"one that has (hydra.launcher.partition={with_gpus[0]}; with GPUs: {', '.join(with_gpus)}),"
                          f" or add {off}")
    cpus, tasks = params.get("cpus_per_task") or 1, params.get("tasks_per_node") or 1
    most = max(parts[p]["cpus"] for p in targets)
    if most and cpus * tasks > most:  # sbatch accepts it; the job would pend forever (Reason=PartitionConfig)
        per = f" with tasks_per_node={tasks}" if tasks > 1 else ""
        raise ConfigError("hydra.launcher.cpus_per_task", cpus, f"the largest node of {where} has {most} CPUs{per}: "
                          f"set hydra.launcher.cpus_per_task={max(1, most // tasks)} or less")


def max_array_size() -> Optional[int]:
    """The cluster's MaxArraySize (array task indices stay below it), from `scontrol show config`; None if unknown."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"^MaxArraySize\s*=\s*(\d+)", out.stdout, re.M)
    return int(found.group(1)) if found else None


def chunk_plan(n: int, limit: Optional[int], parallelism: Optional[int]) -> list[tuple[int, int, int, Optional[int]]]:
    """How to submit `n` jobs as arrays of at most `limit` tasks (indices 0 … limit-1) running at most
    `parallelism` tasks at once in all: (start, stop, throttle, index of the chunk it waits for).
    Chunks are dealt round-robin to min(chunks, parallelism) lanes that share `parallelism`; a chunk
    starts after the previous chunk of its lane has ended (afterany), so the throttles never add up
    to more than `parallelism`. MaxArraySize=0 (arrays disabled): one plain job per chunk."""
    size = n if limit is None else max(1, limit)
    bounds = [(start, min(start + size, n)) for start in range(0, n, size)]
    parallelism = max(1, parallelism or 256)
    lanes = min(len(bounds), parallelism)
    share = [parallelism // lanes + (lane < parallelism % lanes) for lane in range(lanes)]
    return [(a, b, share[k % lanes], k - lanes if k >= lanes else None) for k, (a, b) in enumerate(bounds)]


def sbatch_error(text: str) -> str:
    """sbatch's own complaint, on one line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    said = [ln.rstrip(".") for ln in lines if re.match(r"(sbatch: (error|fatal)|allocation failure)", ln)]
    return " ".join("; ".join(dict.fromkeys(said or lines[-1:])).split())[:300] or "no reason given"


def sbatch_way_out(text: str) -> str:
    low = text.lower()
    if "gres" in low:
        return "compare hydra.launcher.gpus_per_node (or gres) with what `sinfo -o %P,%G` lists"
    if "mutually exclusive" in low and "mem" in low:
        return "set one of hydra.launcher.mem_gb, mem_per_cpu, mem_per_gpu (and null the others)"
    if "partition" in low:
        return "set hydra.launcher.partition to one that `sinfo` lists"
    if "account" in low or "qos" in low:
        return "check hydra.launcher.account and qos with your cluster's admins (`sacctmgr show assoc user=$USER`)"
    if "time limit" in low:
        return "lower hydra.launcher.timeout_min to what the partition allows (`sinfo -o %P,%l`)"
    return ("check the sbatch options hydra.launcher sets (additional_parameters included) against `man sbatch` "
            "and the cluster (`sinfo`, `scontrol show config`)")


class SlurmLauncher(SweepAwareLauncher):
    _EXECUTOR = "slurm"


class LocalLauncher(SweepAwareLauncher):
    _EXECUTOR = "local"


@dataclass
class CoupledSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.coupled_net_launcher.launcher.SlurmLauncher"
    name: Optional[str] = None  # null: coupled_net:<experiment, else the sweep directory's name>
    detach: bool = False
    runs_per_task: int = 1  # runs packed into one array task, trained at once on its allocation


@dataclass
class CoupledLocalConf:
    """hydra/launcher=local: the sweep's runs over this machine's GPU and CPU slots (coupled_net.pool)."""
    _target_: str = "hydra_plugins.coupled_net_launcher.launcher.LocalLauncher"
    submitit_folder: str = "${hydra.sweep.dir}/.submitit/%j"  # the runs' pickles and output (%j: local)
    gpus: Optional[List[int]] = None  # physical indices; null: those visible (CUDA_VISIBLE_DEVICES honoured)
    runs_per_gpu: int = 1
    max_parallel: Optional[int] = None  # null: gpus × runs_per_gpu, or (no GPU) the runs cpus_per_run fits
    cpus_per_run: Optional[int] = None  # null: this process's cores ÷ the runs alive at once
    timeout_min: Optional[int] = None  # a run alive longer is stopped (`interrupted`, resumable)
    gpus_per_node: Optional[int] = None  # submitit's key, kept for old command lines: 0 = gpus=[]
    detach: bool = False


def register_configs() -> None:
    """hydra/launcher=coupled_net_slurm|coupled_net_local (the schemas of conf/hydra/launcher/*.yaml)."""
    cs = ConfigStore.instance()
    cs.store(group="hydra/launcher", name="coupled_net_slurm", node=CoupledSlurmConf, provider="coupled_net")
    cs.store(group="hydra/launcher", name="coupled_net_local", node=CoupledLocalConf, provider="coupled_net")


def register_plugins() -> None:
    """Hydra finds plugins by scanning hydra_plugins/ on disk, which misses an editable install's
    path hook: register the launchers and the sweeper explicitly (before Hydra starts)."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()  # first: its scan re-executes hydra's core plugin modules, BasicSweeper's too
    from .sweeper import CoupledSweeper  # so subclass the BasicSweeper that scan left behind

    for plugin in (SlurmLauncher, LocalLauncher, CoupledSweeper):
        plugins.register(plugin)
