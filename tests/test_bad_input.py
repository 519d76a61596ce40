"""Bad input that used to pass silently or fail with a raw traceback: an empty or duplicated-key YAML file, a demo
run_dir override, a model path that does not exist, serve-teacher on a port in use.

    python -m pytest tests/test_bad_input.py -q
"""
from __future__ import annotations

import socket
import subprocess

import pytest

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
