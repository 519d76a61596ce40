"""Teacher scoring and the student's update on the SmolLM2 demo's own rollouts, in the padded layout (prompts
left-padded, completions right-padded) against packed (`scoring.packing: true`), side by side in one run.

    opdlab prepare --pair smollm2
    python bench/packed_rollouts.py              # the demo's config: 8 rollouts of up to 320 tokens, 4 batches
    python bench/packed_rollouts.py --quick      # 4 rollouts of up to 64 tokens, 2 batches
    python bench/packed_rollouts.py --batches 4 --out bench/results/packed_rollouts.txt

The batches are sampled once by the student (the demo's settings: EOS ends a rollout, so their lengths vary), then
each batch is scored by the teacher and put through the objective's forward and backward (`forward_kl`, the demo's)
by both variants in turn, the order alternating, after one unmeasured warm-up of each; no optimizer step is taken,
so both see the same weights. Printed per variant: the positions the forward computes (rows x row length), the
mean time of the two stages, the ratio, and the achieved FLOP/s of the useful work (`real_pair.stage_flops`'s
counts over the real tokens only) against this machine's peak for the dtype. The loss of the two variants on the
same batch is the same quantity; its largest difference is printed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_pair import body_flops, measure_peak, shape_of  # noqa: E402

from opdlab.config import load_config  # noqa: E402
from opdlab.experiments.pairs import SMOLLM2, is_prepared  # noqa: E402
from opdlab.run import build_run  # noqa: E402
from opdlab.step import accumulate_gradients, sample_rollouts, score_rollouts  # noqa: E402
from opdlab.train import resolve_defaults  # noqa: E402

VARIANTS = ("padded", "packed")


def useful_flops(shapes: dict, rollouts) -> dict[str, float]:
    """Useful FLOPs of the teacher's scoring and the update on these rollouts: real tokens only, each row's own
    causal attention, the output layer at completion positions (x3 for the student's forward + backward)."""
    n_B = (rollouts.prompt_mask_B_P.sum(1) + rollouts.completion_mask_B_T.sum(1)).tolist()
    tokens, attended = sum(n_B), sum(n * (n + 1) // 2 for n in n_B)
    T = rollouts.num_tokens
    head_s, head_t = (2 * shapes[k]["hidden"] * shapes[k]["vocab"] for k in ("student", "teacher"))
    teacher = body_flops(shapes["teacher"], tokens, attended) + head_t * T
    update = 3 * (body_flops(shapes["student"], tokens, attended) + head_s * T) + head_t * T
    return {"teacher": teacher, "update": update}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=None, help="measured batches (default 4, quick 2)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    if not all(is_prepared(r) for r in SMOLLM2.models):
        sys.exit("the SmolLM2 pair is not prepared here: run `opdlab prepare --pair smollm2` first")
    n_batches = args.batches or (2 if args.quick else 4)
    quick = ["rollout.prompts_per_step=4", "rollout.max_new_tokens=64"] if args.quick else []
    with tempfile.TemporaryDirectory(prefix="opdlab-packed-") as tmp:
        cfg = load_config(SMOLLM2.config_path(), [f"run_dir={tmp}/run", "track.backends=[jsonl]", *quick])
        run = build_run(resolve_defaults(cfg))
        batches = [sample_rollouts(run, step)[1] for step in range(n_batches + 1)]
        shapes = {"student": shape_of(run.student), "teacher": shape_of(run.teacher)}
        configs = {v: run.cfg.model_copy(update={"scoring": run.cfg.scoring.model_copy(
            update={"packing": v == "packed"})}) for v in VARIANTS}

        def stages(variant: str, rollouts) -> tuple[float, float, float]:
            run.cfg = configs[variant]
            t0 = time.perf_counter()
            scores = score_rollouts(run, rollouts)
            t1 = time.perf_counter()
            loss = accumulate_gradients(run, rollouts, scores).loss
            return t1 - t0, time.perf_counter() - t1, loss

        for v in VARIANTS:
            stages(v, batches[0])
        times = {v: {"teacher": [], "update": []} for v in VARIANTS}
        losses = {v: [] for v in VARIANTS}
        flops = {"teacher": [], "update": []}
        for i, rollouts in enumerate(batches[1:]):
            for v in (VARIANTS if i % 2 == 0 else VARIANTS[::-1]):
                t_s, u_s, loss = stages(v, rollouts)
                times[v]["teacher"].append(t_s), times[v]["update"].append(u_s), losses[v].append(loss)
            for k, f in useful_flops(shapes, rollouts).items():
                flops[k].append(f)
            lengths = (rollouts.prompt_mask_B_P.sum(1) + rollouts.completion_mask_B_T.sum(1)).tolist()
            print(f"batch {i + 1}: {len(lengths)} rollouts of {min(lengths)}-{max(lengths)} tokens; " + ", ".join(
                f"{v} {times[v]['teacher'][-1]:.2f} + {times[v]['update'][-1]:.2f} s" for v in VARIANTS), flush=True)
        padded_positions = statistics.mean(r.input_ids().numel() for r in batches[1:])
        real_positions = statistics.mean(r.prompt_mask_B_P.sum().item() + r.num_tokens for r in batches[1:])
        hidden = run.student.config.hidden_size
        peak = measure_peak([(4096, hidden, run.student.config.intermediate_size),
                             (1024, hidden, shapes["student"]["vocab"])])
    dtype = "bf16" if run.cfg.train.precision == "bf16-mixed" else "fp32"
    lines = [f"teacher scoring + update ({run.cfg.objective.name}) on the SmolLM2 demo's rollouts, "
             f"{run.cfg.rollout.prompts_per_step} a batch, {n_batches} batches, precision {run.cfg.train.precision}; "
             f"peak {dtype} {peak[dtype] / 1e9:.0f} GFLOP/s (a matmul of the model's shapes)",
             f"positions a batch: padded layout {padded_positions:.0f}, real tokens {real_positions:.0f}",
             f"{'variant':<8} {'teacher s':>10} {'of peak':>8} {'update s':>9} {'of peak':>8} {'both s':>8}"]
    mean = {v: {k: statistics.mean(t) for k, t in times[v].items()} for v in VARIANTS}
    for v in VARIANTS:
        frac = {k: statistics.mean(flops[k]) / mean[v][k] / peak[dtype] for k in flops}
        lines.append(f"{v:<8} {mean[v]['teacher']:>10.2f} {100 * frac['teacher']:>7.0f}% {mean[v]['update']:>9.2f} "
                     f"{100 * frac['update']:>7.0f}% {sum(mean[v].values()):>8.2f}")
    both = {v: sum(mean[v].values()) for v in VARIANTS}
    lines.append(f"packed is {mean['padded']['teacher'] / mean['packed']['teacher']:.2f}x (teacher), "
                 f"{mean['padded']['update'] / mean['packed']['update']:.2f}x (update), "
                 f"{both['padded'] / both['packed']:.2f}x (both); largest loss difference "
                 f"{max(abs(a - b) for a, b in zip(losses['padded'], losses['packed'])):.2e}")
    print("\n" + "\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
