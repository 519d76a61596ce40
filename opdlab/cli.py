"""The `opdlab` command.

    opdlab demo                              built-in task, teacher and student: evaluate, distil, evaluate again
    opdlab prepare [--force]                 make (or re-make) the built-in teacher and student
    opdlab train CONFIG.yaml [k=v ...]       on-policy distillation; --resume continues an interrupted run
    opdlab sft CONFIG.yaml [k=v ...]         warm start on a task's worked solutions
    opdlab eval [CONFIG.yaml] [k=v ...]      mean@k / pass@k of a model on a task, by response length
    opdlab objectives                        the objective table
    opdlab report RUN_DIR                    redraw a run's plots from its files
    opdlab export RUN_DIR --out DIR          a checkpoint as a plain Hugging Face model (LoRA adapters merged)
    opdlab compare [--objectives ...] [k=v]  several objectives from the same student, several seeds, one table
    opdlab compare-privileged [--seeds ...]  SFT vs privileged OPD vs AR-OPD on the built-in task (privileged teacher)
    opdlab toy estimators [--quick ...]      the gamma-interpolated estimator bias/variance toy study
    opdlab reproduce NAME [--seeds N ...]    one headline claim: its precondition, then the claim (docs/claims.md)
    opdlab serve-teacher MODEL [--port ...]  serve a teacher's prompt log-probs over HTTP (vLLM's completions API)
    opdlab diagnose [--pair P] [CONFIG] [k=v] whether each method's phenomenon is present (preconditions)
    opdlab diagnose fidelity [CONFIG] [k=v]  supervision fidelity decay: teacher max-prob by position, continuations
    opdlab diagnose alignment [CONFIG] [k=v] gradient alignment of distillation signals with the success gradient

Every command that takes a config also takes dotted overrides (`train.lr=3e-4 rollout.top_p=0.9`); `--help` lists
every field with its type, default and meaning.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Literal

from accelerate import PartialState
from transformers.utils import logging as transformers_logging
from pydantic import Field
from rich.console import Console

from opdlab.checkpoint import export_checkpoint
from opdlab.config import (THREADS_DOC, ConfigError, EvalConfig, ModelConfig, RunConfig, TaskConfig, _Section, describe,
                           load_config)
from opdlab.diagnostics.alignment import run as alignment_diagnostic
from opdlab.diagnostics.fidelity import measure as fidelity_diagnostic
from opdlab.diagnostics.preconditions import run as preconditions_diagnostic
from opdlab.evaluate import evaluate_model
from opdlab.experiments.compare import main as compare_main
from opdlab.experiments.demo import run_demo
from opdlab.experiments.pairs import PAIRS, prepare_pair
from opdlab.experiments.privileged_compare import main as privileged_main
from opdlab.experiments.reproduce import main as reproduce_main
from opdlab.experiments.toy.estimators import main as estimators_main
from opdlab.models.loading import ModelLoadError
from opdlab.objectives import OBJECTIVES
from opdlab.report import plot_training_curves, redraw_run
from opdlab.run import load_run_config
from opdlab.runtime import PREEMPTED_EXIT_CODE, resolve_device, resolve_precision, set_threads
from opdlab.sft import SFTConfig, run_sft
from opdlab.tasks import make_task
from opdlab.teacher.remote import RemoteTeacherError
from opdlab.teacher.serve import serve
from opdlab.train import Preempted, TrainingError, train


class EvalRunConfig(_Section):
    """An evaluation of one model."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The model evaluated.")
    task: TaskConfig = Field(default_factory=TaskConfig, description="The task (its test split is used).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Sampling and metrics.")
    precision: Literal["auto", "fp32", "bf16-mixed"] = Field("auto", description=(
        "As train.precision: 'bf16-mixed' samples under bf16 autocast (with bf16 weights when model.dtype is "
        "'auto'); 'auto' picks it where bf16 is fast."))
    seed: int = Field(0, description="Sampling seed.")
    output: str | None = Field(None, description="Write the result as JSON here (default: print only).")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', ...")
    threads: int | None = Field(None, ge=1, description=THREADS_DOC)


# `opdlab diagnose NAME`: NAME -> (module, one-line help). Each module exposes CONFIG (its typed config class) and
# run_diagnostic(cfg, console); adding a diagnostic is one entry here.
DIAGNOSTICS = {
    "preconditions": (preconditions_diagnostic,
                      "the default of `opdlab diagnose`: whether each phenomenon the methods address (SFD, LGR's "
                      "informative reward, an informative trace, nodes per P_succ bin) is present, with intervals"),
    "fidelity": (fidelity_diagnostic,
                 "supervision fidelity decay: teacher max-prob F(t) by position on student vs teacher prefixes, "
                 "teacher accuracy from cut student prefixes, logistic fit"),
    "alignment": (alignment_diagnostic,
                  "gradient alignment: cosine between each signal's logit descent direction and the ideal gradient "
                  "of success from targeted rollouts, per token, question and teacher/context"),
}


def fields_help(model) -> str:
    lines = ["configuration fields (set in the YAML file or as key=value):"]
    for name, type_name, default, doc in describe(model):
        lines.append(f"  {name} ({type_name}, default {default})")
        if doc:
            lines.append(f"      {doc}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="opdlab", description=__doc__, formatter_class=fmt)
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="the whole pipeline on the built-in task, in minutes on a laptop",
                       formatter_class=fmt, description="Prepares the built-in models (cached), evaluates teacher "
                       "and student, runs OPD, evaluates the student again and prints a before/after table.")
    d.add_argument("--run-dir", default="runs/demo", help="where the run is written (default runs/demo)")
    d.add_argument("--pair", default="builtin", choices=list(PAIRS), help="which built-in teacher/student pair")
    d.add_argument("--force", action="store_true", help="replace a finished run already in the run dir")
    d.add_argument("overrides", nargs="*", help="key=value overrides of the demo's training config")

    pr = sub.add_parser("prepare", help="make the built-in teacher and student (cached)")
    pr.add_argument("--force", action="store_true", help="re-train them even if cached")
    pr.add_argument("--pair", default="builtin", choices=list(PAIRS), help="which built-in teacher/student pair")

    for name, cfg_model, what in (("train", RunConfig, "on-policy distillation"), ("sft", SFTConfig, "warm start")):
        t = sub.add_parser(name, help=what, formatter_class=fmt, epilog=fields_help(cfg_model))
        t.add_argument("config", nargs="?", help="YAML config file ('-' for defaults only)")
        t.add_argument("overrides", nargs="*", help="dotted key=value overrides")
        if name == "train":
            t.add_argument("--resume", action="store_true", help="continue from the run dir's latest checkpoint")

    e = sub.add_parser("eval", help="mean@k / pass@k of a model", formatter_class=fmt,
                       epilog=fields_help(EvalRunConfig))
    e.add_argument("args", nargs="*", help="optional YAML config, then dotted key=value overrides")
    e.add_argument("--model", help="shortcut for model.path=...")

    sub.add_parser("objectives", help="list the objectives")
    r = sub.add_parser("report", help="redraw a run's plots")
    r.add_argument("run_dir")
    x = sub.add_parser("export", help="a run's checkpoint as a plain Hugging Face model directory (LoRA merged)")
    x.add_argument("run_dir")
    x.add_argument("--out", required=True, help="the directory to write (must not exist or be empty)")
    x.add_argument("--step", type=int, default=None, help="which checkpoint (default: the latest)")
    # listed for --help only: main() hands `compare` its arguments before this parser sees them
    sub.add_parser("compare", help="objectives side by side from the same student (`opdlab compare --help`)")
    sub.add_parser("compare-privileged", help="SFT, privileged OPD and AR-OPD side by side "
                   "(`opdlab compare-privileged --help`)")
    sub.add_parser("reproduce", help="one headline claim, precondition first (`opdlab reproduce --help`)")
    st = sub.add_parser("serve-teacher", help="serve a teacher's prompt log-probs over HTTP (remote_teacher.url)",
                        description="Serves MODEL's prompt log-probs with the request/response shape of vLLM's "
                        "OpenAI-compatible /v1/completions endpoint (see opdlab.teacher.serve).")
    st.add_argument("model", help="local directory, hub id or builtin:teacher")
    st.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    st.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; the address is printed)")
    st.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype")
    st.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    st.add_argument("--served-model-name", default=None, help="the name requests must use (default: MODEL)")
    st.add_argument("--max-logprobs", type=int, default=64, help="largest top-K a request may ask for")
    st.add_argument("--chunk-size", type=int, default=1024, help="positions per chunk of output-layer logits")
    toy = sub.add_parser("toy", help="small controlled studies (`opdlab toy estimators --help`)")
    toy.add_argument("study", choices=["estimators"], help="which study")
    toy.add_argument("study_args", nargs=argparse.REMAINDER, help="the study's own flags")
    dg = sub.add_parser("diagnose", help="diagnostics of a teacher/student pair (`opdlab diagnose NAME --help`)")
    dg_sub = dg.add_subparsers(dest="diagnostic", required=True)
    for name, (_, what) in DIAGNOSTICS.items():
        x = dg_sub.add_parser(name, help=what, description=what, formatter_class=fmt,
                              epilog=fields_help(DIAGNOSTICS[name][0].CONFIG))
        x.add_argument("args", nargs="*", help="optional YAML config, then dotted key=value overrides")
        if name == "preconditions":
            x.add_argument("--pair", choices=["builtin", "smollm2"], default=None,
                           help="a built-in pair: its models, task and sizes (same as pair=NAME)")
    return p


def _required_config(command: str, config: str | None) -> str:
    """`config` of `opdlab train` / `opdlab sft`, which must be a file or '-': a clear error when it is missing or
    is an override."""
    if config is None:
        raise ConfigError(f"{command}: a config is required: a YAML file (e.g. opdlab/configs/demo.yaml) or '-' for "
                          f"the defaults, then any key=value overrides; `opdlab {command} --help` lists every field")
    if "=" in config and not os.path.isfile(config):
        raise ConfigError(f"the first argument of opdlab {command} is the config file (or '-' for the defaults), "
                          f"got the override {config!r}: write `opdlab {command} - {config} ...`")
    return config


def _config_and_overrides(config: str | None, overrides: list[str], model):
    path = None if config in (None, "-") else config
    return load_run_config(path, overrides) if model is RunConfig else load_config(path, overrides, model)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # transformers' weight-loading, shard-writing and GGUF-conversion bars: one line each per model, noise in logs
    # beside opdlab's own progress (set OPDLAB_HF_PROGRESS=1 to keep them)
    if not os.environ.get("OPDLAB_HF_PROGRESS"):
        transformers_logging.disable_progress_bar()
    # `compare` parses its own arguments: argparse.REMAINDER cannot start with an option (`--objectives ...`)
    if argv[:1] == ["compare"]:
        return _guarded(lambda: compare_main(argv[1:]))
    if argv[:1] == ["compare-privileged"]:
        return _guarded(lambda: privileged_main(argv[1:]))
    if argv[:1] == ["reproduce"]:
        return _guarded(lambda: reproduce_main(argv[1:]))
    if argv[:1] == ["diagnose"] and (len(argv) == 1 or argv[1] not in (*DIAGNOSTICS, "-h", "--help")):
        argv.insert(1, "preconditions")  # `opdlab diagnose [--pair P] ...` measures the preconditions
    if argv[:1] == ["train"] and "--resume" in argv:  # `train CONFIG --resume k=v`: overrides after the flag too
        argv.remove("--resume")
        argv.insert(1, "--resume")
    args = _parser().parse_args(argv)
    return _guarded(lambda: _dispatch(args))


def _guarded(run) -> int:
    try:
        return run()
    except ConfigError as e:
        print(f"opdlab: {e}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"opdlab: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        print("opdlab: interrupted; `opdlab train CONFIG --resume` continues from the last checkpoint",
              file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - user-facing errors get one clear line; OPDLAB_DEBUG=1 shows the trace
        if os.environ.get("OPDLAB_DEBUG") or not isinstance(e, (ModelLoadError, TrainingError, ValueError,
                                                                  OSError, RemoteTeacherError)):
            raise
        print(f"opdlab: {e}", file=sys.stderr)
        return 1


def _dispatch(args) -> int:
    console = Console()
    if args.command == "demo":
        run_demo(args.run_dir, args.overrides, console=console, pair=args.pair, force=args.force)
    elif args.command == "prepare":
        prepare_pair(args.pair, force=args.force, console=console)
    elif args.command == "train":
        cfg = _config_and_overrides(_required_config("train", args.config), args.overrides, RunConfig)
        run_dir = train(cfg, resume=args.resume)
        if PartialState().is_main_process:  # under torchrun / accelerate launch, one process draws
            console.print(f"run written to {run_dir}; curves: {plot_training_curves(run_dir)}")
    elif args.command == "sft":
        cfg = _config_and_overrides(_required_config("sft", args.config), args.overrides, SFTConfig)
        console.print(f"model saved to {run_sft(cfg)}")
    elif args.command == "eval":
        _eval(args, console)
    elif args.command == "objectives":
        for name, fn in sorted(OBJECTIVES.items()):
            console.print(f"[bold]{name}[/bold]: {(fn.__doc__ or fn.__module__).strip().splitlines()[0]}")
    elif args.command == "serve-teacher":
        serve(args.model, host=args.host, port=args.port, dtype=args.dtype, device=args.device,
              name=args.served_model_name, max_logprobs=args.max_logprobs, chunk_size=args.chunk_size)
    elif args.command == "toy":
        return estimators_main(args.study_args)
    elif args.command == "diagnose":
        module = DIAGNOSTICS[args.diagnostic][0]
        items = list(args.args)
        config = items.pop(0) if items and "=" not in items[0] else None
        if getattr(args, "pair", None):
            items.insert(0, f"pair={args.pair}")
        module.run_diagnostic(_config_and_overrides(config, items, module.CONFIG), console)
    elif args.command == "export":
        console.print(f"wrote {export_checkpoint(Path(args.run_dir), Path(args.out), args.step)}")
    elif args.command == "report":
        console.print(f"wrote {', '.join(str(p) for p in redraw_run(args.run_dir))}")
    return 0


def _eval(args, console) -> None:
    items = list(args.args)
    config = items.pop(0) if items and "=" not in items[0] else None
    if args.model:
        items.append(f"model.path={args.model}")
    cfg = _config_and_overrides(config, items, EvalRunConfig)
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    result = evaluate_model(cfg.model, make_task(cfg.task), cfg.eval, device=device, precision=precision,
                            seed=cfg.seed)
    console.print(result.table(title=f"{cfg.model.path} on {cfg.task.name}"))
    if cfg.output:
        console.print(f"wrote {result.save(cfg.output)}")


if __name__ == "__main__":
    sys.exit(main())
