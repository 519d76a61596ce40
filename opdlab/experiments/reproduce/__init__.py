"""`opdlab reproduce NAME`: one command per headline claim of the methods opdlab implements (docs/claims.md).

    opdlab reproduce --list                  # the claims
    opdlab reproduce lgr                     # precondition, then the claim, 3 seeds; writes runs/reproduce/lgr/
    opdlab reproduce estimator --quick       # a smoke run in seconds
    opdlab reproduce --table runs/reproduce  # the markdown table of docs/claims.md from the claim.json files

Each claim module measures its precondition first (training-free where the phenomenon allows), then the claim
with several seeds, and writes OUT/NAME/claim.json (`claims.ClaimResult`: every per-seed number, the figure with
its 95 % interval, the status). The status rule is in `opdlab.experiments.reproduce.claims`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from rich.console import Console

from opdlab.experiments.reproduce.claims import claims_table, write_claim

# name -> (module, one line)
CLAIMS = {
    "lgr": ("lgr", "Lookahead Group Reward beats sampled-token OPD, more so on long responses"),
    "lsm": ("lsm", "teacher top-K local support matching trains more stably than sampled-token OPD"),
    "ar-opd": ("privileged", "AR-OPD beats full-context privileged OPD, which beats SFT, with fewer shortcuts"),
    "alignment": ("alignment", "distillation signals align better with the success gradient on incorrect "
                               "rollouts"),
    "estimator": ("estimator", "token-level estimator variance grows more slowly with length than "
                               "sequence-level"),
}


def run_claim(name: str, out: Path, seeds: list[int], quick: bool = False, progress: bool = True, **kw):
    module = importlib.import_module(f"opdlab.experiments.reproduce.{CLAIMS[name][0]}")
    result = module.reproduce(out / name, seeds, quick=quick, progress=progress, **kw)
    write_claim(result, out / name)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="opdlab reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", nargs="?", help=f"a claim: {', '.join(CLAIMS)}, or 'all'")
    p.add_argument("--list", action="store_true", help="list the claims")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (default 3)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke run (the status means nothing)")
    p.add_argument("--out", default="runs/reproduce", help="output directory (default runs/reproduce)")
    p.add_argument("--student", help="student model directory (default: the cached built-in student)")
    p.add_argument("--teacher", help="teacher model directory (default: the cached built-in teacher)")
    p.add_argument("--table", metavar="DIR", help="print the claims table from DIR/*/claim.json and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    console = Console(width=160)
    if args.list:
        for name, (_, line) in CLAIMS.items():
            console.print(f"{name:<10} {line}")
        return 0
    if args.table:
        paths = sorted(Path(args.table).glob("*/claim.json"))
        if not paths:
            print(f"opdlab reproduce: no */claim.json under {args.table}", file=sys.stderr)
            return 2
        print(claims_table(paths))
        return 0
    if args.name is None:
        p.error("give a claim name (or --list)")
    names = list(CLAIMS) if args.name == "all" else [args.name]
    unknown = [n for n in names if n not in CLAIMS]
    if unknown:
        p.error(f"unknown claim {unknown[0]!r}; the claims are: {', '.join(CLAIMS)}, all")
    if args.seeds < 1:
        p.error("--seeds must be >= 1")
    models = {k: v for k, v in (("student", args.student), ("teacher", args.teacher)) if v}
    for name in names:
        result = run_claim(name, Path(args.out), list(range(args.seeds)), quick=args.quick,
                           progress=not args.no_progress, **models)
        console.print(f"[bold]{name}[/bold]: {result.status}", highlight=False)
        console.print(f"  precondition: {result.precondition}", highlight=False)
        console.print(f"  {result.figure_label}: {result.figure_text}", highlight=False)
        console.print(f"  wrote {Path(args.out) / name / 'claim.json'} ({result.wall_s / 60:.1f} min)", highlight=False)
    return 0
