"""A config survives the trip through a study: stored (the ``config`` attribute, as ``search`` writes it),
read back (``search.selection.study_config``, as ``export`` without its CONFIG does) and used (issue 23).

Every example evaluated on the clock failed here: its stored dump carries ``eval_every``'s default beside
``eval_seconds``, and the re-validation refused "not both". Checked over every shipped example and over generated
configs (hypothesis), then once for real: a search evaluated on the clock, exported with only ``--study``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kfac_tune.config import Config, load_config, parse_config, stored_config
from kfac_tune.secrets import mask_data
from tests.search_support import REPO, cli, tiny_config

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


def round_trip(cfg: Config) -> Config:
    """``cfg`` as ``search`` stores it on the study (masked, through the storage's JSON) and ``export`` reads it."""
    stored = json.loads(json.dumps(mask_data(cfg.model_dump(mode="json", by_alias=True), cfg.storage)))
    return stored_config(stored, "the config stored with study 'S'")


def assert_same(cfg: Config, back: Config) -> None:
    assert back.model_dump(mode="json", by_alias=True) == cfg.model_dump(mode="json", by_alias=True)
    assert back.fingerprint() == cfg.fingerprint()  # the same objective: resumable, the same recipes


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_shipped_example_round_trips_through_a_study(example: Path) -> None:
    cfg = load_config(example)
    assert_same(cfg, round_trip(cfg))


@st.composite
def configs(draw: st.DrawFn) -> dict[str, Any]:
    """Valid configs of every budget and evaluation shape: steps, epochs or seconds; evaluated every N steps or
    every S seconds of training; one objective or two; any optimizer; a validation split or none."""
    budget = draw(st.sampled_from(["steps", "epochs", "seconds", "seconds and steps"]))
    training: dict[str, Any] = {"seed": draw(st.integers(0, 2**32 - 1)),
                                "metric": draw(st.sampled_from(["eval_loss", "eval_accuracy", "train_loss"]))}
    if budget in ("steps", "seconds and steps"):
        training["steps"] = draw(st.integers(1, 10**6))
    if budget == "epochs":
        training["epochs"] = draw(st.floats(0.01, 100))
    if budget.startswith("seconds"):
        training["budget"] = {"seconds": draw(st.floats(0.1, 10**5))}
    evaluation = draw(st.sampled_from(["default", "every", "seconds"]))
    if evaluation == "every":
        training["eval_every"] = draw(st.integers(1, 10**4))
    elif evaluation == "seconds":
        training["eval_seconds"] = draw(st.floats(0.01, 10**4))
    search: dict[str, Any] = {"trials": draw(st.integers(1, 100))}
    if not budget.startswith("seconds") and draw(st.booleans()):  # time is an objective only without a time budget
        search["objectives"] = [training["metric"], "train_seconds"]
    return {"model": {"name": "mlp", "kwargs": {"hidden": draw(st.lists(st.integers(1, 512), max_size=3))}},
            "data": {"name": "digits", "batch_size": draw(st.integers(1, 4096)),
                     "validation": draw(st.sampled_from([0, 0.1, 0.25]))},
            "training": training, "optimizer": draw(st.sampled_from(["kfac", "adam", "adamw", "sgd"])),
            "search": search,
            "storage": draw(st.sampled_from(["sqlite:///s.db", "postgresql://u:p#w 'x@db/k"]))}


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs())
def test_generated_configs_round_trip_through_a_study(data: dict[str, Any]) -> None:
    cfg = parse_config(data)
    back = round_trip(cfg)
    assert back.model_dump(mode="json", exclude={"storage"}) == cfg.model_dump(mode="json", exclude={"storage"})
    assert back.fingerprint() == cfg.fingerprint()
    assert "p#w 'x" not in back.storage  # stored masked


def test_a_config_that_gives_both_evaluation_settings_is_still_refused() -> None:
    """The stored form is a whole dump; the user's file still may not name both."""
    from kfac_tune.config import ConfigError

    with pytest.raises(ConfigError, match="expected eval_every .* or eval_seconds .*, not both"):
        parse_config({"training": {"eval_every": 10, "eval_seconds": 1.0}})


@pytest.mark.slow
def test_export_without_the_config_works_for_a_study_evaluated_on_the_clock(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, search={"trials": 1})
    config["training"] = {k: v for k, v in config["training"].items() if k != "eval_every"}
    config["training"].update(steps=None, budget={"seconds": 0.5}, eval_seconds=0.2)
    path = tmp_path / "clock.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    searched = cli("search", str(path), "-o", str(tmp_path / "from-search.yaml"), cwd=tmp_path)
    assert searched.returncode == 0, searched.stdout[-2000:] + searched.stderr[-2000:]
    exported = cli("export", "--study", "clock", "--storage", config["storage"], "-o", str(tmp_path / "r.yaml"),
                   cwd=tmp_path)
    assert exported.returncode == 0, exported.stdout[-2000:] + exported.stderr[-2000:]
    assert yaml.safe_load((tmp_path / "r.yaml").read_text())["provenance"]["study"] == "clock"
