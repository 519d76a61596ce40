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
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    path: str = Field("builtin:student", description=(
        "Local directory or hub id of a Hugging Face causal LM; 'builtin:teacher' / 'builtin:student' are the "
        "built-in tiny models (made by `opdlab demo` or `opdlab prepare`)."))
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Weights dtype.")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="transformers attention kernel.")


class TaskConfig(_Section):
    name: Literal["arithmetic", "file", "reasoning_gym"] = Field("arithmetic", description=(
        "'arithmetic': the built-in multi-step arithmetic task; 'file': a JSONL/Parquet file or a saved HF "
        "dataset with question/answer fields, verified with math-verify; 'reasoning_gym': a reasoning-gym "
        "generator scored by its own scorer."))
    seed: int = Field(0, description="Seed of the task's problem generator / shuffle.")
    min_steps: int = Field(2, ge=1, description="arithmetic: fewest steps in a problem.")
    max_steps: int = Field(4, ge=1, description="arithmetic: most steps in a problem (sets the reasoning length).")
    max_value: int = Field(99, ge=9, description="arithmetic: every intermediate value stays in [0, max_value].")
    test_size: int = Field(200, ge=1, description="Number of held-out test problems (procedural tasks).")
    train_path: str | None = Field(None, description="file: training file (.jsonl, .parquet or a dataset dir).")
    test_path: str | None = Field(None, description="file: test file; defaults to train_path.")
    question_field: str = Field("question", description="file: field holding the question.")
    answer_field: str = Field("answer", description="file: field holding the reference answer.")
    solution_field: str | None = Field("solution", description="file: optional worked-solution field.")
    gym_name: str = Field("basic_arithmetic", description="reasoning_gym: generator name, e.g. countdown.")
    gym_train_size: int = Field(2000, ge=1, description="reasoning_gym: number of training problems.")
    gym_threshold: float = Field(1.0, ge=0, le=1, description="reasoning_gym: score needed for reward 1.")

    @model_validator(mode="after")
    def _check(self):
        if self.min_steps > self.max_steps:
            raise ValueError(f"task.min_steps ({self.min_steps}) must be <= task.max_steps ({self.max_steps})")
        if self.name == "file" and not self.train_path:
            raise ValueError("task.train_path is required when task.name is 'file'")
        return self


class RolloutConfig(_Section):
    prompts_per_step: int = Field(16, ge=1, description="Prompts sampled per training step.")
    samples_per_prompt: int = Field(1, ge=1, description="Rollouts per prompt (batch = prompts x samples).")
    max_new_tokens: int = Field(96, ge=1, description="Most tokens generated per rollout.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts.")
    top_p: float | None = Field(None, gt=0, le=1, description=(
        "Nucleus sampling of rollouts (1 = off). None = the objective's default (0.9 for lsm, 1.0 otherwise); a "
        "run's config.yaml records the value it resolved to."))


class TeacherScoringConfig(_Section):
    top_k: int = Field(0, ge=0, description=(
        "Teacher top-K ids/log-probs returned per position (0 = none); raised to what the objective needs "
        "(objective.top_k for lsm and for the support/* diagnostics of opd)."))
    chunk_size: int = Field(1024, ge=1, description=(
        "Positions per chunk when turning hidden states into log-probs (teacher scoring, the student's forward and "
        "the objectives' own logits): bounds peak memory at chunk_size x vocabulary fp32 values per model."))


class ObjectiveConfig(_Section):
    name: str = Field("opd", description="Objective, by name from the objective table (see `opdlab objectives`).")
    kl_coef: float = Field(1.0, gt=0, description="kappa: advantage = -kappa * (log pi_old - log pi_T).")
    discount: float = Field(0.0, ge=0, le=1, description=(
        "gamma: 0 uses each token's own reverse KL; > 0 sums discounted future per-token KLs into the advantage."))
    clip_eps: float | None = Field(None, gt=0, description="PPO clip range of the importance ratio (None = off).")
    beta: float = Field(0.5, ge=0, le=1, description=(
        "jsd: beta of JSD_beta = beta*KL(pi_T||M) + (1-beta)*KL(pi_theta||M), M = beta*pi_T + (1-beta)*pi_theta. "
        "beta = 0 is the limit KL(pi_T||pi_theta) (teacher first), beta = 1 is KL(pi_theta||pi_T) (student first)."))
    temperature: float = Field(1.0, gt=0, description=(
        "forward_kl / reverse_kl / jsd: both models' logits are divided by it before the softmax."))
    gkd_lambda: float = Field(1.0, ge=0, le=1, description=(
        "GKD data mix: probability that a step trains on student rollouts; otherwise it trains on the task's "
        "reference responses (worked solution + EOS, else 'Answer: <answer>'). 1 = always on-policy."))
    top_k: int = Field(32, ge=1, description=(
        "K of the support S of lsm (teacher or student top-K), and of the support/* diagnostics of every "
        "objective (teacher mass on S, student mass on S, top-K overlap)."))
    support: Literal["teacher_topk", "teacher_topk_sampled", "student_topk", "head_tail"] = Field(
        "teacher_topk", description=(
            "lsm: the support S. 'teacher_topk': teacher top-K; 'teacher_topk_sampled': teacher top-K plus the "
            "sampled token; 'student_topk': student top-K plus the sampled token (the teacher's log-probs there "
            "come from its hidden states); 'head_tail': teacher top-K plus a sampled-token policy-gradient term "
            "-A_t * ratio_t on tokens outside S."))
    mask_tokens: list[str] = Field([], description=(
        "Tokens (vocabulary strings, e.g. '<|im_start|>') excluded from every objective's loss and token count. "
        "Listing the EOS token here masks it too (auto_mask never does)."))
    auto_mask: bool = Field(True, description=(
        "Also exclude tokens whose text the teacher's and student's tokenizers split differently and, when their "
        "special tokens or chat templates differ, every special / chat-template token (e.g. <|im_start|>, think "
        "tags). Stop tokens (EOS) always stay in the loss so the student still learns to stop; a same-family pair "
        "with one template masks nothing (see opdlab.masking for why)."))

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        from opdlab.objectives import OBJECTIVES
        if v not in OBJECTIVES:
            raise ValueError(f"unknown objective {v!r}; allowed: {', '.join(sorted(OBJECTIVES))}")
        return v


class TrainConfig(_Section):
    steps: int = Field(40, ge=1, description="Optimizer steps.")
    lr: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    schedule: Literal["constant", "linear", "cosine"] = Field("constant", description="LR schedule after warm-up.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    micro_batch_size: int | None = Field(None, ge=1, description=(
        "Rollouts per forward/backward; the step accumulates gradients over the batch (None = whole batch)."))
    seed: int = Field(0, description="Seed of sampling, data order and initialisation.")
    save_every: int = Field(20, ge=1, description="Write a checkpoint every N steps (and at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on disk (oldest removed first).")
    max_bad_steps: int = Field(3, ge=1, description=(
        "Consecutive steps with a non-finite loss or gradient that are skipped before the run stops."))
    eval_every: int = Field(0, ge=0, description="Evaluate mean@k on the test split every N steps (0 = never).")
    sample_every: int = Field(10, ge=1, description="Write example rollouts to samples.jsonl every N steps.")


class EvalConfig(_Section):
    num_problems: int = Field(100, ge=1, description="Test problems evaluated.")
    k: int = Field(4, ge=1, description="Samples per problem (mean@k, pass@k).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (1 = off).")
    max_new_tokens: int = Field(96, ge=1, description="Most tokens generated per sample.")
    batch_size: int = Field(64, ge=1, description="Sequences generated at once.")
    length_buckets: list[int] = Field([32, 64, 128, 256, 512], description=(
        "Upper edges (in tokens) of the response-length buckets accuracy is broken down by."))


class RunConfig(_Section):
    """A training run."""

    student: ModelConfig = Field(default_factory=ModelConfig, description="The model being trained.")
    teacher: ModelConfig = Field(default_factory=lambda: ModelConfig(path="builtin:teacher"),
                                 description="The frozen model that scores rollouts.")
    task: TaskConfig = Field(default_factory=TaskConfig, description="Where problems come from.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Student sampling.")
    scoring: TeacherScoringConfig = Field(default_factory=TeacherScoringConfig, description="Teacher scoring.")
    objective: ObjectiveConfig = Field(default_factory=ObjectiveConfig, description="The loss.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimisation and checkpoints.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    run_dir: str = Field("runs/opd", description="Where metrics, checkpoints and samples are written.")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")


class ConfigError(ValueError):
    """A configuration problem, with the field, the value and what is allowed."""


def _section_at(model: type[BaseModel] | None, path) -> type[BaseModel] | None:
    """The config section class found by walking `path` (field names) down from `model`, or None."""
    for part in path:
        f = model.model_fields.get(part) if model is not None else None
        ann = f.annotation if f is not None else None
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return model


def _format_validation_error(err: ValidationError, source: str, model: type[BaseModel] | None = None) -> str:
    lines = [f"invalid configuration ({source}):"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            section = _section_at(model, e["loc"][:-1])
            msg = "unknown field" + (f"; allowed here: {', '.join(section.model_fields)}" if section else "")
        value = e.get("input")
        shown = "" if isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}")
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
            fields = cls.model_fields if cls is not None else None
            if fields is not None and k not in fields:
                dotted = ".".join(keys[: depth + 1])
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                model: type[BaseModel] = RunConfig) -> BaseModel:
    """Read a YAML config (or start from defaults), apply `key.sub=value` overrides and validate."""
    data: dict = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
        source = str(path)
    data = apply_overrides(data, list(overrides or []), model)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source, model)) from None


def save_config(cfg: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def describe(model: type[BaseModel], prefix: str = "", defaults: BaseModel | None = None
             ) -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, description) for every leaf field, for --help.

    Defaults come from the enclosing section's default instance (`defaults`), so a section whose default differs
    from its class's (e.g. `teacher`, a ModelConfig with path 'builtin:teacher') shows its own defaults."""
    rows = []
    for name, f in model.model_fields.items():
        ann = f.annotation
        dotted = f"{prefix}{name}"
        default = getattr(defaults, name) if defaults is not None else f.get_default(call_default_factory=True)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(describe(ann, dotted + ".", default if isinstance(default, BaseModel) else None))
            continue
        type_name = getattr(ann, "__name__", None) or str(ann).replace("typing.", "")
        rows.append((dotted, type_name, repr(default), f.description or ""))
    return rows
