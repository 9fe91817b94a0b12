"""Train one run, or a sweep with -m. Examples:

    python launch/train.py -m experiment=quickstart coupling.alpha=0,2,4,8
    python launch/train.py -m coupling.alpha=0,2,4,8          # the seed's AlexNet / EMNIST letters
"""

import sys
from pathlib import Path

try:  # importing torch takes seconds: Ctrl-C meanwhile ends with one line too
    import hydra
    from omegaconf import DictConfig

    from coupled_net.cli import check_command_line, train_task
    from coupled_net.errors import interrupted
    from hydra_plugins.coupled_net_launcher.launcher import register_plugins
except KeyboardInterrupt:
    print("\ncoupled_net: error: interrupted (SIGINT) while starting; nothing was run", file=sys.stderr)
    raise SystemExit(130) from None


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    return train_task(cfg)


if __name__ == "__main__":
    with interrupted():
        check_command_line(sys.argv[1:], Path(__file__).resolve().parents[1] / "conf")
        register_plugins()  # our launchers and sweeper known to Hydra, even in an editable install
        main()
