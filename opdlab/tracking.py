"""Where a run's numbers go: `metrics.jsonl` (one object per step), TensorBoard events, and `samples.jsonl`
(example rollouts with their rewards and teacher scores). On resume, records from steps after the checkpoint are
dropped so that the files read as one uninterrupted run."""
from __future__ import annotations

import json
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter


def _truncate_jsonl(path: Path, last_step: int) -> None:
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed process
            continue
        if rec.get("step", 0) <= last_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


class MetricsLogger:
    def __init__(self, run_dir: Path, start_step: int = 0):
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        for p in (self.metrics_path, self.samples_path):
            if start_step == 0:
                p.unlink(missing_ok=True)
            else:
                _truncate_jsonl(p, start_step)
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)

    def samples(self, step: int, rollouts, rewards, scores, n: int = 4) -> None:
        mask = rollouts.completion_mask_B_T.bool()
        with open(self.samples_path, "a") as f:
            for i in range(min(n, len(rollouts.texts))):
                f.write(json.dumps({
                    "step": step, "uid": rollouts.problems[i].uid, "question": rollouts.problems[i].question,
                    "response": rollouts.texts[i], "reward": rewards[i],
                    "teacher_logp_mean": scores.logp_B_T[i][mask[i]].mean().item() if mask[i].any() else None,
                }) + "\n")

    def close(self) -> None:
        self.tb.close()
