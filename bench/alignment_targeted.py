"""Targeted rollouts of `opdlab diagnose alignment`: one node's continuations with the prefix shared through the KV
cache, against the same continuations with the prefix run once per row. One table, side by side.

    python bench/alignment_targeted.py --threads 1          # under 2 min on one core
    python bench/alignment_targeted.py --quick              # smoke mode

A node's |C| x n continuations all start with the same prefix (prompt + the rollout's first t tokens).
`opdlab.diagnostics.alignment.targeted.continue_forced` runs that prefix once (batch 1), repeats its KV cache to the
N rows and decodes from the forced tokens. The baseline here prefills the N rows with prefix + forced token (N x L
prefix positions), then decodes the same way. Both sample the same number of steps with EOS suppressed, so the
difference is the prefix work alone; it grows with the node's depth. Model: the built-in student's architecture,
random-init (speed does not depend on training). The last column checks the two compute the same thing: the
largest difference between their next-token log-probabilities after the forced token.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from opdlab.diagnostics.alignment.targeted import continue_forced
from opdlab.models.loading import build_char_tokenizer, init_builtin_model
from opdlab.rollout.builtin import draw


@torch.no_grad()
def unshared(model, prefix_ids_L, first_N, steps, generator):
    """The baseline: every row prefills the whole prefix itself."""
    N = first_N.shape[0]
    ids_N_L = torch.cat([prefix_ids_L.expand(N, -1), first_N[:, None]], dim=1)
    out = model(input_ids=ids_N_L, use_cache=True, logits_to_keep=1)
    cache, L = out.past_key_values, ids_N_L.shape[1]
    rows = [first_N]
    for step in range(steps):
        tok_N = draw(F.softmax(out.logits[:, -1].float(), -1), generator)  # the sampler continue_forced uses
        rows.append(tok_N)
        if step + 1 < steps:
            out = model(input_ids=tok_N[:, None], past_key_values=cache, use_cache=True,
                        position_ids=torch.full((N, 1), L + step, dtype=torch.long))
            cache = out.past_key_values
    return torch.stack(rows, 1)


@torch.no_grad()
def first_step_gap(model, prefix_ids_L, first_N) -> float:
    """max |log p| difference of the first sampled position: shared cache vs full prefill."""
    N = first_N.shape[0]
    full = F.log_softmax(model(input_ids=torch.cat([prefix_ids_L.expand(N, -1), first_N[:, None]], 1)).logits[:, -1],
                         -1)
    out = model(input_ids=prefix_ids_L[None], use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(N)
    shared = model(input_ids=first_N[:, None], past_key_values=cache, use_cache=True,
                   position_ids=torch.full((N, 1), prefix_ids_L.shape[0], dtype=torch.long)).logits[:, -1]
    return float((F.log_softmax(shared, -1) - full).abs().max())


def timed(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tokenizer = build_char_tokenizer()
    model = init_builtin_model("student", tokenizer, seed=0).eval()
    candidates, n, steps = 10, 8, 32
    depths = [16, 128] if args.quick else [16, 64, 256, 512]
    repeats = 1 if args.quick else 3
    g = torch.Generator().manual_seed(0)
    print(f"built-in student architecture, {candidates} candidates x n = {n} rows, {steps} sampled steps, "
          f"{args.threads} thread(s), best of {repeats}")
    print(f"{'prefix tokens':>13}  {'unshared s':>10}  {'shared s':>8}  {'speedup':>7}  {'max |dlogp|':>11}")
    for L in depths:
        prefix_ids_L = torch.randint(4, len(tokenizer), (L,), generator=g)
        first_N = torch.randint(4, len(tokenizer), (candidates,), generator=g).repeat_interleave(n)
        t_shared = timed(lambda: continue_forced(model, prefix_ids_L, first_N, steps=steps, stops=[-1], pad=0,
                                                 generator=torch.Generator().manual_seed(1)), repeats)
        t_unshared = timed(lambda: unshared(model, prefix_ids_L, first_N, steps,
                                            torch.Generator().manual_seed(1)), repeats)
        gap = first_step_gap(model, prefix_ids_L, first_N)
        print(f"{L:>13}  {t_unshared:>10.3f}  {t_shared:>8.3f}  {t_unshared / t_shared:>6.2f}x  {gap:>11.1e}")


if __name__ == "__main__":
    main()
