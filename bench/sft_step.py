"""One SFT step of `opdlab prepare --pair smollm2`'s recipe against one right-padded row per example, side by side
in one run:

    padded        one right-padded row per example, the model's own loss, AdamW (`packing: false`)
    packed        the examples end to end without padding, each attending to itself only (one row with sequence
                  bounds: `opdlab.models.packing.segments_hidden`), the output layer only where a label is and
                  without (positions, vocabulary) logits (`linear_cross_entropy`), AdamW (`packing: true`)
    packed+fused  as packed, with PyTorch's fused AdamW (`fused_optimizer: true`): the pair's recipes

    python bench/sft_step.py                 # SmolLM2-135M-Instruct, the teacher recipe's batch (16), 4 batches
    python bench/sft_step.py --quick         # batch 4, 2 batches
    python bench/sft_step.py --model PATH --batch 16 --batches 4 --precision bf16-mixed

Each batch is run by every variant in turn (the order reversed every other batch, so a busy CPU slows all alike),
one optimizer step each from the same weights (restored in between), after one unmeasured warm-up step each.
Printed per variant: the tokens the forward computes, the mean step time, the ratio to padded, and the achieved
FLOP/s of the useful work (6 x the linear parameters x the real tokens, plus the output layer at the labelled
positions) against this machine's peak for the dtype, measured with a matmul of the model's shapes. The variants'
losses on the same batch are the same quantity (they differ by rounding).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_pair import measure_peak  # noqa: E402

from opdlab.config import ModelConfig, TaskConfig  # noqa: E402
from opdlab.experiments.pairs import WORDS_TASK  # noqa: E402
from opdlab.models.loading import load_model  # noqa: E402
from opdlab.models.zoo import smollm2_dir  # noqa: E402
from opdlab.runtime import resolve_precision  # noqa: E402
from opdlab.sft import packed_sft_batch, sft_batch, sft_rows, sft_step  # noqa: E402
from opdlab.tasks import make_task  # noqa: E402
from opdlab.tasks.base import ProblemStream  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF causal LM directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--batch", type=int, default=None, help="examples a step (default 16, quick 4)")
    parser.add_argument("--batches", type=int, default=None, help="measured batches (default 4, quick 2)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16-mixed"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, n_batches = args.batch or (4 if args.quick else 16), args.batches or (2 if args.quick else 4)
    device = torch.device("cpu")
    precision = resolve_precision(args.precision, device)
    model, tok = load_model(ModelConfig(path=args.model or str(smollm2_dir())), device, trainable=True,
                            precision=precision)
    model.train()
    start = copy.deepcopy(model.state_dict())
    task = make_task(TaskConfig(**WORDS_TASK))
    stream = ProblemStream(task.problems("train"), seed=0)
    batches = [stream.take(batch) for _ in range(n_batches + 1)]
    head = model.get_output_embeddings().weight
    linear = sum(m.weight.numel() for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and m.weight is not head)

    def step(variant: str, problems) -> tuple[float, float, int]:
        model.load_state_dict(start)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=variant == "packed+fused" or None)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        batch = (sft_batch if variant == "padded" else packed_sft_batch)(tok, task, problems, device)
        computed = batch[0].numel() if variant == "padded" else batch.input_ids_N.numel()
        t0 = time.perf_counter()
        loss = sft_step(model, opt, sched, batch, precision=precision)
        return time.perf_counter() - t0, loss.item(), computed

    variants = ("padded", "packed", "packed+fused")
    for v in variants:
        step(v, batches[0])
    times = {v: [] for v in variants}
    computed = {v: 0 for v in variants}
    losses = {v: [] for v in variants}
    useful_flops = []
    for i, problems in enumerate(batches[1:]):
        order = variants if i % 2 == 0 else variants[::-1]
        for v in order:
            s, loss, n = step(v, problems)
            times[v].append(s), losses[v].append(loss)
            computed[v] += n
        rows = sft_rows(tok, task, problems)  # useful work: every real token, the output layer where a label is
        labelled = sum(y != -100 for _, labels in rows for y in labels)
        useful_flops.append(6 * linear * sum(len(ids) for ids, _ in rows) + 6 * head.numel() * labelled)
        print(f"batch {i + 1}: " + ", ".join(f"{v} {times[v][-1]:.2f} s (loss {losses[v][-1]:.4f})" for v in variants),
              flush=True)
    peak = measure_peak([(4096, model.config.hidden_size, model.config.intermediate_size),
                         (1024, model.config.hidden_size, head.shape[0])])
    dtype = "bf16" if precision == "bf16-mixed" else "fp32"
    useful = statistics.mean(useful_flops)
    print(f"\nSFT step, {batch} examples, precision {precision}, {n_batches} batches; peak {dtype} "
          f"{peak[dtype] / 1e9:.0f} GFLOP/s (a matmul of the model's shapes)")
    print(f"{'variant':<13} {'tokens computed':>16} {'s/step':>8} {'vs padded':>10} {'useful GFLOP/s':>15} "
          f"{'of peak':>8}")
    padded = statistics.mean(times["padded"])
    for v in variants:
        t = statistics.mean(times[v])
        print(f"{v:<13} {computed[v] / n_batches:>16.0f} {t:>8.2f} {padded / t:>9.2f}x {useful / t / 1e9:>15.0f} "
              f"{100 * useful / t / peak[dtype]:>7.0f}%")
    print("largest loss difference from padded: " + ", ".join(
        f"{v} {max(abs(a - b) for a, b in zip(losses['padded'], losses[v])):.2e}" for v in variants[1:]))

if __name__ == "__main__":
    main()
