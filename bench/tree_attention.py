"""Lookahead candidate scoring: tree attention against a naive forward per candidate, and an LGR training step
against a plain OPD step, side by side in one run.

    python bench/tree_attention.py --threads 1                    # K = 8, rollouts of 256, 1024 and 2048 tokens
    python bench/tree_attention.py --threads 1 --naive-max 100    # time 100 naive positions per length, scaled
    python bench/tree_attention.py --parts scoring --threads 1    # one part: scoring, steps or task
    python bench/tree_attention.py --quick --threads 1            # smoke: 256 tokens, fewer naive forwards
    make bench-tree                                               # the whole run with --naive-max 100

Models: the built-in teacher and student (`builtin:teacher` / `builtin:student`, made by `opdlab prepare`); when
they are not prepared, random-init models of the same architecture (the header says which).

Part 1, scoring, per rollout length L: `--batch` student rollouts of exactly L tokens (EOS suppressed, as in
bench/throughput.py), the trigger positions and top-K candidates from the student (`student_candidates`, K = 8,
tau = 0.2: the trigger rate is what the student shows on those rollouts), then both ways of getting the rollout's
teacher hidden states plus every candidate's teacher distribution one step ahead:

    naive  the ordinary scoring forward over the rollout, then one teacher forward per trigger position over the K
           sequences (prompt, y_<t, v_k), batched K at a time (each candidate still gets its own full-prefix forward)
    tree   `opdlab.teacher.tree_attention.tree_forward`: the rollout once, segment by segment, and all candidate leaves
           in batches on top of its KV cache

Both reduce each candidate's distribution to the same statistics (`leaf_confidence`); the table prints the largest
difference between the two. With `--naive-max N`, the naive pass times a uniform sample of N trigger positions per
length and scales the time by (all positions / sampled ones); the table says when it did.

Part 2, training steps: `opdlab.train.train()` run for `--steps` steps with objective `opd` and with `lookahead`
(same config, same seed, interleaved opd / lookahead / lookahead / opd), whole-step time read back from
metrics.jsonl (perf/rollout_s + perf/teacher_s + perf/update_s, first step of each run left out), at each L with EOS
suppressed and once on the built-in task as a run sees it (EOS on, 32 prompts, at most 96 new tokens). The
lookahead step's trigger rate is its own `lookahead/trigger_rate` metric.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import eos_suppressed, save_builtin_models  # noqa: E402


def model_dirs(root: Path) -> tuple[dict[str, str], str]:
    from opdlab.models.loading import ModelLoadError, resolve_path
    try:
        return {n: resolve_path(f"builtin:{n}") for n in ("student", "teacher")}, "built-in (prepared)"
    except ModelLoadError:
        return {k: str(v) for k, v in save_builtin_models(root).items()}, "built-in architecture, random init"


def naive_candidates(teacher, rollouts, trigger_B_T, ids_B_T_K, leaf_fn, positions) -> torch.Tensor:
    """(n, K, F) leaf statistics, one teacher forward per trigger position in `positions` (K rows each)."""
    out = []
    for b, t in tqdm(positions, desc="naive", leave=False, dynamic_ncols=True):
        prefix = torch.cat([rollouts.prompt_ids_B_P[b][rollouts.prompt_mask_B_P[b].bool()],
                            rollouts.completion_ids_B_T[b, :t]])
        K = ids_B_T_K.shape[-1]
        seqs_K_L = torch.cat([prefix.expand(K, -1), ids_B_T_K[b, t][:, None]], dim=1)
        hidden_K_H = teacher.get_decoder()(input_ids=seqs_K_L).last_hidden_state[:, -1]
        out.append(leaf_fn(hidden_K_H))
    return torch.stack(out)


@torch.no_grad()
def bench_scoring(dirs, L: int, batch: int, k: int, tau: float, segment: int, naive_max: int | None) -> dict:
    from opdlab.config import ModelConfig
    from opdlab.models.logprobs import completion_hidden
    from opdlab.models.loading import load_model
    from opdlab.rollout.builtin import sample
    from opdlab.tasks.arithmetic import ArithmeticTask
    from opdlab.teacher.tree_attention import leaf_confidence, student_candidates, tree_forward

    student, tok = load_model(ModelConfig(path=dirs["student"]))
    teacher, _ = load_model(ModelConfig(path=dirs["teacher"]))
    V = len(tok)
    problems = list(ArithmeticTask(2, 4, seed=0).problems("train")[:batch])
    with eos_suppressed():
        rollouts = sample(student, tok, problems, max_new_tokens=L, generator=torch.Generator().manual_seed(0),
                          vocab_size=V)
    trigger_B_T, ids_B_T_K = student_candidates(student, rollouts, k, tau, V)
    leaf_fn = leaf_confidence(teacher.get_output_embeddings(), V)
    args = (rollouts.prompt_ids_B_P, rollouts.prompt_mask_B_P, rollouts.completion_ids_B_T,
            rollouts.completion_mask_B_T)

    warm = rollouts.select([0])  # warm-up (lazy initialisation, allocator) on one row's first 32 positions
    tree_forward(teacher, warm.prompt_ids_B_P, warm.prompt_mask_B_P, warm.completion_ids_B_T[:, :32],
                 warm.completion_mask_B_T[:, :32], trigger_B_T[:1, :32], ids_B_T_K[:1, :32], leaf_fn)
    t0 = time.perf_counter()
    _, tree_B_T_K_F = tree_forward(teacher, *args, trigger_B_T, ids_B_T_K, leaf_fn, segment_len=segment)
    tree_s = time.perf_counter() - t0

    positions = trigger_B_T.nonzero().tolist()
    timed = positions
    if naive_max is not None and len(positions) > naive_max:
        g = torch.Generator().manual_seed(0)
        timed = [positions[i] for i in torch.randperm(len(positions), generator=g)[:naive_max].sort().values]
    t0 = time.perf_counter()
    completion_hidden(teacher, *args)  # the rollout's own scoring forward, which the tree pass also does
    naive_n_K_F = naive_candidates(teacher, rollouts, trigger_B_T, ids_B_T_K, leaf_fn, timed)
    naive_s = (time.perf_counter() - t0) * len(positions) / max(len(timed), 1)
    b_n, t_n = torch.tensor(timed).T if timed else (torch.zeros(0, dtype=torch.long),) * 2
    diff = (tree_B_T_K_F[b_n, t_n] - naive_n_K_F).abs().max().item() if timed else float("nan")
    return {"L": L, "batch": batch, "triggers": len(positions), "trigger_rate": len(positions) / rollouts.num_tokens,
            "leaves": len(positions) * k, "naive_s": naive_s, "tree_s": tree_s, "naive_sampled": len(timed),
            "max_diff": diff}


def run_train(dirs, root: Path, name: str, objective: str, extra: list[str], steps: int, eos: bool) -> dict:
    from opdlab.config import load_config
    from opdlab.train import train

    run_dir = root / name
    cfg = load_config(None, [f"student.path={dirs['student']}", f"teacher.path={dirs['teacher']}", "device=cpu",
                             f"objective.name={objective}", f"train.steps={steps}", f"train.save_every={steps}",
                             "train.sample_every=100000", "train.lr=1e-5", f"run_dir={run_dir}", *extra])
    with contextlib.nullcontext() if eos else eos_suppressed():
        train(cfg, progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    return {"step_s": [r["perf/rollout_s"] + r["perf/teacher_s"] + r["perf/update_s"] for r in rows],
            "teacher_s": [r["perf/teacher_s"] for r in rows], "update_s": [r["perf/update_s"] for r in rows],
            "trigger_rate": [r.get("lookahead/trigger_rate", float("nan")) for r in rows],
            "len": [r["train/response_len"] for r in rows]}


def bench_steps(dirs, root: Path, label: str, extra: list[str], steps: int, eos: bool) -> dict:
    runs = {"opd": [], "lookahead": []}
    for i, objective in enumerate(("opd", "lookahead", "lookahead", "opd")):  # interleaved against load drift
        runs[objective].append(run_train(dirs, root, f"{label}-{i}-{objective}", objective, extra, steps, eos))
    pooled = {obj: {k: [v for r in rs for v in r[k]] for k in rs[0]} for obj, rs in runs.items()}
    med = {obj: {k: statistics.median(v) for k, v in d.items()} for obj, d in pooled.items()}
    return {"label": label, "opd_s": med["opd"]["step_s"], "lgr_s": med["lookahead"]["step_s"],
            "opd_teacher_s": med["opd"]["teacher_s"], "lgr_teacher_s": med["lookahead"]["teacher_s"],
            "trigger_rate": statistics.mean(pooled["lookahead"]["trigger_rate"]), "len": med["opd"]["len"],
            "steps_pooled": len(pooled["opd"]["step_s"])}


def scoring_row(r: dict) -> str:
    note = "" if r["naive_sampled"] == r["triggers"] else f"  (naive: {r['naive_sampled']} positions timed, scaled)"
    return (f"{r['L']:>6} {r['batch']:>8} {r['trigger_rate']:>12.1%} {r['leaves']:>7} {r['naive_s']:>9.2f} "
            f"{r['tree_s']:>8.2f} {r['naive_s'] / r['tree_s']:>11.1f}x {r['max_diff']:>10.1e}{note}")


def steps_row(r: dict) -> str:
    what = f"{r['label'][1:]} tokens, EOS off" if r["label"] != "task" else "built-in task, EOS on"
    return (f"{what:>22} {r['len']:>8.0f} {r['trigger_rate']:>12.1%} {r['opd_s']:>10.2f} {r['lgr_s']:>10.2f} "
            f"{r['lgr_s'] / r['opd_s']:>8.2f}x {r['opd_teacher_s']:>9.2f} / {r['lgr_teacher_s']:<8.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024, 2048])
    p.add_argument("--batch", type=int, default=2, help="rollouts per length in the scoring comparison")
    p.add_argument("--k", type=int, default=8)
    p.add_argument("--tau", type=float, default=0.2)
    p.add_argument("--segment", type=int, default=None, help="tree segment length (default: the config's)")
    p.add_argument("--naive-max", type=int, default=None, help="time at most N trigger positions per length")
    p.add_argument("--train-batch", type=int, default=4, help="prompts per step in the training comparison")
    p.add_argument("--steps", type=int, default=3, help="steps per training run (the first is left out)")
    p.add_argument("--parts", nargs="+", choices=["scoring", "steps", "task"], default=["scoring", "steps", "task"],
                   help="scoring: naive vs tree; steps: lgr vs opd steps at each length; task: on the built-in task")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (1 on a shared CPU)")
    p.add_argument("--student", help="student model directory (default: the built-in student)")
    p.add_argument("--teacher", help="teacher model directory (default: the built-in teacher)")
    p.add_argument("--task-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config overrides of the task row, after its defaults, e.g. task.arithmetic.min_steps=8 "
                        "task.arithmetic.max_steps=12 rollout.max_new_tokens=400 rollout.prompts_per_step=16")
    p.add_argument("--quick", action="store_true", help="256 tokens only, naive capped at 40 positions")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.lengths, args.naive_max, args.steps = [256], args.naive_max or 40, 2
    from opdlab.config import ObjectiveConfig
    segment = args.segment or ObjectiveConfig().lookahead.segment
    common = [f"objective.lookahead.k={args.k}", f"objective.lookahead.tau={args.tau}",
              f"objective.lookahead.segment={segment}"]
    import transformers

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dirs, kind = model_dirs(root)
        if args.student or args.teacher:
            dirs = {"student": args.student or dirs["student"], "teacher": args.teacher or dirs["teacher"]}
            kind = f"student {dirs['student']}, teacher {dirs['teacher']}"
        print(f"# tree attention bench: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
              f"{torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} thread(s)")
        print(f"# models: {kind}; K = {args.k}, tau = {args.tau}, tree segment = {segment}; load average before "
              f"{load_before[0]:.2f}", flush=True)
        if "scoring" in args.parts:  # rows are printed as they are measured
            tqdm.write("\nscoring: rollout + every candidate's teacher distribution one step ahead")
            tqdm.write(f"{'L':>6} {'rollouts':>8} {'trigger rate':>12} {'leaves':>7} {'naive s':>9} {'tree s':>8} "
                       f"{'tree speedup':>12} {'max |diff|':>10}")
            for L in args.lengths:
                tqdm.write(scoring_row(bench_scoring(dirs, L, args.batch, args.k, args.tau, segment, args.naive_max)))
        if {"steps", "task"} & set(args.parts):
            tqdm.write("\ntraining step: train() with objective lookahead vs opd, median whole-step seconds")
            tqdm.write(f"{'rollouts':>22} {'resp len':>8} {'trigger rate':>12} {'opd step s':>10} {'lgr step s':>10} "
                       f"{'lgr / opd':>9} {'teacher s opd / lgr':>20}")
        if "steps" in args.parts:
            for L in args.lengths:
                tqdm.write(steps_row(bench_steps(dirs, root, f"L{L}", [
                    *common, f"rollout.prompts_per_step={args.train_batch}", f"rollout.max_new_tokens={L}"],
                    args.steps, eos=False)))
        if "task" in args.parts:
            tqdm.write(steps_row(bench_steps(dirs, root, "task", [
                *common, "task.arithmetic.max_steps=3", "task.arithmetic.max_value=19", "rollout.prompts_per_step=32",
                "rollout.max_new_tokens=96", *args.task_overrides], args.steps, eos=True)))
    load_after = os.getloadavg()
    print(f"\n# load average after {load_after[0]:.2f}" + (
        "  (the CPU was busy: timings are noisy)" if max(load_before[0], load_after[0]) > (os.cpu_count() or 1)
        else ""))


if __name__ == "__main__":
    main()
