"""Tests of `task.file.train_path=hf://NAME[:CONFIG]` (opdlab.tasks.files through `datasets.load_dataset`), on local
data the tests write: a folder of data files (one per split), a folder with named configs in its README's YAML
header (as a hub dataset has them), GSM8K-style answers, and the errors (a missing field, an unknown split or
config, a loading script, a hub id while offline).

    python -m pytest tests/test_hub_datasets.py -q
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import datasets
import pytest

from opdlab.config import ConfigError, TaskConfig, load_config
from opdlab.tasks import make_task
from opdlab.tasks.base import ANSWER_INSTRUCTION


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def rows(prefix: str, n: int) -> list[dict]:
    return [{"problem": f"{prefix} {i} + {i}?", "solution": f"{i} + {i} = {2 * i}\n#### {2 * i}", "id": i}
            for i in range(n)]


def file_task(train_path: str, **file):
    return make_task(TaskConfig(name="file", test_size=2, file={"train_path": train_path, "question_field": "problem",
                                                                "answer_field": "solution",
                                                                "solution_field": "solution", **file}))


def test_folder_of_data_files_with_gsm8k_style_answers(tmp_path):
    write_jsonl(tmp_path / "ds" / "train.jsonl", rows("T", 6))
    write_jsonl(tmp_path / "ds" / "test.jsonl", rows("E", 3))
    task = file_task(f"hf://{tmp_path / 'ds'}")
    train, test = task.problems("train"), task.problems("test")
    assert [p.question for p in train] == [f"T {i} + {i}? {ANSWER_INSTRUCTION}" for i in range(6)]
    assert [p.question for p in test] == [f"E {i} + {i}? {ANSWER_INSTRUCTION}" for i in range(3)]  # the test split
    assert [p.answer for p in train] == [str(2 * i) for i in range(6)]  # the '#### N' line of the worked answer
    assert train[3].solution == "3 + 3 = 6\nAnswer: 6" and train[3].uid == "ds.train-3"
    assert task.verify(train[3], "3 + 3 = 6\nAnswer: 6") == 1.0 and task.verify(train[3], "Answer: 7") == 0.0
    # a split named differently, and a dataset without a test split: rows held out of training instead
    write_jsonl(tmp_path / "only" / "train.jsonl", rows("T", 6))
    held = file_task(f"hf://{tmp_path / 'only'}")
    assert len(held.problems("test")) == 2 and len(held.problems("train")) == 4
    assert not {p.question for p in held.problems("test")} & {p.question for p in held.problems("train")}


def test_named_configs_and_splits(tmp_path):
    root = tmp_path / "multi"
    write_jsonl(root / "easy" / "train.jsonl", rows("easy", 4))
    write_jsonl(root / "easy" / "validation.jsonl", rows("easy-val", 2))
    write_jsonl(root / "hard" / "train.jsonl", rows("hard", 5))
    (root / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: easy\n  data_files:\n  - {split: train, path: easy/train.jsonl}\n"
        "  - {split: validation, path: easy/validation.jsonl}\n"
        "- config_name: hard\n  data_files:\n  - {split: train, path: hard/train.jsonl}\n---\n")
    hard = file_task(f"hf://{root}:hard")
    # no test split in that config: 2 of its 5 rows held out, the rest trained on
    assert sorted(p.question.split("?")[0] for p in (*hard.problems("train"), *hard.problems("test"))) == \
        sorted(f"hard {i} + {i}" for i in range(5))
    assert len(hard.problems("test")) == 2
    easy = file_task(f"hf://{root}:easy", test_split="validation")
    assert [p.question.split("?")[0] for p in easy.problems("test")] == ["easy-val 0 + 0", "easy-val 1 + 1"]
    assert len(easy.problems("train")) == 4
    # the same data through the config: task.file.test_path takes an hf:// spec too
    cfg = load_config(None, ["task.name=file", f"task.file.train_path=hf://{root}:easy",
                             f"task.file.test_path=hf://{root}:easy", "task.file.test_split=validation",
                             "task.file.question_field=problem", "task.file.answer_field=solution"])
    assert len(make_task(cfg.task).problems("test")) == 2
    with pytest.raises(ValueError, match=r"could not load dataset '.*multi' \(config 'medium'\), split 'train'"):
        file_task(f"hf://{root}:medium")
    with pytest.raises(ValueError, match=r"could not load dataset '.*multi' \(config 'hard'\), split 'test'"):
        file_task(f"hf://{root}:hard", test_path=f"hf://{root}:hard")


def test_missing_field_names_the_dataset_and_the_fields(tmp_path):
    write_jsonl(tmp_path / "ds" / "train.jsonl", rows("T", 4))
    with pytest.raises(ValueError) as err:
        make_task(TaskConfig(name="file", file={"train_path": f"hf://{tmp_path / 'ds'}", "question_field": "question"}))
    assert f"hf://{tmp_path / 'ds'} (train): missing field 'question' (fields present: problem, solution, id)" \
        in str(err.value)


def test_a_loading_script_is_refused_with_what_to_do(tmp_path):
    script = tmp_path / "mymath" / "mymath.py"
    script.parent.mkdir()
    script.write_text("import datasets\nclass MyMath(datasets.GeneratorBasedBuilder):\n    pass\n")
    with pytest.raises(ValueError, match="is a dataset loading script, which datasets >= 4 no longer runs"):
        file_task(f"hf://{script}")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        file_task("hf://opdlab-test/no-such-dataset:main")
    msg = str(err.value)
    assert msg.startswith("could not load dataset 'opdlab-test/no-such-dataset' (config 'main'), split 'train': it "
                          "is not a local folder, and the Hugging Face hub is not reachable (offline mode is on)")
    assert "save_to_disk(DIR)" in msg and time.perf_counter() - start < 10


def test_bare_hub_id_hints_at_the_prefix():
    with pytest.raises(FileNotFoundError, match=r"for a dataset by name, write hf://openai/gsm8k"):
        file_task("openai/gsm8k")


def test_empty_hub_name_is_a_config_error():
    with pytest.raises((ConfigError, ValueError), match="no dataset name after 'hf://'"):
        file_task("hf://")
