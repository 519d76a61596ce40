"""Code verification throughput: programs verified per second, one at a time vs a pool of workers.

    python bench/verify_throughput.py                   # the 164 HumanEval canonical solutions, workers 1, 2, 4
    python bench/verify_throughput.py --workers 1 8 --repeats 2
    python bench/verify_throughput.py --site-packages    # programs start with site-packages (slower start-up)

Each program is graded by `CodeTask.verify_batch` exactly as a training step grades its rollouts: extraction, the
test harness, one sandboxed process tree per program (namespaces, Landlock, limits: whatever this machine allows,
printed in the header). `workers=1` grades serially in the calling thread; `workers=N` uses the task's thread pool,
each thread waiting on its own sandboxed process. Every configuration must give reward 1 to all 164 solutions (the
script stops otherwise). The rows interleave the configurations `--repeats` times and report the median; the
header prints the load average before and after, since timings on a busy machine are unreliable.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from tqdm import tqdm

from opdlab.tasks.sandbox.run import Limits
from opdlab.tasks.code import CodeTask


def measure(task: CodeTask, problems, responses) -> float:
    """Seconds to grade the batch; raises if any canonical solution fails."""
    start = time.perf_counter()
    rewards = task.verify_batch(problems, responses)
    seconds = time.perf_counter() - start
    bad = [p.uid for p, r in zip(problems, rewards) if r != 1.0]
    if bad:
        sys.exit(f"canonical solutions failed in the sandbox: {bad[:10]} ({len(bad)} in all)")
    return seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4], help="pool sizes to compare (1 = serial)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved runs of every configuration (median kept)")
    ap.add_argument("--limit", type=int, default=164, help="grade only the first N problems")
    ap.add_argument("--site-packages", action="store_true", help="let programs import installed packages")
    args = ap.parse_args(argv)
    if 1 not in args.workers:
        args.workers = [1] + args.workers

    tasks = {w: CodeTask("humaneval", workers=w, limits=Limits(wall_s=20, cpu_s=10),
                         site_packages=args.site_packages) for w in args.workers}
    problems = list(tasks[1].problems("test"))[: args.limit]
    responses = [p.solution for p in problems]
    load_before = os.getloadavg()
    print(f"{len(problems)} HumanEval canonical solutions; cores: {os.cpu_count()}; python {sys.version.split()[0]}; "
          f"site-packages: {'on' if args.site_packages else 'off'}")
    print("sandbox: " + tasks[1].sandbox.isolation().describe().replace("\n", "; "))

    times: dict[int, list[float]] = {w: [] for w in args.workers}
    runs = [(r, w) for r in range(args.repeats) for w in args.workers]
    for _, w in tqdm(runs, desc="grading", unit="batch"):
        times[w].append(measure(tasks[w], problems, responses))
    load_after = os.getloadavg()
    for task in tasks.values():
        task.close()

    serial = statistics.median(times[1])
    print(f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f}\n")
    print(f"{'configuration':<22}{'seconds':>9}{'programs/s':>12}{'ms/program':>12}{'vs serial':>11}")
    for w in args.workers:
        sec = statistics.median(times[w])
        name = "serial (workers=1)" if w == 1 else f"pool, workers={w}"
        print(f"{name:<22}{sec:>9.2f}{len(problems) / sec:>12.1f}{1000 * sec / len(problems):>12.1f}"
              f"{serial / sec:>10.2f}x")
    if max(load_before[0], load_after[0]) > (os.cpu_count() or 1):
        print("\nwarning: the machine was busy (load average above the core count); timings are unreliable")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
