"""The alignment precondition: are there enough nodes in every P_succ bin, for correct and incorrect rollouts alike?

Comparing alignment on correct and incorrect rollouts is only meaningful within bins of the node's success
probability (docs/methods.md#measuring-honestly). This counts, before paying for the alignment diagnostic, the nodes
it would have: at the exponentially spaced depths of every student rollout (as `opdlab diagnose alignment` places
them), P_succ is estimated without bias by n student continuations from the prefix, each from a first token drawn
from the student's own distribution there; nodes are counted per (P_succ bin, correct / incorrect rollout).
"""
from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from opdlab.diagnostics.alignment.report import P_SUCC_BINS, in_bin
from opdlab.diagnostics.alignment.signals import exponential_depths
from opdlab.diagnostics.alignment.targeted import success_values
from opdlab.diagnostics.preconditions.stats import wilson
from opdlab.models.logprobs import chunk_logits, completion_hidden, softcap_of


@torch.no_grad()
def p_succ_nodes(cfg, student, tokenizer, task, rollouts, rewards, vocab_size, stops, generator,
                 progress: bool = True) -> list[dict]:
    nodes = []
    n = cfg.alignment_rollouts_per_node
    for ri, r in enumerate(tqdm(rollouts, desc="alignment: P_succ", disable=not progress, leave=False)):
        L = int(r.completion_mask_B_T[0].sum())
        depths = [t for t in exponential_depths(L, cfg.alignment_depth_ratio) if t < cfg.max_new_tokens - 1]
        depths = depths[:cfg.alignment_max_nodes_per_rollout]
        if not depths:
            continue
        hidden = completion_hidden(student, r.prompt_ids_B_P, r.prompt_mask_B_P, r.completion_ids_B_T,
                                   r.completion_mask_B_T)[0]
        head = student.get_output_embeddings()
        prompt_P = r.prompt_ids_B_P[0][r.prompt_mask_B_P[0].bool()]
        for t in depths:
            # the logits predicting completion token t: the hidden state before it (the prompt's last for t = 0)
            z_V = chunk_logits(hidden[t:t + 1], head, vocab_size, softcap_of(student))[0]
            probs = torch.softmax(z_V / cfg.temperature, -1)
            first = torch.multinomial(probs, n, replacement=True, generator=generator).tolist()
            v = success_values(student, tokenizer, task, r.problems[0], prompt_P,
                               r.completion_ids_B_T[0, :t].tolist(), first, 1, max_new_tokens=cfg.max_new_tokens,
                               stops=stops, temperature=cfg.temperature, generator=generator, vocab_size=vocab_size,
                               max_rows=cfg.batch_size)
            nodes.append({"rollout": ri, "position": t, "p_succ": float(v.mean()), "correct": rewards[ri] >= 1.0})
    return nodes


def summarise_alignment(nodes: list[dict], cfg) -> dict:
    cells = []
    for lo, hi in P_SUCC_BINS:
        inside = [x for x in nodes if in_bin(x["p_succ"], lo, hi)]
        cells.append({"lo": lo, "hi": hi, "correct": sum(x["correct"] for x in inside),
                      "incorrect": sum(not x["correct"] for x in inside)})
    wrong = [x for x in nodes if not x["correct"]]
    low = sum(in_bin(x["p_succ"], *P_SUCC_BINS[0]) for x in wrong)
    return {"nodes": len(nodes), "bins": cells, "min_cell": min(min(c["correct"], c["incorrect"]) for c in cells),
            "incorrect_nodes_in_lowest_bin": wilson(low, len(wrong), cfg.confidence),
            "mean_p_succ": float(np.mean([x["p_succ"] for x in nodes])) if nodes else None}
