"""Hydra's basic sweeper (the Cartesian product of the overrides), planning the whole sweep first:
conflicts refuse the launch before Hydra writes multirun.yaml or any launcher starts or submits a
job; finished runs are left out of the batches (coupled_net.sweep), and every job keeps its number in
the whole sweep (hydra.job.num: `hydra.sweep.subdir=run_${hydra.job.num}` names the same directories
whichever runs a re-launch leaves out)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn, filter_overrides

from coupled_net.errors import ConfigError, fail
from coupled_net.sweepfiles import write_launch

log = logging.getLogger(__name__)


class CoupledSweeper(BasicSweeper):
    def __init__(self, max_batch_size: Optional[int], params: Optional[dict] = None, fail_fast: Any = None) -> None:
        super().__init__(max_batch_size=max_batch_size, params=params)
        self.fail_fast = fail_fast  # after this many failed runs, a launch starts no more (None: off)

    def setup(self, *, hydra_context, task_function, config) -> None:
        check_fail_fast(self.fail_fast)  # before Hydra writes anything
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        if not getattr(self.launcher, "numbers_jobs_as_planned", False):  # ours do (coupled_net.sweep.planned_num)
            self.launcher = PlannedNumbers(self.launcher)

    def split_arguments(self, overrides: List[Override], max_batch_size) -> List[List[List[str]]]:
        """BasicSweeper.sweep calls this (a static method there) right before it saves multirun.yaml
        and launches the batches: the one point that sees every job before anything happens."""
        # the planner (torch, the models): imported where a sweep is launched, not by Hydra's plugin discovery
        from coupled_net.failfast import start_launch  # (torch: machine) likewise
        from coupled_net.sweep import bad_configs, conflicts, finished, plan, remember

        batches = BasicSweeper.split_arguments(overrides, max_batch_size)
        planned = plan(self.hydra_context.config_loader, self.config, [job for batch in batches for job in batch])
        bad = bad_configs(planned)
        if bad:  # one line per mistake, the last one last: nothing is written, started or submitted
            fail(bad[-1], details=bad[:-1])
        refused = conflicts(planned)
        if refused:
            fail(f"{len(refused)} conflict(s) in sweep {self.config.hydra.sweep.dir} (listed above): nothing was "
                 "started or submitted", details=refused)
        remember(planned)
        done = finished(planned)
        for job in done:
            shown = " ".join(filter_overrides(job.overrides))
            lacks = f"; it has no numbers of callbacks {', '.join(job.lacks)} (added after it ran: callbacks are not " \
                    "part of a run's identity)" if job.lacks else ""
            log.info("\t#%d : %s — already done (%s), not run again%s", job.num, shown, job.done_in.name, lacks)
        if done:
            log.info("%d of %d runs of this sweep are already done; launching the other %d", len(done), len(planned),
                     len(planned) - len(done))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        start_launch(sweep_dir)  # a re-launch counts its own failures
        launcher = self.launcher.launcher if isinstance(self.launcher, PlannedNumbers) else self.launcher
        write_launch(sweep_dir, executor=getattr(launcher, "_EXECUTOR", "basic"),
                     parallel=launcher.parallelism() if hasattr(launcher, "parallelism") else 1,
                     planned=len(planned), launched=len(planned) - len(done), fail_fast=self.fail_fast)
        skip = {tuple(job.overrides) for job in done}
        kept = [[job for job in batch if tuple(job) not in skip] for batch in batches]
        return [batch for batch in kept if batch]


def check_fail_fast(value: Any) -> None:
    """hydra.sweeper.fail_fast is null (off) or a number of failed runs; anything else ends the launch in one line."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        fail(str(ConfigError("hydra.sweeper.fail_fast", value, "an integer >= 1, or null (off)")))


class PlannedNumbers:
    """A launcher that numbers a batch's jobs from `initial_job_idx` on (Hydra's basic one), given the
    jobs so that each keeps its planned number: BasicSweeper counts only the jobs it launched, so with
    finished runs left out a job would get another's number, and with `hydra.sweep.subdir=run_${hydra.job.num}`
    that job's directory. Each run of consecutive numbers is launched on its own, from its first number."""

    def __init__(self, launcher) -> None:
        self.launcher = launcher

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from coupled_net.sweep import numbered_runs  # the planner (torch, the models): see split_arguments

        return [ret for num, jobs in numbered_runs(job_overrides, initial_job_idx)
                for ret in self.launcher.launch(jobs, initial_job_idx=num)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.launcher, name)
