"""train.py end to end, in subprocesses as a user runs it: stage 1 on webdataset shards, stage 2
from its checkpoint, torchrun with 2 CPU processes, SIGKILL + ``--resume auto``, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minigpt4.models import MiniGPT4
from train_fixtures import REF, stage1_config, stage2_config, write_align_folder, write_shards

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def train(cfg_path: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "train.py", "--cfg-path", str(cfg_path), *extra],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def log_lines(job_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (job_dir / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    return {
        "laion": write_shards(root / "laion", n_shards=2, per_shard=6, corrupt=(4,)),  # one corrupt jpg
        "cc_sbu": write_shards(root / "cc_sbu", n_shards=1, per_shard=6),
    }


def test_help_needs_no_gpu():
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--cfg-path" in proc.stdout and "--resume" in proc.stdout


@pytest.mark.e2e
def test_stage1_then_stage2(shards, write_yaml, tmp_path):
    stage1 = stage1_config(shards, tmp_path / "s1", batch_size=3, iters_per_epoch=8, max_epoch=2)
    train(write_yaml(stage1))
    s1 = tmp_path / "s1" / "job"
    ckpt1 = s1 / "checkpoint_1.pth"
    assert set(weights(ckpt1)) == {"llama_proj.weight", "llama_proj.bias"}
    assert not torch.equal(weights(ckpt1)["llama_proj.weight"], torch.load(REF / "minigpt4_tiny.pth", weights_only=True)["model"]["llama_proj.weight"])
    epochs = [line for line in log_lines(s1) if "train_loss" in line]
    assert len(epochs) == 2 and epochs[-1]["train_broken_samples"] >= 1  # the corrupt sample was met, skipped, counted

    align = write_align_folder(tmp_path / "align", n=6)
    stage2 = stage2_config(align, tmp_path / "s2", ckpt=str(ckpt1), batch_size=3, iters_per_epoch=6, max_epoch=2)
    train(write_yaml(stage2))
    s2 = tmp_path / "s2" / "job"
    losses = [line["loss"] for line in log_lines(s2) if "global_step" in line]
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.01

    # stage 2 started from stage 1's projection and changed only it
    final = weights(s2 / "checkpoint_1.pth")
    assert set(final) == {"llama_proj.weight", "llama_proj.bias"}
    assert not torch.equal(final["llama_proj.weight"], weights(ckpt1)["llama_proj.weight"])
    start = MiniGPT4.from_config(stage2["model"]).state_dict()
    assert torch.equal(start["llama_proj.weight"], weights(ckpt1)["llama_proj.weight"])


@pytest.mark.e2e
def test_torchrun_two_cpu_processes_equal_one_with_the_doubled_batch(write_yaml, tmp_path):
    align = write_align_folder(tmp_path / "align", n=10, captions=["a box on a white background"])
    common = dict(iters_per_epoch=3, max_epoch=1, prompt_path=str(REF / "prompt_one.txt"))
    ddp_cfg = write_yaml(stage2_config(align, tmp_path / "ddp", batch_size=2, **common))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "train.py", "--cfg-path", str(ddp_cfg)],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    train(write_yaml(stage2_config(align, tmp_path / "one", batch_size=4, **common)))
    ddp = torch.load(tmp_path / "ddp" / "job" / "checkpoint_0.pth", weights_only=True)
    assert ddp["world_size"] == 2 and len(ddp["data_state"]) == 2
    one = weights(tmp_path / "one" / "job" / "checkpoint_0.pth")
    for name, tensor in one.items():
        torch.testing.assert_close(ddp["model"][name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.e2e
def test_sigkill_then_resume_auto_equals_an_uninterrupted_run(shards, write_yaml, tmp_path):
    run = dict(batch_size=4, iters_per_epoch=12, max_epoch=3, save_every_iters=4, num_workers=2)
    reference = tmp_path / "reference"
    train(write_yaml(stage1_config(shards, reference, **run)))

    killed = tmp_path / "killed"
    cfg = write_yaml(stage1_config(shards, killed, **run))
    proc = subprocess.Popen([sys.executable, "train.py", "--cfg-path", str(cfg)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    job = killed / "job"
    deadline = time.time() + 240
    while not list(job.glob("checkpoint_*.pth")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (job / "checkpoint_2.pth").exists(), "the run finished before it could be killed"
    assert list(job.glob("checkpoint_*.pth"))

    resumed = train(cfg, "--resume", "auto")
    assert "resumed from" in resumed.stderr
    want = torch.load(reference / "job" / "checkpoint_2.pth", weights_only=True)
    got = torch.load(job / "checkpoint_2.pth", weights_only=True)
    for name in want["model"]:
        assert torch.equal(got["model"][name], want["model"][name]), name
    for pid, state in want["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(got["optimizer"]["state"][pid][key], value), (pid, key)
    assert got["data_state"] == want["data_state"]


def test_missing_shard_folder_fails_with_the_key(write_yaml, tmp_path):
    cfg = stage1_config({"laion": str(tmp_path / "no_such_dir" / "{00000..00009}.tar")}, tmp_path / "out")
    proc = train(write_yaml(cfg), check=False)
    assert proc.returncode == 2
    assert "datasets.laion.build_info.storage: no such folder" in proc.stderr and "no_such_dir" in proc.stderr
    assert "Traceback" not in proc.stderr


def wait_for_steps(proc: subprocess.Popen, log: Path, steps: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count('"global_step"') >= steps:
            return
        time.sleep(0.01)
    raise AssertionError(f"the run ended or stalled before {steps} steps (exit code {proc.poll()})")


@pytest.mark.e2e
def test_sigterm_stops_after_the_step_with_a_checkpoint_and_resume_auto_continues_exactly(shards, write_yaml, tmp_path):
    run = dict(batch_size=4, iters_per_epoch=12, max_epoch=3, num_workers=2)  # no periodic checkpoints
    reference = tmp_path / "reference"
    train(write_yaml(stage1_config(shards, reference, **run)))

    stopped = tmp_path / "stopped"
    cfg = write_yaml(stage1_config(shards, stopped, **run))
    proc = subprocess.Popen([sys.executable, "train.py", "--cfg-path", str(cfg)], cwd=REPO, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    job = stopped / "job"
    wait_for_steps(proc, job / "log.txt", 3)
    os.killpg(proc.pid, signal.SIGTERM)  # as Slurm on preemption: the loader workers receive it too
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-4000:]
    assert "stopped by SIGTERM after iteration" in stderr and "--resume auto" in stderr
    assert "Traceback" not in stderr  # the loader workers outlived the last step
    last = [line for line in log_lines(job) if "global_step" in line][-1]
    done = last["iter"] + 1
    name = f"checkpoint_{last['epoch']}.pth" if done == 12 else f"checkpoint_{last['epoch']}_iter{done}.pth"
    assert [p.name for p in job.glob("checkpoint_*.pth")] == [name]  # written at the step it stopped after

    train(cfg, "--resume", "auto")
    want = torch.load(reference / "job" / "checkpoint_2.pth", weights_only=True)
    got = torch.load(job / "checkpoint_2.pth", weights_only=True)
    for name in want["model"]:
        assert torch.equal(got["model"][name], want["model"][name]), name
    assert got["data_state"] == want["data_state"]


@pytest.mark.e2e
def test_torchrun_sigterm_stops_every_rank_at_the_same_step_and_resumes(write_yaml, tmp_path):
    align = write_align_folder(tmp_path / "align", n=10)
    cfg = write_yaml(stage2_config(align, tmp_path / "ddp", batch_size=2, iters_per_epoch=10, max_epoch=2, num_workers=1))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "train.py", "--cfg-path", str(cfg)]
    proc = subprocess.Popen(torchrun, cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    job = tmp_path / "ddp" / "job"
    wait_for_steps(proc, job / "log.txt", 2)
    os.killpg(proc.pid, signal.SIGTERM)  # as Slurm on preemption; the agent passes it on to the ranks
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "stopped by SIGTERM after iteration" in stderr, stderr[-4000:]
    (ckpt,) = job.glob("checkpoint_*.pth")
    state = torch.load(ckpt, weights_only=True)
    assert state["world_size"] == 2 and len(state["data_state"]) == 2

    resumed = subprocess.run([*torchrun, "--resume", "auto"], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert (job / "checkpoint_1.pth").exists()
