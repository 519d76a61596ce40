"""The long-chain figure of docs/results/lookahead-long-chains.md: held-out mean@k by step for each objective of an
`opdlab compare` run (mean over seeds, min-max band), and the teacher's fidelity on student prefixes from
`opdlab diagnose fidelity` outputs.

    python docs/plot_long_chains.py COMPARE_DIR/compare.json docs/figures/lookahead_long_chains.png \
        before=FIDELITY_DIR "after opd (seed 0)"=DIR "after lookahead (seed 0)"=DIR
"""
import json
import statistics
import sys
from pathlib import Path

from matplotlib.figure import Figure

cmp = json.loads(Path(sys.argv[1]).read_text())
fids = dict(arg.split("=", 1) for arg in sys.argv[3:])
fig = Figure(figsize=(15, 4), layout="constrained")
ax_acc, ax_f, ax_c = fig.subplots(1, 3)
for name, runs in cmp["runs"].items():
    curves = [r["mean_at_k"] for r in runs.values()]
    steps = curves[0][0]; n = min(len(c[1]) for c in curves)
    cols = list(zip(*(c[1][:n] for c in curves)))
    line, = ax_acc.plot([0] + steps[:n], [statistics.fmean(cmp["before"].values())] + [statistics.fmean(c) for c in cols], marker="o", label=name)
    ax_acc.fill_between(steps[:n], [min(c) for c in cols], [max(c) for c in cols], alpha=0.2, color=line.get_color())
ax_acc.set(title=f"held-out mean@{cmp['k']} ({len(cmp['before'])} seeds, min-max band)", xlabel="step")
ax_acc.legend()
for label, d in fids.items():
    p = Path(d) / "fidelity.json"
    if not p.exists():
        continue
    f = json.loads(p.read_text())
    bins = [b for b in f["student"]["bins"] if b["tokens"] >= f["min_bin_tokens"]]
    ax_f.plot([b["mean_position"] for b in bins], [b["fidelity"] for b in bins], label=f"student prefixes, {label}")
    cuts = f["cuts"]
    ax_c.errorbar([c["position"] for c in cuts], [c["accuracy"] for c in cuts], yerr=[c["stderr"] for c in cuts], marker="o", capsize=3, label=label)
    if label == next(iter(fids)):
        tb = [b for b in f["teacher"]["bins"] if b["tokens"] >= f["min_bin_tokens"]]
        ax_f.plot([b["mean_position"] for b in tb], [b["fidelity"] for b in tb], "k--", label="teacher's own prefixes")
ax_f.set(title="teacher max-prob F(t) by position", xlabel="completion position t", ylim=(0.95, 1.001)); ax_f.legend(fontsize=8)
ax_c.set(title="teacher accuracy continuing a student prefix cut at t", xlabel="cut position t", ylabel="accuracy"); ax_c.legend(fontsize=8)
fig.savefig(sys.argv[2], dpi=100)
print("wrote", sys.argv[2])
