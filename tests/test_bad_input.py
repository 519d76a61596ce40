"""Bad input that used to pass silently or fail with a raw traceback: an empty or duplicated-key YAML file, a demo
run_dir override, a model path that does not exist, serve-teacher on a port in use.

    python -m pytest tests/test_bad_input.py -q
"""
from __future__ import annotations

import os
import socket
import subprocess

import pytest
import torch

from opdlab.config import ConfigError, load_config
from opdlab.models.loading import ModelLoadError, check_local
from opdlab.teacher.serve import check_port
from test_train import SUBPROCESS_TIMEOUT, opdlab_command, subprocess_env


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_config_file_is_an_error(tmp_path, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="empty"):
        load_config(path)


def test_key_given_twice_is_an_error_naming_it_and_its_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  lr: 1.0e-4\n  steps: 3\n  lr: 3.0e-4\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "'lr' is given twice" in str(e.value) and "lines 2 and 4" in str(e.value)
    path.write_text("train: {steps: 3}\ntrain: {lr: 1.0e-4}\n")
    with pytest.raises(ConfigError, match="'train' is given twice"):
        load_config(path)
    path.write_text("train: {steps: 3}\neval: {k: 2}\n")  # the same key in two sections is fine
    assert load_config(path).train.steps == 3


def test_missing_local_model_path_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path in ("runs/none", "./none", "a/b/c", str(tmp_path / "none")):
        with pytest.raises(ModelLoadError, match="does not exist"):
            check_local(path)
    check_local("Qwen/Qwen3-8B")  # a hub id: left to the hub (and its offline error)
    check_local("gpt2")


def test_serve_teacher_on_a_port_in_use_says_so(model_dirs):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ValueError, match="another process listens there"):
            check_port("127.0.0.1", port)
        proc = subprocess.run([*opdlab_command(), "serve-teacher", str(model_dirs["teacher"]), "--port", str(port)],
                              env=subprocess_env(), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr


def test_demo_run_dir_override_is_honoured(monkeypatch, tmp_path):
    """`opdlab demo run_dir=X` writes to X (it used to be replaced by the --run-dir default)."""
    from opdlab.experiments import demo
    seen, real = {}, demo.load_run_config
    monkeypatch.setattr(demo, "prepare_pair", lambda *a, **k: None)

    def load_and_stop(path, overrides):  # the config the demo would run, then stop before any compute
        seen["cfg"] = real(path, overrides)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "load_run_config", load_and_stop)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo("runs/demo", [f"run_dir={tmp_path / 'mine'}"])
    assert seen["cfg"].run_dir == str(tmp_path / "mine")
    seen.clear()
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(str(tmp_path / "default"), [])
    assert seen["cfg"].run_dir == str(tmp_path / "default")


# ---------------------------------------------------------------- the run directory


def _train_cli(model_dirs, run, *extra) -> int:
    from opdlab import cli
    from test_train import overrides
    return cli.main(["train", "-", *overrides(model_dirs, run, *extra)])


@pytest.mark.parametrize("layout, words", [
    ("run_dir_is_file", "is a file, not a directory"),
    ("checkpoints_is_file", "checkpoints should be a directory"),
    ("metrics_is_dir", "metrics.jsonl should be a file"),
])
def test_run_dir_of_the_wrong_kind_is_refused_before_any_compute(model_dirs, tmp_path, capsys, monkeypatch,
                                                                 layout, words):
    import opdlab.run
    run = tmp_path / "run"
    if layout == "run_dir_is_file":
        run.write_text("")
    else:
        run.mkdir()
        (run / "checkpoints").write_text("") if layout == "checkpoints_is_file" else (run / "metrics.jsonl").mkdir()
    loads = []
    monkeypatch.setattr(opdlab.run, "load_model", lambda *a, **k: loads.append(a) or 1 / 0)
    assert _train_cli(model_dirs, run) == 1
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and not loads  # no model was loaded


def test_unwritable_run_dir_is_refused(model_dirs, tmp_path, capsys):
    assert _train_cli(model_dirs, "/proc/opdlab-run") == 1  # /proc refuses new entries, even to root
    err = capsys.readouterr().err
    assert "run_dir /proc/opdlab-run is not writable" in err and "Traceback" not in err


def test_too_little_free_space_for_one_checkpoint_is_refused(model_dirs, tmp_path, capsys, monkeypatch):
    import shutil as real_shutil

    import opdlab.run
    from opdlab.checkpoint import checkpoint_bytes
    from transformers import AutoModelForCausalLM
    need = checkpoint_bytes(AutoModelForCausalLM.from_pretrained(model_dirs["student"]))
    usage = real_shutil.disk_usage(tmp_path)
    monkeypatch.setattr(opdlab.run.shutil, "disk_usage", lambda p: usage._replace(free=need - 1))
    assert _train_cli(model_dirs, tmp_path / "full") == 1
    err = capsys.readouterr().err
    assert "MiB free" in err and "one checkpoint of this student needs" in err
    assert not (tmp_path / "full" / "metrics.jsonl").exists()
    # and the estimate is of the right size: a checkpoint on disk holds the weights and two Adam moments
    monkeypatch.undo()
    run = tmp_path / "sized"
    assert _train_cli(model_dirs, run, "train.steps=1") == 0
    ckpt = next((run / "checkpoints").glob("step-*"))
    on_disk = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    assert 0.8 * need < on_disk < 1.5 * need


def test_failed_checkpoint_write_is_a_clear_error_and_leaves_the_previous_one(model_dirs, tmp_path, capsys,
                                                                              monkeypatch):
    import errno

    import opdlab.checkpoint
    from test_train import weights
    run, real, calls = tmp_path / "enospc", opdlab.checkpoint.torch.save, []

    def save_then_fill(obj, f, *a, **k):  # the second checkpoint's trainer state meets a full disk
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", str(f.name))
        return real(obj, f, *a, **k)

    monkeypatch.setattr(opdlab.checkpoint.torch, "save", save_then_fill)
    assert _train_cli(model_dirs, run, "train.steps=4", "train.save_every=2") == 1
    err = capsys.readouterr().err
    assert "No space left on device" in err and "step-000002 is intact" in err and "Traceback" not in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-000002"]
    assert all(torch.isfinite(v).all() for v in weights(run, 2).values())


def test_stale_temporary_checkpoints_are_removed_at_start(model_dirs, tmp_path, capsys):
    run = tmp_path / "stale"
    assert _train_cli(model_dirs, run, "train.steps=2") == 0
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = run / "checkpoints" / f".step-000004.tmp-{dead.pid}"
    (stale / "model").mkdir(parents=True)
    alive = run / "checkpoints" / f".step-000004.tmp-{os.getppid()}"  # a live process's write: left alone
    alive.mkdir()
    capsys.readouterr()
    from opdlab import cli
    from test_train import overrides
    assert cli.main(["train", "-", *overrides(model_dirs, run, "train.steps=3"), "--resume"]) == 0
    assert "removed 1 temporary checkpoint directory" in capsys.readouterr().err
    assert not stale.exists() and alive.exists()


def test_demo_refuses_to_replace_a_finished_run_without_force(monkeypatch, tmp_path, capsys):
    from opdlab import cli
    from opdlab.experiments import demo
    prepared = []

    def prepare_and_stop(*a, **k):  # stop before any compute
        prepared.append(a)
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "prepare_pair", prepare_and_stop)
    monkeypatch.setattr(demo, "set_threads", lambda n: n)  # the demo pins 2 threads: not for the rest of the tests
    run = tmp_path / "done"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    (run / "checkpoints" / "step-000002" / "trainer_state.pt").write_bytes(b"")
    assert cli.main(["demo", "--run-dir", str(run), "train.steps=2"]) == 1
    err = capsys.readouterr().err
    assert "already holds a finished run" in err and "--force" in err and "Traceback" not in err
    assert (run / "checkpoints" / "step-000002" / "trainer_state.pt").exists() and not prepared
    assert cli.main(["demo", "--run-dir", str(run), "--force", "train.steps=2"]) == 130  # replaced, then stopped
    assert not run.exists() and prepared
