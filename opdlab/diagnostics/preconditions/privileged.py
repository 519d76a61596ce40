"""The privileged precondition: does the oracle trace tell the teacher something it cannot compute from the question?

- Trace gain: the teacher's greedy accuracy on the questions with no trace, the partial trace and the full one
  (`opdlab.teacher.views`), and the paired differences full - none and partial - none with bootstrap intervals over
  questions (the null: 0).
- Belief shift: on the student's rollouts, the mean per-token KL(q_F || q_P) between the teacher under the full and
  the partial view (the residual AR-OPD adds), and KL(q_F || q_none), with intervals over rollouts.
- Answer mass before it is written: at the positions where the student's rollout starts a number, before it first
  writes the final answer, the probability q puts on the answer's first token, under the full view and with no
  trace, and their difference (the null: 0; the no-trace teacher gets there only by computing). Positions where the
  answer is the right next value count for both views alike.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from opdlab.diagnostics.preconditions.stats import cluster_bootstrap, mean_or_none
from opdlab.objectives.common import logits_of
from opdlab.rollout.builtin import sample
from opdlab.teacher.scoring import score
from opdlab.teacher.views import score_views, teacher_prompts

VIEWS = ("none", "partial", "full")


@torch.no_grad()
def trace_accuracy(cfg, teacher, tokenizer, task, problems, vocab_size) -> dict[str, list[float]]:
    """{view: greedy reward per question}."""
    out = {}
    for view in VIEWS:
        rewards = []
        for start in range(0, len(problems), cfg.batch_size):
            batch = problems[start:start + cfg.batch_size]
            r = sample(teacher, tokenizer, batch, prompts=teacher_prompts(tokenizer, batch, view, cfg.privileged),
                       max_new_tokens=cfg.max_new_tokens, temperature=0, vocab_size=vocab_size)
            rewards += [float(task.verify(p, t)) for p, t in zip(batch, r.texts)]
        out[view] = rewards
    return out


def _log_probs(scores, mask_T: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(logits_of(scores, scores.hidden_B_T_H[0][mask_T]).double(), -1)


def answer_token_ids(tokenizer, answer: str) -> list[int]:
    """The first token holding a digit of the answer as written alone and after a space (BPE spells them apart)."""
    ids = set()
    for text in (answer, f" {answer}", f"= {answer}"):
        toks = tokenizer.encode(text, add_special_tokens=False)
        first = next((t for t in toks if re.search(r"\d", tokenizer.decode([t]))), None)
        if first is not None:
            ids.add(first)
    return sorted(ids)


def number_starts_before_answer(tokenizer, ids: list[int], answer: str) -> list[int]:
    """Positions t whose token starts a number, before the completion first writes `answer` as a number."""
    text, out, prev = "", [], ""
    ans = re.compile(rf"(?<![\d.]){re.escape(answer)}(?![\d.])")
    for t, tok in enumerate(ids):
        piece = tokenizer.decode([tok])
        if ans.search(text):
            break
        if re.match(r"\s*\d", piece) and not (piece[:1].isdigit() and prev[-1:].isdigit()):
            out.append(t)
        text += piece
        prev = piece
    return out


@torch.no_grad()
def rollout_shift(cfg, teacher, tokenizer, rollouts, vocab_size) -> list[dict]:
    """Per student rollout: mean KL(q_F || q_P), KL(q_F || q_none), and the answer mass at number starts."""
    out = []
    for r in rollouts:
        mask_T = r.completion_mask_B_T[0].bool()
        both = score_views(teacher, tokenizer, r, ["full", "partial"], cfg.privileged, vocab_size,
                           chunk_size=cfg.chunk_size, keep_hidden=True)
        plain = score(teacher, r, vocab_size, chunk_size=cfg.chunk_size, keep_hidden=True)
        lf, lp, ln = _log_probs(both, mask_T), _log_probs(both.partial, mask_T), _log_probs(plain, mask_T)
        qf = lf.exp()
        ids = r.completion_ids_B_T[0][mask_T].tolist()
        answer = r.problems[0].answer
        targets = answer_token_ids(tokenizer, answer)
        starts = number_starts_before_answer(tokenizer, ids, answer)
        rec = {"kl_full_partial": float((qf * (lf - lp)).sum(-1).mean()),
               "kl_full_none": float((qf * (lf - ln)).sum(-1).mean()), "positions": len(starts)}
        if starts and targets:
            rec["answer_mass_full"] = float(qf[starts][:, targets].sum(-1).mean())
            rec["answer_mass_none"] = float(ln.exp()[starts][:, targets].sum(-1).mean())
        out.append(rec)
    return out


def summarise_privileged(accuracy: dict[str, list[float]], shifts: list[dict], cfg) -> dict:
    boot = dict(n_boot=cfg.bootstrap, confidence=cfg.confidence, seed=cfg.seed)
    rows = list(zip(*(accuracy[v] for v in VIEWS)))  # per question: (none, partial, full)
    mean_col = lambda i: (lambda rs: mean_or_none([x[i] for x in rs]))  # noqa: E731
    diff = lambda i: (lambda rs: mean_or_none([x[i] - x[0] for x in rs]))  # noqa: E731
    with_mass = [s for s in shifts if "answer_mass_full" in s]
    return {
        "questions": len(rows),
        "accuracy": {v: cluster_bootstrap(rows, mean_col(i), **boot) for i, v in enumerate(VIEWS)},
        "gain_full": cluster_bootstrap(rows, diff(2), **boot),
        "gain_partial": cluster_bootstrap(rows, diff(1), **boot),
        "kl_full_partial": cluster_bootstrap(shifts, lambda ss: mean_or_none([s["kl_full_partial"] for s in ss]),
                                             **boot),
        "kl_full_none": cluster_bootstrap(shifts, lambda ss: mean_or_none([s["kl_full_none"] for s in ss]), **boot),
        "answer_mass_full": cluster_bootstrap(with_mass, lambda ss: mean_or_none([s["answer_mass_full"] for s in ss]),
                                              **boot),
        "answer_mass_none": cluster_bootstrap(with_mass, lambda ss: mean_or_none([s["answer_mass_none"] for s in ss]),
                                              **boot),
        "answer_mass_gain": cluster_bootstrap(
            with_mass, lambda ss: mean_or_none([s["answer_mass_full"] - s["answer_mass_none"] for s in ss]), **boot),
        "answer_mass_positions": int(sum(s["positions"] for s in shifts)),
    }
