"""`opdlab diagnose` (the preconditions): each summary against a direct computation and against its null, the
helpers of the privileged check, and the command end to end on tiny models.

    python -m pytest tests/test_preconditions.py -q
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from opdlab.config import ConfigError, load_config
from opdlab.diagnostics.preconditions.alignment import summarise_alignment
from opdlab.diagnostics.preconditions.config import PreconditionsConfig
from opdlab.diagnostics.preconditions.lgr import summarise_lgr
from opdlab.diagnostics.preconditions.privileged import (answer_token_ids, number_starts_before_answer,
                                                         summarise_privileged)
from opdlab.diagnostics.preconditions.sfd import summarise_sfd
from opdlab.diagnostics.preconditions.stats import cluster_bootstrap, wilson
from opdlab.models.loading import build_char_tokenizer


def cfg(*overrides) -> PreconditionsConfig:
    return load_config(None, ["bootstrap=300", *overrides], PreconditionsConfig)


def lgr_node(rollout, r, V):
    return {"rollout": rollout, "position": 0, "candidates": list(range(len(r))), "r": list(r), "V": list(V)}


def test_lgr_summary_reads_its_null_and_a_monotone_reward():
    rng = np.random.default_rng(0)
    V = [[float(x) for x in rng.integers(0, 9, 6) / 8] for _ in range(80)]
    monotone = [lgr_node(i // 2, [0.9 + 0.01 * v for v in vs], vs) for i, vs in enumerate(V)]
    noise = [lgr_node(i // 2, list(rng.random(6)), vs) for i, vs in enumerate(V)]
    c = cfg()
    good, null = summarise_lgr(monotone, c), summarise_lgr(noise, c)
    informative = sum(np.ptp(v) > 0 for v in V)
    assert good["informative_nodes"] == informative and good["spearman"]["value"] == pytest.approx(1.0)
    assert good["top_reward_is_best"]["value"] == 1.0
    assert null["spearman"]["lo"] < 0 < null["spearman"]["hi"]  # independent rewards: the interval covers 0
    # chance: a random candidate is a best one at the rate of best candidates among the K
    chance = np.mean([np.mean(np.asarray(v) == max(v)) for v in V if np.ptp(v) > 0])
    assert null["random_candidate_is_best"]["value"] == pytest.approx(chance)


def test_lgr_normalisations_compared_on_noise_level_groups():
    """Groups whose V are all equal and whose rewards differ by 1e-4 (noise) beside informative ones: the paper's
    form gives the noise groups unit-scale bonuses; a floor above their spread takes those away."""
    nodes = []
    for i in range(40):
        nodes.append(lgr_node(i, [0.5, 0.7, 0.9, 0.6], [0.0, 0.5, 1.0, 0.25]))  # informative, spread 0.15
        nodes.append(lgr_node(i, [0.99, 0.9901, 0.9899, 0.99], [1.0, 1.0, 1.0, 1.0]))  # no information
    out = {n["label"]: n for n in summarise_lgr(nodes, cfg("lgr_floors=[0.05]"))["normalisations"]}
    l1 = lambda r: np.abs((np.asarray(r) - np.mean(r)) / (np.std(r) + 1e-6)).sum()  # noqa: E731 - sum |r~|
    noise, signal = l1([0.99, 0.9901, 0.9899, 0.99]), l1([0.5, 0.7, 0.9, 0.6])
    assert out["std"]["bonus_share_on_uninformative"] == pytest.approx(noise / (noise + signal), rel=1e-4)
    assert out["floor 0.05"]["bonus_share_on_uninformative"] < 0.01
    assert out["gate 0.05"]["bonus_share_on_uninformative"] == 0
    assert out["gate 0.05"]["corr_with_advantage"]["value"] > out["std"]["corr_with_advantage"]["value"]


def test_alignment_counts_per_bin():
    nodes = [{"rollout": 0, "position": t, "p_succ": p, "correct": c}
             for t, (p, c) in enumerate([(0.0, False), (0.1, False), (0.3, True), (0.6, True), (1.0, True),
                                         (0.19, True), (0.7, False)])]
    s = summarise_alignment(nodes, cfg())
    assert [(b["correct"], b["incorrect"]) for b in s["bins"]] == [(1, 2), (1, 0), (2, 1)]
    assert s["min_cell"] == 0 and s["incorrect_nodes_in_lowest_bin"]["value"] == pytest.approx(2 / 3)


def test_sfd_excess_decay_and_its_null():
    rng = np.random.default_rng(1)
    flat = [list(0.99 + 0.005 * rng.standard_normal(40)) for _ in range(30)]
    decaying = [list(np.linspace(0.99, 0.7, 40) + 0.005 * rng.standard_normal(40)) for _ in range(30)]
    bins = [SimpleNamespace(start=s, tokens=100) for s in range(0, 40, 8)]
    def result(student, teacher):
        side = lambda rows: SimpleNamespace(bins=bins, token_fidelity=rows, accuracy=0.5, mean_length=40,  # noqa
                                            fit=None, source="x")
        s, t = side(student), side(teacher)
        s.source, t.source = "student", "teacher"
        return SimpleNamespace(student=s, teacher=t, cuts=[])
    c = cfg()
    present = summarise_sfd(result(decaying, flat), c)
    assert present["late_from"] == 32 and present["excess_decay"]["lo"] > 0.2
    expected = np.mean([f for r in decaying for f in r[:8]]) - np.mean([f for r in decaying for f in r[32:]])
    assert present["student_decay"]["value"] == pytest.approx(expected)
    shared = summarise_sfd(result(decaying, decaying[::-1]), c)  # both decay alike: a position effect
    assert shared["excess_decay"]["lo"] < 0 < shared["excess_decay"]["hi"]


def test_privileged_summary_and_answer_positions():
    acc = {"none": [1, 0, 0, 1, 0, 0] * 5, "partial": [1, 0, 1, 1, 0, 0] * 5, "full": [1, 1, 1, 1, 1, 0] * 5}
    shifts = [{"kl_full_partial": 0.1, "kl_full_none": 0.3, "positions": 2, "answer_mass_full": 0.5,
               "answer_mass_none": 0.2}] * 4
    s = summarise_privileged(acc, shifts, cfg())
    assert s["gain_full"]["value"] == pytest.approx(0.5) and s["gain_partial"]["value"] == pytest.approx(1 / 6)
    assert s["gain_full"]["lo"] > 0 and s["answer_mass_gain"]["value"] == pytest.approx(0.3)
    tok = build_char_tokenizer()
    ids = tok.encode("7 + 5\n= 12\nAnswer: 12", add_special_tokens=False)
    # number starts: '7' (0), '5' (4), '12' (8); the answer is written from position 8, so 8 is the last one
    assert number_starts_before_answer(tok, ids, "12") == [0, 4, 8]
    assert [tok.decode([i]) for i in answer_token_ids(tok, "12")] == ["1"]


def test_bootstrap_and_wilson_by_hand():
    ci = cluster_bootstrap([1.0, 2.0, 3.0], lambda xs: float(np.mean(xs)), n_boot=500)
    assert ci["value"] == 2.0 and 1.0 <= ci["lo"] < 2.0 < ci["hi"] <= 3.0
    w = wilson(5, 10)
    assert w["value"] == 0.5 and w["lo"] == pytest.approx(0.2366, abs=1e-3) and w["hi"] == pytest.approx(0.7634,
                                                                                                          abs=1e-3)


def test_config_pair_presets_and_bad_checks():
    c = cfg("pair=smollm2", "num_questions=3")
    assert c.student.path == "builtin:smollm2-student" and c.max_new_tokens == 320 and c.num_questions == 3
    assert c.task.arithmetic.style == "words"
    with pytest.raises(ConfigError, match="unknown check"):
        cfg("checks=[sfd,lgrr]")


def test_diagnose_end_to_end(model_dirs, tmp_path):
    from opdlab.cli import main

    out = tmp_path / "diag"
    rc = main(["diagnose", f"student.path={model_dirs['student']}", f"teacher.path={model_dirs['teacher']}",
               "num_questions=2", "samples_per_question=2", "max_new_tokens=12", "lgr_nodes=3", "lgr_k=3",
               "lgr_rollouts_per_candidate=2", "alignment_rollouts_per_node=2", "alignment_max_nodes_per_rollout=2",
               "sfd_continuations=1", "sfd_num_cuts=2", "bootstrap=100", f"output={out}"])
    assert rc == 0
    d = json.loads((out / "diagnose.json").read_text())
    assert set(d["verdicts"]) == {"sfd", "lgr", "privileged", "alignment"}
    assert d["lgr"]["nodes"] <= 3 and all(len(n["V"]) == 3 for n in d["lgr"]["node_records"])
    assert all(0 <= v <= 1 for n in d["lgr"]["node_records"] for v in n["V"])
    assert d["alignment"]["nodes"] == sum(b["correct"] + b["incorrect"] for b in d["alignment"]["bins"]) <= 8
    assert d["privileged"]["questions"] == 2 and d["privileged"]["kl_full_partial"]["value"] >= 0
