"""Teacher scoring in this process against the same teacher served over loopback HTTP (`opdlab serve-teacher`),
side by side in one table.

    python bench/remote_teacher.py --threads 1          # 32 rows x 128 completion tokens, 3 repeats a variant
    python bench/remote_teacher.py --quick               # 8 rows x 32 tokens, 1 repeat

Rows: `opdlab.teacher.scoring.score` with the built-in teacher's architecture (random-init Llama, hidden 128, 4 layers,
character vocabulary), then `opdlab.teacher.remote.RemoteTeacher.score` against `opdlab serve-teacher` started as a
subprocess on 127.0.0.1 with the same weights, for a few (top-K, rows per request, requests in flight) settings.
Each row reports completion tokens/s (median of the repeats, after one warm-up call) and its ratio to in-process
scoring, and checks that the served log-probs equal the in-process ones. What the ratio shows is the cost of the
HTTP round trip and the JSON encoding of K log-probs per position for a teacher this small; for a large teacher
the forward pass dominates and the server runs on its own GPU.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_models(root: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from opdlab.models.loading import BUILTIN_SIZES, build_char_tokenizer

    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                         max_position_embeddings=1024, tie_word_embeddings=False, num_key_value_heads=4,
                         **BUILTIN_SIZES["teacher"])
    model = LlamaForCausalLM(config)
    model.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    return root / "teacher"


def make_rollouts(tokenizer, rows: int, length: int):
    from opdlab.models.prompts import encode_prompts, render_prompt
    from opdlab.tasks.arithmetic import ArithmeticTask
    from opdlab.types import Rollouts

    problems = list(ArithmeticTask(seed=0).problems("train")[:rows])
    ids_B_P, mask_B_P = encode_prompts(tokenizer, [render_prompt(tokenizer, p.question) for p in problems])
    gen = torch.Generator().manual_seed(0)
    completion_B_T = torch.randint(5, len(tokenizer), (rows, length), generator=gen)
    zeros_B_T = torch.zeros(rows, length)
    return Rollouts(prompt_ids_B_P=ids_B_P, prompt_mask_B_P=mask_B_P, completion_ids_B_T=completion_B_T,
                    completion_mask_B_T=torch.ones(rows, length, dtype=torch.long), logp_old_B_T=zeros_B_T,
                    sampler_logp_B_T=zeros_B_T.clone(), problems=problems, texts=[""] * rows)


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="8 rows x 32 tokens, 1 repeat")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of this process and the server")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows, length, repeats = (8, 32, 1) if args.quick else (32, 128, 3)

    from opdlab.config import ModelConfig
    from opdlab.models.loading import load_model
    from opdlab.teacher.remote import RemoteTeacher
    from opdlab.teacher.scoring import score

    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir = make_models(Path(tmp))
        teacher, tokenizer = load_model(ModelConfig(path=str(teacher_dir)), "cpu")
        rollouts = make_rollouts(tokenizer, rows, length)
        V = teacher.get_output_embeddings().weight.shape[0]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        exe = Path(sys.executable).parent / "opdlab"
        server = subprocess.Popen([str(exe), "serve-teacher", str(teacher_dir), "--port", "0", "--device", "cpu"],
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        try:
            line = server.stdout.readline()
            while "serving" not in line:
                if server.poll() is not None:
                    raise SystemExit("the server did not start")
                line = server.stdout.readline()
            url = line.split("on ")[1].split(" ")[0]
            tokens = rows * length
            print(f"teacher: random-init Llama, built-in teacher size, vocabulary {V}; {rows} rows x {length} "
                  f"completion tokens; {args.threads} thread(s); median of {repeats}")
            print(f"{'variant':52s} {'tokens/s':>9s} {'vs in-process':>14s} {'max |dlogp|':>12s}")
            for top_k in (1, 32):
                base_s, local = timed(lambda: score(teacher, rollouts, V, top_k=top_k), repeats)
                print(f"{f'in-process score(), top-{top_k}':52s} {tokens / base_s:9.0f} {'1.00x':>14s} {'-':>12s}")
                for batch, in_flight in ((8, 4), (32, 1)):
                    client = RemoteTeacher(url, batch_size=batch, max_in_flight=in_flight)
                    s, remote = timed(lambda: client.score(rollouts, V, top_k=top_k), repeats)
                    diff = (remote.logp_B_T - local.logp_B_T).abs().max().item()
                    name = f"served, top-{top_k}, {batch} rows/request, {in_flight} in flight"
                    print(f"{name:52s} {tokens / s:9.0f} {f'{base_s / s:.2f}x':>14s} {diff:12.1e}")
        finally:
            server.kill()
            server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
