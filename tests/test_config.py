"""Tests of the run configuration (`opdlab.config`) and `opdlab train --help`.

    python -m pytest tests/test_config.py -q
"""
from __future__ import annotations

import pytest
import yaml

from opdlab import cli
from opdlab.config import ConfigError, RunConfig, TrainConfig, describe, load_config, save_config
from opdlab.run import load_run_config


def flat_leaves(d: dict, prefix: str = "") -> dict:
    """Dotted leaf names of a nested dict (the independent enumeration of config fields); an empty dict is a leaf
    (a mapping field such as chat_template_kwargs)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def test_overrides_parse_types():
    cfg = load_config(None, [
        "train.lr=3e-4", "train.steps=7", "train.betas=[0.8, 0.95]", "objective.clip_eps=0.2",
        "objective.discount=0.5", "eval.length_buckets=[8,16]", "train.micro_batch_size=4",
        "rollout.top_p=1", "student.path=/some/dir", "run_dir=123", "device=0", "task.file.train_path=null",
        "task.file.solution_field=7"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.steps == 7 and isinstance(cfg.train.steps, int)
    assert cfg.train.betas == (0.8, 0.95)
    assert cfg.objective.clip_eps == 0.2 and cfg.objective.discount == 0.5
    assert cfg.eval.length_buckets == [8, 16]
    assert cfg.train.micro_batch_size == 4
    assert cfg.rollout.top_p == 1.0
    assert cfg.student.path == "/some/dir"
    assert cfg.run_dir == "123" and cfg.device == "0"  # text fields keep the text, even when it looks numeric
    assert cfg.task.file.train_path is None and cfg.task.file.solution_field == "7"  # a `str | None` field
    # overrides replace only what they name; everything else keeps its default
    assert cfg.train.seed == 0 and cfg.teacher.path == "builtin:teacher"
    assert load_config(None, ["objective.clip_eps=null"]).objective.clip_eps is None


def test_override_unknown_field_names_it_and_lists_allowed():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lrr=1"])
    msg = str(e.value)
    assert "train.lrr" in msg
    for allowed in TrainConfig.model_fields:
        assert allowed in msg
    with pytest.raises(ConfigError) as e:
        load_config(None, ["trian.lr=1"])
    assert "trian" in str(e.value) and "train" in str(e.value).split("trian", 1)[1]


def test_yaml_unknown_field_names_it_and_lists_allowed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {steps: 3, lrr: 0.1}\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "train.lrr" in msg and "unknown field" in msg and "max_bad_steps" in msg and str(path) in msg


@pytest.mark.parametrize("override, field, shown", [
    ("train.lr=-1", "train.lr", "-1"),
    ("train.lr=fast", "train.lr", "fast"),
    ("train.schedule=wavy", "train.schedule", "wavy"),
    ("rollout.top_p=1.5", "rollout.top_p", "1.5"),
    ("objective.name=nope", "objective.name", "nope"),
    ("task.arithmetic.min_steps=5", "task.arithmetic.min_steps", "5"),  # a cross-field rule: min_steps > max_steps (4)
])
def test_bad_value_names_field_and_value(override, field, shown):
    with pytest.raises(ConfigError) as e:
        load_run_config(None, [override])
    msg = str(e.value)
    assert field in msg and shown in msg, msg


def test_bad_value_lists_allowed_choices():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.schedule=wavy"])
    assert all(s in str(e.value) for s in ("constant", "linear", "cosine"))
    with pytest.raises(ConfigError) as e:
        load_run_config(None, ["objective.name=nope"])
    assert "opd" in str(e.value)


@pytest.mark.parametrize("override", ["train.lr", "=3", "train..lr=3"])
def test_malformed_override(override):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert override in str(e.value)


def test_bad_yaml_files(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping") as e:
        load_config(listy)
    assert "list" in str(e.value)
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="not found") as e:
        load_config(missing)
    assert str(missing) in str(e.value)
    section = tmp_path / "section.yaml"
    section.write_text("train: 5\n")
    with pytest.raises(ConfigError) as e:
        load_config(section)
    assert "train" in str(e.value)


def test_empty_yaml_is_refused_and_no_file_is_defaults(tmp_path):
    """An empty file is most likely the wrong file: it is refused (tests/test_bad_input.py); no file is defaults."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="empty"):
        load_config(empty)
    assert load_config(None) == RunConfig()


def test_describe_covers_every_leaf():
    rows = describe(RunConfig)
    names = [r[0] for r in rows]
    leaves = flat_leaves(RunConfig().model_dump())
    assert sorted(names) == sorted(leaves)
    assert len(names) == len(set(names))
    for name, _type, default, doc in rows:
        assert doc, f"{name} has no description"
        assert default == repr(leaves[name]), (name, default, leaves[name])


def test_train_help_lists_fields(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name, _type, _default, doc in describe(RunConfig):
        assert name in out, name
    assert "train.lr" in out and TrainConfig.model_fields["lr"].description in out
    assert "--resume" in out


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["train.lr=3e-4", "train.betas=[0.8,0.9]", "objective.clip_eps=0.1",
                             "eval.length_buckets=[4,8]", "student.path=/x/y", "task.arithmetic.max_steps=6",
                             "run_dir=r/1"])
    path = tmp_path / "config.yaml"
    save_config(cfg, path)
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    again = load_config(path)
    assert again == cfg
    assert again != RunConfig()
    # and a re-loaded file with overrides on top still works
    assert load_config(path, ["train.steps=3"]).train.steps == 3
