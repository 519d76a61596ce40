"""RUN_DIR/alignment.json, the whole record of a gradient alignment run: every node's numbers, the rollouts, the
config and the summary (`opdlab.diagnostics.alignment.run` writes it; the report and the plots read it alone).

    save_result(result, "runs/alignment")          # NaN / inf become null
    result = load_result("runs/alignment")
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

ALIGNMENT_FILE = "alignment.json"


def _clean(x):
    """JSON-safe: NaN / inf become null."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.generic):
        return _clean(x.item())
    return x


def save_result(result: dict, run_dir: str | Path) -> Path:
    """Write RUN_DIR/alignment.json (the directory is made if needed); returns its path."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ALIGNMENT_FILE
    path.write_text(json.dumps(_clean(result), separators=(",", ":")))
    return path


def load_result(run_dir: str | Path) -> dict:
    path = Path(run_dir) / ALIGNMENT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {ALIGNMENT_FILE} in {run_dir}: run `opdlab diagnose alignment` first")
    return json.loads(path.read_text())
