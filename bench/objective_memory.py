"""Peak memory of one training step's loss: the full-vocabulary `jsd` objective against teacher top-K `lsm`, at a
151,936-token vocabulary, printed side by side.

    python bench/objective_memory.py             # 8 sequences x 512 completion tokens, chunk_size 1024 and 256
    python bench/objective_memory.py --quick     # 2 x 256, chunk_size 1024 (~1 min)
    python bench/objective_memory.py --threads 1

What one variant measures, in a fresh subprocess: the student's forward (`opdlab.models.logprobs.student_forward`), the
objective and `loss.backward()`, i.e. what `train()` does between teacher scoring and the optimizer step, on one
batch of random token ids (16 prompt + `--new-tokens` completion tokens per sequence). The models are a 1-layer
Llama pair with hidden size 64 and the Qwen-family vocabulary, so the output layer dominates as it does in real
models' losses (student and teacher differ only in their random init). The peak is ru_maxrss after the step minus the
RSS just before it (as `bench/throughput.py` measures scoring), so weights, inputs and the teacher's scores do not
count; the gradients of the student's weights do (the same for both objectives). The teacher's scores (what each
objective's table entry asks for: hidden states for `jsd`, top-K ids and log-probs for `lsm`) are made before the
measurement with a small chunk, so their own peak stays below the step's; a variant whose peak did not rise during
the step is flagged.

  * jsd   `objective.name=jsd` (default `--beta 1`: KL(student || teacher) over all 151,936 tokens, the loss TRL's
          GKDTrainer computes). Logits of both models are made `chunk_size` positions at a time.
  * lsm   `objective.name=lsm`, support = the teacher's top-32 (`objective.support_k=32`): the student's logits are
          still made a chunk at a time (to gather them at the support), the teacher's come as K values per position.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import maxrss_bytes, rss_bytes  # noqa: E402  (bench/ is not a package)

VOCAB = 151_936  # Qwen-family vocabulary
HIDDEN = 64
PROMPT_TOKENS = 16
TOP_K = 32
SCORING_CHUNK = 64  # teacher scoring before the measured step: (64 x V) fp32 = 37 MiB a tensor


def save_pair(root: Path) -> dict[str, Path]:
    """Student and teacher: 1-layer Llamas, hidden 64, vocabulary 151,936, untied; the char tokenizer beside them so
    `load_model` takes them (its ids are not used)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from opdlab.models.loading import build_char_tokenizer

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=4 * HIDDEN, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    dirs = {}
    for seed, name in enumerate(("student", "teacher")):
        torch.manual_seed(seed)
        dirs[name] = root / name
        LlamaForCausalLM(config).save_pretrained(dirs[name])
        build_char_tokenizer().save_pretrained(dirs[name])
    return dirs


def random_rollouts(batch: int, new_tokens: int):
    from opdlab.types import Rollouts

    g = torch.Generator().manual_seed(0)
    ids_B_L = torch.randint(0, VOCAB, (batch, PROMPT_TOKENS + new_tokens), generator=g)
    ones_B_L = torch.ones_like(ids_B_L)
    zeros_B_T = torch.zeros(batch, new_tokens)
    return Rollouts(prompt_ids_B_P=ids_B_L[:, :PROMPT_TOKENS], prompt_mask_B_P=ones_B_L[:, :PROMPT_TOKENS],
                    completion_ids_B_T=ids_B_L[:, PROMPT_TOKENS:], completion_mask_B_T=ones_B_L[:, PROMPT_TOKENS:],
                    logp_old_B_T=zeros_B_T, sampler_logp_B_T=zeros_B_T, problems=[None] * batch, texts=[""] * batch)


def worker(dirs: dict[str, str], objective: str, chunk_size: int, batch: int, new_tokens: int, beta: float,
           out_path: str) -> None:
    """Runs in a fresh process: one student forward + `objective` + backward; writes its peak and timing."""
    from opdlab.config import ModelConfig, ObjectiveConfig
    from opdlab.models.logprobs import student_forward
    from opdlab.models.loading import load_model
    from opdlab.objectives import OBJECTIVES, as_objective
    from opdlab.teacher.scoring import score

    student, _ = load_model(ModelConfig(path=dirs["student"]), trainable=True)
    teacher, _ = load_model(ModelConfig(path=dirs["teacher"]))
    rollouts = random_rollouts(batch, new_tokens)
    cfg = ObjectiveConfig(name=objective, support_k=TOP_K, divergence={"beta": beta})
    fn = as_objective(OBJECTIVES[objective])
    request = fn.teacher_request(cfg)
    scores = score(teacher, rollouts, VOCAB, top_k=request.top_k, chunk_size=SCORING_CHUNK, keep_hidden=request.hidden)
    gc.collect()
    rss_before, maxrss_before = rss_bytes(), maxrss_bytes()
    t0 = time.perf_counter()
    out = fn(rollouts, student_forward(student, rollouts, VOCAB, chunk_size), scores, cfg)
    out.loss.backward()
    seconds = time.perf_counter() - t0
    maxrss_after = maxrss_bytes()
    Path(out_path).write_text(json.dumps({
        "objective": objective, "chunk_size": chunk_size, "seconds": seconds, "loss": out.loss.item(),
        "peak_mib": (maxrss_after - rss_before) / 2**20, "rss_before_mib": rss_before / 2**20,
        # If loading or scoring peaked above the step, ru_maxrss would not see the step: flag it.
        "peak_is_from_call": maxrss_after > maxrss_before}))


def measure(dirs: dict[str, Path], objective: str, chunk_size: int, args, root: Path) -> dict:
    out = root / f"{objective}-{chunk_size}.json"
    cmd = [sys.executable, __file__, "--worker", objective, "--chunk-size", str(chunk_size),
           "--student-dir", str(dirs["student"]), "--teacher-dir", str(dirs["teacher"]), "--batch", str(args.batch),
           "--new-tokens", str(args.new_tokens), "--beta", str(args.beta), "--out", str(out)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {objective} chunk {chunk_size} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def print_report(args, results: list[dict], load: float) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    tokens = args.batch * args.new_tokens
    print()
    print(f"objective memory bench ({'quick' if args.quick else 'full'}): one student forward + objective + backward")
    print(f"machine: {platform.machine()}, {cores} cores, torch {torch.__version__} ({args.threads or 'default'} "
          f"threads), load avg {load:.1f} before / {os.getloadavg()[0]:.1f} after")
    print(f"batch: {args.batch} sequences x {args.new_tokens} completion tokens (+{PROMPT_TOKENS} prompt) = {tokens} "
          f"loss tokens; vocab {VOCAB:,}; 1-layer Llama pair, hidden {HIDDEN}")
    print()
    print(f"{'variant':<44}{'chunk':>7}{'peak MiB':>10}{'jsd / lsm':>11}{'seconds':>9}{'loss':>11}")
    for chunk in args.chunk_sizes:
        rows = {r["objective"]: r for r in results if r["chunk_size"] == chunk}
        labels = {"jsd": f"jsd, beta {args.beta:g}: full vocabulary", "lsm": f"lsm, teacher top-{TOP_K} support"}
        for name in ("jsd", "lsm"):
            r = rows[name]
            ratio = f"{rows['jsd']['peak_mib'] / r['peak_mib']:.2f}x" if name == "lsm" else ""
            flag = "" if r["peak_is_from_call"] else "  (peak predates the step!)"
            print(f"{labels[name]:<44}{chunk:>7}{r['peak_mib']:>10.0f}{ratio:>11}{r['seconds']:>9.2f}"
                  f"{r['loss']:>11.5f}{flag}")
        logits_mib = min(chunk, tokens) * VOCAB * 4 / 2**20
        print(f"{'  one fp32 (chunk x vocab) tensor':<44}{chunk:>7}{logits_mib:>10.0f}")
    print("(peak: ru_maxrss minus RSS just before the step, fresh process per row; teacher scoring outside the step; "
          "the two losses are different objectives, so their values differ)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 x 256 tokens, chunk_size 1024 only")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--batch", type=int, default=None, help="sequences (default 8, quick 2)")
    parser.add_argument("--new-tokens", type=int, default=None, help="completion tokens a sequence (default 512, "
                                                                       "quick 256)")
    parser.add_argument("--chunk-sizes", type=lambda s: [int(c) for c in s.split(",")], default=None,
                        help="comma-separated scoring.chunk_size values (default 1024,256; quick 1024)")
    parser.add_argument("--beta", type=float, default=1.0, help="jsd's beta (1 = KL(student || teacher))")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--chunk-size", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--student-dir", help=argparse.SUPPRESS)
    parser.add_argument("--teacher-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers
    transformers.utils.logging.disable_progress_bar()
    if args.worker:
        worker({"student": args.student_dir, "teacher": args.teacher_dir}, args.worker, args.chunk_size, args.batch,
               args.new_tokens, args.beta, args.out)
        return

    args.batch = args.batch or (2 if args.quick else 8)
    args.new_tokens = args.new_tokens or (256 if args.quick else 512)
    args.chunk_sizes = args.chunk_sizes or ([1024] if args.quick else [1024, 256])
    load = os.getloadavg()[0]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="opdlab-objmem-") as tmp:
        root = Path(tmp)
        dirs = save_pair(root)
        results = [measure(dirs, name, chunk, args, root) for chunk in args.chunk_sizes for name in ("jsd", "lsm")]
    print_report(args, results, load)
    print(f"(bench took {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
