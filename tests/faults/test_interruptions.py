"""Runs killed at random moments, a damaged latest checkpoint, data that changes under a resumed run, and a disk
that fills up: each either ends at the weights of an uninterrupted run or stops with the last good checkpoint
intact.

    python -m pytest tests/faults/test_interruptions.py -q
"""
from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from opdlab.checkpoint import list_checkpoints
from opdlab.train import TrainingError, train
from faults.test_preemption import start, write_config
from test_train import SUBPROCESS_TIMEOUT, assert_same_weights, make_cfg, metric_rows, opdlab_command, weights


def test_killed_at_random_moments_many_times_resumes_to_the_same_weights(model_dirs, tmp_path):
    """kill -9 four times at seeded random moments of a run that checkpoints every step (so most kills land in or
    near a checkpoint write); each time `--resume` from whatever is on disk. The end is the uninterrupted run."""
    rng, run, total = random.Random(0), tmp_path / "killed", 40
    config = write_config(tmp_path / "run.yaml", model_dirs, run, f"train.steps={total}", "train.save_every=1")
    kills = 0
    while kills < 4:
        resume = ["--resume"] if list_checkpoints(run / "checkpoints") else []
        proc = start([*opdlab_command(), "train", str(config), *resume], tmp_path / f"run{kills}.log")
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        # wait for the run to get going (a metrics line after the last one on disk), then a random moment more
        seen = len(metric_rows(run)) if (run / "metrics.jsonl").is_file() else 0
        while proc.poll() is None and time.monotonic() < deadline:
            if (run / "metrics.jsonl").is_file() and len(metric_rows(run)) > seen:
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.1))
        if proc.poll() is not None:  # finished before the kill: nothing more to interrupt
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        kills += 1
    if list_checkpoints(run / "checkpoints")[-1].name != f"step-{total:06d}":
        proc = start([*opdlab_command(), "train", str(config), "--resume"], tmp_path / "final.log")
        assert proc.wait(timeout=SUBPROCESS_TIMEOUT) == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert kills >= 3
    reference = tmp_path / "reference"
    train(make_cfg(model_dirs, reference, f"train.steps={total}"), progress=False)
    assert_same_weights(weights(run, total), weights(reference, total), atol=0)
    assert [r["step"] for r in metric_rows(run)] == list(range(1, total + 1))
    assert not list((run / "checkpoints").glob(".step-*.tmp-*"))  # what the kills left was cleaned up


@pytest.mark.parametrize("damage", ["truncated_weights", "truncated_state", "missing_weights"])
def test_damaged_latest_checkpoint_falls_back_to_the_one_before(model_dirs, tmp_path, capsys, damage):
    run = tmp_path / "damaged"
    train(make_cfg(model_dirs, run, "train.steps=3", "train.save_every=1", "train.keep_checkpoints=3"),
          progress=False)
    latest = run / "checkpoints" / "step-000003"
    target = {"truncated_weights": latest / "model" / "model.safetensors",
              "truncated_state": latest / "trainer_state.pt",
              "missing_weights": latest / "model" / "model.safetensors"}[damage]
    if damage == "missing_weights":
        target.unlink()
    else:
        with open(target, "r+b") as f:
            f.truncate(target.stat().st_size // 2)
    capsys.readouterr()
    train(make_cfg(model_dirs, run, "train.steps=5", "train.save_every=1", "train.keep_checkpoints=3"), resume=True,
          progress=False)
    err = capsys.readouterr().err
    assert f"checkpoint {latest} cannot be read" in err and "falling back" in err
    reference = tmp_path / "reference"
    train(make_cfg(model_dirs, reference, "train.steps=5"), progress=False)
    assert_same_weights(weights(run, 5), weights(reference, 5), atol=0)
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3, 4, 5]  # step 3 redone from step 2


def test_data_that_changes_under_a_resumed_run_is_refused(model_dirs, tmp_path):
    data = tmp_path / "qa.jsonl"
    rows = [{"question": f"What is {i} plus 1?", "answer": str(i + 1)} for i in range(20)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = ["task.name=file", f"task.file.train_path={data}", f"task.file.test_path={data}",
            "task.file.solution_field=null"]
    run = tmp_path / "run"
    train(make_cfg(model_dirs, run, "train.steps=2", *task), progress=False)
    train(make_cfg(model_dirs, run, "train.steps=3", *task), resume=True, progress=False)  # same data: fine
    rows[5]["answer"] = "7"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(TrainingError, match=f"training problems of {data} are not those the run started on"):
        train(make_cfg(model_dirs, run, "train.steps=4", *task), resume=True, progress=False)
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3]
    train(make_cfg(model_dirs, run, "train.steps=4", *task, "task.allow_data_change=true"), resume=True,
          progress=False)
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3, 4]


def test_checkpoint_without_a_data_digest_resumes_with_a_warning(model_dirs, tmp_path, capsys):
    run = tmp_path / "old"
    train(make_cfg(model_dirs, run, "train.steps=1"), progress=False)
    path = run / "checkpoints" / "step-000001" / "trainer_state.pt"
    state = torch.load(path, weights_only=False)
    del state["data_digest"]  # as a checkpoint of an earlier version
    torch.save(state, path)
    capsys.readouterr()
    train(make_cfg(model_dirs, run, "train.steps=2"), resume=True, progress=False)
    assert "does not record its training data" in capsys.readouterr().err


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a few hundred KiB (needs root and `mount`; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()

    def make(size_bytes: int) -> Path:
        size = max(4096, size_bytes // 4096 * 4096)
        got = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
        if got.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {got.stderr.decode().strip()}")
        return mount

    yield make
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_a_disk_that_fills_up_stops_the_run_with_the_last_checkpoint_intact(model_dirs, tmp_path, small_disk):
    probe = tmp_path / "probe"  # how much one checkpoint and the run's files take
    train(make_cfg(model_dirs, probe, "train.steps=1", "train.save_every=1"), progress=False)
    one = sum(f.stat().st_size for f in probe.rglob("*") if f.is_file())
    ckpt = sum(f.stat().st_size for f in (probe / "checkpoints").rglob("*") if f.is_file())
    disk = small_disk(one + ckpt // 2)  # the first checkpoint fits, the second does not
    run = disk / "run"
    config = write_config(tmp_path / "run.yaml", model_dirs, run, "train.steps=6", "train.save_every=1",
                          "train.keep_checkpoints=5")
    proc = start([*opdlab_command(), "train", str(config)], tmp_path / "full.log")
    assert proc.wait(timeout=SUBPROCESS_TIMEOUT) == 1
    out = (tmp_path / "full.log").read_text()
    assert "No space left on device" in out and "Traceback" not in out, out[-3000:]
    assert not list((run / "checkpoints").glob(".step-*.tmp-*"))  # no half-written copy left
    kept = list_checkpoints(run / "checkpoints")
    assert kept and all((c / "trainer_state.pt").is_file() for c in kept)
    # moved to a disk with room, the run resumes from what was kept and ends where an uninterrupted run does
    moved = tmp_path / "moved"
    shutil.copytree(run, moved)
    train(make_cfg(model_dirs, moved, "train.steps=6", "train.save_every=1", "train.keep_checkpoints=5"),
          resume=True, progress=False)
    reference = tmp_path / "reference"
    train(make_cfg(model_dirs, reference, "train.steps=6"), progress=False)
    assert_same_weights(weights(moved, 6), weights(reference, 6), atol=0)
