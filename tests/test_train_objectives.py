"""End-to-end `train()` with every objective of the table beyond `opd` (full-vocabulary divergences, LSM and its
support variants), GKD's data mix (reference responses packed as `Rollouts`, the choice resumable), the
objective-dependent rollout top-p default, and the new config fields' validation.

    python -m pytest tests/test_train_objectives.py -q
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
import yaml

from opdlab.config import ConfigError, RunConfig, describe, load_config
from opdlab.models.prompts import encode_prompts, render_prompt
from opdlab.rollout.builtin import reference_rollouts
from opdlab.run import load_run_config
from opdlab.train import resolve_defaults, train
from opdlab.types import Problem
from test_train import assert_same_weights, init_weights, make_cfg, max_diff, metric_rows, weights

torch.set_num_threads(1)

RUNS = [("forward_kl", []), ("reverse_kl", []),
        ("jsd", ["objective.divergence.beta=0.3", "objective.divergence.temperature=0.8"]),
        ("lsm", []), ("lsm", ["objective.lsm.support=teacher_topk_sampled"]),
        ("lsm", ["objective.lsm.support=student_topk"]), ("lsm", ["objective.lsm.support=head_tail"])]


@pytest.mark.parametrize("name, extra", RUNS, ids=[" ".join([n, *e]) for n, e in RUNS])
def test_objective_trains_end_to_end(model_dirs, tmp_path, name, extra):
    run = tmp_path / "run"
    train(make_cfg(model_dirs, run, f"objective.name={name}", "objective.support_k=5", "train.steps=2",
                   "train.micro_batch_size=3", *extra), progress=False)
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(math.isfinite(v) for v in r.values()), r
        assert r["train/grad_norm"] > 0
        assert r["train/loss"] > 0 or "head_tail" in " ".join(extra)  # divergences are >= 0; a PG tail is not
        for key in ("support/teacher_mass", "support/student_mass", "support/topk_overlap",
                    "train/neg_reward_frac", "gap/pos_0_32"):
            assert key in r, key
        assert 0 < r["support/teacher_mass"] <= 1 + 1e-5 and 0 <= r["support/topk_overlap"] <= 1
    assert max_diff(weights(run, 2), init_weights(model_dirs)) > 1e-5
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["rollout"]["top_p"] == (0.9 if name == "lsm" else 1.0)  # the resolved default is recorded


def test_opd_logs_support_diagnostics(model_dirs, tmp_path):
    run = tmp_path / "opd"
    train(make_cfg(model_dirs, run, "train.steps=1", "objective.support_k=3"), progress=False)
    (row,) = metric_rows(run)
    assert {"support/teacher_mass", "support/student_mass", "support/topk_overlap", "train/reverse_kl",
            "train/masked_frac", "train/on_policy"} <= row.keys()
    assert row["train/on_policy"] == 1.0


# ---------------------------------------------------------------- GKD: reference responses


def test_reference_rollouts_hold_the_responses_and_the_students_log_probs(tokenizer, student_model):
    problems = [Problem(uid="a", question="Compute 1 + 2.", answer="3", solution="1 + 2 = 3\nAnswer: 3"),
                Problem(uid="b", question="Hi", answer="7")]
    responses = [problems[0].solution, "Answer: 7"]
    r = reference_rollouts(student_model, tokenizer, problems, responses, max_new_tokens=64,
                           vocab_size=len(tokenizer), chunk_size=3)
    eos = tokenizer.eos_token_id
    for b, text in enumerate(responses):
        expected = tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
        n = len(expected)
        assert r.completion_ids_B_T[b, :n].tolist() == expected
        assert r.completion_mask_B_T[b].tolist() == [1] * n + [0] * (r.completion_ids_B_T.shape[1] - n)
        assert r.texts[b] == text
    ids, mask = encode_prompts(tokenizer, [render_prompt(tokenizer, p.question) for p in problems])
    assert torch.equal(r.prompt_ids_B_P, ids) and torch.equal(r.prompt_mask_B_P, mask)
    # log pi_old: the student's log-probs of the response tokens, from one plain full forward
    full_ids, full_mask = r.input_ids(), r.attention_mask()
    with torch.no_grad():
        logits = student_model(input_ids=full_ids, attention_mask=full_mask,
                               position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    P, T = ids.shape[1], r.completion_ids_B_T.shape[1]
    ref = F.log_softmax(logits[:, P - 1:P - 1 + T].double(), -1).gather(-1, r.completion_ids_B_T[..., None])[..., 0]
    m = r.completion_mask_B_T.bool()
    torch.testing.assert_close(r.logp_old_B_T.double()[m], ref[m], rtol=0, atol=2e-5)
    assert torch.all(r.logp_old_B_T[~m] == 0) and not r.logp_old_B_T.requires_grad
    # cut to max_new_tokens: the long one loses its EOS, like a rollout that ran out of tokens
    short = reference_rollouts(student_model, tokenizer, problems, responses, max_new_tokens=5)
    assert short.completion_ids_B_T.shape[1] == 5 and eos not in short.completion_ids_B_T[0].tolist()


def test_gkd_mix_is_seeded_and_resumes_exactly(model_dirs, tmp_path):
    mix = ("objective.gkd_lambda=0.5", "objective.name=forward_kl")
    a, b = tmp_path / "a", tmp_path / "b"
    train(make_cfg(model_dirs, a, *mix, "train.steps=6", "train.save_every=3"), progress=False)
    train(make_cfg(model_dirs, b, *mix, "train.steps=3", "train.save_every=3"), progress=False)
    train(make_cfg(model_dirs, b, *mix, "train.steps=6", "train.save_every=3"), resume=True, progress=False)
    rows_a, rows_b = metric_rows(a), metric_rows(b)
    choices = [r["train/on_policy"] for r in rows_a]
    assert choices == [r["train/on_policy"] for r in rows_b]
    assert 0 < sum(choices) < len(choices)  # both kinds of step happened
    assert all(("train/reward" in r) == bool(r["train/on_policy"]) for r in rows_a)
    assert_same_weights(weights(a, 6), weights(b, 6))

    off = tmp_path / "off"  # lambda = 0: every step trains on reference responses
    train(make_cfg(model_dirs, off, "objective.gkd_lambda=0", "train.steps=2"), progress=False)
    assert [r["train/on_policy"] for r in metric_rows(off)] == [0.0, 0.0]
    assert max_diff(weights(off, 2), init_weights(model_dirs)) > 1e-5


# ---------------------------------------------------------------- config


def test_top_p_default_follows_the_objective():
    top_p = lambda *o: resolve_defaults(load_config(None, list(o))).rollout.top_p  # noqa: E731
    assert top_p("objective.name=lsm") == 0.9
    assert top_p() == 1.0 and top_p("objective.name=jsd") == 1.0
    assert top_p("objective.name=lsm", "rollout.top_p=0.5") == 0.5
    assert top_p("objective.name=opd", "rollout.top_p=0.95") == 0.95
    cfg = load_config(None, ["objective.name=lsm"])
    assert cfg.rollout.top_p is None and resolve_defaults(cfg) is not cfg  # the loaded config is left as it was


@pytest.mark.parametrize("override, field, allowed", [
    ("objective.lsm.support=nearby", "objective.lsm.support", "teacher_topk_sampled"),
    ("objective.divergence.beta=1.5", "objective.divergence.beta", "less than or equal to 1"),
    ("objective.gkd_lambda=-0.1", "objective.gkd_lambda", "greater than or equal to 0"),
    ("objective.support_k=0", "objective.support_k", "greater than or equal to 1"),
    ("objective.divergence.temperature=0", "objective.divergence.temperature", "greater than 0"),
    ("objective.auto_mask=maybe", "objective.auto_mask", "bool"),
    ("objective.name=kl", "objective.name", "forward_kl"),
])
def test_bad_values_name_field_value_and_allowed(override, field, allowed):
    with pytest.raises(ConfigError) as err:
        load_run_config(None, [override])
    message = str(err.value)
    assert field in message and override.split("=", 1)[1] in message and allowed in message, message


def test_new_fields_are_documented():
    rows = {name: doc for name, _, _, doc in describe(RunConfig)}
    for name in ("objective.divergence.beta", "objective.divergence.temperature", "objective.gkd_lambda",
                 "objective.support_k",
                 "objective.lsm.support", "objective.mask_tokens", "objective.auto_mask", "rollout.top_p"):
        assert len(rows[name]) > 30, name
    assert ("KL(pi_T||pi_theta)" in rows["objective.divergence.beta"]
            and "KL(pi_theta||pi_T)" in rows["objective.divergence.beta"])
