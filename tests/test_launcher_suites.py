"""Our launchers subclass hydra-submitit-launcher's; like it, they must pass Hydra's own launcher test
suites: the local variant, and the SLURM one on the real one-node cluster (.ci/slurm_up.sh), where they
catch what only a submitted job has (hydra.job.num in hydra.sweep.subdir, as the suites set it)."""

from __future__ import annotations


import pytest
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

from hydra_plugins.coupled_net_launcher.launcher import LocalLauncher, SlurmLauncher
from helpers import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def plugin_on_path(monkeypatch):
    """Hydra discovers plugins by scanning hydra_plugins/ on sys.path; the suites' subprocesses too."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))


@pytest.fixture(autouse=True)
def unset_version_base():
    """The suites' apps expect Hydra's default version base; our other tests composed with 1.3 in this
    process, and Hydra keeps the version base in a process-wide singleton."""
    from hydra.version import VersionBase, _UNSPECIFIED_

    instance = VersionBase.instance()
    saved, instance.version_base = instance.version_base, _UNSPECIFIED_
    yield
    instance.version_base = saved


@pytest.mark.parametrize("cls", [LocalLauncher, SlurmLauncher])
def test_discovery(cls) -> None:
    assert cls.__name__ in [x.__name__ for x in Plugins.instance().discover(Launcher)]


@pytest.mark.parametrize("launcher_name, overrides",
                         [("coupled_net_local", ["hydra.launcher.gpus_per_node=0", "hydra.launcher.timeout_min=1"])])
class TestCoupledNetLocalLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [(
    {"defaults": [{"override hydra/launcher": "coupled_net_local"}, {"override hydra/hydra_logging": "disabled"},
                  {"override hydra/job_logging": "disabled"}, "_self_"],
     "hydra": {"launcher": {"gpus_per_node": 0, "timeout_min": 1}}},
    ["-m"],
)])
class TestCoupledNetLocalLauncherIntegration(IntegrationTestSuite):
    pass


# the SLURM suites' jobs: CPU-only, small, as tests/test_slurm.py submits them
SLURM = {"gpus_per_node": 0, "cpus_per_task": 1, "mem_per_cpu": "1G", "timeout_min": 5}


@pytest.mark.usefixtures("slurm_cluster")
@pytest.mark.parametrize("launcher_name, overrides",
                         [("coupled_net_slurm", [f"hydra.launcher.{k}={v}" for k, v in SLURM.items()])])
class TestCoupledNetSlurmLauncher(LauncherTestSuite):
    pass


@pytest.mark.usefixtures("slurm_cluster")
@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [(
    {"defaults": [{"override hydra/launcher": "coupled_net_slurm"}, {"override hydra/hydra_logging": "disabled"},
                  {"override hydra/job_logging": "disabled"}, "_self_"],
     "hydra": {"launcher": SLURM}},
    ["-m"],
)])
class TestCoupledNetSlurmLauncherIntegration(IntegrationTestSuite):
    pass
