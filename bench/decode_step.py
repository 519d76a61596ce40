"""Sampling with opdlab's lean decoding step (`rollout.decoder: auto`) against transformers' forward (`hf`, with
and without prepacked products), side by side in one run.

    python bench/decode_step.py                    # SmolLM2 student, batch 8 x 192 new tokens, 3 repeats
    python bench/decode_step.py --quick            # 8 x 32 new tokens, 1 repeat
    python bench/decode_step.py --model PATH --batch 64 --new-tokens 320 --precision fp32
    python bench/decode_step.py --batch 64 --samples 4 --new-tokens 320 --keep-eos --repeats 1   # as evaluation

`opdlab.rollout.builtin.sample` on the model as training holds it (fp32 master weights, under bf16 autocast in
bf16-mixed), EOS suppressed so every row is `--new-tokens` long (or, with `--keep-eos`, rows ending at EOS as in
training and evaluation, where the lean decoder drops finished rows from its batch), the variants alternating repeat
by repeat (a busy CPU slows all alike), best of the repeats. Printed per variant: seconds, completion tokens and
tokens/s, decoding steps and ms a step (prefill included), the step against the weight-bandwidth bound (every
weight read once a step, at the read bandwidth measured here), how many of its tokens equal the prepacked `hf`
variant's, and the error of its log-probs of the sampled tokens against an fp32 forward of the same tokens (what
the bf16 products cost in accuracy, for each variant alike).
"""
from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_pair import measure_read_bandwidth  # noqa: E402
from throughput import eos_suppressed  # noqa: E402

from opdlab.config import ModelConfig  # noqa: E402
from opdlab.models.loading import load_model  # noqa: E402
from opdlab.models.logprobs import student_forward  # noqa: E402
from opdlab.rollout.builtin import sample  # noqa: E402
from opdlab.rollout.lean import why_not_lean  # noqa: E402
from opdlab.tasks.arithmetic import ArithmeticTask  # noqa: E402

VARIANTS = {"hf, plain products": dict(decoder="hf", packed="off"),
            "hf, prepacked": dict(decoder="hf", packed="auto"),
            "lean": dict(decoder="auto")}


def logp_error(model, r) -> tuple[float, float]:
    """Max and mean |log-prob error| of the sampled tokens against an fp32 forward over them (the training loop's
    `student_forward`, outside autocast)."""
    with torch.no_grad():
        logp_B_T = student_forward(model, r, model.get_output_embeddings().weight.shape[0]).logp_B_T
    err = (r.logp_old_B_T - logp_B_T)[r.completion_mask_B_T.bool()].abs()
    return err.max().item(), err.mean().item()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-student")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--precision", default="bf16-mixed", choices=["bf16-mixed", "fp32"])
    ap.add_argument("--samples", type=int, default=1, help="rows per problem (evaluation draws several)")
    ap.add_argument("--keep-eos", action="store_true",
                    help="rows stop at EOS, as in training and evaluation (default: every row runs to the end)")
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = 32, 1
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(ModelConfig(path=args.model), torch.device("cpu"), trainable=True,
                                  precision=args.precision)
    model.eval()
    reason = why_not_lean(model)
    if reason is not None:
        print(f"{args.model}: lean decoding does not take this model ({reason}); nothing to compare")
        return
    bandwidth = measure_read_bandwidth()
    distinct = ArithmeticTask(seed=0, style="words", min_steps=3, max_steps=8, max_value=50).problems(
        "train")[:max(1, args.batch // args.samples)]
    problems = [p for p in distinct for _ in range(args.samples)][:args.batch]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16-mixed" else nullcontext()
    best, rollouts = {k: float("inf") for k in VARIANTS}, {}
    with (nullcontext() if args.keep_eos else eos_suppressed()), autocast:
        for _ in range(args.repeats):
            for name, kw in VARIANTS.items():
                t0 = time.perf_counter()
                rollouts[name] = sample(model, tokenizer, problems, max_new_tokens=args.new_tokens,
                                        generator=torch.Generator().manual_seed(0), **kw)
                best[name] = min(best[name], time.perf_counter() - t0)
    bytes_per = 2 if args.precision == "bf16-mixed" else 4
    weight_bytes = bytes_per * sum(p.numel() for p in model.parameters())
    B = args.batch
    bound_ms = weight_bytes / bandwidth * 1e3
    print(f"{args.model}, {args.precision}: batch {B} ({args.samples} a problem) x up to {args.new_tokens} new "
          f"tokens, {'stopping at EOS' if args.keep_eos else 'EOS suppressed'}, {args.threads} threads, best of "
          f"{args.repeats}; read bandwidth {bandwidth / 1e9:.1f} GB/s, weights {weight_bytes / 1e6:.0f} MB, "
          f"bound {bound_ms:.1f} ms a step")
    print(f"{'variant':<20}{'s':>8}{'tokens':>8}{'tokens/s':>10}{'steps':>7}{'ms/step':>9}{'x bound':>9}"
          f"{'same tokens':>13}{'logp err max':>14}{'mean':>9}")
    ref = rollouts["hf, prepacked"].completion_ids_B_T
    for name in VARIANTS:
        s, r = best[name], rollouts[name]
        tokens, steps = int(r.completion_mask_B_T.sum()), r.completion_ids_B_T.shape[1]
        ms = s / steps * 1e3
        same = (r.completion_ids_B_T == ref).float().mean().item() if r.completion_ids_B_T.shape == ref.shape \
            else float("nan")
        err_max, err_mean = logp_error(model, r)
        print(f"{name:<20}{s:>8.2f}{tokens:>8}{tokens / s:>10.1f}{steps:>7}{ms:>9.1f}{ms / bound_ms:>9.1f}"
              f"{same:>13.1%}{err_max:>14.4f}{err_mean:>9.5f}")
    print(f"lean / hf prepacked: {best['hf, prepacked'] / best['lean']:.2f}x; lean / hf plain: "
          f"{best['hf, plain products'] / best['lean']:.2f}x")


if __name__ == "__main__":
    main()
