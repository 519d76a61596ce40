"""The built-in pairs (`opdlab.experiments.pairs`): recipes, the cache check, pruned students.

    python -m pytest tests/test_pairs.py -q

`prepare_pair` runs here on a stand-in pair of the tiny built-in sizes (a few SFT steps), with the SmolLM2 pair's
structure: a teacher warm-started from a base directory, then a student pruned from that teacher and repaired.
"""
from __future__ import annotations

import json

import pytest
import yaml
from rich.console import Console

from opdlab.config import TaskConfig, load_config
from opdlab.experiments import pairs
from opdlab.experiments.pairs import PAIRS, ModelRecipe, Pair, get_pair, is_prepared, prepare_pair
from opdlab.models.loading import builtin_dir
from opdlab.models.zoo import PRUNING_FILE

TINY = dict(task=TaskConfig(arithmetic={"min_steps": 1, "max_steps": 2, "max_value": 19}), steps=2, batch_size=4,
            lr=1e-3, warmup_steps=0, precision="fp32", device="cpu")


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OPDLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_every_pair_config_loads_and_names_its_models():
    for pair in PAIRS.values():
        cfg = load_config(pair.config_path())
        names = {f"builtin:{r.name}" for r in pair.models}
        assert {cfg.student.path, cfg.teacher.path} == names, pair.name
    with pytest.raises(ValueError, match="smollm2"):
        get_pair("qwen")


def test_prepare_builds_a_pruned_student_from_the_teacher_and_caches_both(cache, monkeypatch, model_dirs):
    teacher = ModelRecipe("t-tiny", dict(TINY, seed=0), base=lambda: model_dirs["teacher"])
    student = ModelRecipe("s-tiny", dict(TINY, seed=1), prune_from=("t-tiny", 1))
    monkeypatch.setitem(PAIRS, "tiny", Pair("tiny", "tiny pair", "demo.yaml", (teacher, student)))
    log = Console(record=True, width=200)
    prepare_pair("tiny", console=log)
    assert is_prepared(teacher) and is_prepared(student)
    pruned = json.loads((builtin_dir(".s-tiny-pruned") / PRUNING_FILE).read_text())
    assert pruned["kept_layers"] == [0] and pruned["source_num_layers"] == 2  # the 2-layer teacher, 1 kept
    assert json.loads((builtin_dir("s-tiny") / "config.json").read_text())["num_hidden_layers"] == 1
    prepare_pair("tiny", console=log)  # second call: both cached
    assert log.export_text().count("cached at") == 2
    # a changed recipe is not the cached model
    changed = ModelRecipe("s-tiny", dict(TINY, seed=1, steps=3), prune_from=("t-tiny", 1))
    assert not is_prepared(changed)
    # rebuilding the teacher rebuilds the student pruned from it
    prepare_pair("tiny", force=True, console=log)
    assert "1 layers of t-tiny" in log.export_text()


def test_a_model_made_at_the_precision_auto_stands_for_is_the_auto_recipe(cache, monkeypatch):
    # a model cached with precision bf16-mixed is the recipe asking for 'auto' where auto is bf16-mixed, and not
    # where auto is fp32; an explicit different precision is another recipe
    import opdlab.runtime as runtime
    made = ModelRecipe("m-tiny", dict(TINY, precision="bf16-mixed"))
    out = builtin_dir("m-tiny")
    out.mkdir(parents=True)
    (out / "sft_config.yaml").write_text(yaml.safe_dump(made.sft_config().model_dump(mode="json")))
    auto = ModelRecipe("m-tiny", dict(TINY, precision="auto"))
    monkeypatch.setattr(runtime, "bf16_is_fast", lambda device: True)
    assert is_prepared(made) and is_prepared(auto)
    assert not is_prepared(ModelRecipe("m-tiny", dict(TINY, precision="fp32")))
    monkeypatch.setattr(runtime, "bf16_is_fast", lambda device: False)
    assert is_prepared(made) and not is_prepared(auto)


def test_smollm2_recipes_chain_teacher_to_student():
    smol = get_pair("smollm2")
    teacher, student = smol.models
    assert teacher.base is not None and student.prune_from == (teacher.name, 24)
    assert teacher.sft["task"].arithmetic.style == "words" == student.sft["task"].arithmetic.style
    assert pairs.BUILTIN.models[1].sft["task"].arithmetic.shortcut_frac == 0.5
    assert student.sft["task"].arithmetic.shortcut_frac == 0.5 and teacher.sft["task"].arithmetic.shortcut_frac == 0
