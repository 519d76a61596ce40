"""Throughput and memory of the OPD pipeline, printed side by side in one table.

    python bench/throughput.py            # full: batch 32 x 128 new tokens, 4 train() steps, 4k-token memory test
    python bench/throughput.py --quick    # smoke: small batch, 2 steps, 1k-token memory test (~20 s)
    python bench/throughput.py --threads 1
    make bench                            # the full run, in the project's virtual environment

What it measures (all on CPU or whatever `--device` names; models are random-init, since speed does not depend on
training):

  * rollout      `opdlab.rollout.builtin.sample` with the built-in student: generated tokens / s.
  * scoring      `opdlab.teacher.scoring.score` with the built-in teacher on those rollouts: completion tokens / s (the
                 forward pass also covers the prompts).
  * OPD step     `opdlab.train.train()` itself for a few steps, read back from metrics.jsonl: `perf/tokens_per_s`
                 (completion tokens / whole step) and its split `perf/rollout_s`, `perf/teacher_s`,
                 `perf/update_s`. The first step is left out of the mean (one-off allocations and lazy imports).
                 This is the real loop, not a re-implementation of it, so it cannot drift from what `train()` does.
  * memory       peak RSS of scoring one 4096-token sequence with a 151,936-token vocabulary (1-layer Llama,
                 hidden 64): `score` with chunk_size 1024 (and 256) against the naive full-logit computation
                 (logits for all positions, log_softmax, gather, top-k, entropy). Each variant runs in a fresh
                 subprocess and reports ru_maxrss minus the RSS just before the call, so weights and inputs do not
                 count; the variants' log-probs are compared to check they compute the same thing.

The built-in models are saved with `save_pretrained` to a temp dir and loaded with `opdlab.models.loading.load_model`,
the path a run takes. EOS is suppressed during the bench (the stop-token list is replaced by an id that is never
sampled) so every rollout is exactly `max_new_tokens` long: a random-init model would otherwise stop at random
lengths. The decode loop computes every row at every step either way, so this changes only when the loop ends.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

MEMORY_VOCAB = 151_936  # Qwen-family vocabulary: the case chunking is for
MEMORY_HIDDEN = 64
MEMORY_TOP_K = 8


# --------------------------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def eos_suppressed() -> Iterator[None]:
    """Make `sample` (and so `train()`) never stop early: its stop-token list becomes an id no sampler returns."""
    import opdlab.rollout.builtin

    real = opdlab.rollout.builtin.stop_token_ids
    opdlab.rollout.builtin.stop_token_ids = lambda model, tokenizer: [-1]
    try:
        yield
    finally:
        opdlab.rollout.builtin.stop_token_ids = real


def save_builtin_models(root: Path) -> dict[str, Path]:
    """Random-init built-in teacher and student, each saved with the character tokenizer beside it."""
    from opdlab.models.loading import build_char_tokenizer, init_builtin_model

    tokenizer = build_char_tokenizer()
    dirs = {}
    for name in ("student", "teacher"):
        model = init_builtin_model(name, tokenizer, seed=0)
        dirs[name] = root / name
        model.save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of `repeats` calls of fn (and the last result)."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # score() returns without a host sync on a GPU
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    """Peak RSS of this process so far (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------- speed


def bench_speed(dirs: dict[str, Path], batch: int, new_tokens: int, repeats: int, device: str) -> dict:
    """Standalone rollout and teacher-scoring throughput on one fixed batch of arithmetic prompts."""
    from opdlab.config import ModelConfig
    from opdlab.models.loading import check_compatible, load_model
    from opdlab.rollout.builtin import sample
    from opdlab.tasks.arithmetic import ArithmeticTask
    from opdlab.teacher.scoring import score

    student, tok = load_model(ModelConfig(path=str(dirs["student"])), device)
    teacher, t_tok = load_model(ModelConfig(path=str(dirs["teacher"])), device)
    vocab = check_compatible(student, tok, teacher, t_tok).vocab_size
    problems = list(ArithmeticTask(2, 4, seed=0).problems("train")[:batch])
    gen = torch.Generator(device=device)

    def rollout():
        gen.manual_seed(0)
        return sample(student, tok, problems, max_new_tokens=new_tokens, generator=gen, vocab_size=vocab)

    with eos_suppressed():
        sample(student, tok, problems[:2], max_new_tokens=4, vocab_size=vocab)  # warm-up: lazy init, allocator
        rollout_s, rollouts = timed(rollout, repeats)
    score(teacher, rollouts.select([0]), vocab)  # warm-up
    score_s, _ = timed(lambda: score(teacher, rollouts, vocab, chunk_size=1024), repeats)
    return {
        "tokens": rollouts.num_tokens, "prompt_len": rollouts.prompt_ids_B_P.shape[1],
        "rollout_s": rollout_s, "score_s": score_s, "vocab": vocab,
        "student_params": n_params(student), "teacher_params": n_params(teacher),
    }


def bench_train(dirs: dict[str, Path], root: Path, batch: int, new_tokens: int, steps: int, device: str) -> dict:
    """Run `train()` for `steps` steps and average its own perf/* metrics over the steps after the first."""
    from opdlab.config import load_config
    from opdlab.train import train

    run_dir = root / "run"
    cfg = load_config(None, [
        f"student.path={dirs['student']}", f"teacher.path={dirs['teacher']}", f"device={device}",
        f"rollout.prompts_per_step={batch}", f"rollout.max_new_tokens={new_tokens}", f"train.steps={steps}",
        f"train.save_every={steps}", "train.sample_every=100000", "train.precision=fp32", f"run_dir={run_dir}"])
    with eos_suppressed():
        train(cfg, progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    measured = rows[1:] or rows
    keys = ("perf/tokens_per_s", "perf/rollout_s", "perf/teacher_s", "perf/update_s", "train/response_len")
    out = {k: statistics.mean(r[k] for r in measured) for k in keys}
    out["steps_averaged"] = [r["step"] for r in measured]
    return out


# --------------------------------------------------------------------------------------------- memory


def save_memory_model(root: Path) -> Path:
    """A 1-layer Llama with a 151,936-token vocabulary and hidden size 64: the head dominates, like real models'
    scoring memory does. Saved with the char tokenizer so `load_model` takes it (its ids are not used)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from opdlab.models.loading import build_char_tokenizer

    config = LlamaConfig(vocab_size=MEMORY_VOCAB, hidden_size=MEMORY_HIDDEN, intermediate_size=4 * MEMORY_HIDDEN,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    path = root / "vocab150k"
    LlamaForCausalLM(config).save_pretrained(path)
    build_char_tokenizer().save_pretrained(path)
    return path


def naive_scores(teacher, ids_B_L: torch.Tensor, mask_B_L: torch.Tensor, P: int, top_k: int) -> dict:
    """What one writes without chunking: full logits for every position, then the statistics from them."""
    from opdlab.models.prompts import position_ids

    logits_B_L_V = teacher(input_ids=ids_B_L, attention_mask=mask_B_L, position_ids=position_ids(mask_B_L)).logits
    logp_B_T_V = torch.log_softmax(logits_B_L_V[:, P - 1:-1].float(), dim=-1)
    del logits_B_L_V
    targets_B_T = ids_B_L[:, P:]
    p_B_T_V = logp_B_T_V.exp()
    return {
        "logp": logp_B_T_V.gather(-1, targets_B_T[..., None]).squeeze(-1),
        "entropy": -(p_B_T_V * logp_B_T_V).sum(-1),
        "maxp": p_B_T_V.max(-1).values,
        "topk_logp": logp_B_T_V.topk(top_k, dim=-1).values,
    }


def memory_worker(model_dir: str, variant: str, seq_len: int, out_path: str) -> None:
    """Runs in a fresh process: score one sequence with `variant` ('full' or 'chunk<N>') and write the numbers."""
    from opdlab.config import ModelConfig
    from opdlab.models.loading import load_model
    from opdlab.teacher.scoring import score
    from opdlab.types import Rollouts

    teacher, _ = load_model(ModelConfig(path=model_dir))
    g = torch.Generator().manual_seed(0)
    P = 1  # one prompt token, then `seq_len` scored tokens
    ids_B_L = torch.randint(0, MEMORY_VOCAB, (1, P + seq_len), generator=g)
    mask_B_L = torch.ones_like(ids_B_L)
    zeros_B_T = torch.zeros(1, seq_len)
    rollouts = Rollouts(prompt_ids_B_P=ids_B_L[:, :P], prompt_mask_B_P=mask_B_L[:, :P],
                        completion_ids_B_T=ids_B_L[:, P:], completion_mask_B_T=mask_B_L[:, P:],
                        logp_old_B_T=zeros_B_T, sampler_logp_B_T=zeros_B_T, problems=[], texts=[""])
    gc.collect()
    rss_before, maxrss_before = rss_bytes(), maxrss_bytes()
    t0 = time.perf_counter()
    with torch.no_grad():
        if variant == "full":
            res = naive_scores(teacher, ids_B_L, mask_B_L, P, MEMORY_TOP_K)
        else:
            s = score(teacher, rollouts, MEMORY_VOCAB, top_k=MEMORY_TOP_K, chunk_size=int(variant[len("chunk"):]))
            res = {"logp": s.logp_B_T, "entropy": s.entropy_B_T, "maxp": s.maxp_B_T, "topk_logp": s.topk_logp_B_T_K}
    seconds = time.perf_counter() - t0
    maxrss_after = maxrss_bytes()
    torch.save({k: v.detach().cpu() for k, v in res.items()}, out_path + ".pt")
    Path(out_path).write_text(json.dumps({
        "variant": variant, "seconds": seconds, "peak_mib": (maxrss_after - rss_before) / 2**20,
        # If loading ever peaked above the scoring peak, ru_maxrss would not see the call: flag it.
        "peak_is_from_call": maxrss_after > maxrss_before, "rss_before_mib": rss_before / 2**20}))


def bench_memory(root: Path, seq_len: int, chunks: list[int], threads: int) -> list[dict]:
    model_dir = save_memory_model(root)
    results = []
    for variant in ["full"] + [f"chunk{c}" for c in chunks]:
        out = root / f"mem-{variant}.json"
        cmd = [sys.executable, __file__, "--memory-worker", variant, "--model-dir", str(model_dir),
               "--seq-len", str(seq_len), "--out", str(out), "--threads", str(threads)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory worker {variant} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(out.read_text())
        res["values"] = torch.load(str(out) + ".pt")
        results.append(res)
    ref = results[0]["values"]
    for r in results:
        r["max_abs_diff"] = max((r["values"][k] - ref[k]).abs().max().item() for k in ref)
    return results


# --------------------------------------------------------------------------------------------- report


def print_report(args, speed: dict, trained: dict, memory: list[dict], load: tuple, seq_len: int) -> None:
    import transformers

    B, T = args.batch, args.new_tokens
    rollout_tps = speed["tokens"] / speed["rollout_s"]
    score_tps = speed["tokens"] / speed["score_s"]
    step_tps = trained["perf/tokens_per_s"]
    step_s = trained["perf/rollout_s"] + trained["perf/teacher_s"] + trained["perf/update_s"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print()
    print(f"opdlab throughput bench ({'quick' if args.quick else 'full'})")
    print(f"machine: {platform.machine()}, {cores} cores, device {args.device}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}, "
          f"load avg {load[0]:.1f} before / {os.getloadavg()[0]:.1f} after")
    if args.device == "cpu" and load[0] + torch.get_num_threads() > cores + 1:
        # Measured on a shared 2-core box: with both cores taken, 2 threads made sample() ~100x slower than 1.
        hint = " or with --threads 1" if torch.get_num_threads() > 1 else ""
        print(f"WARNING: the CPU was busy (load {load[0]:.1f} on {cores} cores): timings are unreliable; "
              f"rerun on an idle machine{hint}.")
    print(f"models: built-in student {speed['student_params'] / 1e6:.2f}M params, teacher "
          f"{speed['teacher_params'] / 1e6:.2f}M, vocab {speed['vocab']}; batch {B} arithmetic prompts "
          f"(prompt {speed['prompt_len']} tokens) x {T} new tokens, EOS suppressed; median of {args.repeats}")
    print()
    print(f"{'stage':<44}{'tokens':>8}{'seconds':>9}{'tokens/s':>10}{'vs rollout':>12}")
    rows = [("rollout: sample()", speed["tokens"], speed["rollout_s"], rollout_tps),
            ("teacher scoring: score(), chunk 1024", speed["tokens"], speed["score_s"], score_tps)]
    steps = trained["steps_averaged"]
    span = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
    step_label = f"OPD step: train(), mean of {span}"
    rows.append((step_label, B * trained["train/response_len"], step_s, step_tps))
    for label, n, s, tps in rows:
        print(f"{label:<44}{n:>8.0f}{s:>9.3f}{tps:>10.0f}{tps / rollout_tps:>11.2f}x")
    for key, label in (("perf/rollout_s", "rollout + verify"), ("perf/teacher_s", "teacher scoring"),
                       ("perf/update_s", "update: student fwd, objective, bwd, optim")):
        sec = trained[key]
        print(f"  {label:<42}{'':>8}{sec:>9.3f}{B * trained['train/response_len'] / sec:>10.0f}"
              f"{'':>4}{100 * sec / step_s:>5.0f}% of step")
    print()
    logits_mb = seq_len * MEMORY_VOCAB * 4 / 2**20
    print(f"teacher scoring peak memory: 1 x {seq_len} tokens, vocab {MEMORY_VOCAB:,} (1-layer Llama, hidden "
          f"{MEMORY_HIDDEN}, top-k {MEMORY_TOP_K}); one fp32 logit tensor = {logits_mb:,.0f} MiB")
    print(f"{'variant':<44}{'peak MiB':>9}{'vs full':>9}{'seconds':>9}{'max |diff| vs full':>20}")
    full_mib = memory[0]["peak_mib"]
    for r in memory:
        label = "unchunked: full logits, log_softmax, ..." if r["variant"] == "full" else \
            f"score(), chunk_size {r['variant'][len('chunk'):]}"
        flag = "" if r["peak_is_from_call"] else "  (peak predates the call!)"
        diff = "-" if r["variant"] == "full" else f"{r['max_abs_diff']:.1e}"
        print(f"{label:<44}{r['peak_mib']:>9.0f}{r['peak_mib'] / full_mib:>8.2f}x{r['seconds']:>9.2f}{diff:>20}{flag}")
    print("(memory: ru_maxrss minus RSS just before the call, fresh process per variant; diff over log p, entropy, "
          "max-p, top-k log p)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the bench itself")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu", help="device of the speed benches (memory bench is CPU RSS)")
    parser.add_argument("--batch", type=int, default=None, help="prompts per batch (default 32, quick 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per rollout (default 128, quick 32)")
    parser.add_argument("--steps", type=int, default=None, help="train() steps (default 4, quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats of sample/score (default 3)")
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers
    transformers.utils.logging.disable_progress_bar()  # load/save bars would break up the table
    if args.memory_worker:
        memory_worker(args.model_dir, args.memory_worker, args.seq_len, args.out)
        return

    args.batch = args.batch or (8 if args.quick else 32)
    args.new_tokens = args.new_tokens or (32 if args.quick else 128)
    args.steps = args.steps or (2 if args.quick else 4)
    args.repeats = args.repeats or (1 if args.quick else 3)
    seq_len, chunks = (1024, [256]) if args.quick else (4096, [1024, 256])
    load = os.getloadavg()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="opdlab-bench-") as tmp:
        root = Path(tmp)
        dirs = save_builtin_models(root)
        speed = bench_speed(dirs, args.batch, args.new_tokens, args.repeats, args.device)
        trained = bench_train(dirs, root, args.batch, args.new_tokens, args.steps, args.device)
        memory = bench_memory(root, seq_len, chunks, torch.get_num_threads())
    print_report(args, speed, trained, memory, load, seq_len)
    print(f"(bench took {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
