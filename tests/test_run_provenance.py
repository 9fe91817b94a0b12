"""What a run directory keeps about how it was started: the whole resolved config at the top of every
start in train.log, and a dirty tree's diff as git.diff (named by results.json's provenance.git_diff)."""

from __future__ import annotations

import logging
import re
import subprocess

import pytest
import yaml
from omegaconf import OmegaConf

from coupled_net.lifecycle import log_config
from coupled_net.machine import provenance

from helpers import compose_cfg, read_results, run_cli

STAMP = re.compile(r"^\[\d{4}-\d\d-\d\d ")  # a log record's first line; a message's other lines lack it


def config_blocks(log_text: str) -> list[tuple[str, dict]]:
    """Each `resolved config` record of a train.log: (its header line, the YAML under it, parsed)."""
    lines, blocks = log_text.splitlines(), []
    for i, line in enumerate(lines):
        if STAMP.match(line) and line.endswith("resolved config:"):
            body = []
            for following in lines[i + 1:]:
                if STAMP.match(following):
                    break
                body.append(following)
            blocks.append((line.split(" - ", 1)[1], yaml.safe_load("\n".join(body))))
    return blocks


@pytest.mark.slow  # a real CLI run: ~30 s on a busy 2-core machine
def test_train_log_holds_the_whole_resolved_config_once_per_start_and_the_terminal_does_not(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_cli("experiment=quickstart", "trainer.epochs=1", "trainer.limit_batches=2", "seed=7",
                   f"hydra.run.dir={run_dir}", f"dataset.root={tmp_path}", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = OmegaConf.to_container(OmegaConf.load(run_dir / ".hydra" / "config.yaml"), resolve=True)
    ((header, logged),) = config_blocks((run_dir / "train.log").read_text())
    assert header == "run started; resolved config:"
    assert logged == saved
    assert (logged["seed"], logged["trainer"]["epochs"], logged["trainer"]["limit_batches"]) == (7, 1, 2)
    assert logged["dataset"]["root"] == str(tmp_path)  # interpolations resolved
    assert "resolved config" not in proc.stdout + proc.stderr
    assert read_results(run_dir)["status"] == "done"


def test_a_resumed_start_logs_the_config_again_under_its_own_header(caplog):
    cfg = compose_cfg("experiment=quickstart", "coupling.alpha=4")
    with caplog.at_level(logging.INFO, logger="coupled_net.lifecycle"):
        log_config(cfg, 2)
    (record,) = caplog.records
    assert record.to == "file"  # train.log only
    header, _, body = record.getMessage().partition("\n")
    assert header == "run resumed from a checkpoint (resume #2); resolved config:"
    assert yaml.safe_load(body)["coupling"]["alpha"] == 4


def git(repo, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                          capture_output=True, text=True).stdout


def committed_repo(path):
    path.mkdir()
    git(path, "init", "-q")
    (path / "a.txt").write_text("one\nkeep\n")
    git(path, "add", "a.txt")
    git(path, "commit", "-q", "-m", "first")
    return path


def test_a_dirty_tree_leaves_its_diff_and_untracked_names_as_git_diff_and_a_clean_one_nothing(tmp_path):
    dirty = committed_repo(tmp_path / "dirty")
    (dirty / "a.txt").write_text("two\nkeep\n")
    (dirty / "notes.txt").write_text("SECRET CONTENT\n")  # untracked: named, not copied
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    facts = provenance(None, run_dir=run_dir, repo=dirty)
    head = git(dirty, "rev-parse", "HEAD").strip()
    assert (facts["git_commit"], facts["git_dirty"], facts["git_diff"]) == (head, True, "git.diff")
    text = (run_dir / "git.diff").read_text()
    assert text.startswith(f"# git diff HEAD of {head}\n# untracked files (not in the diff):\n#   notes.txt\n\n")
    diff = text.split("\n\n", 1)[1]
    assert diff == git(dirty, "diff", "HEAD")
    assert "-one\n+two\n" in diff and "SECRET" not in text
    (dirty / "a.txt").write_text("one\nkeep\n")  # back to the commit: the saved file re-applies the change
    git(dirty, "apply", str(run_dir / "git.diff"))
    assert (dirty / "a.txt").read_text() == "two\nkeep\n"
    assert [p.name for p in run_dir.iterdir()] == ["git.diff"]  # atomic: no temp file left

    clean = committed_repo(tmp_path / "clean")
    (clean / "untracked.txt").write_text("x\n")  # untracked files alone do not make a tree dirty
    other = tmp_path / "other"
    other.mkdir()
    facts = provenance(None, run_dir=other, repo=clean)
    assert (facts["git_dirty"], facts["git_diff"]) == (False, None)
    assert list(other.iterdir()) == []
    assert "git_diff" not in provenance(None, repo=dirty)  # only the start that owns a directory saves it
