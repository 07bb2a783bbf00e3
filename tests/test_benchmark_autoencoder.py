"""The seed benchmark's pipeline end to end on a toy size: tuning, arms, matched targets, plots, MLflow.

The numbers it produces at this size mean nothing; what is checked is that the script's outputs are consistent
with each other (the matched target is reached by both arms of a pair, ratios follow from the recorded curves)
and that what reaches MLflow is the recorded curve, stamped at training time.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import autoencoder
from kfac_tune.zoo.data import DEBIAN_FASHION_MNIST

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="needs `apt-get install dataset-fashion-mnist` (.ci/bootstrap.sh installs it)")]


def test_toy_run_logs_consistent_results_to_mlflow(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    autoencoder.main([
        "--width-div", "16", "--train-size", "256", "--test-size", "256", "--seeds", "2",
        "--arms", "adam,kfac-adaptive", "--trials", "2", "--adam-lr-range", "1e-3,1e-2",
        "--adaptive-damping-grid", "1e-4,1e-3", "--tune-seconds", "0.5", "--arm-seconds", "1.5",
        "--dense-until", "5", "--eval-every", "5", "--threads", "1", "--out", str(tmp_path / "out"), "--mlflow", uri,
    ])
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert len(results["curves"]) == 2 and len(results["per_seed"]) == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == [
        f"sigmoid_seed{s}_test_vs_{x}.png" for s in (0, 1) for x in ("seconds", "steps")]
    for curves, compared in zip(results["curves"], results["per_seed"]):
        by_arm = {c["arm"]: c for c in curves}
        for name, row in compared["arms"].items():
            curve = by_arm[name]
            assert row["min"] == min(curve["test"])
            if row["pair_step"] is not None:  # the arm's own clock at the first point at or below the target
                i = curve["steps"].index(row["pair_step"])
                assert curve["test"][i] <= row["pair_target"] and all(t > row["pair_target"] for t in curve["test"][:i])

    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("kfac-tune-benchmarks")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 2 * len(results["arms"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"results.json", "log.txt"}
    for child in children:
        seed = int(child.data.tags["seed"])
        curve = next(c for c in results["curves"][seed] if c["arm"] == child.data.tags["arm"])
        history = client.get_metric_history(child.info.run_id, "test_loss")
        assert [m.step for m in history] == curve["steps"]
        assert [m.value for m in history] == pytest.approx(curve["test"])
        elapsed = [(m.timestamp - history[0].timestamp) / 1000 for m in history]
        assert elapsed == pytest.approx([s - curve["seconds"][0] for s in curve["seconds"]], abs=2e-3)


def test_seeds_run_in_separate_processes_combine_into_one_summary(tmp_path: Path) -> None:
    common = ["--width-div", "16", "--train-size", "128", "--test-size", "128", "--seeds", "1",
              "--arms", "adam,kfac-adaptive", "--adam-lr", "3e-3", "--adaptive-damping-grid", "1e-4",
              "--arm-seconds", "0.5", "--threads", "1"]
    for seed in (0, 1):
        autoencoder.main([*common, "--first-seed", str(seed), "--out", str(tmp_path / f"s{seed}")])
    parts = [json.loads((tmp_path / f"s{seed}" / "results.json").read_text()) for seed in (0, 1)]
    assert [p["seeds"] for p in parts] == [[0], [1]]
    assert parts[0]["curves"][0][0]["test"][0] != parts[1]["curves"][0][0]["test"][0], "seeds differ"

    autoencoder.main(["--combine", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "all")])
    pooled = json.loads((tmp_path / "all" / "results.json").read_text())
    assert pooled["seeds"] == [0, 1]
    assert pooled["per_seed"] == parts[0]["per_seed"] + parts[1]["per_seed"]
    assert pooled["summary"].startswith("medians over 2 seed(s)")


def test_muon_and_soap_arms_are_tuned_like_adam_and_train(tmp_path: Path) -> None:
    autoencoder.main([
        "--width-div", "16", "--train-size", "128", "--test-size", "128", "--seeds", "1", "--arms", "adam,muon,soap",
        "--trials", "2", "--adam-lr-range", "1e-3,1e-2", "--muon-lr-range", "2e-3,2e-2", "--soap-lr-range",
        "3e-4,3e-3", "--tune-seconds", "0.3", "--arm-seconds", "1", "--eval-every", "5", "--threads", "1",
        "--out", str(tmp_path),
    ])
    results = json.loads((tmp_path / "results.json").read_text())
    assert [arm["kind"] for arm in results["arms"]] == ["adam", "muon", "soap"]
    assert [len(results["tuning"][kind]) for kind in ("adam", "muon", "soap")] == [2, 2, 2], "same trial budget"
    for curve in results["curves"][0]:
        assert not curve["diverged"] and curve["total_steps"] > 0
        assert min(curve["test"]) < curve["test"][0], f"{curve['arm']} lowers the test loss"
