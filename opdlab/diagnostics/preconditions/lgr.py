"""LGR's precondition: do the candidate rewards r(k) carry information about the candidates' success?

At trigger positions of student rollouts (the student's entropy above tau), the student's top-K tokens are the
candidates and r(k) the teacher's confidence one step ahead (`opdlab.teacher.scoring.score` with the lookahead
request, as in training). Each candidate's success value V_k is the mean reward of n student continuations with it
forced (`opdlab.diagnostics.alignment.targeted.success_values`). Reported, over nodes whose V_k are not all equal
(informative nodes):

- Spearman(r(k), V_k) per node, averaged, with a bootstrap interval over rollouts (the null: 0);
- how often the top-reward candidate is a best one (max V), against the rate of a candidate drawn at random (the
  null); the raw rewards' mean and the within-group std;
- per group normalisation (`objective.lookahead.norm`: the paper's 'std', 'floor' and 'gate' at each floor), the
  pooled Pearson correlation over every node's candidates between the normalised reward r~(k) and the candidate's
  success advantage V_k - mean_k V, with its interval: the bonus LGR adds is gamma * r~(y_t), so this says how well
  the bonus tracks what it is meant to reward, across nodes as well as within them; and the share of bonus mass
  that falls on nodes where every candidate has the same V (no information to carry).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from opdlab.diagnostics.alignment.report import spearman
from opdlab.diagnostics.alignment.targeted import success_values
from opdlab.diagnostics.preconditions.stats import cluster_bootstrap, mean_or_none
from opdlab.objectives.lookahead import group_normalise
from opdlab.teacher.scoring import score
from opdlab.types import LookaheadRequest


@torch.no_grad()
def lgr_nodes(cfg, student, teacher, tokenizer, task, rollouts, vocab_size, stops, generator, rng,
              progress: bool = True) -> list[dict]:
    """One record per measured trigger node: rollout, position, candidates, student p, raw rewards r, values V."""
    request = LookaheadRequest(k=cfg.lgr_k, tau=cfg.lgr_tau, signal=cfg.lgr_signal)
    found = []
    for ri, r in enumerate(tqdm(rollouts, desc="lgr: candidate rewards", disable=not progress, leave=False)):
        s = score(teacher, r, vocab_size, chunk_size=cfg.chunk_size, lookahead=request, student=student)
        trig = (s.lookahead_trigger_B_T.bool() & r.loss_mask_B_T.bool())[0]
        for t in torch.nonzero(trig).flatten().tolist():
            found.append((ri, t, s.lookahead_ids_B_T_K[0, t].tolist(), s.lookahead_reward_B_T_K[0, t].float().tolist()))
    if len(found) > cfg.lgr_nodes:
        found = [found[i] for i in sorted(rng.choice(len(found), cfg.lgr_nodes, replace=False))]
    nodes = []
    for ri, t, cands, rewards in tqdm(found, desc="lgr: success values", disable=not progress, leave=False):
        r = rollouts[ri]
        prompt_P = r.prompt_ids_B_P[0][r.prompt_mask_B_P[0].bool()]
        V = success_values(student, tokenizer, task, r.problems[0], prompt_P, r.completion_ids_B_T[0, :t].tolist(),
                           cands, cfg.lgr_rollouts_per_candidate, max_new_tokens=cfg.max_new_tokens, stops=stops,
                           temperature=cfg.temperature, generator=generator, vocab_size=vocab_size,
                           max_rows=cfg.batch_size).mean(axis=1)
        nodes.append({"rollout": ri, "position": t, "candidates": cands, "r": rewards, "V": V.tolist()})
    return nodes


def normalisations(floors) -> list[tuple[str, str, float]]:
    """(label, norm, floor) of every group normalisation compared."""
    return [("std", "std", 0.0)] + [(f"{n} {f:g}", n, f) for n in ("floor", "gate") for f in floors]


def normalised(nodes: list[dict], norm: str, floor: float) -> list[np.ndarray]:
    """Each node's r~ under a normalisation, by `opdlab.objectives.lookahead.group_normalise` itself."""
    if not nodes:
        return []
    r = torch.tensor([n["r"] for n in nodes], dtype=torch.float64)[None]
    out = group_normalise(r, torch.ones(r.shape[:2], dtype=torch.bool), norm=norm, floor=floor)[0]
    return [row.numpy() for row in out]


def _pooled_corr(items: list[tuple[np.ndarray, np.ndarray]]) -> float | None:
    if not items:
        return None
    x = np.concatenate([a for a, _ in items])
    y = np.concatenate([b for _, b in items])
    if x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def summarise_lgr(nodes: list[dict], cfg) -> dict:
    """The numbers of the module docstring, with intervals over rollouts."""
    boot = dict(n_boot=cfg.bootstrap, confidence=cfg.confidence, seed=cfg.seed)
    informative = [n for n in nodes if np.ptp(n["V"]) > 0]
    by_rollout: dict[int, list[dict]] = {}
    for n in informative:
        by_rollout.setdefault(n["rollout"], []).append(n)
    groups = list(by_rollout.values())

    def mean_rho(gs):
        rhos = [x for g in gs for n in g if (x := spearman(n["r"], n["V"])) is not None]
        return mean_or_none(rhos)

    def top_hit(gs):
        return mean_or_none([float(n["V"][int(np.argmax(n["r"]))] == max(n["V"])) for g in gs for n in g])

    def chance(gs):
        return mean_or_none([float(np.mean(np.asarray(n["V"]) == max(n["V"]))) for g in gs for n in g])

    out = {"nodes": len(nodes), "informative_nodes": len(informative), "rollouts": len(groups),
           "spearman": cluster_bootstrap(groups, mean_rho, **boot),
           "top_reward_is_best": cluster_bootstrap(groups, top_hit, **boot),
           "random_candidate_is_best": cluster_bootstrap(groups, chance, **boot),
           "reward_mean": mean_or_none([x for n in nodes for x in n["r"]]),
           "group_std_median": float(np.median([np.std(n["r"]) for n in nodes])) if nodes else None,
           "normalisations": []}
    all_by_rollout: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        all_by_rollout.setdefault(n["rollout"], []).append(i)
    for label, norm, floor in normalisations(cfg.lgr_floors):
        r_tilde = normalised(nodes, norm, floor)
        adv = [np.asarray(n["V"]) - np.mean(n["V"]) for n in nodes]
        clusters = [[(r_tilde[i], adv[i]) for i in idx] for idx in all_by_rollout.values()]
        mass = [float(np.abs(x).sum()) for x in r_tilde]
        noise = sum(m for m, n in zip(mass, nodes) if np.ptp(n["V"]) == 0)
        out["normalisations"].append({
            "label": label, "norm": norm, "floor": floor,
            "corr_with_advantage": cluster_bootstrap(clusters, lambda cs: _pooled_corr([x for c in cs for x in c]),
                                                     **boot),
            "bonus_share_on_uninformative": noise / sum(mass) if sum(mass) > 0 else None})
    return out
