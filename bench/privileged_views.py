"""Scoring both privileged views in one teacher pass against two sequential passes, side by side.

    python bench/privileged_views.py              # built-in-sized teacher, 32 rollouts x 96 tokens, 7 repeats
    python bench/privileged_views.py --quick      # 3 repeats
    python bench/privileged_views.py --threads 1  # use 1 on a shared CPU

The privileged objectives need the teacher's distribution under the full and the partial view of the oracle trace.
`opdlab.teacher.views.score_views(..., ["full", "partial"])` stacks the two prompt batches (2B rows) and calls
`opdlab.teacher.scoring.score` once; the alternative is two `score` calls of B rows. Both give the same numbers
(tests/test_privileged.py checks it); this prints their time (median of interleaved repeats), the ratio, and the max
abs difference of the sampled-token log-probs. Models are random-init with the built-in teacher's size (speed does
not depend on training), saved and loaded through `opdlab.models.loading.load_model`; prompts are built-in arithmetic
problems (2-3 steps) with the default template, rollouts 96 tokens with EOS never sampled.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--tokens", type=int, default=96)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from opdlab.config import ModelConfig, PrivilegedConfig
    from opdlab.models.loading import build_char_tokenizer, init_builtin_model, load_model
    from opdlab.teacher.views import score_views, view_prompt_ids
    from opdlab.tasks.arithmetic import ArithmeticTask
    from opdlab.teacher.scoring import score
    from opdlab.types import Rollouts

    tok = build_char_tokenizer()
    with tempfile.TemporaryDirectory() as d:
        init_builtin_model("teacher", tok).save_pretrained(d)
        tok.save_pretrained(d)
        teacher, tok = load_model(ModelConfig(path=d))
    task = ArithmeticTask(2, 3, seed=0, max_value=19)
    problems = [task.problems("train")[i] for i in range(args.batch)]
    from opdlab.models.prompts import encode_prompts, render_prompt
    ids, mask = encode_prompts(tok, [render_prompt(tok, q.question) for q in problems])
    g = torch.Generator().manual_seed(0)
    comp = torch.randint(5, 90, (args.batch, args.tokens), generator=g)  # printable characters, no EOS
    rollouts = Rollouts(prompt_ids_B_P=ids, prompt_mask_B_P=mask, completion_ids_B_T=comp,
                        completion_mask_B_T=torch.ones_like(comp), logp_old_B_T=torch.zeros(comp.shape),
                        sampler_logp_B_T=torch.zeros(comp.shape), problems=problems, texts=[""] * args.batch)
    cfg, V = PrivilegedConfig(), len(tok)

    def one_pass():
        return score_views(teacher, tok, rollouts, ["full", "partial"], cfg, V, keep_hidden=True)

    def two_passes():
        out = []
        for view in ("full", "partial"):
            p_ids, p_mask = view_prompt_ids(tok, rollouts, view, cfg)
            out.append(score(teacher, rollouts, V, teacher_prompt_ids_B_P=p_ids, teacher_prompt_mask_B_P=p_mask,
                             keep_hidden=True))
        return out

    a, (b_full, b_partial) = one_pass(), two_passes()  # warm-up, and the equality check
    diff = max((a.logp_B_T - b_full.logp_B_T).abs().max().item(),
               (a.partial.logp_B_T - b_partial.logp_B_T).abs().max().item())
    times = {"one pass (score_views)": [], "two passes (score x 2)": []}
    for _ in range(3 if args.quick else 7):
        for name, fn in (("one pass (score_views)", one_pass), ("two passes (score x 2)", two_passes)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    base = statistics.median(times["two passes (score x 2)"])
    print(f"{args.batch} rollouts x {args.tokens} tokens, two views, threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.1f}")
    print(f"{'variant':<28}{'seconds':>10}{'speedup':>10}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:<28}{med:>10.3f}{base / med:>9.2f}x")
    print(f"max |diff| of sampled-token log-probs, one pass vs two: {diff:.1e}")


if __name__ == "__main__":
    main()
