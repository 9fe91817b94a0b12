"""Fetch or build a dataset into dataset.root once, e.g. on a login node whose compute nodes are
offline:  python launch/prepare.py dataset=emnist_letters dataset.root=/scratch/data

Takes the same overrides as train.py, checked the same way (a mistake is one line); writes no run
directory."""

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException

from coupled_net.cli import check_command_line, prepare_task
from coupled_net.errors import fail, interrupted
from hydra_plugins.coupled_net_launcher.launcher import register_plugins

CONF = Path(__file__).resolve().parents[1] / "conf"

if __name__ == "__main__":
    with interrupted():
        check_command_line(sys.argv[1:], CONF)  # as train.py: a mistyped key, an unknown option: one line
        register_plugins()  # as train.py: hydra/launcher=slurm|local compose here too
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
            try:
                cfg = compose("train", overrides=sys.argv[1:])
            except HydraException as e:  # what the checks above leave to Hydra (a malformed override)
                fail(" ".join(str(e).split()), to_file=False)
        prepare_task(cfg)
