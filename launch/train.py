"""Train one run, or a sweep with -m. Examples:

    python launch/train.py -m experiment=quickstart coupling.alpha=0,2,4,8
    python launch/train.py -m coupling.alpha=0,2,4,8          # the seed's AlexNet / EMNIST letters
"""

import hydra
from omegaconf import DictConfig

from coupled_net.cli import train_task


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> str:
    return train_task(cfg)


if __name__ == "__main__":
    main()
