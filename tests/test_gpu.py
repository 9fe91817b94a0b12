"""The CUDA-only branches (skipped without a GPU: `requires_gpu`): the tensor pipeline holds the
split on the GPU, autocast trains, and a run moved between CPU and GPU is the same run."""

from __future__ import annotations

import pytest
import torch

from coupled_net.build import build, resolve
from coupled_net.lifecycle import execute_run

from helpers import compose_cfg, read_results, run_cli, run_dirs

pytestmark = pytest.mark.requires_gpu
TINY = ["experiment=quickstart", "dataset.train_per_class=8", "dataset.test_per_class=2", "trainer.batch_size=32"]


def test_the_tensor_pipeline_holds_the_split_on_the_gpu_and_batches_arrive_there():
    parts = build(resolve(compose_cfg(*TINY, "trainer.device=cuda")))
    loader = parts.loaders["train"]
    assert loader.images.device.type == "cuda"
    images, labels = next(iter(loader))
    assert images.device.type == labels.device.type == "cuda" and images.dtype == torch.float32
    assert next(parts.model.parameters()).device.type == "cuda"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_trains_on_the_gpu_and_stores_float32_weights(tmp_path, precision):
    res = execute_run(compose_cfg(*TINY, "trainer.epochs=2", "trainer.device=cuda", f"trainer.precision={precision}",
                          f"dataset.root={tmp_path}"), tmp_path / "run")
    assert res["status"] == "done" and res["provenance"]["device"] == torch.cuda.get_device_name(0)
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    assert best["features.0.weight"].dtype == torch.float32


def test_a_run_finished_on_the_cpu_is_not_trained_again_on_the_gpu(tmp_path):
    cpu = execute_run(compose_cfg(*TINY, "trainer.epochs=1", "trainer.device=cpu", f"dataset.root={tmp_path}"), tmp_path / "run")
    before = (tmp_path / "run" / "results.json").read_bytes()
    gpu = execute_run(compose_cfg(*TINY, "trainer.epochs=1", "trainer.device=cuda", f"dataset.root={tmp_path}"), tmp_path / "run")
    assert gpu == cpu and (tmp_path / "run" / "results.json").read_bytes() == before
    assert read_results(tmp_path / "run")["fingerprint"] == cpu["fingerprint"]


def test_a_torchvision_model_trains_on_the_gpu_and_its_model_summary_leaves_it_there(tmp_path):
    # the model summary (torchinfo) once moved every model back to the CPU before epoch 1 on a GPU
    res = execute_run(compose_cfg(*TINY, "model=torchvision", "model.arch=mobilenet_v3_small", "model.input_size=32",
                          "trainer.epochs=1", "trainer.device=cuda", f"dataset.root={tmp_path}"), tmp_path / "run")
    assert res["status"] == "done", res["error"]
    assert "mobilenet_v3_small" in res["model"]


def test_two_runs_packed_on_one_gpu_see_cuda_0_and_the_same_physical_uuid_and_finish(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "hydra/launcher=local", "hydra.launcher.gpus=[0]", "hydra.launcher.runs_per_gpu=2", *TINY,
                   "trainer.epochs=1", "trainer.device=cuda", "coupling.alpha=0,2", f"hydra.sweep.dir={sweep}",
                   f"dataset.root={tmp_path}", cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [read_results(d) for d in run_dirs(sweep)]
    assert [r["status"] for r in results] == ["done", "done"]
    gpus = [r["provenance"]["gpu"] for r in results]
    assert [g["index"] for g in gpus] == [0, 0] and [g["physical"] for g in gpus] == [0, 0]
    assert gpus[0]["uuid"] == gpus[1]["uuid"] and gpus[0]["uuid"].startswith("GPU-")
    assert [r["provenance"]["sharing"]["shared_by"] for r in results] == [2, 2]


@pytest.mark.parametrize("augment", ["letters", "crop_flip"])
def test_a_training_epoch_of_the_tensor_pipeline_never_waits_for_the_gpu_between_steps(monkeypatch, augment):
    # the per-batch warp parameters and crop offsets once went up with blocking copies: one stall per step
    import coupled_net.trainer as trainer_module
    from coupled_net.build import make_trainer
    from coupled_net.trainer import LoopState

    spec = resolve(compose_cfg(*TINY, "trainer.device=cuda", f"augment={augment}", "model.input_size=64"))
    trainer = make_trainer(spec, build(spec))
    real = trainer_module._summed_over_ranks

    def read_once(sums, seen):  # the epoch's one read of its sums: a sync by nature, after the last step
        torch.cuda.set_sync_debug_mode(0)
        return real(sums, seen)
    monkeypatch.setattr(trainer_module, "_summed_over_ranks", read_once)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_one_epoch(1, LoopState())
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_a_checkpoint_holds_the_generator_of_the_runs_own_gpu_and_restoring_it_repeats_its_draws():
    # it held one state per visible GPU: a resume seeing fewer GPUs raised IndexError at every retry
    from coupled_net import checkpoint
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    state = checkpoint.rng_state(device)
    assert isinstance(state["cuda"], torch.Tensor)
    first = torch.rand(3, device=device)
    checkpoint.set_rng_state(state, device)
    assert torch.equal(torch.rand(3, device=device), first)


def test_two_ddp_ranks_on_two_gpus_train_and_keep_the_coupled_layers_identical(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs: NCCL refuses two ranks on one")
    import subprocess
    import sys

    from helpers import TRAIN
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(TRAIN), *TINY,
            "trainer.epochs=1", "trainer.device=cuda", f"dataset.root={tmp_path}", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = read_results(tmp_path / "run")
    assert res["status"] == "done" and res["world_size"] == 2
    assert len(set(res["coupled_layer_digest_per_rank"])) == 1
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=False)
    assert len(last["rng"]) == 2 and not torch.equal(last["rng"][0]["cuda"], last["rng"][1]["cuda"])
