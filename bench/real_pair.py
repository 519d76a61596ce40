"""opdlab against TRL's GKDTrainer and DistillationTrainer on the SmolLM2 pair, with each stage's FLOP/s against this
machine's measured peak.

    pip install --no-deps -r requirements-bench.txt   # TRL, pinned
    opdlab prepare --pair smollm2                      # the pair (cached; ~30 min once)
    python bench/real_pair.py              # full: 8 prompts x 192 new tokens, 3 steps a run, 2 runs a side
    python bench/real_pair.py --quick      # smoke: 4 x 32, 2 steps, 1 run a side
    python bench/real_pair.py --out bench/results/real_pair.json

Sides, run interleaved in one process (the order rotates every round, so load from elsewhere hits all alike):

  * opdlab bf16-mixed   `train()` with `train.precision=bf16-mixed` (fp32 master weights, bf16 autocast)
  * opdlab fp32         the same loop in fp32 (the reference for the bf16-mixed speed-up)
  * TRL GKDTrainer      `trl.experimental.gkd`, lmbda = 1 (always on-policy), beta = 1
  * TRL Distillation    `trl.DistillationTrainer`, beta = 1 (reverse KL over the full vocabulary)

Every side trains the same objective: KL(student || teacher) over the whole vocabulary at each completion token
(opdlab's `jsd` with beta = 1), on the same prompts in the same order (the words arithmetic task's training
stream), the same student and teacher (`builtin:smollm2-student`, 24 layers, and `builtin:smollm2-teacher`, 30),
batch, completion length (EOS suppressed, so every completion is full length), temperature 1, AdamW at the same
lr, constant schedule, gradient clipping 1.0. Every side steps with PyTorch's fused AdamW: transformers' default,
and opdlab's `train.fused_optimizer` (`--fused-optimizer off` gives opdlab its own default, PyTorch's plain AdamW).
TRL runs in its own precision defaults, which work on this CPU: both configs default to `bf16=True` (autocast bf16
through accelerate, fp32 weights), with gradient checkpointing off (GKD's `SFTConfig` default turns it on, and with
it generates without a KV cache).

Per step: generation, teacher scoring and the rest (student forward, loss, backward, optimizer), read from
opdlab's `perf/*` metrics and, for TRL, from a callback and hooks that leave TRL's code unchanged. Each stage's
useful FLOPs are counted from the model shapes (2 x multiply-adds of every linear layer, the causal attention
products, the output layer where logits are needed, x3 for forward + backward), so the count is the same for all
sides, and divided by the stage's time. The peak is measured here: the best of a few matmuls of the models' own
shapes, in fp32 and bf16. Sampling is also held against its bandwidth bound: each decoding step must read every
weight of the student once (in bf16 under bf16-mixed), at the read bandwidth measured here.

Loss check: one batch of student samples, the same weights, opdlab's `jsd` objective against both TRL trainers'
loss functions, in fp32.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trl_compare  # noqa: E402  (bench/ is not a package)

SIDES = ("opdlab bf16-mixed", "opdlab fp32", "TRL GKDTrainer", "TRL Distillation")


# --------------------------------------------------------------------------------------------- the machine


def measure_peak(shapes: list[tuple[int, int, int]], repeats: int = 5) -> dict[str, float]:
    """Best achieved FLOP/s of (M, K) @ (K, N) matmuls of the given shapes, per dtype."""
    peak = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for M, K, N in shapes:
            a, b = torch.randn(M, K, dtype=dtype), torch.randn(K, N, dtype=dtype)
            a @ b
            for _ in range(repeats):
                t0 = time.perf_counter()
                a @ b
                best = max(best, 2 * M * K * N / (time.perf_counter() - t0))
        peak[name] = best
    return peak


def measure_read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of reading a 1 GiB fp32 tensor once (a sum: the access pattern of reading every weight)."""
    x = torch.ones(n_bytes // 4)
    x.sum()
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = max(best, n_bytes / (time.perf_counter() - t0))
    return best


# --------------------------------------------------------------------------------------------- FLOP counts


def shape_of(model) -> dict:
    c = model.config
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings())
    return {"linear": linear, "layers": c.num_hidden_layers, "hidden": c.hidden_size,
            "attn_width": c.num_attention_heads * getattr(c, "head_dim", c.hidden_size // c.num_attention_heads),
            "vocab": model.get_output_embeddings().weight.shape[0], "intermediate": c.intermediate_size,
            "weight_bytes_bf16": 2 * sum(p.numel() for p in model.parameters())}


def body_flops(s: dict, tokens: int, attended: int) -> float:
    """Forward FLOPs of the decoder body: every linear layer once per token, and the two attention products
    (QK^T, AV) over `attended` (query, key) pairs in all."""
    return 2 * s["linear"] * tokens + 4 * s["layers"] * s["attn_width"] * attended


def stage_flops(student: dict, teacher: dict, B: int, P: int, T: int) -> dict[str, float]:
    """Useful FLOPs of one step's stages for B rows of P prompt and T completion tokens."""
    L = P + T
    causal = B * L * (L + 1) // 2
    head_s, head_t = 2 * student["hidden"] * student["vocab"], 2 * teacher["hidden"] * teacher["vocab"]
    generation = body_flops(student, B * L, causal) + head_s * B * T  # prefill + T decoding steps, a head each
    teacher_scoring = body_flops(teacher, B * L, causal) + head_t * B * T
    update = 3 * (body_flops(student, B * L, causal) + head_s * B * T) + head_t * B * T  # the objective's
    return {"generation": generation, "teacher": teacher_scoring, "update": update}


# --------------------------------------------------------------------------------------------- TRL Distillation


def build_distillation_trainer(args, dirs: dict[str, Path], problems, out_dir: Path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import DistillationConfig, DistillationTrainer

    tokenizer = AutoTokenizer.from_pretrained(dirs["student"], padding_side="left")
    load = dict(dtype=torch.float32, attn_implementation="sdpa")
    student = AutoModelForCausalLM.from_pretrained(dirs["student"], **load)
    teacher = AutoModelForCausalLM.from_pretrained(dirs["teacher"], **load)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": p.question}]} for p in problems])
    with trl_compare.quiet():
        config = DistillationConfig(
            output_dir=str(out_dir), beta=1.0, temperature=1.0, top_p=1.0, max_completion_length=args.new_tokens,
            generation_kwargs={"min_new_tokens": args.new_tokens}, per_device_train_batch_size=args.batch,
            gradient_accumulation_steps=1, max_steps=args.steps, learning_rate=args.lr,
            lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999,
            max_grad_norm=1.0, gradient_checkpointing=False, use_cpu=True, shuffle_dataset=False, seed=0,
            data_seed=0, dataloader_num_workers=0, report_to="none", save_strategy="no", logging_steps=1,
            disable_tqdm=True, bf16=args.trl_bf16)
    threads = torch.get_num_threads()
    with trl_compare.quiet():
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                                      processing_class=tokenizer)
    torch.set_num_threads(threads)
    trainer.remove_callback(PrinterCallback)
    return trainer


class DistillationProbe(trl_compare.StepProbe):
    """A DistillationTrainer's steps and its generation (`_generate`, whose second output is the completions)."""

    def __init__(self, trainer):
        super().__init__(trainer)
        trainer._generate = self.timed(trainer._generate, lambda out: sum(len(c) for c in out[1]))


def run_distillation(args, dirs, problems, out_dir: Path) -> list[dict]:
    trainer = build_distillation_trainer(args, dirs, problems, out_dir)
    probe = DistillationProbe(trainer)
    with trl_compare.quiet():
        trainer.train()
    return probe.steps


def distillation_loss(args, dirs, problems, rollouts, root: Path) -> float:
    """DistillationTrainer's loss function on opdlab's sampled batch (fp32, per-token mean)."""
    trainer = build_distillation_trainer(args, dirs, problems[:args.batch], root / "distill-loss-check")
    inputs = {"prompt_ids": rollouts.prompt_ids_B_P, "prompt_mask": rollouts.prompt_mask_B_P,
              "completion_ids": rollouts.completion_ids_B_T, "completion_mask": rollouts.completion_mask_B_T}
    with torch.no_grad(), trl_compare.quiet():
        loss, _, _ = trainer._compute_loss(trainer.model, inputs, None)
    return loss.item()


# --------------------------------------------------------------------------------------------- the run


def run_side(name: str, args, dirs, problems, root: Path) -> list[dict]:
    if name.startswith("opdlab"):
        side_args = argparse.Namespace(**{**vars(args), "precision": name.split()[1]})
        return trl_compare.run_opdlab(side_args, dirs, root / "opdlab-run")
    if name == "TRL GKDTrainer":
        return trl_compare.run_trl(args, dirs, problems, root / "gkd-run")
    return run_distillation(args, dirs, problems, root / "distill-run")


def summarise(runs: list[list[dict]]) -> dict[str, float]:
    steps = [s for run in runs for s in (run[1:] or run)]  # each run's first step is a warm-up
    out = {k: statistics.median(s[k] for s in steps) for k in ("step_s", "gen_s", "teacher_s", "rest_s")}
    out["tokens"] = statistics.median(s["tokens"] for s in steps)
    out["tokens_per_s"] = statistics.median(s["tokens"] / s["step_s"] for s in steps)
    out["steps_measured"] = len(steps)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the bench itself")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--batch", type=int, default=None, help="prompts per step (default 8, quick 4)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per completion (default 192, quick 32)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run, the first unmeasured (default 3)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per side (default 2, quick 1)")
    parser.add_argument("--lr", type=float, default=1e-5, help="learning rate of every side")
    parser.add_argument("--packing", choices=["on", "off"], default="on", help=(
        "opdlab's scoring.packing (default on, as the SmolLM2 demo runs): the teacher's and the student's forwards "
        "over the rollouts compute the real tokens only, without the prompts' padding"))
    parser.add_argument("--fused-optimizer", choices=["on", "off"], default="on", help=(
        "opdlab's train.fused_optimizer (default on: transformers' Trainer, and so both TRL trainers, step with "
        "PyTorch's fused AdamW by default; opdlab's own default is PyTorch's plain AdamW)"))
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated subset of: " + ", ".join(SIDES))
    parser.add_argument("--out", default=None, help="write the numbers as JSON here (e.g. "
                                                    "bench/results/real_pair.json)")
    args = parser.parse_args(argv)
    sides = [s.strip() for s in args.sides.split(",")]
    if unknown := [s for s in sides if s not in SIDES]:
        parser.error(f"unknown side(s) {unknown}; choose from {', '.join(SIDES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from opdlab.runtime import bf16_is_fast

    if not bf16_is_fast(torch.device("cpu")) and not torch.cuda.is_available():
        sys.exit("this CPU has neither AMX nor AVX512-BF16, so every bf16 side of this bench (opdlab bf16-mixed, "
                 "TRL with bf16=True) would run on bf16's slow path (a 2048x2048 bf16 matmul measured 0.3 GFLOP/s "
                 "against 121 in fp32 on a 2-core AVX2 CPU): its ratios mean nothing here. Run it on a CPU with AMX "
                 "or on a GPU; `opdlab prepare --pair smollm2` itself runs in fp32 here (precision auto).")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trl, _, _ = trl_compare.import_trl()
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)  # e.g. GKD's "consider DistillationTrainer" notice

    from transformers import AutoModelForCausalLM

    from opdlab.experiments.pairs import SMOLLM2, is_prepared
    from opdlab.models.loading import builtin_dir

    if not all(is_prepared(r) for r in SMOLLM2.models):
        sys.exit("the SmolLM2 pair is not prepared here: run `opdlab prepare --pair smollm2` first "
                 "(~30 min on 2 cores)")
    args.batch = args.batch or (4 if args.quick else 8)
    args.new_tokens = args.new_tokens or (32 if args.quick else 192)
    args.steps = args.steps or (2 if args.quick else 3)
    args.repeats = args.repeats or (1 if args.quick else 2)
    args.trl_gradient_checkpointing, args.trl_bf16 = False, True
    # the pair's own task (opdlab.experiments.pairs.WORDS_TASK): worked solutions told as stories
    args.extra_overrides = ["task.arithmetic.style=words", "task.arithmetic.min_steps=3",
                            "task.arithmetic.max_steps=8", "task.arithmetic.max_value=50",
                            f"scoring.packing={str(args.packing == 'on').lower()}",
                            f"train.fused_optimizer={str(args.fused_optimizer == 'on').lower()}"]
    dirs = {"student": builtin_dir("smollm2-student"), "teacher": builtin_dir("smollm2-teacher")}
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()

    shapes = {k: shape_of(AutoModelForCausalLM.from_pretrained(dirs[k])) for k in ("student", "teacher")}
    with tempfile.TemporaryDirectory(prefix="opdlab-real-pair-") as tmp:
        root = Path(tmp)
        cfg = trl_compare.opdlab_config(argparse.Namespace(**{**vars(args), "precision": "fp32"}), dirs, root / "r")
        problems = trl_compare.stream_problems(cfg, args.batch * args.steps)
        fp32_args = argparse.Namespace(**{**vars(args), "trl_bf16": False})  # the loss check compares in fp32
        check = trl_compare.loss_check(fp32_args, dirs, problems, root)
        check["distillation"] = distillation_loss(fp32_args, dirs, problems, check.pop("rollouts"), root)
        runs: dict[str, list] = {s: [] for s in sides}
        for rep in range(args.repeats):
            order = sides[rep % len(sides):] + sides[:rep % len(sides)]
            for name in order:
                print(f"round {rep + 1}/{args.repeats}: {name} ...", flush=True)
                runs[name].append(run_side(name, args, dirs, problems, root))
    P = check["prompt_len"]
    flops = stage_flops(shapes["student"], shapes["teacher"], args.batch, P, args.new_tokens)
    peak_shapes = [(args.batch * (P + args.new_tokens), s["hidden"], s["intermediate"]) for s in shapes.values()]
    peak_shapes.append((1024, shapes["teacher"]["hidden"], shapes["teacher"]["vocab"]))
    peak = measure_peak(peak_shapes)
    bandwidth = measure_read_bandwidth()
    summary = {name: summarise(r) for name, r in runs.items()}
    report(args, trl, check, summary, flops, peak, bandwidth, shapes, load_before, P)
    print(f"(bench took {time.perf_counter() - t_start:.0f} s)")
    if args.out:
        write_json(Path(args.out), args, check, summary, flops, peak, bandwidth, shapes, load_before, P)


def stage_rows(name: str, s: dict, flops: dict, peak: dict, bandwidth: float, student: dict, T: int) -> dict:
    dtype = "fp32" if name == "opdlab fp32" else "bf16"
    rows = {}
    for stage, key in (("generation", "gen_s"), ("teacher", "teacher_s"), ("update", "rest_s")):
        achieved = flops[stage] / s[key]
        rows[stage] = {"seconds": s[key], "flops_per_s": achieved, "fraction_of_peak": achieved / peak[dtype],
                       "peak_dtype": dtype}
    weight_bytes = student["weight_bytes_bf16"] * (2 if dtype == "fp32" else 1)
    bound_s = T * weight_bytes / bandwidth
    rows["generation"]["bandwidth_bound_s"] = bound_s
    rows["generation"]["times_bandwidth_bound"] = s["gen_s"] / bound_s
    return rows


def report(args, trl, check, summary, flops, peak, bandwidth, shapes, load_before, P) -> None:
    import transformers

    cores = len(os.sched_getaffinity(0))
    print()
    print(f"SmolLM2 pair: student {shapes['student']['layers']} layers, teacher {shapes['teacher']['layers']}, "
          f"vocab {shapes['student']['vocab']}; {args.batch} prompts (longest {P} tokens) x {args.new_tokens} new "
          f"tokens, EOS suppressed; reverse KL over the full vocabulary; {'quick' if args.quick else 'full'}")
    print(f"machine: {platform.machine()}, {cores} cores, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), transformers {transformers.__version__}, trl {trl.__version__}; load {load_before:.1f} "
          f"before, {os.getloadavg()[0]:.1f} after")
    print(f"measured peak: fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s (best "
          f"matmul of the models' shapes); read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print()
    names = list(summary)
    print(f"{'':<26}" + "".join(f"{n:>20}" for n in names))
    print(f"{'training tokens/s':<26}" + "".join(f"{summary[n]['tokens_per_s']:>20.1f}" for n in names))
    for key, label in (("step_s", "step s"), ("gen_s", "  generation s"), ("teacher_s", "  teacher scoring s"),
                       ("rest_s", "  fwd, loss, bwd, optim s")):
        print(f"{label:<26}" + "".join(f"{summary[n][key]:>20.2f}" for n in names))
    for stage in ("generation", "teacher", "update"):
        cells = []
        for n in names:
            r = stage_rows(n, summary[n], flops, peak, bandwidth, shapes["student"], args.new_tokens)[stage]
            cells.append(f"{r['flops_per_s'] / 1e9:.0f} GF/s {100 * r['fraction_of_peak']:.0f}%")
        print(f"{'  ' + stage + ' FLOP/s, % peak':<26}" + "".join(f"{c:>20}" for c in cells))
    cells = []
    for n in names:
        r = stage_rows(n, summary[n], flops, peak, bandwidth, shapes["student"], args.new_tokens)["generation"]
        cells.append(f"{r['times_bandwidth_bound']:.1f}x")
    print(f"{'  sampling / bw bound':<26}" + "".join(f"{c:>20}" for c in cells))
    trl_best = max((summary[n]["tokens_per_s"] for n in names if n.startswith("TRL")), default=None)
    if trl_best and "opdlab bf16-mixed" in summary:
        print(f"opdlab bf16-mixed / fastest TRL trainer: {summary['opdlab bf16-mixed']['tokens_per_s'] / trl_best:.2f}x")
    if "opdlab fp32" in summary and "opdlab bf16-mixed" in summary:
        print(f"opdlab bf16-mixed / opdlab fp32: "
              f"{summary['opdlab bf16-mixed']['tokens_per_s'] / summary['opdlab fp32']['tokens_per_s']:.2f}x")
    print(f"loss check (fp32, one batch, same weights, per sampled token): opdlab {check['opdlab']:.8f}, "
          f"GKDTrainer {check['trl_mean']:.8f}, DistillationTrainer {check['distillation']:.8f}; student gradients "
          f"opdlab vs GKD: max |diff| / max |grad| {check['grad_rel_diff']:.1e}")


def write_json(path: Path, args, check, summary, flops, peak, bandwidth, shapes, load_before, P) -> None:
    trl_names = [n for n in summary if n.startswith("TRL")]
    trl_best = max(trl_names, key=lambda n: summary[n]["tokens_per_s"]) if trl_names else None
    opd = summary.get("opdlab bf16-mixed")
    out = {
        "precision": "bf16-mixed (opdlab); TRL bf16=True (its default), fp32 weights",
        "opdlab_tokens_per_s": opd["tokens_per_s"] if opd else None,
        "trl_tokens_per_s": summary[trl_best]["tokens_per_s"] if trl_best else None,
        "trl_trainer": trl_best,
        "ratio": opd["tokens_per_s"] / summary[trl_best]["tokens_per_s"] if opd and trl_best else None,
        "stages": {n: stage_rows(n, s, flops, peak, bandwidth, shapes["student"], args.new_tokens)
                   for n, s in summary.items()},
        "sides": summary,
        "peak_flops": peak, "read_bandwidth_bytes_per_s": bandwidth,
        "loss_check": {k: check[k] for k in ("opdlab", "trl_mean", "distillation", "grad_rel_diff")},
        "setup": {"batch": args.batch, "new_tokens": args.new_tokens, "prompt_len": P, "steps": args.steps,
                  "repeats": args.repeats, "quick": args.quick, "threads": torch.get_num_threads(),
                  "opdlab_scoring_packing": args.packing == "on",
                  "opdlab_fused_optimizer": args.fused_optimizer == "on",
                  "load_before": load_before, "load_after": os.getloadavg()[0], "torch": torch.__version__},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
