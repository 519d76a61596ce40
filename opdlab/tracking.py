"""Where a run's numbers go: `metrics.jsonl` (one object per step), `samples.jsonl` (example rollouts with their
rewards and teacher scores), and the trackers of `track.backends`: TensorBoard events, and Weights & Biases, trackio
and MLflow through accelerate's tracker classes (`accelerate.tracking`). On resume, records from steps after the
checkpoint are dropped so that the files read as one uninterrupted run, and a wandb / mlflow run is continued under
the id it had (kept in `RUN_DIR/trackers.json`).

Every tracker gets the resolved config (flattened to dotted keys, and `config.yaml` as a file where the tracker
keeps files), the metrics of every step, the sample rollouts as a table every `train.sample_every` steps (wandb,
mlflow, trackio) and, when the run closes, the training-curve plot (`opdlab.report.plot_training_curves`) as an
image. With `track.offline` (the default) nothing leaves the machine: wandb runs in offline mode under
`RUN_DIR/wandb` (`wandb sync RUN_DIR/wandb/offline-run-*` uploads it later), mlflow writes a file store under
`RUN_DIR/mlruns`, and trackio writes its local store.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

from opdlab.config import ConfigError, TrackConfig
from opdlab.report import plot_training_curves

# The trackers that need a package of their own, and the pin that installs it (requirements-trackers.txt).
TRACKER_PACKAGES = {"wandb": ("wandb", "wandb==0.31.0"), "trackio": ("trackio", "trackio"),
                    "mlflow": ("mlflow", "mlflow-skinny==3.17.2")}
SAMPLE_COLUMNS = ["step", "uid", "question", "response", "reward", "teacher_logp_mean"]
IDS_FILE = "trackers.json"


def check_trackers(track: TrackConfig) -> None:
    """A `ConfigError` naming the package to install for every tracker of `track.backends` that is missing."""
    missing = [(name, TRACKER_PACKAGES[name]) for name in track.backends
               if name in TRACKER_PACKAGES and importlib.util.find_spec(TRACKER_PACKAGES[name][0]) is None]
    if missing:
        raise ConfigError("invalid configuration: track.backends: " + "; ".join(
            f"{name} is not installed (pip install {pin})" for name, (_, pin) in missing)
            + " (got " + repr(track.backends) + "); requirements-trackers.txt pins them all")


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


def flatten(config: dict, prefix: str = "") -> dict:
    """A nested config as dotted keys ('train.lr'); lists become their JSON text (trackers take scalars)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, (list, tuple)) else v
    return out


def mlflow_name(key: str) -> str:
    """A metric name MLflow accepts (alphanumerics, _ - . : / and spaces): 'eval/mean@4' -> 'eval/mean_at_4'."""
    return re.sub(r"[^\w\-.:/ ]", "_", key.replace("@", "_at_"))


class _Tracker:
    """One accelerate tracker with what opdlab sends it beyond metrics: the config file, tables and images."""

    def __init__(self, name: str, track: TrackConfig, run_dir: Path, run_id: str | None):
        import accelerate.tracking as at  # lazy: pulls in each tracker's package only when it is used
        self.name, self.run_dir = name, run_dir
        run_name = track.run_name or run_dir.name
        if name == "wandb":
            import wandb  # lazy: optional tracker
            kwargs = dict(name=run_name, tags=list(track.tags), dir=str(run_dir),
                          settings=wandb.Settings(quiet=True, console="off"))
            if track.offline:
                kwargs["mode"] = "offline"
            if run_id:
                kwargs.update(id=run_id, resume="allow")
            self.tracker = at.WandBTracker(track.project, **kwargs)
        elif name == "trackio":
            kwargs = dict(name=run_name)
            if run_id:
                kwargs.update(name=run_id, resume="allow")
            self.tracker = at.TrackioTracker(track.project, **kwargs)
        elif name == "mlflow":
            import mlflow  # lazy: optional tracker
            if track.offline:
                os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # the local file store, in RUN_DIR
                mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
            self.tracker = at.MLflowTracker(experiment_name=track.project, run_name=run_name, run_id=run_id,
                                            tags={t: "" for t in track.tags} or None)
        else:
            raise ValueError(f"unknown tracker {name!r}; allowed: {', '.join(TRACKER_PACKAGES)}")
        self.tracker.start()

    @property
    def run_id(self) -> str | None:
        run = self.tracker.tracker
        if self.name == "mlflow":
            return run.info.run_id
        return getattr(run, "id", None) or getattr(run, "name", None)

    def config(self, values: dict, config_file: Path) -> None:
        self.tracker.store_init_configuration(values)
        if config_file.is_file():  # a run directory has it (opdlab.run writes it first)
            self.file(config_file)

    def file(self, path: Path) -> None:
        if self.name == "wandb":
            self.tracker.tracker.save(str(path), base_path=str(path.parent), policy="now")
        elif self.name == "mlflow":
            self.tracker.log_artifact(str(path))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.name == "mlflow":
            metrics = {mlflow_name(k): v for k, v in metrics.items()}
        self.tracker.log(metrics, step=step)

    def table(self, step: int, rows: list[dict]) -> None:
        data = [[r[c] for c in SAMPLE_COLUMNS] for r in rows]
        if self.name == "wandb":
            self.tracker.log_table("samples", columns=SAMPLE_COLUMNS, data=data, step=step)
        elif self.name == "mlflow":
            import mlflow  # lazy: optional tracker
            mlflow.log_table({c: [r[c] for r in rows] for c in SAMPLE_COLUMNS},
                             artifact_file=f"samples/step-{step:06d}.json")
        elif self.name == "trackio":
            import trackio  # lazy: optional tracker
            self.tracker.log({"samples": trackio.Table(columns=SAMPLE_COLUMNS, data=data)}, step=step)

    def image(self, step: int, key: str, path: Path) -> None:
        if self.name == "wandb":
            from PIL import Image  # lazy: only for wandb's images
            self.tracker.log_images({key: [Image.open(path)]}, step=step)
        elif self.name == "mlflow":
            self.tracker.log_artifact(str(path))
        elif self.name == "trackio":
            import trackio  # lazy: optional tracker
            self.tracker.log({key: trackio.Image(str(path))}, step=step)

    def finish(self) -> None:
        self.tracker.finish()


class MetricsLogger:
    def __init__(self, run_dir: Path, start_step: int = 0, track: TrackConfig | None = None,
                 config: dict | None = None):
        """`track`: the trackers (default: jsonl and TensorBoard); `config`: the resolved config (a nested dict)
        sent to the other trackers, with RUN_DIR/config.yaml as a file."""
        track = track or TrackConfig()
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        self.last_step = start_step
        for p in (self.metrics_path, self.samples_path):
            if start_step == 0:
                p.unlink(missing_ok=True)
            else:
                _truncate_jsonl(p, start_step)
        self.tb = SummaryWriter(str(self.run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None) \
            if "tensorboard" in track.backends else None
        ids_path = self.run_dir / IDS_FILE
        ids = json.loads(ids_path.read_text()) if start_step and ids_path.is_file() else {}
        self.trackers = [_Tracker(name, track, self.run_dir, ids.get(name)) for name in track.backends
                         if name in TRACKER_PACKAGES]
        if self.trackers:
            ids_path.write_text(json.dumps({t.name: t.run_id for t in self.trackers}, indent=1) + "\n")
            if start_step == 0:
                for t in self.trackers:
                    t.config(flatten(config or {}), self.run_dir / "config.yaml")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        for t in self.trackers:
            t.log(step, metrics)
        self.last_step = step

    def samples(self, step: int, rollouts, rewards, scores, n: int = 4) -> None:
        mask = rollouts.completion_mask_B_T.bool()
        rows = [{
            "step": step, "uid": rollouts.problems[i].uid, "question": rollouts.problems[i].question,
            "response": rollouts.texts[i], "reward": rewards[i],
            "teacher_logp_mean": scores.logp_B_T[i][mask[i]].mean().item() if mask[i].any() else None,
        } for i in range(min(n, len(rollouts.texts)))]
        with open(self.samples_path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        for t in self.trackers:
            t.table(step, rows)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.trackers and self.metrics_path.is_file() and self.metrics_path.stat().st_size:
            curves = plot_training_curves(self.run_dir)
            for t in self.trackers:
                t.image(self.last_step, "curves", curves)
        for t in self.trackers:
            t.finish()
