"""This machine's facts (coupled_net.machine) and the JSON records (coupled_net.storage), tested on
the CPU with the environment a GPU node or a SLURM array task would give."""

from __future__ import annotations

import torch

from coupled_net import machine
from coupled_net.storage import read_json, write_json


def test_a_cuda_device_without_index_is_the_gpu_of_this_process_s_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert machine.rank_gpu(torch.device("cuda")) == torch.device("cuda", 1)  # rank 3 of 2 GPUs: wraps
    assert machine.rank_gpu(torch.device("cuda", 0)) == torch.device("cuda", 0)  # an index given stays
    assert machine.rank_gpu(torch.device("cpu")) == torch.device("cpu")
    monkeypatch.delenv("LOCAL_RANK")
    assert machine.rank_gpu(torch.device("cuda")) == torch.device("cuda", 0)


def test_a_slurm_array_task_is_named_by_its_array_and_index(monkeypatch):
    for key in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(key, raising=False)
    assert (machine.slurm_array_job_id(), machine.slurm_job_id()) == (None, None)
    monkeypatch.setenv("SLURM_JOB_ID", "57")
    assert (machine.slurm_array_job_id(), machine.slurm_job_id()) == (None, "57")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "13")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    assert (machine.slurm_array_job_id(), machine.slurm_job_id()) == ("13", "13_4")


def test_a_json_record_is_an_object_or_nothing(tmp_path):
    path = tmp_path / "record.json"
    assert read_json(path) is None  # absent
    for text in ("[1, 2]", '{"status": "do', ""):
        path.write_text(text)
        assert read_json(path) is None, text  # not an object, cut short, empty
    write_json(path, {"b": [1], "a": None}, indent=1)
    assert path.read_bytes() == b'{\n "b": [\n  1\n ],\n "a": null\n}\n'
    assert read_json(path) == {"b": [1], "a": None}
