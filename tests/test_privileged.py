"""Tests of privileged teacher contexts, self-teachers, two-view scoring, the hindsight diagnostics, and privileged
objectives trained end to end (`opdlab.teacher.views`, `opdlab.tasks.hindsight`, `opdlab.train`).

    python -m pytest tests/test_privileged.py -q
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from opdlab.config import ConfigError, EvalConfig, PrivilegedConfig, load_config
from opdlab.evaluate import evaluate
from opdlab.tasks.hindsight import oracle_derivations, rollout_diagnostics, shortcut_events, step_errors
from opdlab.teacher.self_teacher import EMATeacher, frozen_copy
from opdlab.teacher.views import (cut_at_word, partial_trace, score_views, split_trace,
                               teacher_prompts, view_prompt_ids, view_text)
from opdlab.rollout.builtin import sample
from opdlab.tasks.arithmetic import ArithmeticTask
from opdlab.teacher.scoring import score
from opdlab.train import train
from opdlab.types import Problem
from test_train import assert_same_weights, make_cfg, metric_rows, weights

torch.set_num_threads(1)

TRACE = "7 + 5 - 3 + 9\n= 12 - 3 + 9\n= 9 + 9\n= 18\nAnswer: 18"
PROBLEM = Problem(uid="p", question="Compute 7 + 5 - 3 + 9.", answer="18", solution=TRACE)


# ----------------------------------------------------------------------------------------------- contexts


def test_split_trace_and_partial_view():
    reasoning, answer = split_trace(TRACE)
    assert answer == "Answer: 18" and reasoning == "7 + 5 - 3 + 9\n= 12 - 3 + 9\n= 9 + 9\n= 18"
    # 39 characters of reasoning; rho 0.5 -> 20 characters, "7 + 5 - 3 + 9\n= 12 -": ends at a space, kept as is
    assert partial_trace(TRACE, 0.5) == "7 + 5 - 3 + 9\n= 12 -\nAnswer: 18"
    # rho 0.43 -> 17 characters "7 + 5 - 3 + 9\n= 1" cuts "12": extended to the end of the word
    assert partial_trace(TRACE, 0.43) == "7 + 5 - 3 + 9\n= 12\nAnswer: 18"
    assert partial_trace(TRACE, 0.0) == "Answer: 18" and partial_trace(TRACE, 1.0) == TRACE


@pytest.mark.parametrize("rho", [0.1, 0.25, 0.33, 0.5, 0.7, 0.9])
def test_cut_is_a_prefix_ending_at_a_word_boundary(rho):
    text = "the quick brown fox jumps over the lazy dog again"
    cut = cut_at_word(text, rho)
    assert text.startswith(cut) and len(cut) >= round(rho * len(text)) - 1
    rest = text[len(cut):]
    assert rest == "" or rest[0] == " "  # never inside a word
    assert cut.split() == text.split()[:len(cut.split())]


def test_trace_without_answer_line_and_gsm_style():
    assert partial_trace("a bb ccc dddd", 0.5) == "a bb ccc"
    gsm = "She has 3 + 4 = 7 apples.\nThen 7 * 2 = 14.\nAnswer: 14"
    assert partial_trace(gsm, 0.5).endswith("\nAnswer: 14")


def test_file_task_solutions_are_traces(tmp_path):
    from opdlab.tasks.files import FileTask
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "7",
                                "solution": "He starts with 3 apples.\nThen 3 + 4 = 7.\n#### 7"}) + "\n")
    (problem,) = FileTask(path, path).problems("train")
    cfg = PrivilegedConfig(template="{trace}")
    assert view_text(problem, "full", cfg) == problem.solution
    reasoning, answer = split_trace(problem.solution)
    assert answer == "Answer: 7" and reasoning == "He starts with 3 apples.\nThen 3 + 4 = 7."
    assert view_text(problem, "partial", cfg) == cut_at_word(reasoning, 0.5) + "\nAnswer: 7"
    assert oracle_derivations(problem) == {"7": 1}


def test_view_text_and_errors(tokenizer):
    cfg = PrivilegedConfig(template="Q={question} T={trace}")
    assert view_text(PROBLEM, "none", cfg) == PROBLEM.question
    assert view_text(PROBLEM, "full", cfg) == f"Q={PROBLEM.question} T={TRACE}"
    assert view_text(PROBLEM, "partial", cfg) == f"Q={PROBLEM.question} T={partial_trace(TRACE, 0.5)}"
    with pytest.raises(ValueError, match="no worked solution"):
        view_text(Problem(uid="x", question="q", answer="1"), "full", cfg)
    (prompt,) = teacher_prompts(tokenizer, [PROBLEM], "full", cfg)
    assert prompt.startswith("<|im_start|>user\nQ=Compute") and prompt.endswith("<|im_start|>assistant\n")
    with pytest.raises(ConfigError, match="placeholders"):
        load_config(None, ["privileged.template=see {solution}"])
    with pytest.raises(ConfigError, match="must contain"):
        load_config(None, ["privileged.template={question}"])


# ----------------------------------------------------------------------------------------------- two views, one pass


def test_both_views_in_one_pass_equal_two_separate_passes(tokenizer, teacher_model, student_model):
    task = ArithmeticTask(1, 3, seed=0, max_value=19)
    problems = [task.problems("train")[i] for i in range(4)]
    g = torch.Generator().manual_seed(0)
    rollouts = sample(student_model, tokenizer, problems, max_new_tokens=12, generator=g)
    cfg = PrivilegedConfig()
    calls = []
    hook = teacher_model.model.register_forward_hook(lambda m, i, o: calls.append(1))
    both = score_views(teacher_model, tokenizer, rollouts, ["full", "partial"], cfg, len(tokenizer), top_k=5,
                       chunk_size=7, keep_hidden=True)
    hook.remove()
    assert len(calls) == 1  # one teacher forward for both views
    mask = rollouts.completion_mask_B_T.bool()
    for view, got in (("full", both), ("partial", both.partial)):
        ids, pmask = view_prompt_ids(tokenizer, rollouts, view, cfg)
        ref = score(teacher_model, rollouts, len(tokenizer), top_k=5, chunk_size=7, teacher_prompt_ids_B_P=ids,
                    teacher_prompt_mask_B_P=pmask, keep_hidden=True)
        torch.testing.assert_close(got.logp_B_T[mask], ref.logp_B_T[mask], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.entropy_B_T[mask], ref.entropy_B_T[mask], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got.hidden_B_T_H[mask], ref.hidden_B_T_H[mask], rtol=1e-4, atol=1e-5)
        assert torch.equal(got.topk_ids_B_T_K[mask][:, 0], ref.topk_ids_B_T_K[mask][:, 0])
    assert not torch.allclose(both.logp_B_T[mask], both.partial.logp_B_T[mask])  # the views really differ
    # selecting rows of the scores selects the same rows of the partial view
    sub = both.select([1, 3])
    torch.testing.assert_close(sub.partial.logp_B_T, both.partial.logp_B_T[[1, 3]])


# ----------------------------------------------------------------------------------------------- self-teachers


def test_ema_update_math_and_no_grad_state(student_model):
    ema = EMATeacher(student_model, rate=0.1)
    before = {n: p.detach().clone() for n, p in ema.model.named_parameters()}
    assert all(not p.requires_grad for p in ema.model.parameters())
    opt = torch.optim.AdamW(student_model.parameters(), lr=0.05)
    ids = torch.randint(0, 50, (2, 6))
    student_model.train()
    student_model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    ema.update(student_model)
    for n, p in student_model.named_parameters():
        expected = 0.9 * before[n] + 0.1 * p.detach()
        torch.testing.assert_close(dict(ema.model.named_parameters())[n], expected, rtol=1e-6, atol=1e-7)
    assert max((before[n] - p).abs().max().item() for n, p in ema.model.named_parameters()) > 1e-4
    assert all(p.grad is None for p in ema.model.parameters())  # no gradients ...
    ema_ids = {id(p) for p in ema.model.parameters()}
    assert not ema_ids & {id(p) for group in opt.param_groups for p in group["params"]}  # ... no optimizer state
    assert not ema_ids & {id(p) for p in opt.state}
    frozen = frozen_copy(student_model)
    snapshot = {n: p.clone() for n, p in frozen.named_parameters()}
    opt.step()
    assert all(torch.equal(p, snapshot[n]) for n, p in frozen.named_parameters())


# ----------------------------------------------------------------------------------------------- hindsight


def test_oracle_derivations():
    assert oracle_derivations(PROBLEM) == {"12": 1, "18": 3}  # 9 is in the question, so it is never "derived"
    assert oracle_derivations(Problem(uid="x", question="q", answer="1")) == {}
    # a program is not a derivation: numbers in a code task's reference solution are never "derived" (no events)
    program = Problem(uid="c", question="Write f.", answer="", solution="```python\ndef f():\n    return 18\n```")
    assert oracle_derivations(program) == {} and shortcut_events(program, "return 18") == []


@pytest.mark.parametrize("response, events", [
    (TRACE, []),  # the oracle's own derivation
    ("7 + 5 - 3 + 9\n= 12 - 3 + 9\n= 9 + 9\n= 17\nAnswer: 17", []),  # wrong, but every result worked
    ("7 + 5 - 3 + 9\n= 12 - 3 + 9\nAnswer: 18", [("18", 2, "answer", 3)]),  # an answer the working did not reach
    ("Answer: 18", [("18", 0, "answer", 3)]),
    ("Answer: 7", [("7", 0, "answer", None)]),  # the question's first number: a shortcut, not a derived value
    # '18 - 3 + 9' is a (wrong) worked step that lands on a later value; '= 12' skips a step
    ("7 + 5 - 3 + 9\n= 18 - 3 + 9\n= 12\nAnswer: 12", [("12", 2, "step", 1)]),
    ("7 + 5 - 3 + 9\n\n= 12 - 3 + 9\n= 18\n= 18\nAnswer: 18", [("18", 2, "step", 3)]),  # empty lines don't count
])
def test_shortcut_events_on_hand_written_rollouts(response, events):
    got = [(e.value, e.student_line, e.kind, e.oracle_line) for e in shortcut_events(PROBLEM, response)]
    assert got == events


def test_step_errors_and_batch_diagnostics():
    assert step_errors(TRACE) == [False, False, False]
    assert step_errors("7 + 5 - 3 + 9\n= 12 - 3 + 9\n= 8 + 9\n= 17\nAnswer: 17") == [False, True, False]
    assert step_errors("7 + 5\n= 13\nAnswer: 13") == [True]
    assert step_errors("Answer: 12") == [] and step_errors("The sum is 12.") == []
    long_bad = "7 + 5 - 3 + 9\n= 12 - 3 + 9\n= 9 + 9\n= 19\nAnswer: 19"
    d = rollout_diagnostics([PROBLEM, PROBLEM, PROBLEM], [TRACE, long_bad, "Answer: 18"])
    assert d["leak/shortcut_rate"] == pytest.approx(1 / 3) and d["leak/events_per_rollout"] == pytest.approx(1 / 3)
    assert d["leak/hindsight_rate"] == pytest.approx(1 / 3)
    # long rollouts (>= median length): TRACE and long_bad, 3 steps each; first quarter = step 0, last = step 2
    assert d["drift/step_err_first_quarter"] == 0.0 and d["drift/step_err_last_quarter"] == 0.5


def test_eval_reports_the_shortcut_rate(tokenizer, student_model):
    task = ArithmeticTask(1, 2, seed=0, test_size=6, max_value=19)
    result = evaluate(student_model, tokenizer, task, EvalConfig(num_problems=6, k=2, max_new_tokens=16),
                      progress=False, keep_texts=6)
    g = torch.Generator().manual_seed(0)  # the same draws as evaluate's: one batch, same seed
    flat = [p for p in (task.problems("test")[i] for i in range(6)) for _ in range(2)]
    texts = sample(student_model, tokenizer, flat, max_new_tokens=16, generator=g).texts
    expected = sum(bool(shortcut_events(p, t)) for p, t in zip(flat, texts)) / len(flat)
    assert result.extra["shortcut_rate"] == pytest.approx(expected)
    assert result.records[0].texts == texts[:2]


# ----------------------------------------------------------------------------------------------- training


PRIV = ["task.arithmetic.min_steps=2", "task.arithmetic.max_steps=3", "task.arithmetic.max_value=19",
        "rollout.max_new_tokens=12", "objective.privileged.skip_first=1", "scoring.chunk_size=7"]


def test_anchored_residual_trains_end_to_end(model_dirs, tmp_path):
    run = tmp_path / "ar"
    train(make_cfg(model_dirs, run, "objective.name=anchored_residual", "train.steps=2", "train.micro_batch_size=3",
                   *PRIV), progress=False)
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("priv/belief_shift", "priv/uptake", "priv/uptake_ratio", "priv/top16_overlap",
                    "priv/entropy_full", "priv/entropy_partial", "leak/shortcut_rate", "div/target"):
            assert math.isfinite(r[key]), key
        assert r["priv/belief_shift"] > 0 and r["train/loss"] > 0 and r["train/grad_norm"] > 0
        assert 0 <= r["leak/shortcut_rate"] <= 1
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/loss"] == pytest.approx(first["div/target"], rel=1e-4)  # one micro-batch mean = the loss


def test_ema_self_teacher_resumes_exactly(model_dirs, tmp_path):
    extra = ["objective.name=privileged_partial", "privileged.teacher=ema_student", "privileged.ema_rate=0.5",
             "train.steps=4", "train.save_every=2", *PRIV]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(make_cfg(model_dirs, straight, *extra), progress=False)
    train(make_cfg(model_dirs, resumed, *extra[:-len(PRIV) - 2], "train.steps=2", "train.save_every=2", *PRIV),
          progress=False)
    train(make_cfg(model_dirs, resumed, *extra), resume=True, progress=False)
    assert_same_weights(weights(straight, 4), weights(resumed, 4))
    state = torch.load(straight / "checkpoints" / "step-000004" / "trainer_state.pt", weights_only=False)
    w = weights(straight, 4)
    # the EMA teacher lags the student: it differs from the step-4 student and from the initial student
    ema_w = state["ema_teacher"]
    assert max((ema_w[k] - w[k]).abs().max().item() for k in w if k in ema_w) > 1e-6
    rows = metric_rows(straight)
    assert all("priv/belief_shift" in r for r in rows)


def test_late_stage_accuracy_is_the_longest_quarter():
    from types import SimpleNamespace

    from opdlab.experiments.privileged_compare import late_accuracy
    records = [SimpleNamespace(lengths=[10, 40, 20, 30], rewards=[1.0, 0.0, 1.0, 1.0]),
               SimpleNamespace(lengths=[50, 5, 45, 15], rewards=[1.0, 0.0, 0.0, 0.0])]
    # 8 samples; the 0.75 quantile of the sorted lengths (index 6) is 45: samples of length 45 and 50
    assert late_accuracy(SimpleNamespace(records=records)) == pytest.approx(0.5)


def test_reasoning_gym_traces_give_both_views():
    # reasoning-gym's gsm_symbolic carries a worked solution: the full view holds it whole, the partial view a
    # word-boundary prefix of its reasoning plus the answer line, and both end with the student's question
    from opdlab.config import TaskConfig
    from opdlab.teacher.views import view_text
    from opdlab.tasks import make_task

    task = make_task(TaskConfig(name="reasoning_gym", test_size=1, gym={"name": "gsm_symbolic", "train_size": 3}))
    p = task.problems("train")[0]
    cfg = PrivilegedConfig()
    full, part = view_text(p, "full", cfg), view_text(p, "partial", cfg)
    assert p.solution in full and full.endswith(p.question) and part.endswith(p.question)
    reasoning = part.split("\n", 1)[1].rsplit("\nAnswer:", 1)[0]
    assert p.solution.startswith(reasoning) and 0 < len(reasoning) < len(p.solution)
    assert p.solution[len(reasoning)] in " \n"  # cut at a word boundary
    assert f"Answer: {p.answer}" in part
