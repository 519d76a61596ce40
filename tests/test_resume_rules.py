"""What `--resume` may change: the resumable fields apply (and config.yaml records them), the others are refused
with a message naming them, and overrides may follow the flag on the command line.

    python -m pytest tests/test_resume_rules.py -q
"""
from __future__ import annotations

import pytest
import yaml

from opdlab import cli
from opdlab.run import RESUMABLE, resumable
from opdlab.train import TrainingError, train
from test_train import make_cfg, metric_rows, overrides


def test_changed_learning_rate_is_refused_and_nothing_is_touched(model_dirs, tmp_path):
    run = tmp_path / "run"
    train(make_cfg(model_dirs, run, "train.steps=2"), progress=False)
    saved = (run / "config.yaml").read_text()
    with pytest.raises(TrainingError) as e:
        train(make_cfg(model_dirs, run, "train.steps=4", "train.lr=3e-3", "rollout.max_new_tokens=6"),
              resume=True, progress=False)
    msg = str(e.value)
    assert "train.lr: 0.001 -> 0.003" in msg and "rollout.max_new_tokens: 8 -> 6" in msg
    assert "train.steps" not in msg.split("may change only")[0]  # a resumable change is not among the refused
    assert (run / "config.yaml").read_text() == saved
    assert [r["step"] for r in metric_rows(run)] == [1, 2]


def test_resumable_changes_apply_and_are_recorded(model_dirs, tmp_path, capsys):
    run = tmp_path / "run"
    train(make_cfg(model_dirs, run, "train.steps=2"), progress=False)
    train(make_cfg(model_dirs, run, "train.steps=3", "train.save_every=3", "train.keep_checkpoints=3"),
          resume=True, progress=False)
    assert "resume: train.steps: 2 -> 3" in capsys.readouterr().err
    recorded = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (recorded["steps"], recorded["save_every"], recorded["keep_checkpoints"]) == (3, 3, 3)
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3]


def test_cli_takes_overrides_after_resume(model_dirs, tmp_path, capsys):
    run = tmp_path / "cli"
    assert cli.main(["train", "-", *overrides(model_dirs, run, "train.steps=2")]) == 0
    args = overrides(model_dirs, run)
    assert cli.main(["train", "-", *args[:3], "--resume", *args[3:], "train.steps=3"]) == 0
    assert [r["step"] for r in metric_rows(run)] == [1, 2, 3]
    code = cli.main(["train", "-", *args, "--resume", "train.steps=4", "train.lr=1e-2"])
    err = capsys.readouterr().err
    assert code == 1 and "--resume cannot change train.lr" in err and "Traceback" not in err


def test_resumable_patterns():
    assert resumable("train.steps") and resumable("track.backends") and resumable("remote_teacher.url")
    assert not resumable("train.lr") and not resumable("student.path") and not resumable("train.stepsize")
    assert all(r.count("*") <= 1 for r in RESUMABLE)
