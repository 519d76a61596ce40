"""Decoding under bf16 autocast on a CPU: Linear weights prepacked for oneDNN once (`rollout.packed_linears: auto`)
against autocast's plain products ('off'), side by side in one run.

    python bench/decode_linear.py                       # SmolLM2 student, batch 8 x 128 new tokens, 3 repeats
    python bench/decode_linear.py --quick               # batch 8 x 16 tokens, 1 repeat
    python bench/decode_linear.py --model PATH --batch 8 --new-tokens 192 --threads 2

Two sections, each alternating the two variants repeat by repeat (so a busy CPU slows both alike), best of the
repeats:

  * products   every Linear weight of the model (bf16), in model order, times a batch of `--batch` rows: F.linear
               on the bf16 weight (what autocast runs, its reorder included) against oneDNN's linear on the packed
               weight. Bytes read / time against the machine's read bandwidth (a sum over 1 GiB).
  * sampling   `opdlab.rollout.builtin.sample` itself on the model as training holds it (fp32 master weights under
               bf16 autocast), EOS suppressed so every row is `--new-tokens` long: tokens/s, ms a decoding step, and
               the step against the weight-bandwidth bound (every bf16 weight read once a step). Whether the two
               variants drew the same tokens is printed.

The model defaults to the SmolLM2 pair's student (`opdlab prepare --pair smollm2` makes it); any HF causal LM
directory works. Needs a CPU where oneDNN runs bf16 (AVX512); elsewhere it says so and exits.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_pair import measure_read_bandwidth  # noqa: E402
from throughput import eos_suppressed  # noqa: E402

from opdlab.config import ModelConfig  # noqa: E402
from opdlab.models.loading import load_model  # noqa: E402
from opdlab.rollout.builtin import sample  # noqa: E402
from opdlab.rollout.packed import PackedLinear, packing_supported  # noqa: E402
from opdlab.tasks.arithmetic import ArithmeticTask  # noqa: E402


def products(model, rows: int, repeats: int) -> dict[str, float]:
    """Seconds of one pass of `rows` x every Linear weight, plain bf16 F.linear against the packed copies."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    w16 = [m.weight.detach().bfloat16() for m in linears]
    packs = [PackedLinear(m, rows) for m in linears]
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=torch.bfloat16) for w in w16}
    variants = {"plain": lambda: [F.linear(xs[w.shape[1]], w) for w in w16],
                "packed": lambda: [p(xs[w.shape[1]]) for w, p in zip(w16, packs)]}
    best = {k: float("inf") for k in variants}
    with torch.no_grad():
        for f in variants.values():
            f()
        for _ in range(repeats):
            for k, f in variants.items():
                t0 = time.perf_counter()
                f()
                best[k] = min(best[k], time.perf_counter() - t0)
    best["bytes"] = float(sum(w.numel() * 2 for w in w16))
    return best


def sampling(model, tokenizer, batch: int, new_tokens: int, repeats: int) -> dict:
    problems = ArithmeticTask(seed=0, style="words", min_steps=3, max_steps=8, max_value=50).problems("train")[:batch]
    best, tokens = {"off": float("inf"), "auto": float("inf")}, {}
    with eos_suppressed(), torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(repeats):
            for packed in ("off", "auto"):
                g = torch.Generator().manual_seed(0)
                t0 = time.perf_counter()
                r = sample(model, tokenizer, problems, max_new_tokens=new_tokens, generator=g, packed=packed,
                           decoder="hf")  # transformers' forward, where packed_linears applies
                best[packed] = min(best[packed], time.perf_counter() - t0)
                tokens[packed] = r.completion_ids_B_T
    same = torch.equal(tokens["off"], tokens["auto"])
    agree = (tokens["off"] == tokens["auto"]).float().mean().item() if tokens["off"].shape == tokens["auto"].shape \
        else float("nan")
    return {**best, "same_tokens": same, "token_agreement": agree}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:smollm2-student")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="16 new tokens, 1 repeat")
    args = ap.parse_args(argv)
    if args.quick:
        args.new_tokens, args.repeats = 16, 1
    torch.set_num_threads(args.threads)
    if not packing_supported(torch.device("cpu")):
        print("oneDNN does not run bf16 on this CPU (no AVX512): nothing to compare; packed_linears stays off here")
        return
    model, tokenizer = load_model(ModelConfig(path=args.model), torch.device("cpu"), trainable=True,
                                  precision="bf16-mixed")
    model.eval()
    bandwidth = measure_read_bandwidth()
    prod = products(model, args.batch, max(args.repeats, 3))
    samp = sampling(model, tokenizer, args.batch, args.new_tokens, args.repeats)
    weight_bytes = 2 * sum(p.numel() for p in model.parameters())
    print(f"{args.model}: batch {args.batch}, {args.threads} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"\nproducts: every Linear weight ({prod['bytes'] / 1e6:.0f} MB bf16) x {args.batch} rows, best of "
          f"{max(args.repeats, 3)}")
    print(f"{'variant':<10}{'ms':>9}{'GB/s':>8}{'of bandwidth':>14}")
    for k in ("plain", "packed"):
        print(f"{k:<10}{prod[k] * 1e3:>9.2f}{prod['bytes'] / prod[k] / 1e9:>8.1f}"
              f"{prod['bytes'] / prod[k] / bandwidth:>13.0%}")
    print(f"packed / plain speed: {prod['plain'] / prod['packed']:.2f}x")
    T = args.new_tokens
    bound_ms = weight_bytes / bandwidth * 1e3
    print(f"\nsampling: sample(), {args.batch} x {T} new tokens, fp32 weights under bf16 autocast, best of "
          f"{args.repeats}; bandwidth bound {bound_ms:.1f} ms a step ({weight_bytes / 1e6:.0f} MB bf16)")
    print(f"{'packed_linears':<16}{'s':>8}{'tokens/s':>10}{'ms/step':>9}{'x bound':>9}")
    for k in ("off", "auto"):
        ms = samp[k] / T * 1e3
        print(f"{k:<16}{samp[k]:>8.2f}{args.batch * T / samp[k]:>10.1f}{ms:>9.1f}{ms / bound_ms:>9.1f}")
    print(f"auto / off speed: {samp['off'] / samp['auto']:.2f}x; same tokens: {samp['same_tokens']} "
          f"(agreement {samp['token_agreement']:.1%})")


if __name__ == "__main__":
    main()
