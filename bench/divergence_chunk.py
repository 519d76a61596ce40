"""The full-vocabulary KL's loss and gradient: the written-out gradient (`opdlab.objectives.divergence.KLRows`)
against autograd's graph of the same formula, side by side in one run, at the SmolLM2 pair's shapes.

    python bench/divergence_chunk.py            # 1536 loss tokens (8 x 192), vocabulary 49,152, hidden 576
    python bench/divergence_chunk.py --quick    # 256 tokens, 1 repeat
    python bench/divergence_chunk.py --threads 2 --tokens 1536 --repeats 5

Both sides run the whole `reverse_kl` / `forward_kl` objective (student and teacher output layers in bf16 autocast,
log-softmax in fp32, chunks of 1024 positions, diagnostics included) and its backward pass into the hidden states
and the output layer; "autograd" swaps `KLRows` for the same formula traced by autograd (what the objective did
before). The sides alternate within each repeat; the best time of each is kept. It checks that both give the same
loss and gradients, and prints the time of each and their ratio.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from opdlab.config import ObjectiveConfig
from opdlab.objectives import divergence
from opdlab.objectives.divergence import forward_kl, reverse_kl
from opdlab.types import Problem, Rollouts, StudentOutputs, TeacherScores


class AutogradKLRows:
    """`KLRows.apply` with the gradient traced by autograd (the reference side)."""

    @staticmethod
    def apply(z_C_V, logq_C_V, q_C_V, reverse):
        logp_C_V = F.log_softmax(z_C_V, dim=-1)
        diff_C_V = logp_C_V - logq_C_V
        with torch.no_grad():
            other_C_V = q_C_V if reverse else logp_C_V.detach().exp()
            other_C = (other_C_V * diff_C_V.detach()).sum(-1)
        if reverse:
            return (logp_C_V.exp() * diff_C_V).sum(-1), -other_C, logp_C_V.detach()
        return -(q_C_V * diff_C_V).sum(-1), other_C, logp_C_V.detach()


def inputs(tokens: int, vocab: int, hidden: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    student_head = torch.nn.Linear(hidden, vocab, bias=False)
    teacher_head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        student_head.weight.copy_(torch.randn(vocab, hidden, generator=g) * 0.04)
        teacher_head.weight.copy_(student_head.weight + torch.randn(vocab, hidden, generator=g) * 0.02)
    h_B_T_H = torch.randn(1, tokens, hidden, generator=g).requires_grad_(True)
    mask_B_T = torch.ones(1, tokens, dtype=torch.long)
    ids_B_T = torch.randint(0, vocab, (1, tokens), generator=g)
    zeros_B_T = torch.zeros(1, tokens)
    rollouts = Rollouts(prompt_ids_B_P=torch.zeros(1, 1, dtype=torch.long),
                        prompt_mask_B_P=torch.ones(1, 1, dtype=torch.long), completion_ids_B_T=ids_B_T,
                        completion_mask_B_T=mask_B_T, logp_old_B_T=zeros_B_T, sampler_logp_B_T=zeros_B_T,
                        problems=[Problem(uid="0", question="q", answer="a")], texts=[""])
    teacher = TeacherScores(logp_B_T=zeros_B_T, topk_ids_B_T_K=torch.zeros(1, tokens, 0, dtype=torch.long),
                            topk_logp_B_T_K=torch.zeros(1, tokens, 0), entropy_B_T=zeros_B_T, maxp_B_T=zeros_B_T,
                            hidden_B_T_H=h_B_T_H.detach() + 0.1, lm_head=teacher_head, vocab_size=vocab)
    return student_head, h_B_T_H, rollouts, teacher


def run_once(fn, student_head, h_B_T_H, rollouts, teacher):
    student_head.zero_grad(set_to_none=True)
    h_B_T_H.grad = None
    student = StudentOutputs(logp_B_T=torch.zeros(1, h_B_T_H.shape[1]), entropy_B_T=torch.zeros(1, h_B_T_H.shape[1]),
                             hidden_B_T_H=h_B_T_H, lm_head=student_head, vocab_size=teacher.vocab_size,
                             chunk_size=1024)
    t0 = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(rollouts, student, teacher, ObjectiveConfig(name=fn.__name__))
    out.loss.backward()
    return time.perf_counter() - t0, out.loss.detach(), h_B_T_H.grad.clone(), student_head.weight.grad.clone()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.repeats = 256, 1
    torch.set_num_threads(args.threads)
    data = inputs(args.tokens, args.vocab, args.hidden)
    written = divergence.KLRows
    print(f"{args.tokens} loss tokens, vocabulary {args.vocab}, hidden {args.hidden}, {args.threads} threads, "
          f"best of {args.repeats}")
    for fn in (reverse_kl, forward_kl):
        best = {"written-out": float("inf"), "autograd": float("inf")}
        results = {}
        for _ in range(args.repeats):
            for side, impl in (("written-out", written), ("autograd", AutogradKLRows)):
                divergence.KLRows = impl
                try:
                    seconds, *results[side] = run_once(fn, *data)
                finally:
                    divergence.KLRows = written
                best[side] = min(best[side], seconds)
        for a, b in zip(results["written-out"], results["autograd"]):
            torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-6)
        print(f"{fn.__name__:11s} written-out {best['written-out']:.3f} s  autograd {best['autograd']:.3f} s  "
              f"ratio {best['autograd'] / best['written-out']:.2f}x  (loss {results['written-out'][0].item():.4f}, "
              f"same loss and gradients)")


if __name__ == "__main__":
    main()
