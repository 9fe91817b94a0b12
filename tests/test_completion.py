"""Hydra's tab completion through our entry point, as the README documents it: the bash function it
installs asks `launch/train.py -sc query=bash` with the line typed so far in COMP_LINE."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import REPO, TRAIN


def complete(line: str) -> list[str]:
    env = {**os.environ, "COMP_LINE": line, "COMP_POINT": str(len(line))}
    out = subprocess.run([sys.executable, str(TRAIN), "-sc", "query=bash"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return out.stdout.split()


@pytest.mark.slow  # three Hydra start-ups: ~15 s when the machine is idle
def test_tab_completion_lists_config_groups_and_keys_and_installs_for_this_script():
    assert complete("python launch/train.py model=") == [
        "model=alexnet", "model=resnet18", "model=small_cnn", "model=timm", "model=torchvision", "model=vgg11"]
    assert complete("python launch/train.py coupling.") == [
        "coupling.alpha=", "coupling.layer=", "coupling.mode=", "coupling.schedule="]
    script = subprocess.run([sys.executable, str(TRAIN), "--shell-completion", "install=bash"], cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=True).stdout
    # the installed function completes a script only when the file has Hydra's decorator
    assert 'grep "@hydra.main" $file_path -q' in script and "@hydra.main" in TRAIN.read_text()
    assert script.rstrip().endswith("complete -o nospace -o default -F hydra_bash_completion python")
