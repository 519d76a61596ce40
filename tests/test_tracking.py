"""Tests of the trackers (`track.*`, opdlab.tracking) with the real packages, offline: a short training run logs
to wandb (offline mode; its record log read back with a small reader of the format below) and to MLflow (a file
store, read with MlflowClient), each compared with metrics.jsonl; a resumed run continues the same tracker runs;
trackio where it is installed; and the errors of a bad `track` section.

    python -m pytest tests/test_tracking.py -q
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from opdlab.config import ConfigError, load_config
from opdlab.run import load_run_config
from opdlab.tracking import flatten, mlflow_name
from opdlab.train import train
from test_train import metric_rows, overrides

TRACKIO_SKIP = ("trackio is not installed: trackio 0.43 requires pillow<13 and this environment pins pillow 13.0.0 "
                "(matplotlib's), so requirements-trackers.txt leaves it out")


def wandb_records(run_dir: Path) -> list:
    """The records of a wandb offline run's `.wandb` file: a 7-byte header (':W&B', magic, version), then 32 KiB
    blocks of chunks, each with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)
    holding a protobuf `Record`."""
    from wandb.proto import wandb_internal_pb2
    (path,) = Path(run_dir, "wandb").glob("offline-run-*/run-*.wandb")
    data, pos, block, out, buf = path.read_bytes(), 7, 32768, [], b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


def wandb_history(records) -> dict[int, dict]:
    out = {}
    for rec in records:
        if rec.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item}
            out.setdefault(items["_step"], {}).update(items)
    return out


def test_wandb_and_mlflow_offline_get_config_metrics_samples_and_plots(model_dirs, tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -r requirements-trackers.txt)")
    mlflow = pytest.importorskip("mlflow", reason="mlflow is not installed (pip install -r requirements-trackers.txt)")
    run_dir = tmp_path / "tracked"
    cfg = load_run_config(None, overrides(model_dirs, run_dir, "train.steps=2", "train.sample_every=1",
                                          "track.backends=[jsonl, wandb, mlflow]", "track.tags=[smoke, cpu]",
                                          "track.run_name=first", "track.project=opdlab-test"))
    train(cfg, progress=False)
    rows = {r["step"]: r for r in metric_rows(run_dir)}
    assert not (run_dir / "tensorboard").exists()  # not in track.backends
    ids = json.loads((run_dir / "trackers.json").read_text())

    # wandb: the run, its config, every step's metrics, the samples table and the curves image
    records = wandb_records(run_dir)
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert (run.run_id, run.project, run.display_name, list(run.tags)) == (ids["wandb"], "opdlab-test", "first",
                                                                         ["smoke", "cpu"])
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    assert config["train.lr"] == 1e-3 and config["track.backends"] == '["jsonl", "wandb", "mlflow"]'
    history = wandb_history(records)
    for step, row in rows.items():
        for k, v in row.items():
            if k != "step":
                assert history[step][k] == pytest.approx(v, rel=1e-12), (step, k)
    assert history[1]["samples/_type"] == "table-file" and history[2]["curves/_type"] == "images/separated"
    files = {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert "config.yaml" in files
    (table_path,) = Path(run_dir, "wandb").glob("offline-run-*/files/media/table/samples_1_*.table.json")
    table = json.loads(table_path.read_text())
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert table["columns"][:4] == ["step", "uid", "question", "response"]
    assert [r[3] for r in table["data"]] == [s["response"] for s in samples if s["step"] == 1]

    # mlflow: a file store in the run directory
    client = mlflow.tracking.MlflowClient((run_dir / "mlruns").resolve().as_uri())
    mrun = client.get_run(ids["mlflow"])
    assert mrun.info.run_name == "first" and {"smoke", "cpu"} <= set(mrun.data.tags)
    assert mrun.data.params["train.lr"] == "0.001"
    loss = [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "train/loss")]
    assert loss == [(s, pytest.approx(rows[s]["train/loss"], rel=1e-12)) for s in sorted(rows)]
    artifacts = {a.path for a in client.list_artifacts(ids["mlflow"])}
    assert {"config.yaml", "curves.png", "samples"} <= artifacts

    # resumed: the same wandb and mlflow runs go on (ids kept in trackers.json)
    train(cfg.model_copy(update={"train": cfg.train.model_copy(update={"steps": 4})}), resume=True, progress=False)
    assert json.loads((run_dir / "trackers.json").read_text()) == ids
    steps = [m.step for m in client.get_metric_history(ids["mlflow"], "train/loss")]
    assert steps == [1, 2, 3, 4]


def test_trackio_local_store(model_dirs, tmp_path, monkeypatch):
    pytest.importorskip("trackio", reason=TRACKIO_SKIP)
    monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))
    run_dir = tmp_path / "trackio_run"
    train(load_run_config(None, overrides(model_dirs, run_dir, "train.steps=2", "track.backends=[jsonl, trackio]")),
          progress=False)
    assert any((tmp_path / "trackio").rglob("*")) and len(metric_rows(run_dir)) == 2


@pytest.mark.parametrize("override, message", [
    ("track.backends=[jsonl, neptune]", "track.backends.1: Input should be 'jsonl', 'tensorboard', 'wandb', "
                                        "'trackio' or 'mlflow' (got 'neptune')"),
    ("track.backends=[tensorboard]", "must include 'jsonl'"),
    ("track.backends=[jsonl, wandb, wandb]", "lists a tracker twice"),
])
def test_bad_track_section_names_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_missing_tracker_package_names_the_pip_pin(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"track.backends: wandb is not installed \(pip install wandb==0.31.0\)"):
        load_run_config(None, ["track.backends=[jsonl, wandb]"])


def test_flatten_and_mlflow_names():
    assert flatten({"a": {"b": 1, "c": [1, 2]}, "d": None}) == {"a.b": 1, "a.c": "[1, 2]", "d": None}
    assert mlflow_name("eval/mean@4_len_<=32") == "eval/mean_at_4_len___32"
