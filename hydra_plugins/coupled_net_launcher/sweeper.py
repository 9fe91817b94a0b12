"""Hydra's basic sweeper (the Cartesian product of the overrides), planning the whole sweep first:
conflicts refuse the launch before Hydra writes multirun.yaml or any launcher starts or submits a
job; finished runs are left out of the batches (coupled_net.sweep)."""

from __future__ import annotations

import logging
from typing import List

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.types import Override
from hydra.core.utils import filter_overrides

from coupled_net.errors import fail

log = logging.getLogger(__name__)


class CoupledSweeper(BasicSweeper):
    def split_arguments(self, overrides: List[Override], max_batch_size) -> List[List[List[str]]]:
        """BasicSweeper.sweep calls this (a static method there) right before it saves multirun.yaml
        and launches the batches: the one point that sees every job before anything happens."""
        # the planner (torch, the models): imported where a sweep is launched, not by Hydra's plugin discovery
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
            log.info("\t#%d : %s — already done (%s), not run again", job.num, shown, job.done_in.name)
        if done:
            log.info("%d of %d runs of this sweep are already done; launching the other %d", len(done), len(planned),
                     len(planned) - len(done))
        skip = {tuple(job.overrides) for job in done}
        kept = [[job for job in batch if tuple(job) not in skip] for batch in batches]
        return [batch for batch in kept if batch]
