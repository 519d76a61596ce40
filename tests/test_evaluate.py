"""Tests of opdlab.evaluate (pass@k, evaluate, result tables) and opdlab.report (plots).

    python -m pytest tests/test_evaluate.py -q
"""
from __future__ import annotations

import json
import math
import warnings
from itertools import combinations
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from opdlab.config import EvalConfig
from opdlab.evaluate import EvalResult, comparison_table, evaluate, make_buckets, pass_at_k
from opdlab.models.loading import build_char_tokenizer, init_builtin_model
from opdlab.report import choose_panels, load_metrics, plot_eval_by_length, plot_training_curves
from opdlab.tasks.arithmetic import ArithmeticTask
from opdlab.tasks.base import Task
from opdlab.types import Problem

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The models here are tiny: extra intra-op threads only add contention (many times slower on a busy 2-core box).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


# ---------------------------------------------------------------- pass@k


def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (the first c correct) holding at least one correct sample."""
    subsets = list(combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 11))
def test_pass_at_k_matches_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_special_cases():
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8)
    assert pass_at_k(4, 1, 4) == 1.0
    # Large n: the product form stays finite where C(n, k) as a float would overflow.
    assert pass_at_k(2000, 1000, 500) == pytest.approx(1.0)
    assert 0.0 < pass_at_k(2000, 1, 500) == pytest.approx(500 / 2000)


@pytest.mark.parametrize("n,c,k,match", [
    (3, 1, 4, "k <= n"), (3, 1, 0, "k <= n"), (3, 4, 1, "c <= n"), (3, -1, 1, "c <= n"),
    (0, 0, 1, "n >= 1"), (3, 1.5, 1, "integer"), (3, True, 1, "integer"),
])
def test_pass_at_k_rejects_bad_arguments(n, c, k, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(n, c, k)


# ---------------------------------------------------------------- evaluate on a scripted model


class ScriptedLM(torch.nn.Module):
    """At every step emits 'a' or EOS (probability p_eos), nothing else: lengths are geometric and texts are 'a'*n,
    so every number evaluate reports can be recomputed from the per-sample lengths alone."""

    def __init__(self, vocab_size: int, a_id: int, eos_id: int, p_eos: float):
        super().__init__()
        self.head = torch.nn.Linear(1, vocab_size, bias=False)
        self.logits_V = torch.full((vocab_size,), -1e4)
        self.logits_V[a_id] = math.log(1 - p_eos)
        self.logits_V[eos_id] = math.log(p_eos)

    def get_output_embeddings(self):
        return self.head

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                logits_to_keep=None):
        B, S = input_ids.shape
        return SimpleNamespace(logits=self.logits_V.expand(B, S, -1), past_key_values=None)


class CountingTask(Task):
    """`n` tiny problems; reward = min(1, characters / 4), so rewards are fractional and 'correct' means >= 4."""

    name = "counting"

    def __init__(self, n: int = 10):
        self._problems = [Problem(uid=f"c{i}", question=f"Say some a's ({i}).", answer="aaaa") for i in range(n)]

    def problems(self, split):
        return self._problems

    def verify(self, problem, response):
        return min(1.0, len(response) / 4)


def scripted_model(tokenizer, p_eos=0.3):
    vocab = tokenizer.get_vocab()
    return ScriptedLM(len(tokenizer), vocab["a"], tokenizer.eos_token_id, p_eos)


def test_evaluate_numbers_recomputed_from_lengths(tokenizer):
    task = CountingTask(10)
    cfg = EvalConfig(num_problems=10, k=4, max_new_tokens=6, batch_size=7, length_buckets=[2, 4])
    res = evaluate(scripted_model(tokenizer), tokenizer, task, cfg, seed=3, progress=False, keep_texts=3)

    assert res.num_problems == 10 and res.k == 4 and len(res.records) == 10
    assert [r.uid for r in res.records] == [p.uid for p in task.problems("test")]
    rewards, lengths, truncs = [], [], []
    for rec in res.records:
        assert len(rec.rewards) == len(rec.lengths) == len(rec.truncated) == 4
        for reward, length, trunc in zip(rec.rewards, rec.lengths, rec.truncated):
            assert 1 <= length <= 6
            if trunc:
                assert length == 6
            chars = length if trunc else length - 1  # the length counts the stop token when there is one
            assert reward == task.verify(None, "a" * chars)
        rewards += rec.rewards
        lengths += rec.lengths
        truncs += rec.truncated
    # Every sample's text is kept for the first keep_texts problems only, each matching its own length.
    for rec in res.records[:3]:
        assert len(rec.texts) == 4
        for text, length, trunc in zip(rec.texts, rec.lengths, rec.truncated):
            assert text == "a" * (length - (0 if trunc else 1))
    assert all(rec.texts is None for rec in res.records[3:])
    # a result saved while records held the first sample's text alone still loads
    old = json.loads(res.to_json())
    old["records"] = [{**{k: v for k, v in r.items() if k != "texts"}, "text": r["texts"][0] if r["texts"] else None}
                      for r in old["records"]]
    loaded = EvalResult.from_dict(old)
    assert loaded.records[0].texts == res.records[0].texts[:1] and loaded.records[5].texts is None

    assert res.mean_at_k == pytest.approx(sum(rewards) / len(rewards))
    correct = [sum(r >= 1 for r in rec.rewards) for rec in res.records]
    assert res.pass_at_k == pytest.approx(sum(c > 0 for c in correct) / 10)
    assert res.pass_at_1 == pytest.approx(sum(c / 4 for c in correct) / 10)
    assert res.mean_length == pytest.approx(sum(lengths) / len(lengths))
    assert res.truncated_frac == pytest.approx(sum(truncs) / len(truncs))
    # With p_eos = 0.3 over 40 samples, all of these are (practically) certain to be non-trivial.
    assert 0 < res.truncated_frac < 1 and 0 < res.mean_at_k < 1 and res.pass_at_1 < res.pass_at_k

    assert [b.label for b in res.buckets] == ["<=2", "3-4", ">4"]
    expected = {"<=2": [], "3-4": [], ">4": []}
    for length, reward in zip(lengths, rewards):
        expected["<=2" if length <= 2 else "3-4" if length <= 4 else ">4"].append(reward)
    for b in res.buckets:
        assert b.count == len(expected[b.label])
        if b.count:
            assert b.mean_reward == pytest.approx(sum(expected[b.label]) / b.count)
        else:
            assert b.mean_reward is None
    assert sum(b.count for b in res.buckets) == 10 * 4


def test_evaluate_no_truncation_when_eos_is_certain(tokenizer):
    cfg = EvalConfig(num_problems=3, k=2, max_new_tokens=1, batch_size=8)
    res = evaluate(scripted_model(tokenizer, p_eos=1 - 1e-9), tokenizer, CountingTask(3), cfg, progress=False)
    # EOS at the very last allowed position is a finished sample, not a truncated one.
    assert res.truncated_frac == 0.0 and res.mean_length == 1.0 and res.mean_at_k == 0.0


def test_evaluate_clamps_to_split_size(tokenizer):
    cfg = EvalConfig(num_problems=5, k=2, max_new_tokens=4)
    with pytest.warns(UserWarning, match="only 3"):
        res = evaluate(scripted_model(tokenizer), tokenizer, CountingTask(3), cfg, progress=False)
    assert res.num_problems == 3 and res.requested_problems == 5
    assert sum(b.count for b in res.buckets) == 3 * 2


def test_evaluate_rejects_bad_buckets(tokenizer):
    with pytest.raises(ValueError, match="strictly increasing"):
        evaluate(scripted_model(tokenizer), tokenizer, CountingTask(3),
                 EvalConfig(num_problems=2, k=1, length_buckets=[8, 4]), progress=False)
    with pytest.raises(ValueError, match="no 'test' problems"):
        evaluate(scripted_model(tokenizer), tokenizer, CountingTask(0), EvalConfig(num_problems=2, k=1),
                 progress=False)


# ---------------------------------------------------------------- evaluate on a tiny random Llama


class RecordingTask(Task):
    """Arithmetic questions with an arbitrary but fixed verifier that records every call."""

    name = "recording"

    def __init__(self, model):
        self.inner, self.model, self.calls = ArithmeticTask(test_size=20), model, []

    def problems(self, split):
        return self.inner.problems(split)

    def verify(self, problem, response):
        assert not self.model.training, "evaluate must sample in eval mode"
        reward = (sum(map(ord, response)) % 4) / 3
        self.calls.append((problem.uid, response, reward))
        return reward


def test_evaluate_tiny_llama(tokenizer):
    model = init_builtin_model("student", tokenizer, seed=0)
    model.train()
    cfg = EvalConfig(num_problems=6, k=3, max_new_tokens=12, batch_size=5, length_buckets=[4, 8])

    task = RecordingTask(model)
    res = evaluate(model, tokenizer, task, cfg, seed=0, progress=True)
    assert model.training, "evaluate must restore the model's mode"

    # mean@k is the plain average of what the verifier returned, each problem verified exactly k times.
    assert len(task.calls) == 6 * 3
    uids = [p.uid for p in task.problems("test")[:6]]
    assert sorted(uid for uid, _, _ in task.calls) == sorted(uids * 3)
    assert res.mean_at_k == pytest.approx(sum(r for _, _, r in task.calls) / len(task.calls))
    assert sum(b.count for b in res.buckets) == 6 * 3
    assert all(1 <= n <= 12 for rec in res.records for n in rec.lengths)
    texts = {}
    for uid, text, _ in task.calls:
        texts.setdefault(uid, []).append(text)
    assert [rec.texts for rec in res.records] == [texts[u] for u in uids]  # every sample's text, in order

    # Same seed, same everything; another seed samples differently.
    again = evaluate(model, tokenizer, RecordingTask(model), cfg, seed=0, progress=False)
    assert _comparable(res) == _comparable(again)
    other_task = RecordingTask(model)
    evaluate(model, tokenizer, other_task, cfg, seed=1, progress=False)
    assert [t for _, t, _ in other_task.calls] != [t for _, t, _ in task.calls]


def _comparable(res: EvalResult) -> dict:
    d = res.to_dict()
    d.pop("wall_s")
    return d


# ---------------------------------------------------------------- results: JSON and tables


def _result(tokenizer, seed=0, k=2) -> EvalResult:
    cfg = EvalConfig(num_problems=4, k=k, max_new_tokens=6, length_buckets=[2, 4])
    return evaluate(scripted_model(tokenizer), tokenizer, CountingTask(4), cfg, seed=seed, progress=False)


def test_result_json_roundtrip_and_tables(tokenizer, tmp_path):
    res = _result(tokenizer)
    path = res.save(tmp_path / "sub" / "eval.json")
    assert json.loads(path.read_text())["mean_at_k"] == res.mean_at_k
    assert EvalResult.load(path) == res
    assert set(res.metrics()) == {"eval/mean@2", "eval/pass@2", "eval/pass@1", "eval/response_len",
                                  "eval/truncated"}

    console = Console(record=True, width=140)
    console.print(res.table())
    console.print(comparison_table({"teacher": res, "student before": _result(tokenizer, seed=1)}, k=2))
    text = console.export_text()
    for needle in ("mean@2", "pass@2", "pass@1", "<=2", ">4", "teacher", "student before", "mean length"):
        assert needle in text

    with pytest.raises(ValueError, match="k=4"):
        comparison_table({"a": res}, k=4)
    with pytest.raises(ValueError, match="different k"):
        comparison_table({"a": res, "b": _result(tokenizer, k=3)})


def test_make_buckets_edges():
    labels = [(b.label, b.low, b.high) for b in make_buckets([32, 64, 512])]
    assert labels == [("<=32", 0, 32), ("33-64", 32, 64), ("65-512", 64, 512), (">512", 512, None)]


# ---------------------------------------------------------------- report


def _write_metrics(path, steps=60):
    lines = []
    for s in range(steps):
        row = {"step": s, "train/loss": 2.0 / (s + 1), "train/reverse_kl": 1.0 / (s + 1) + 0.01 * (s % 3),
               "teacher/entropy": 1.5, "teacher/maxp": 0.6, "student/entropy": 2.0 - s / steps,
               "train/response_len": 40 + s % 5, "train/reward": s / steps, "perf/tokens_per_s": 1000.0 + s,
               "note": "text is ignored", "train/skipped": False}
        if s % 10 == 0:
            row["eval/mean@4"] = s / (2 * steps)
        lines.append(json.dumps(row))
    lines.append('{"step": 60, "train/loss": 0.0')  # a run killed mid-write
    path.write_text("\n".join(lines))


def test_plot_training_curves(tmp_path):
    _write_metrics(tmp_path / "metrics.jsonl")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the truncated last line is expected and must not warn
        rows = load_metrics(tmp_path / "metrics.jsonl")
        out = plot_training_curves(tmp_path)
    assert len(rows) == 60
    assert out == tmp_path / "curves.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_load_metrics_warns_on_broken_middle_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "train/loss": 1}\n{oops\n{"step": 1, "train/loss": 0.5}\n')
    with pytest.warns(UserWarning, match=":2: not valid JSON"):
        rows = load_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]


def test_plot_training_curves_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_training_curves(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 0, "note": "x"}\n')
    with pytest.raises(ValueError, match="no numeric metrics"):
        plot_training_curves(tmp_path)


def test_choose_panels_keeps_important_metrics():
    keys = [f"train/extra_{i}" for i in range(15)] + [
        "perf/tokens_per_s", "eval/mean@8", "train/loss", "teacher/entropy", "train/reverse_kl", "student/entropy"]
    chosen = choose_panels(keys, max_panels=12)
    assert len(chosen) == 12
    assert {"train/loss", "train/reverse_kl", "eval/mean@8", "teacher/entropy", "student/entropy",
            "perf/tokens_per_s"} <= set(chosen)
    groups = [k.split("/")[0] for k in chosen]
    assert groups == sorted(groups, key=["train", "eval", "teacher", "student", "perf"].index)


def test_plot_eval_by_length(tokenizer, tmp_path):
    results = {"teacher": _result(tokenizer, seed=0), "student": _result(tokenizer, seed=1)}
    out = plot_eval_by_length(results, tmp_path / "plots" / "by_length.png")
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5_000
    other = _result(tokenizer)
    other.buckets = make_buckets([3])
    with pytest.raises(ValueError, match="other length buckets"):
        plot_eval_by_length({"a": results["teacher"], "b": other}, tmp_path / "x.png")
