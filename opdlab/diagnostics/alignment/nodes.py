"""The measuring loop of `opdlab diagnose alignment`: candidates, node selection, success values, directions.

For each rollout (one at a time, so at most one rollout's (T, V) logits per model are held):

1. the student's logits and every teacher / context's scores (`opdlab.teacher.scoring.score`, or
   `opdlab.teacher.views`'s views, or with the lookahead candidates' rewards: whatever each signal's table entry
   asks for) over the completion; the candidate set at each exponential depth;
2. nodes chosen under the budget of targeted rollouts (`opdlab.diagnostics.alignment.signals.select_nodes`);
3. V_j at each node from n targeted rollouts per candidate (`opdlab.diagnostics.alignment.targeted.success_values`);
4. each signal's descent direction by autograd through its objective-table function, one backward pass per
   (rollout, teacher, signal) giving every node of the rollout at once; g*, cosines and the cheap divergences.

Steps 1 and 4 recompute the scores rather than keep every rollout's logits: scoring costs little next to the
targeted rollouts. Called by `opdlab.diagnostics.alignment.run.run_alignment`, which documents the outputs.
"""
from __future__ import annotations

import re
import time
from dataclasses import replace

import numpy as np
import torch
from tqdm.auto import tqdm

from opdlab.diagnostics.alignment.signals import candidate_set, cosine, descent_directions, divergences, \
    exponential_depths, ideal_gradient, select_nodes
from opdlab.diagnostics.alignment.spec import spec_prompt_ids
from opdlab.diagnostics.alignment.targeted import success_values
from opdlab.models.logprobs import chunk_logits, completion_hidden, softcap_of
from opdlab.objectives import OBJECTIVES, as_objective
from opdlab.objectives.common import logits_of
from opdlab.teacher.scoring import score
from opdlab.teacher.views import score_views


def _trim(rollout, length: int):
    """A one-row rollout cut to its own completion length."""
    return replace(rollout, completion_ids_B_T=rollout.completion_ids_B_T[:, :length],
                   completion_mask_B_T=rollout.completion_mask_B_T[:, :length],
                   logp_old_B_T=rollout.logp_old_B_T[:, :length], sampler_logp_B_T=rollout.sampler_logp_B_T[:, :length],
                   loss_mask_B_T=rollout.loss_mask_B_T[:, :length])


def student_logits(model, rollout, vocab_size: int) -> torch.Tensor:
    """(T, V) fp32 logits of the student at every completion position of a one-row rollout."""
    hidden_1_T_H = completion_hidden(model, rollout.prompt_ids_B_P, rollout.prompt_mask_B_P,
                                     rollout.completion_ids_B_T, rollout.completion_mask_B_T)
    return chunk_logits(hidden_1_T_H[0], model.get_output_embeddings(), vocab_size, softcap_of(model))


class _Scorer:
    """Teacher scores of one rollout per teacher spec (and per model for two-view signals), computed once each."""

    def __init__(self, cfg, models, tokenizer, vocab_size: int, top_k: int):
        self.cfg, self.models, self.tokenizer, self.V, self.top_k = cfg, models, tokenizer, vocab_size, top_k
        self._cache: dict = {}

    def reset(self):
        self._cache.clear()

    def spec(self, rollout, spec):
        if spec.name not in self._cache:
            ids, mask = spec_prompt_ids(self.tokenizer, rollout, spec, self.cfg.privileged)
            self._cache[spec.name] = score(self.models[spec.model], rollout, self.V, top_k=self.top_k,
                                           chunk_size=self.cfg.chunk_size, teacher_prompt_ids_B_P=ids,
                                           teacher_prompt_mask_B_P=mask, keep_hidden=True)
        return self._cache[spec.name]

    def for_signal(self, rollout, spec, request):
        """The scores a signal's table entry asks for: both privileged views, the lookahead candidates' rewards
        (`TeacherRequest.lookahead`, scored with the student's candidates), or the spec's plain scores."""
        if getattr(request, "both_views", False):
            return self.both_views(rollout, spec)
        lookahead = getattr(request, "lookahead", None)
        if lookahead is None:
            return self.spec(rollout, spec)
        key = (spec.name, "lookahead", lookahead)
        if key not in self._cache:
            ids, mask = spec_prompt_ids(self.tokenizer, rollout, spec, self.cfg.privileged)
            self._cache[key] = score(self.models[spec.model], rollout, self.V, top_k=self.top_k,
                                     chunk_size=self.cfg.chunk_size, teacher_prompt_ids_B_P=ids,
                                     teacher_prompt_mask_B_P=mask, keep_hidden=True, lookahead=lookahead,
                                     student=self.models["self"])
        return self._cache[key]

    def both_views(self, rollout, spec):
        key = ("both", spec.model)
        if key not in self._cache:
            self._cache[key] = score_views(self.models[spec.model], self.tokenizer, rollout, ["full", "partial"],
                                           self.cfg.privileged, self.V, top_k=self.top_k,
                                           chunk_size=self.cfg.chunk_size, keep_hidden=True)
        return self._cache[key]

    @torch.no_grad()
    def logits(self, rollout, spec) -> torch.Tensor:
        scores = self.spec(rollout, spec)
        return logits_of(scores, scores.hidden_B_T_H[0])


def _param_subset(model, pattern: str):
    named = [(n, p) for n, p in model.named_parameters() if re.search(pattern, n)]
    if not named:
        names = [n for n, _ in model.named_parameters()][:6]
        raise ValueError(f"param_subset {pattern!r} matches no parameter of the student; names look like {names}")
    return [p for _, p in named]


def measure_nodes(cfg, specs, models, tokenizer, task, rollouts, rewards, vocab_size, stops, generator,
                  progress: bool = True):
    """(node records, rollout records, timing) for the run; see `opdlab.diagnostics.alignment.run`."""
    student = models["self"]
    signal_cfgs = {s: cfg.objective.model_copy(update={"name": s}) for s in cfg.signals}
    objectives = {s: as_objective(OBJECTIVES[s]) for s in cfg.signals}
    requests = {s: objectives[s].teacher_request(signal_cfgs[s]) for s in cfg.signals}
    top_k = min(vocab_size, max([cfg.teacher_top_k, cfg.objective.support_k] + [r.top_k for r in requests.values()]))
    scorer = _Scorer(cfg, models, tokenizer, vocab_size, top_k)
    lengths = [int(r.completion_mask_B_T.sum()) for r in rollouts]
    rollouts = [_trim(r, L) for r, L in zip(rollouts, lengths)]

    # 1. candidate sets at each rollout's exponential depths
    t0 = time.perf_counter()
    candidates: list[dict[int, list[int]]] = []
    with torch.no_grad():
        for r, L in tqdm(list(zip(rollouts, lengths)), desc="candidates", disable=not progress):
            scorer.reset()
            z_T_V = student_logits(student, r, vocab_size)
            teacher_z = [scorer.logits(r, s) for s in specs]
            ids = r.completion_ids_B_T[0]
            candidates.append({t: candidate_set(int(ids[t]), z_T_V[t], [z[t] for z in teacher_z],
                                                cfg.student_top_k, cfg.teacher_top_k)
                               for t in exponential_depths(L, cfg.depth_ratio)})
    # 2. nodes under the budget
    chosen = select_nodes([[(t, len(c)) for t, c in sorted(cands.items())] for cands in candidates], cfg.budget,
                          cfg.rollouts_per_candidate, cfg.max_nodes_per_rollout)
    by_rollout: dict[int, list[int]] = {}
    for ri, t in chosen:
        by_rollout.setdefault(ri, []).append(t)
    # 3. success values
    t1 = time.perf_counter()
    values: dict[tuple[int, int], np.ndarray] = {}
    n = cfg.rollouts_per_candidate
    for ri, t in tqdm(chosen, desc="targeted rollouts (nodes)", disable=not progress):
        r = rollouts[ri]
        prompt_P = r.prompt_ids_B_P[0][r.prompt_mask_B_P[0].bool()]
        values[ri, t] = success_values(
            student, tokenizer, task, r.problems[0], prompt_P, r.completion_ids_B_T[0, :t].tolist(),
            candidates[ri][t], n, max_new_tokens=cfg.max_new_tokens, stops=stops, temperature=cfg.temperature,
            top_p=cfg.top_p, generator=generator, vocab_size=vocab_size, max_rows=cfg.batch_size)
    # 4. directions, g*, cosines
    t2 = time.perf_counter()
    params = _param_subset(student, cfg.param_subset) if cfg.param_subset else []
    flags = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        nodes, records = _directions(cfg, specs, student, tokenizer, rollouts, rewards, lengths, vocab_size,
                                     candidates, values, by_rollout, scorer, objectives, requests, signal_cfgs,
                                     params, progress)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
    t3 = time.perf_counter()
    timing = {"candidates_s": t1 - t0, "targeted_s": t2 - t1, "directions_s": t3 - t2, "nodes": len(chosen),
              "targeted_rollouts": int(sum(v.size for v in values.values()))}
    return nodes, records, timing


def _directions(cfg, specs, student, tokenizer, rollouts, rewards, lengths, vocab_size, candidates, values,
                by_rollout, scorer, objectives, requests, signal_cfgs, params, progress):
    nodes, records = [], []
    for ri, r in enumerate(tqdm(rollouts, desc="directions", disable=not progress)):
        ids = r.completion_ids_B_T[0].tolist()
        records.append({
            "index": ri, "question_uid": r.problems[0].uid, "question": r.problems[0].question,
            "answer": r.problems[0].answer, "text": r.texts[0], "reward": float(rewards[ri]),
            "correct": bool(rewards[ri] >= 1.0), "length": lengths[ri],
            "tokens": [tokenizer.decode([i]) for i in ids], "node_positions": by_rollout.get(ri, [])})
        if ri not in by_rollout:
            continue
        scorer.reset()
        with torch.no_grad():
            z_T_V = student_logits(student, r, vocab_size)
        p_T_V = torch.softmax(z_T_V.double(), -1)
        node_recs = {t: _node_record(ri, t, ids, candidates[ri][t], p_T_V[t], values[ri, t], tokenizer)
                     for t in by_rollout[ri]}
        for t, rec in node_recs.items():
            rec["before_error"] = before_first_error(r.problems[0].solution,
                                                     tokenizer.decode(ids[:t], skip_special_tokens=True))
        param_rows = _param_rows(student, r, vocab_size, params) if params else None
        for spec in specs:
            zt_T_V = scorer.logits(r, spec)
            for t, rec in node_recs.items():
                C = rec["candidates"]
                rec["teachers"][spec.name] = {
                    "q": torch.softmax(zt_T_V[t].double(), -1)[C].tolist(), **divergences(z_T_V[t], zt_T_V[t]),
                    "signals": {}}
            for s in cfg.signals:
                scores = scorer.for_signal(r, spec, requests[s])
                try:
                    d_T_V = descent_directions(objectives[s], r, z_T_V[None], scores, signal_cfgs[s],
                                               cfg.chunk_size)[0]
                except Exception as e:  # name the signal and teacher; the objective's message says the rest
                    raise ValueError(f"signal {s!r} with teacher {spec.name!r}: {e}") from e
                for t, rec in node_recs.items():
                    C = rec["candidates"]
                    d_C = d_T_V[t, C].double().cpu().numpy()
                    entry = {"direction": d_C.tolist(), "alignment": cosine(rec["g_star"], d_C)}
                    if param_rows is not None:
                        entry["param_alignment"] = cosine(param_rows(t, C, rec["g_star"]), param_rows(t, C, d_C))
                    rec["teachers"][spec.name]["signals"][s] = entry
        nodes += [node_recs[t] for t in sorted(node_recs)]
    return nodes, records


def before_first_error(solution: str | None, prefix_text: str) -> bool | None:
    """Whether a completion prefix is still error-free: it is a prefix of the oracle's worked solution (None when
    the problem has none). [R] The first error is the first departure from the trace, which in the arithmetic
    task's fixed formats is the first wrong character."""
    if not solution or solution.lstrip().startswith("```"):
        return None
    return solution.startswith(prefix_text)


def _node_record(ri: int, t: int, ids: list[int], cands: list[int], p_V: torch.Tensor, rewards_C_n: np.ndarray,
                 tokenizer) -> dict:
    p_C = p_V[cands].cpu().numpy()
    V_C = rewards_C_n.mean(axis=1)
    p_succ, g_star = ideal_gradient(p_C, V_C)
    return {"rollout": ri, "position": t, "token": tokenizer.decode([ids[t]]), "candidates": list(cands),
            "candidate_tokens": [tokenizer.decode([c]) for c in cands], "p": p_C.tolist(),
            "candidate_mass": float(p_C.sum()), "V": V_C.tolist(), "n": int(rewards_C_n.shape[1]),
            "p_succ": p_succ, "g_star": g_star.tolist(), "informative": bool(np.abs(g_star).max() > 0),
            "teachers": {}}


def _param_rows(model, rollout, vocab_size: int, params):
    """f(t, C, v) = J^T v flattened, J = d z_C(t) / d(params): a vector-Jacobian product through the student
    (the params have requires_grad set while this is used)."""
    with torch.enable_grad():
        z_T_V = student_logits(model, rollout, vocab_size)

    def vjp(t: int, C: list[int], v) -> np.ndarray:
        v_C = torch.as_tensor(np.asarray(v), dtype=z_T_V.dtype, device=z_T_V.device)
        grads = torch.autograd.grad((z_T_V[t, C] * v_C).sum(), params, retain_graph=True, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                          for g, p in zip(grads, params)]).cpu().numpy()
    return vjp
