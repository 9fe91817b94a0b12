"""Fetch or build a dataset into dataset.root once, e.g. on a login node whose compute nodes are
offline:  python launch/prepare.py dataset=emnist_letters dataset.root=/scratch/data

Takes the same overrides as train.py; writes no run directory."""

import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from coupled_net.cli import prepare_task
from hydra_plugins.coupled_net_launcher.launcher import register_plugins

if __name__ == "__main__":
    register_plugins()  # as train.py: hydra/launcher=slurm|local compose here too
    with initialize_config_dir(version_base="1.3", config_dir=str(Path(__file__).resolve().parents[1] / "conf")):
        prepare_task(compose("train", overrides=sys.argv[1:]))
