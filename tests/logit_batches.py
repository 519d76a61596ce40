"""Objective inputs built straight from logits, for the numerical tests of the objectives.

The output layers are `nn.Identity`, so the "hidden states" are the logits themselves (H = V): gradients w.r.t.
`StudentOutputs.hidden_B_T_H` are gradients w.r.t. the student's logits, and the tests can compare them with
direct computations on (B, T, V) tensors that the objectives themselves never build.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from opdlab.types import Problem, Rollouts, StudentOutputs, TeacherScores


@dataclass
class LogitBatch:
    z_B_T_V: torch.Tensor  # student logits, a leaf with requires_grad
    zt_B_T_V: torch.Tensor  # teacher logits
    ids_B_T: torch.Tensor
    mask_B_T: torch.Tensor
    logp_old_B_T: torch.Tensor

    def inputs(self, top_k: int = 0, chunk_size: int = 1024, keep_hidden: bool = True, loss_mask_B_T=None):
        """(Rollouts, StudentOutputs, TeacherScores) as the training loop would pass them."""
        B, T, V = self.z_B_T_V.shape
        m = self.mask_B_T.bool()
        logp_B_T_V = F.log_softmax(self.z_B_T_V.float(), -1)
        logq_B_T_V = F.log_softmax(self.zt_B_T_V.float(), -1)
        logp_B_T = logp_B_T_V.gather(-1, self.ids_B_T[..., None]).squeeze(-1) * m
        rollouts = Rollouts(
            prompt_ids_B_P=torch.zeros(B, 1, dtype=torch.long), prompt_mask_B_P=torch.ones(B, 1, dtype=torch.long),
            completion_ids_B_T=self.ids_B_T, completion_mask_B_T=self.mask_B_T.long(),
            logp_old_B_T=self.logp_old_B_T * m, sampler_logp_B_T=self.logp_old_B_T * m,
            problems=[Problem(uid=str(i), question="q", answer="a") for i in range(B)], texts=[""] * B,
            loss_mask_B_T=loss_mask_B_T)
        student = StudentOutputs(
            logp_B_T=logp_B_T, entropy_B_T=torch.zeros(B, T), hidden_B_T_H=self.z_B_T_V, lm_head=torch.nn.Identity(),
            vocab_size=V, chunk_size=chunk_size)
        with torch.no_grad():
            topk_logp, topk_ids = logq_B_T_V.topk(top_k, dim=-1) if top_k else (logq_B_T_V[..., :0],
                                                                                 self.ids_B_T[..., None][..., :0])
            teacher = TeacherScores(
                logp_B_T=logq_B_T_V.gather(-1, self.ids_B_T[..., None]).squeeze(-1) * m,
                topk_ids_B_T_K=topk_ids, topk_logp_B_T_K=topk_logp, entropy_B_T=torch.zeros(B, T),
                maxp_B_T=torch.zeros(B, T),
                hidden_B_T_H=self.zt_B_T_V if keep_hidden else None,
                lm_head=torch.nn.Identity() if keep_hidden else None, vocab_size=V if keep_hidden else None)
        return rollouts, student, teacher


def logit_batch(seed: int, B: int = 3, T: int = 6, V: int = 13, lengths=None, scale: float = 2.0,
                on_policy: bool = True) -> LogitBatch:
    """Random student and teacher logits, sampled tokens drawn from the student, right-padded rows."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(B, T, V, generator=g) * scale).requires_grad_(True)
    zt = torch.randn(B, T, V, generator=g) * scale
    ids = torch.multinomial(z.detach().softmax(-1).reshape(-1, V), 1, generator=g).reshape(B, T)
    lengths = lengths or [T] + [int(n) for n in torch.randint(1, T + 1, (B - 1,), generator=g)]
    mask = (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).long()
    logp_old = F.log_softmax(z.detach(), -1).gather(-1, ids[..., None]).squeeze(-1)
    if not on_policy:
        logp_old = logp_old + 0.3 * torch.randn(B, T, generator=g)
    return LogitBatch(z, zt, ids, mask, logp_old)
