"""A run's identity from its composed config (SPEC §5): coupled_net.identity's rule (which keys, their
neutral values), applied with what the config alone cannot say —

- the type each key declares (coupled_net.knobs): `trainer.label_smoothing=0` is the run of the
  default 0.0, in its fingerprint and in its sweep directory's name;
- for `dataset=image_folder`, the images themselves: `dataset.root` is only where they are, so the
  identity holds the class folders and a digest of the files (coupled_net.data.folder_contents) as
  `dataset.contents.*`: another folder is another run, a copied or moved one the same.

Also the resolver that names a sweep's run directories (`${coupled_net.run_name:...}`)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from .data import folder_contents
from .errors import ConfigError, one_line
from .identity import Identity, identity_from, run_name
from .knobs import float_keys

FLOATS = float_keys()


def identity_of(cfg: DictConfig, contents: dict | None = None) -> Identity:
    """The identity of the task config `cfg` (its `hydra` node, if any, is left out). `contents`: a
    cache of image folders' contents by root, for the many jobs of one sweep plan (None: read them)."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # noqa: BLE001 - an interpolation that cannot be resolved
        raise ConfigError("config", "(composed)", f"cannot be resolved: {one_line(e, 300)}") from None
    plain.pop("hydra", None)
    dataset = plain.get("dataset")
    # a missing root (`???`) is refused with the other missing keys, by the validation of the build
    if isinstance(dataset, dict) and dataset.get("name") == "image_folder" and dataset.get("root") != "???":
        root, contents = str(dataset.get("root")), {} if contents is None else contents
        if root not in contents:
            contents[root] = folder_contents(cfg.dataset)
        plain["dataset"] = {**dataset, "contents": contents[root]}
    return identity_from(plain, FLOATS)


def register_run_name() -> None:
    """`${coupled_net.run_name:${hydra.overrides.task}}`, conf/train.yaml's hydra.sweep.subdir: here, not
    with the other resolvers (coupled_net.identity), because a name types its values as the knobs
    declare. Every process that resolves it (the launching one, a SLURM job's) imports this module
    through the task it runs (coupled_net.cli -> lifecycle)."""
    if not OmegaConf.has_resolver("coupled_net.run_name"):
        OmegaConf.register_new_resolver("coupled_net.run_name", lambda overrides: run_name(list(overrides), FLOATS))


register_run_name()
