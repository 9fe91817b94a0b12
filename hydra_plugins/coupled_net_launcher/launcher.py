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
imports coupled_net's light leaves at the top, and the sweep planner (torch, the models) only where
a sweep is launched."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

import coupled_net.identity  # noqa: F401 - registers the minus and direction resolvers in SLURM job processes too (the
# run-name resolver, coupled_net.identify, arrives with the pickled task function: coupled_net.cli)
from coupled_net.errors import ConfigError, fail
from coupled_net.storage import read_json, write_json

log = logging.getLogger(__name__)
OWN_KEYS = ("detach",)
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
    def __init__(self, **params: Any) -> None:
        own = {k: params.pop(k) for k in OWN_KEYS if k in params}
        super().__init__(**params)
        self.detach = bool(own.get("detach", False))

    def setup(self, *, hydra_context, task_function, config) -> None:
        """Hydra calls this before the sweep writes anything (multirun.yaml, the sweep directory):
        the place to refuse what sbatch would, so that a refusal leaves no trace."""
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        from coupled_net.sweep import searching  # the planner: only where a sweep is launched (see above)

        if self.detach and searching(config.hydra.sweeper):
            # a search samples each trial from the values of those before: it cannot leave them running
            fail(str(ConfigError("hydra.launcher.detach", True, "a search (hparams_search=...) needs every trial's "
                                 "value before it samples the next one: leave detach out (the sweep waits)")))
        if self._EXECUTOR != "slurm":
            return
        try:
            check_slurm_client()
            settle_memory(self.params, given_keys(config))
            check_partition_and_gpus(self.params, sinfo_partitions())
        except ConfigError as e:
            fail(str(e))
        if self.params.get("name") is None:
            choice = config.hydra.runtime.choices.get("experiment")
            self.params["name"] = f"coupled_net:{choice or Path(str(config.hydra.sweep.dir)).name}"

    def run_dir(self, overrides: Sequence[str], job_num: int) -> Path:
        """The directory Hydra will give job `job_num` of this sweep."""
        from coupled_net.sweep import job_config  # the planner: only where a sweep is launched (see above)

        return job_config(self.hydra_context.config_loader, self.config, overrides, job_num)[0]

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        logging.getLogger("submitit").addFilter(_SacctOnce())

        from coupled_net.sweep import planned_num  # the planner: only where a sweep is launched (see above)

        todo = [(planned_num(o, num), list(o), self.run_dir(o, num))
                for num, o in enumerate(job_overrides, start=initial_job_idx)]
        for num, overrides, _ in todo:
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        if not todo:
            return []
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        submitted = self._submit(todo, sweep_dir)
        if not self.detach:
            try:
                return [job.results()[0] for job in submitted]
            except KeyboardInterrupt:
                self._interrupted(submitted, sweep_dir)
                raise
        log.info("detached: %d job(s) submitted (%s); follow them with `python launch/collect.py %s`",
                 len(submitted), ", ".join(j.job_id for j in submitted), sweep_dir)
        return [_finished(overrides, f"submitted as SLURM job {job.job_id}") for (_, overrides, _), job in
                zip(todo, submitted)]

    def _submit(self, todo, sweep_dir: Path) -> list:
        """One job array per chunk (one chunk unless the sweep is larger than the cluster's MaxArraySize),
        each chunk's jobs added to manifest.json as soon as it is submitted."""
        limit = max_array_size() if self._EXECUTOR == "slurm" else None
        plan = chunk_plan(len(todo), limit, self.params.get("array_parallelism"))
        if len(plan) > 1:
            log.info("%d jobs, more than this cluster's MaxArraySize=%d allows in one array: submitting %d arrays",
                     len(todo), limit, len(plan))
        submitted, arrays = [], []
        for k, (start, stop, throttle, after) in enumerate(plan):
            chunk = todo[start:stop]
            extra = {} if len(plan) == 1 else {"array_parallelism": throttle}
            if after is not None:  # at most array_parallelism tasks at once over all chunks: wait for a lane
                extra["dependency"] = f"afterany:{arrays[after]}"
            params = [(o, "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()) for num, o, _ in chunk]
            jobs = self._map_array(params, extra, chunk, k, len(plan), arrays)
            arrays.append(jobs[0].job_id.split("_")[0])
            self._write_manifest(sweep_dir, chunk, jobs)
            submitted += jobs
        return submitted

    def _map_array(self, params, extra: dict, chunk, k: int, n_chunks: int, arrays: list[str]) -> list:
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
                return executor.map_array(self, *zip(*params))
        except FailedJobError as e:
            for path in set(folder.iterdir()) - before if folder.is_dir() else ():  # its pickles, its script
                path.unlink(missing_ok=True)
            if not existed:
                with contextlib.suppress(OSError):
                    folder.rmdir()
            what = f"job #{chunk[0][0]}" if len(chunk) == 1 else f"jobs #{chunk[0][0]}-#{chunk[-1][0]}"
            if n_chunks > 1:
                what += f" (array {k + 1} of {n_chunks})"
            done = (f"; arrays {', '.join(arrays)} were submitted before it (in manifest.json): `scancel "
                    f"{' '.join(arrays)}` stops them" if arrays else "; nothing was submitted")
            fail(f"sbatch refused {what}: {sbatch_error(str(e) or stderr.getvalue())}: "
                 f"{sbatch_way_out(str(e))}{done}", code=1)

    def _interrupted(self, submitted, sweep_dir: Path) -> None:
        """Ctrl-C while waiting: local jobs are children of this machine, stopped like a run (SIGINT:
        a checkpoint, `interrupted`); SLURM jobs are the cluster's and keep running (say so)."""
        if self._EXECUTOR == "local":
            log.warning("stopping the sweep's %d local job(s): each saves a checkpoint and records "
                        "`interrupted`", len(submitted))
            for job in submitted:  # SIGTERM: submitit's local controller (pid = job id) forwards it to the run
                try:
                    os.kill(int(job.job_id), signal.SIGTERM)
                except (ValueError, OSError):
                    pass
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not all(job.done() for job in submitted):
                time.sleep(0.2)
            return
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

    def _write_manifest(self, sweep_dir: Path, todo, submitted) -> None:
        path = sweep_dir / "manifest.json"
        manifest = read_json(path) or {"sweep_dir": str(sweep_dir), "jobs": []}
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        for (num, overrides, run_dir), job in zip(todo, submitted):
            manifest["jobs"].append({"job_id": str(job.job_id), "job_num": num, "overrides": overrides,
                                     "run_dir": str(run_dir), "submitted_at": now, "executor": self._EXECUTOR})
        write_json(path, manifest)


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
    """The hydra.* keys set on the command line (`+`/`++`/`~` stripped)."""
    return {str(o).split("=", 1)[0].lstrip("+~") for o in config.hydra.overrides.hydra}


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


@dataclass
class CoupledLocalConf(LocalQueueConf):
    _target_: str = "hydra_plugins.coupled_net_launcher.launcher.LocalLauncher"
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
