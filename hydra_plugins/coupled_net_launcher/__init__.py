"""coupled_net's Hydra launchers (Hydra only instantiates launchers from the hydra_plugins package).
Importing this registers hydra/launcher=coupled_net_slurm|coupled_net_local in the ConfigStore."""

from .launcher import register_configs

register_configs()
