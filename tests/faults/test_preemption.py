"""SIGTERM / SIGINT, as a cluster preempts a job: the step under way ends, a checkpoint is written, the process exits
with PREEMPTED_EXIT_CODE, and `--resume` ends at the weights of an uninterrupted run. In one process through the CLI,
and in two (torchrun, gloo), where torchrun passes the signal on to both workers.

    python -m pytest tests/faults/test_preemption.py -q
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from opdlab.config import load_config
from opdlab.runtime import PREEMPTED_EXIT_CODE, StopSignals
from opdlab.train import train
from test_distributed import free_port
from test_train import (SUBPROCESS_TIMEOUT, assert_same_weights, make_cfg, metric_rows, opdlab_command, overrides,
                        subprocess_env, weights)


def write_config(path: Path, model_dirs, run: Path, *extra) -> Path:
    path.write_text(yaml.safe_dump(load_config(None, overrides(model_dirs, run, *extra)).model_dump(mode="json")))
    return path


def signal_after(proc: subprocess.Popen, run: Path, steps: int, sig: int, log: Path) -> None:
    """Send `sig` to `proc` once `run` has logged `steps` steps; wait for it to exit."""
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT
    metrics = run / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert proc.poll() is None, f"training exited early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no progress before the timeout"
        time.sleep(0.02)
    proc.send_signal(sig)
    proc.wait(timeout=SUBPROCESS_TIMEOUT)


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=subprocess_env())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_checkpoints_exits_75_and_resumes_exactly(model_dirs, tmp_path, sig):
    run, log = tmp_path / "preempted", tmp_path / "preempted.log"
    # far more steps than will run, no periodic checkpoint: the only checkpoint is the one the signal makes
    config = write_config(tmp_path / "run.yaml", model_dirs, run, "train.steps=100000", "train.save_every=100000")
    proc = start([*opdlab_command(), "train", str(config)], log)
    signal_after(proc, run, 2, sig, log)
    out = log.read_text()
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    assert f"stopped by {signal.Signals(sig).name} after step" in out and "Traceback" not in out
    done = len(metric_rows(run))
    ckpts = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert ckpts == [f"step-{done:06d}"]  # the step it reached, and that step's metrics were logged
    total = done + 2
    train(make_cfg(model_dirs, run, f"train.steps={total}", "train.save_every=100000"), resume=True, progress=False)
    reference = tmp_path / "reference"
    train(make_cfg(model_dirs, reference, f"train.steps={total}", "train.save_every=100000"), progress=False)
    assert_same_weights(weights(run, total), weights(reference, total), atol=0)
    assert [r["step"] for r in metric_rows(run)] == list(range(1, total + 1))


def torchrun(config: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "-m", "opdlab.cli", "train", str(config), *flags]


def test_sigterm_to_torchrun_stops_both_processes_at_one_checkpoint(model_dirs, tmp_path):
    run, log = tmp_path / "ddp", tmp_path / "ddp.log"
    batch = ["rollout.prompts_per_step=4", "train.save_every=100000"]
    config = write_config(tmp_path / "ddp.yaml", model_dirs, run, "train.steps=100000", *batch)
    proc = start(torchrun(config), log)
    signal_after(proc, run, 2, signal.SIGTERM, log)
    out = log.read_text()
    assert "stopped by SIGTERM after step" in out, out[-3000:]
    assert proc.returncode != 0  # torchrun reports its workers' non-zero exit
    done = len(metric_rows(run))
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == [f"step-{done:06d}"]
    total = done + 1
    resumed = start(torchrun(write_config(tmp_path / "ddp2.yaml", model_dirs, run, f"train.steps={total}", *batch),
                             "--resume"), tmp_path / "resumed.log")
    assert resumed.wait(timeout=SUBPROCESS_TIMEOUT) == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    reference = tmp_path / "reference"
    ref = start(torchrun(write_config(tmp_path / "ref.yaml", model_dirs, reference, f"train.steps={total}", *batch)),
                tmp_path / "ref.log")
    assert ref.wait(timeout=SUBPROCESS_TIMEOUT) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert_same_weights(weights(run, total), weights(reference, total), atol=0)


def test_stop_signals_record_then_restore_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop:
        assert not stop.requested
        signal.raise_signal(signal.SIGTERM)  # recorded, not fatal
        assert stop.requested and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):  # a second one interrupts at once
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before
