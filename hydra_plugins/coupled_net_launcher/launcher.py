"""hydra-submitit-launcher's launchers, plus what a long sweep on a cluster needs:

- `detach: true` submits the job array and returns at once, writing `manifest.json` (job id ↔
  overrides ↔ run dir ↔ submission time) into the sweep directory for `launch/collect.py`.

Finished runs are left out, and conflicting ones refused, before this launcher sees the jobs
(the coupled_net sweeper, coupled_net.sweep); each job checks its directory again when it starts."""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import LocalQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf

import coupled_net.identity  # noqa: F401 - registers the run-name resolver in SLURM job processes too
from coupled_net.results import read_json, write_json

log = logging.getLogger(__name__)
OWN_KEYS = ("detach",)


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

    def run_dir(self, overrides: Sequence[str], job_num: int) -> Path:
        """The directory Hydra will give job `job_num` of this sweep."""
        from coupled_net.sweep import job_config

        return job_config(self.hydra_context.config_loader, self.config, overrides, job_num)[0]

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        logging.getLogger("submitit").addFilter(_SacctOnce())

        from coupled_net.sweep import planned_num

        todo = [(planned_num(o, num), list(o), self.run_dir(o, num))
                for num, o in enumerate(job_overrides, start=initial_job_idx)]
        for num, overrides, _ in todo:
            log.info("\t#%d : %s", num, " ".join(filter_overrides(overrides)))
        if not todo:
            return []
        executor = self._executor()
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        params = [(o, "hydra.sweep.dir", num, f"job_id_for_{num}", Singleton.get_state()) for num, o, _ in todo]
        submitted = executor.map_array(self, *zip(*params))
        self._write_manifest(sweep_dir, todo, submitted)
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
        ids = " ".join(j.job_id for j in submitted)
        log.warning("the sweep's SLURM jobs keep running: `scancel %s` stops them; `python launch/collect.py %s` "
                    "follows them", ids, sweep_dir)

    def _executor(self):
        """Built as BaseSubmititLauncher.launch builds it."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        specific_init = {"max_num_timeout"}
        init = {"folder": self.params["submitit_folder"],
                **{f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in specific_init}}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, **init)
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
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


class SlurmLauncher(SweepAwareLauncher):
    _EXECUTOR = "slurm"


class LocalLauncher(SweepAwareLauncher):
    _EXECUTOR = "local"


@dataclass
class CoupledSlurmConf(SlurmQueueConf):
    _target_: str = "hydra_plugins.coupled_net_launcher.launcher.SlurmLauncher"
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
