"""A run's identity (SPEC §5) and its sweep sub-directory name (§6): which keys count, how a
difference is named, how names are made. In-process, no training."""

from __future__ import annotations

import hashlib

import pytest
from omegaconf import OmegaConf

from coupled_net.identify import identity_of
from coupled_net.identity import NON_IDENTITY, differences, run_key, run_name, same_value

from helpers import compose_cfg

QUICK = ["experiment=quickstart"]


def fingerprint(*overrides: str) -> str:
    return identity_of(compose_cfg(*QUICK, *overrides)).fingerprint


def test_the_non_identity_keys_are_the_ones_the_spec_lists():
    assert NON_IDENTITY == ("dataset.root", "dataset.download", "trainer.device", "trainer.num_workers",
                            "trainer.threads", "trainer.progress", "trainer.compile", "trainer.channels_last",
                            "trainer.last_every", "logger", "callbacks", "hydra", "optimized_metric")


# Fingerprints computed by the version before the augment group and the recipe keys existed (commit
# e3293fa): runs it made must keep them, so that they resume and re-launched sweeps skip them.
BEFORE_THE_NEW_KEYS = [
    (["experiment=quickstart"], "2972b43501ac47f5"),
    ([], "933635ba84765f7e"),
    (["experiment=quickstart", "coupling.alpha=4", "seed=2"], "409b20f3c3fec338"),
    (["dataset=cifar10", "augment=letters"], "16d0f7daccce51e9"),  # what cifar10 was trained with then
]


@pytest.mark.parametrize("overrides, expected", BEFORE_THE_NEW_KEYS, ids=[" ".join(o) or "default"
                                                                          for o, _ in BEFORE_THE_NEW_KEYS])
def test_runs_made_before_the_new_keys_existed_keep_their_fingerprint(overrides, expected):
    assert identity_of(compose_cfg(*overrides)).fingerprint == expected


@pytest.mark.parametrize("override", [
    "trainer.label_smoothing=0.1", "trainer.grad_clip_norm=1.0", "trainer.overfit_batches=2",
    "scheduler.warmup_epochs=2", "augment=none", "augment=crop_flip", "augment.degrees=10",
])
def test_a_new_key_away_from_its_neutral_value_is_part_of_the_identity(override):
    assert fingerprint(override) != fingerprint()


def test_cifar10_now_trains_with_crop_flip_so_its_fingerprint_differs_from_before():
    assert identity_of(compose_cfg("dataset=cifar10")).fingerprint != "16d0f7daccce51e9"
    assert identity_of(compose_cfg("dataset=cifar10")).keys["augment._target_"] == "coupled_net.augment.CropFlip"


@pytest.mark.parametrize("override", [
    "dataset.root=/somewhere/else", "dataset.download=true", "trainer.device=cpu", "trainer.num_workers=3",
    "trainer.threads=1", "trainer.progress=false", "trainer.compile=true", "trainer.channels_last=true",
    "logger=tensorboard", "logger=[tensorboard,mlflow]", "+note=first-try", "optimized_metric=val_loss",
])
def test_where_and_how_a_run_executes_and_labels_leave_the_fingerprint_unchanged(override):
    assert fingerprint(override) == fingerprint()


@pytest.mark.parametrize("override", [
    "optimizer.lr=0.02", "seed=7", "coupling.alpha=2", "coupling.mode=mean", "trainer.epochs=5",
    "trainer.limit_batches=3", "trainer.precision=bf16", "dataset.val_fraction=0.2", "scheduler=step",
    "model.width=16", "trainer.eval_batch_size=64",
])
def test_anything_that_changes_what_is_computed_changes_the_fingerprint(override):
    assert fingerprint(override) != fingerprint()


def test_the_fingerprint_is_a_digest_of_the_identity_keys():
    ident = identity_of(compose_cfg(*QUICK, "+note=x"))
    assert ident.labels == {"note": "x"}
    assert "dataset.root" not in ident.keys and "note" not in ident.keys
    assert ident.keys["optimizer.lr"] == 0.05 and ident.keys["scheduler.T_max"] == 4  # resolved
    assert len(ident.fingerprint) == 16 and int(ident.fingerprint, 16) >= 0


def test_differences_name_each_key_with_both_values():
    stored = identity_of(compose_cfg(*QUICK)).keys
    wanted = identity_of(compose_cfg(*QUICK, "optimizer.lr=0.02", "seed=3", "coupling.layer=[features.0]")).keys
    assert differences(stored, wanted) == [
        'coupling.layer: None → ["features.0"]', "optimizer.lr: 0.05 → 0.02", "seed: 42 → 3"]
    assert differences({"a": 1}, {"b": 2}) == ["a: 1 → (absent)", "b: (absent) → 2"]
    assert differences(stored, dict(stored)) == []


def test_run_names_keep_identity_keys_sorted_and_leave_out_the_rest():
    overrides = ["seed=1", "coupling.alpha=2", "dataset.root=/data", "+note=x", "experiment=quickstart",
                 "trainer.device=cpu", "logger=tensorboard", "hydra/launcher=slurm", "optimizer.lr=0.02"]
    assert run_name(overrides) == "coupling.alpha=2,experiment=quickstart,optimizer.lr=0.02,seed=1"
    assert run_name(list(reversed(overrides))) == run_name(overrides)  # the order typed does not matter


def test_quoting_a_value_or_forcing_a_label_does_not_make_another_directory():
    assert run_name(["coupling.mode='mean'"]) == run_name(['coupling.mode="mean"']) == run_name(["coupling.mode=mean"])
    assert run_name(["coupling.layer=[ features.0 ]"]) == "coupling.layer=[features.0]"
    assert run_name(["++note=a", "seed=1"]) == run_name(["+note=a", "seed=1"]) == "seed=1"


def test_a_string_and_a_number_that_print_alike_are_told_apart():
    assert differences({"optimizer.lr": "0.05"}, {"optimizer.lr": 0.05}) == ['optimizer.lr: "0.05" → 0.05']


def test_a_run_name_never_nests_directories_and_is_never_empty():
    assert run_name(["model.weights=/w/alex.pt"]) == "model.weights=%2Fw%2Falex.pt"
    assert run_name(["dataset.root=/data"]) == "default"


def test_a_long_run_name_keeps_a_readable_prefix_and_ends_in_a_digest_of_the_whole():
    overrides = [f"+extra.key{i}={'v' * 20}" for i in range(12)]
    whole = ",".join(sorted(f"extra.key{i}={'v' * 20}" for i in range(12)))
    assert len(whole.encode()) > 200
    name = run_name(overrides)
    assert name == f"{whole.encode()[:191].decode()}-{hashlib.sha256(whole.encode()).hexdigest()[:8]}"
    assert len(name.encode()) == 200


# ---- numbers that are equal are one value (issue 18, item 2) -----------------------------------

@pytest.mark.parametrize("typed", [
    "trainer.label_smoothing=0", "augment.degrees=20", "augment.shear=10", "scheduler.eta_min=0",
    "optimizer.lr=5e-2", "dataset.mean=[0.1125]", "augment.scale=[0.8,1.2]",
])
def test_a_default_typed_as_an_integer_or_spelt_otherwise_is_the_same_run(typed):
    # 2972b43501ac47f5: quickstart's fingerprint since before the augment group (pinned above)
    assert fingerprint(typed) == "2972b43501ac47f5"


def test_an_integer_where_a_float_is_taken_is_that_float_in_the_identity_and_the_directory_name():
    assert fingerprint("trainer.label_smoothing=1e-1") == fingerprint("trainer.label_smoothing=0.1")
    assert fingerprint("augment.degrees=15") == fingerprint("augment.degrees=15.0") != fingerprint()
    assert identity_of(compose_cfg(*QUICK, "augment.degrees=15")).keys["augment.degrees"] == 15.0
    floats = frozenset({"trainer.label_smoothing", "augment.scale"})
    assert run_name(["trainer.label_smoothing=0", "seed=1"], floats) == "seed=1,trainer.label_smoothing=0.0"
    assert run_name(["trainer.label_smoothing=0.0", "seed=1"], floats) == "seed=1,trainer.label_smoothing=0.0"
    assert run_name(["seed=1"], floats) == "seed=1"  # an integer key stays one


def test_the_sweep_directory_resolver_types_the_values_as_their_keys_declare():
    named = OmegaConf.create({"o": ["trainer.label_smoothing=0", "augment.degrees=20", "coupling.alpha=2"],
                              "name": "${coupled_net.run_name:${o}}"})
    assert named.name == "augment.degrees=20.0,coupling.alpha=2,trainer.label_smoothing=0.0"


def test_a_record_that_typed_a_default_as_an_integer_is_still_the_run_it_repeats():
    """Before 0 and 0.0 were one value, `trainer.label_smoothing=0` recorded a run under a fingerprint
    of its own: that record still matches the run (resume, skip) and is the same run to the collector."""
    ident = identity_of(compose_cfg(*QUICK))
    legacy = {"fingerprint": "0123456789abcdef", "identity": {**ident.keys, "trainer.label_smoothing": 0,
                                                             "augment.degrees": 20}, "labels": {}}
    assert ident.matches(legacy) and run_key(legacy) == ident.run_key
    other = {**legacy, "identity": {**ident.keys, "trainer.label_smoothing": 0.1}}
    assert not ident.matches(other) and run_key(other) != ident.run_key
    assert differences(other["identity"], ident.keys) == ["trainer.label_smoothing: 0.1 → (absent)"]
    labelled = {**legacy, "labels": {"note": "x"}}
    assert run_key(labelled) != ident.run_key  # labels still tell runs apart
    assert not ident.matches({"fingerprint": None, "identity": ident.keys})  # an unfinished old record: no


def test_values_compare_as_the_run_sees_them():
    assert same_value(0, 0.0) and same_value([1, 2], [1.0, 2.0]) and same_value({"a": 1}, {"a": 1.0})
    assert not same_value(True, 1) and not same_value("0.05", 0.05) and not same_value([1], [1, 1])
    assert not same_value(None, 0)
