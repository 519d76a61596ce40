"""`opdlab reproduce`: the statistics and the status rule against independent computations, each claim's own
figures on hand-made inputs, and every claim end to end at its quick sizes on the tiny random models."""
from __future__ import annotations

import json
import math
from statistics import NormalDist

import numpy as np
import pytest

from opdlab.cli import main as cli_main
from opdlab.experiments.reproduce import CLAIMS, run_claim
from opdlab.experiments.reproduce.alignment import stratified_difference
from opdlab.experiments.reproduce.claims import (ABSENT, NOT_REPRODUCED, REPRODUCED, ClaimResult, claims_table,
                                                 load_claim, status_of, t_interval, t_quantile, write_claim)
from opdlab.experiments.reproduce.estimator import slope
from opdlab.experiments.reproduce.lsm import drawdown, gaussian_null, top_share

# Student's t 0.975 quantiles as printed in statistical tables
T_TABLE = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 10: 2.228, 30: 2.042}


@pytest.mark.parametrize("df", list(T_TABLE))
def test_t_quantile_matches_the_printed_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T_TABLE[df], abs=1.5e-3)


def test_t_quantile_approaches_the_normal_one():
    assert t_quantile(0.975, 2000) == pytest.approx(NormalDist().inv_cdf(0.975), abs=2e-3)


def test_t_interval_by_hand():
    got = t_interval([1.0, 2.0, 3.0])
    half = 4.303 * 1.0 / math.sqrt(3)  # sd of 1, 2, 3 is 1
    assert got["value"] == pytest.approx(2.0)
    assert got["lo"] == pytest.approx(2.0 - half, abs=2e-3) and got["hi"] == pytest.approx(2.0 + half, abs=2e-3)
    one = t_interval([0.4])
    assert one["value"] == 0.4 and one["lo"] is None


def test_status_rule():
    above, straddles = {"value": 1.0, "lo": 0.1, "hi": 2.0}, {"value": 1.0, "lo": -0.1, "hi": 2.0}
    assert status_of(True, above) == REPRODUCED
    assert status_of(True, straddles) == NOT_REPRODUCED
    assert status_of(True, {"value": 1.0, "lo": None, "hi": None}) == NOT_REPRODUCED  # one seed: no interval
    assert status_of(False, above) == ABSENT
    assert status_of(True, above, straddles) == NOT_REPRODUCED  # every part of a compound claim is needed
    assert status_of(True, above, above) == REPRODUCED


def test_top_share_and_its_gaussian_null():
    assert top_share(np.array([3.0, 1.0, 1.0, 1.0]), frac=0.25) == pytest.approx(9 / 12)
    # E[z^2 ; |z| > c] / E[z^2] with c the 99.5 % point: 2 (c phi(c) + 1 - Phi(c))
    c = NormalDist().inv_cdf(0.995)
    expected = 2 * (c * NormalDist().pdf(c) + 0.005)
    assert gaussian_null(200_000, draws=3) == pytest.approx(expected, abs=3e-3)


def test_drawdown_by_hand():
    assert drawdown([0.3, 0.5, 0.2, 0.6, 0.55]) == pytest.approx(0.3)
    assert drawdown([0.1, 0.2, 0.3]) == 0.0


def test_stratified_difference_by_hand():
    cell = lambda mean, n: {"mean": mean, "n": n}  # noqa: E731
    group = {"by_p_succ": [{"correct": cell(0.5, 10), "incorrect": cell(0.3, 30)},   # -0.2, 40 nodes
                           {"correct": cell(0.2, 5), "incorrect": cell(0.6, 5)},     # +0.4, 10 nodes
                           {"correct": cell(0.9, 50), "incorrect": cell(None, 0)}]}  # one kind only: left out
    assert stratified_difference(group) == pytest.approx((40 * -0.2 + 10 * 0.4) / 50)


def test_slope_of_a_power_law():
    xs = [10, 14, 20, 28, 40]
    assert slope(xs, [3 * x ** 2.5 for x in xs]) == pytest.approx(2.5)


def test_claim_json_round_trip_and_table(tmp_path):
    r = ClaimResult(name="x", claim="a | b", paper="p", testbed="t", precondition="pre", precondition_present=True,
                    figure_label="f", figure=t_interval([1.0, 1.2, 1.1]), figure_text="1.1", command="opdlab x",
                    seeds=[0, 1, 2], wall_s=120)
    assert r.status == REPRODUCED
    back = load_claim(write_claim(r, tmp_path / "x"))
    assert back == r
    table = claims_table([tmp_path / "x" / "claim.json"])
    assert "a \\| b" in table and "**reproduced**" in table and "(2 min)" in table


def test_estimator_claim_through_the_cli(tmp_path, capsys):
    out = tmp_path / "rep"
    assert cli_main(["reproduce", "estimator", "--quick", "--seeds", "2", "--out", str(out), "--no-progress"]) == 0
    data = json.loads((out / "estimator" / "claim.json").read_text())
    runs = data["details"]["runs"]
    for run in runs:  # the slopes recomputed from the stored variances
        T = [r["horizon"] for r in run["per_horizon"]]
        for key in ("token", "sequence"):
            fit = np.polyfit(np.log(T), np.log([r[f"var_{key}"] for r in run["per_horizon"]]), 1)[0]
            assert run[f"slope_{key}"] == pytest.approx(fit)
    diffs = [r["slope_sequence"] - r["slope_token"] for r in runs]
    assert data["figure"]["value"] == pytest.approx(np.mean(diffs))
    assert data["status"] == status_of(data["precondition_present"], data["figure"])
    capsys.readouterr()
    assert cli_main(["reproduce", "--table", str(out)]) == 0
    assert "**estimator**" in capsys.readouterr().out


def test_unknown_claim_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["reproduce", "nope"])
    assert e.value.code == 2 and "the claims are: lgr" in capsys.readouterr().err


@pytest.mark.parametrize("name", [n for n in CLAIMS if n != "estimator"])
def test_every_claim_runs_at_quick_sizes(name, model_dirs, tmp_path):
    result = run_claim(name, tmp_path, [0, 1], quick=True, progress=False, student=str(model_dirs["student"]),
                       teacher=str(model_dirs["teacher"]))
    assert result.status in (REPRODUCED, NOT_REPRODUCED, ABSENT)
    assert result.status == status_of(result.precondition_present, result.figure, *result.required.values())
    assert result.figure["n"] <= 2 and len(result.figure["values"]) == result.figure["n"]
    assert load_claim(tmp_path / name / "claim.json").status == result.status
