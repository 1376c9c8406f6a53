"""FSDP2 on CPU (gloo): two sharded processes train exactly as one process on the same global batch, the core is
gathered once per step whatever the depth, ranks that drew different depths stop with an error instead of hanging,
and sharded checkpoints resume after a kill (on the same or another number of processes) and export a model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recurrent_lm.loading import load_model

from .test_train import DEBUG, ROOT

RUN = Path(__file__).parent / "fsdp_run.py"
pytestmark = pytest.mark.skipif(torch.torch_version.TorchVersion(torch.__version__) < "2.7",
                                reason="FSDP2 on CPU needs torch >= 2.7 (CPU streams)")
FSDP2 = ["--trainer.strategy.class_path", "recurrent_lm.train.parallel.FSDP2Strategy"]


def fsdp_run(tmp_path, name: str, *options) -> subprocess.CompletedProcess:
    out = tmp_path / f"{name}.json"
    done = subprocess.run([sys.executable, str(RUN), str(out), *options], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "WANDB_MODE": "disabled"})
    done.rows = json.loads(out.read_text()) if out.is_file() else None
    return done


def test_two_fsdp2_processes_train_as_one_process_and_gather_the_core_once_per_step(tmp_path):
    """20 steps at random depth (truncated backprop included): the losses of 2 FSDP2 processes, averaged over ranks,
    equal 1 process's on the same global batch to float32 tolerance; the FSDP2 units gathered per step do not grow
    with the no-grad depth, and do when the core reshards after every application (what the plan avoids); with
    activation checkpointing of the core the losses stay the same."""
    one = fsdp_run(tmp_path, "one", "--devices", "1", "--steps", "20")
    two = fsdp_run(tmp_path, "two", "--devices", "2", "--steps", "20")
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    assert [r["depth"] for r in one.rows] == [r["depth"] for r in two.rows]
    assert len({r["depth"][0] for r in two.rows}) > 2, "the no-grad depth varies"
    for a, b in zip(one.rows, two.rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-5), (a, b)
    assert one.rows[-1]["loss"] < 0.6 * one.rows[0]["loss"]
    by_grad = {}
    for row in two.rows:
        by_grad.setdefault(row["depth"][1], set()).add(row["all_gathers"])
    assert all(len(counts) == 1 for counts in by_grad.values()), by_grad
    recomputing = fsdp_run(tmp_path, "recomputing", "--devices", "2", "--steps", "4", "--activation-checkpointing")
    assert [r["loss"] for r in recomputing.rows] == pytest.approx([r["loss"] for r in one.rows[:4]], rel=1e-5)
    resharding = fsdp_run(tmp_path, "resharding", "--devices", "2", "--steps", "4", "--reshard-core")
    counts = {sum(r["depth"]): r["all_gathers"] for r in resharding.rows}
    assert len(set(counts.values())) > 1 and max(counts.values()) > max(c for s in by_grad.values() for c in s)


def test_ranks_that_draw_different_depths_stop_with_an_error_not_a_hang(tmp_path):
    skewed = fsdp_run(tmp_path, "skewed", "--devices", "2", "--steps", "3", "--skew-depth")
    assert skewed.returncode != 0
    assert "ranks drew different depths" in skewed.stderr


def train_fsdp2(root: Path, *options) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "recurrent_lm.cli", "train", "--config", DEBUG, "--trainer.default_root_dir", str(root),
           "--trainer.logger.init_args.save_dir", str(root), "--trainer.limit_val_batches", "0",
           "--trainer.callbacks.init_args.every_n_train_steps", "4", "--model.architecture.init_scale", "0", *FSDP2,
           *options]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "WANDB_MODE": "disabled"})


def finished(process: subprocess.Popen) -> None:
    assert process.wait(timeout=400) == 0, process.stderr.read().decode()[-3000:]


@pytest.mark.slow
def test_a_killed_fsdp2_run_resumes_on_the_same_or_another_number_of_processes_and_exports(tmp_path):
    """(about 2 minutes on 2 cores) A 2-process FSDP2 run killed after a sharded checkpoint resumes to the same
    weights as an uninterrupted one; resumed on 1 process it finishes from the same step; `rlm export` of the
    sharded checkpoint gives the exported model, which loads and generates. A sharded checkpoint resumed without
    FSDP2, or into another architecture, is a one-line error before any shard loads."""
    full = tmp_path / "full"  # validating at its end too: greedy answers with sharded weights (synced_gpus)
    finished(train_fsdp2(full, "--trainer.max_steps", "12", "--trainer.devices", "2", "--trainer.limit_val_batches",
                         "1", "--trainer.val_check_interval", "12", "--data.val_problems_per_difficulty", "2"))
    killed = tmp_path / "killed"
    process = train_fsdp2(killed, "--trainer.max_steps", "12", "--trainer.devices", "2")
    checkpoint = killed / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not (checkpoint / "meta.pt").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)  # both ranks, mid-run
    process.wait()
    step = torch.load(checkpoint / "meta.pt", weights_only=True)["global_step"]
    assert 0 < step < 12 and not (killed / "model").exists()

    finished(train_fsdp2(killed, "--trainer.max_steps", "12", "--trainer.devices", "2", "--ckpt_path", "last"))
    a, b = load_file(full / "model" / "model.safetensors"), load_file(killed / "model" / "model.safetensors")
    for key in a:  # same data streams, same depth draws, same schedule: the same weights
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)

    subprocess.run([sys.executable, "-m", "recurrent_lm.cli", "export", str(killed / "checkpoints" / "last.ckpt"),
                    str(tmp_path / "exported")], check=True, cwd=ROOT, capture_output=True)
    c = load_file(tmp_path / "exported" / "model.safetensors")
    assert all(torch.equal(b[key], c[key]) for key in b)

    # the 2-process run goes on in 1 process: its shards are resharded on load
    (killed / "model").rename(tmp_path / "model-at-12")
    finished(train_fsdp2(killed, "--trainer.max_steps", "16", "--trainer.devices", "1", "--ckpt_path", "last"))
    assert torch.load(checkpoint / "meta.pt", weights_only=True)["global_step"] == 16
    # a sharded checkpoint resumed without FSDP2, or into another architecture: one line, before any shard loads
    where = ["--trainer.default_root_dir", str(killed), "--trainer.logger.init_args.save_dir", str(killed),
             "--model.architecture.init_scale", "0", "--trainer.max_steps", "20", "--ckpt_path", "last"]
    assert "a sharded checkpoint (FSDP2) resumes under trainer.strategy" in refused(*where)
    assert "the checkpoint is of another architecture" in refused(*where, *FSDP2, "--model.architecture.hidden_size",
                                                                  "32")
    model = load_model(killed / "model")
    out = model.generate(torch.tensor([[1, 5, 6]]), num_steps=2, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 6)


def refused(*options) -> str:
    """The last stderr line of an `rlm train` of the debug recipe that must fail."""
    done = subprocess.run([sys.executable, "-m", "recurrent_lm.cli", "train", "--config", DEBUG,
                           "--trainer.limit_val_batches", "0", "--trainer.max_steps", "8",
                           "--trainer.callbacks.init_args.every_n_train_steps", "4", *options],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode != 0
    return done.stderr.strip().splitlines()[-1]


def test_fsdp2_with_float16_is_refused_in_one_line(tmp_path):
    root = tmp_path / "run"
    assert "FSDP2 with float16 needs a sharded gradient scaler" in refused(
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root), *FSDP2,
        "--model.sharding.param_dtype", "float16")


def test_a_sharding_strategy_other_than_fsdp2strategy_is_refused_at_start(tmp_path):
    """rlm train checks the strategy when it builds the trainer: nothing is written, no process group starts."""
    root = tmp_path / "run"
    assert "rlm train shards with FSDP2 through recurrent_lm.train.parallel.FSDP2Strategy" in refused(
        "--trainer.default_root_dir", str(root), "--trainer.logger.init_args.save_dir", str(root),
        "--trainer.strategy.class_path", "lightning.pytorch.strategies.ModelParallelStrategy")
    assert not root.exists()
