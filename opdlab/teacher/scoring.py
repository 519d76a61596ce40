"""Teacher scoring: one teacher forward over (teacher prompt + student completion), reduced to what objectives
need — log-prob of the sampled token, top-K ids and log-probs, entropy and max-prob — chunk by chunk so the full
distribution is never held for the whole batch.

The teacher may see a different prompt than the student (privileged context): pass its prompt ids; the completion
tokens are the student's, unchanged, since the pair shares a tokenizer.

With `keep_hidden=True` the scores also carry the teacher's last hidden states and output layer, from which an
objective that needs the teacher's full distribution (the full-vocabulary divergences) makes logits chunk by chunk
itself; the objective table says which objectives ask for it (`opdlab.objectives.Objective.teacher_request`).

With `lookahead` (a `LookaheadRequest`, asked for by the lookahead objective) the scores also carry candidate
rewards: the student (passed as `student`) proposes its top-K tokens at its high-entropy positions, and the teacher
scores each one step ahead in the same passes that score the rollout (`opdlab.teacher.tree_attention`).
"""
from __future__ import annotations

import torch

from opdlab.models.logprobs import completion_hidden, scatter_back, softcap_of, token_stats
from opdlab.teacher.tree_attention import lookahead_scores
from opdlab.types import LookaheadRequest, Rollouts, TeacherScores


@torch.no_grad()
def score(teacher, rollouts: Rollouts, vocab_size: int, *, top_k: int = 0, chunk_size: int = 1024,
          teacher_prompt_ids_B_P: torch.Tensor | None = None,
          teacher_prompt_mask_B_P: torch.Tensor | None = None, keep_hidden: bool = False,
          lookahead: LookaheadRequest | None = None, student=None,
          pending_B_T: torch.Tensor | None = None, packing: bool = False) -> TeacherScores:
    """Score a batch of rollouts with the teacher (by default on the student's own prompts).

    `keep_hidden` also returns the (B, T, H) hidden states and the output layer (no (B, T, V) tensor is made);
    `lookahead` also returns the candidate rewards of the lookahead objective (needs `student`).
    `pending_B_T` (with `keep_hidden`, no top-K): positions whose token statistics the objective will compute from
    its own logits (`TeacherScores.pending_B_T`); no logits are made for them here.
    `packing`: the teacher's forward runs on the real tokens only (`opdlab.models.packing`); the
    lookahead objective's passes keep their own layout.
    A teacher served over HTTP (`opdlab.teacher.remote.RemoteTeacher`) is accepted in place of the model."""
    if not isinstance(teacher, torch.nn.Module):
        if lookahead is not None:
            raise ValueError("the lookahead objective needs the teacher's model here; a teacher served over HTTP "
                             "(remote_teacher.url) cannot score its candidates")
        return teacher.score(rollouts, vocab_size, top_k=top_k, chunk_size=chunk_size,
                             teacher_prompt_ids_B_P=teacher_prompt_ids_B_P,
                             teacher_prompt_mask_B_P=teacher_prompt_mask_B_P, keep_hidden=keep_hidden)
    device = next(teacher.parameters()).device
    p_ids = rollouts.prompt_ids_B_P if teacher_prompt_ids_B_P is None else teacher_prompt_ids_B_P
    p_mask = rollouts.prompt_mask_B_P if teacher_prompt_mask_B_P is None else teacher_prompt_mask_B_P
    mask_B_T = rollouts.completion_mask_B_T.to(device).bool()
    if pending_B_T is not None:
        if not keep_hidden or top_k or lookahead is not None:
            raise ValueError("score(): pending positions need keep_hidden=True, top_k=0 and no lookahead")
        pending_B_T = pending_B_T.to(device).bool() & mask_B_T
    stats_B_T = mask_B_T if pending_B_T is None else mask_B_T & ~pending_B_T  # where logits are made here
    lookahead_fields = {}
    if lookahead is None:
        hidden_B_T_H = completion_hidden(teacher, p_ids.to(device), p_mask.to(device),
                                         rollouts.completion_ids_B_T.to(device), mask_B_T.long(), packing=packing)
    else:  # the rollout and every candidate leaf, segment by segment (opdlab.teacher.tree_attention)
        hidden_B_T_H, lookahead_fields = lookahead_scores(teacher, student, rollouts, p_ids, p_mask, lookahead,
                                                          vocab_size, chunk_size)
    logp_N, ent_N, maxp_N, ids_N_K, tlp_N_K = token_stats(
        hidden_B_T_H[stats_B_T], rollouts.completion_ids_B_T.to(device)[stats_B_T], teacher.get_output_embeddings(),
        vocab_size, top_k=top_k, chunk_size=chunk_size, softcap=softcap_of(teacher))
    return TeacherScores(
        logp_B_T=scatter_back(logp_N, stats_B_T), topk_ids_B_T_K=scatter_back(ids_N_K, stats_B_T, 0),
        topk_logp_B_T_K=scatter_back(tlp_N_K, stats_B_T, float("-inf")), entropy_B_T=scatter_back(ent_N, stats_B_T),
        maxp_B_T=scatter_back(maxp_N, stats_B_T), pending_B_T=pending_B_T,
        hidden_B_T_H=hidden_B_T_H if keep_hidden else None,
        lm_head=teacher.get_output_embeddings() if keep_hidden else None,
        vocab_size=vocab_size if keep_hidden else None, softcap=softcap_of(teacher) if keep_hidden else None,
        **lookahead_fields)
