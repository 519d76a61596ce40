"""The memory allocator under opdlab's SFT step: glibc's malloc as it comes, against mimalloc, jemalloc and tcmalloc
put in front of it with LD_PRELOAD where their libraries are found, side by side in one run.

    python bench/allocator.py                    # SFT steps of the SmolLM2 recipe (bench/sft_step.py --batch 8)
    python bench/allocator.py --quick            # batch 4, 1 batch
    python bench/allocator.py --rounds 2 --out bench/results/allocator.txt

jemalloc and tcmalloc are looked for where Debian installs them (`apt install libjemalloc2 libtcmalloc-minimal4`),
mimalloc at $MIMALLOC_LIB (e.g. the `libmimalloc.so.3` of the `cmeel-mimalloc` wheel); a variant whose library is
missing is left out. Each variant runs the same workload in a fresh process (the order rotating every round, so load
from elsewhere hits all alike): `bench/sft_step.py`'s packed SFT step, whose mean step time is read from its output.
Printed per variant: the step time, the process's user and system CPU time, its minor page faults and its peak
resident memory. glibc maps every block over its mmap threshold (at most 32 MB) fresh, the kernel zero-filling each
page on first touch, and unmaps it when freed; the page faults and the system time are that cost.
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

LIBS = Path("/usr/lib/x86_64-linux-gnu")
MIMALLOC = os.environ.get("MIMALLOC_LIB", "")
VARIANTS = {
    "glibc": {},
    "mimalloc": {"LD_PRELOAD": MIMALLOC},
    "jemalloc": {"LD_PRELOAD": str(LIBS / "libjemalloc.so.2")},
    "tcmalloc": {"LD_PRELOAD": str(LIBS / "libtcmalloc_minimal.so.4")},
}


def run_once(env_extra: dict, workload: list[str]) -> dict:
    """One run of `workload` in a fresh process, with that process's own resource use (os.wait4)."""
    proc = subprocess.Popen(workload, env={**os.environ, **env_extra}, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(workload)} with {env_extra} failed (exit {proc.returncode})")
    step = re.search(r"^packed\s+\d+\s+([\d.]+)", out, re.M)
    return {"step_s": float(step.group(1)), "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
            "faults": usage.ru_minflt, "maxrss_gb": usage.ru_maxrss / 2**20}  # ru_maxrss in KiB


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=None, help="runs of each variant (default 2, quick 1)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    rounds = args.rounds or (1 if args.quick else 2)
    sft = str(Path(__file__).resolve().parent / "sft_step.py")
    workload = [sys.executable, sft, "--batch", "4" if args.quick else "8", "--batches", "1" if args.quick else "2"]
    variants = {k: v for k, v in VARIANTS.items() if "LD_PRELOAD" not in v or Path(v["LD_PRELOAD"]).is_file()}
    names = list(variants)
    runs: dict[str, list[dict]] = {k: [] for k in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(run_once(variants[name], workload))
            print(f"round {r + 1}: {name}: {runs[name][-1]}", flush=True)
    base = statistics.mean(x["step_s"] for x in runs[names[0]])
    lines = [f"packed SFT step of SmolLM2-135M-Instruct ({' '.join(workload[2:])}), {rounds} run(s) a variant; "
             f"per run: CPU times and page faults of the whole process (model loading included)",
             f"{'allocator':<26} {'s/step':>7} {'vs glibc':>9} {'user s':>7} {'sys s':>6} {'faults':>10} "
             f"{'peak RSS GB':>11}"]
    for name in names:
        m = {k: statistics.mean(x[k] for x in runs[name]) for k in runs[name][0]}
        lines.append(f"{name:<26} {m['step_s']:>7.2f} {base / m['step_s']:>8.2f}x {m['user_s']:>7.1f} "
                     f"{m['sys_s']:>6.1f} {m['faults']:>10.0f} {m['maxrss_gb']:>11.1f}")
    print("\n" + "\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
