"""The model YAML: every malformed file is refused with exit code 2 and one paragraph naming the field.

The corpus lives in tests/data/bad_yaml/; each file's first line says ``# expect: <text the message must
contain>`` (usually the field path). Files are run through the real CLI (``kfac-tune search FILE``), because what
matters is what the user sees: no traceback, the path, the file name.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kfac_tune.cli import cli
from kfac_tune.config import Config, ConfigError, load_config

CORPUS = sorted((Path(__file__).parent / "data" / "bad_yaml").glob("*.yaml"))


def expectation(path: Path) -> str:
    first = path.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("# expect: "), f"{path.name} must start with '# expect: ...'"
    return first.removeprefix("# expect: ")


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 30


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_bad_yaml_exits_2_with_one_paragraph(path: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["search", str(path), "--no-tracking", "--storage",
                                      f"sqlite:///{tmp_path / 'never.db'}"])
    message = result.output.strip()
    assert result.exit_code == 2, message
    assert "Traceback" not in message
    assert expectation(path) in message
    assert path.name in message
    assert [line for line in message.splitlines() if line.startswith("Error:")] == [message.splitlines()[0]]
    assert "\n\n" not in message
    assert not (tmp_path / "never.db").exists(), "the study must not be created for a bad file"


def test_minimal_file_gets_every_default(tmp_path: Path) -> None:
    path = tmp_path / "ten_lines.yaml"
    path.write_text("model: mlp\ndata: digits\n")
    cfg = load_config(path)
    assert cfg.optimizer.name == "kfac" and cfg.search.sampler.name == "tpe" and cfg.storage.startswith("sqlite")
    assert cfg.training.goal == "minimize" and cfg.stem == "ten_lines"


def test_yaml12_floats_and_shorthands(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optimizer: adam\nsearch:\n  pruner: none\n  space:\n    lr: {low: 1e-5, high: 1e-1, log: true}\n"
                    "    beta1: 0.9\n    beta2: [0.99, 0.999]\n")
    cfg = load_config(path)
    space = cfg.search.space
    assert space["lr"].low == 1e-5 and space["beta1"].value == 0.9 and space["beta2"].choices == [0.99, 0.999]
    assert cfg.search.pruner.name == "none"


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optimizer: adam\n")
    assert load_config(path, {"optimizer.name": "sgd"}).optimizer.name == "sgd"
    with pytest.raises(ConfigError, match="search.trials"):
        load_config(path, {"search.trials": 0})


def test_fingerprint_ignores_budget_but_not_space(tmp_path: Path) -> None:
    base = Config()
    assert base.fingerprint() == Config(search={"trials": 99}).fingerprint()
    assert base.fingerprint() != Config(search={"space": {"lr": 0.1}}).fingerprint()


# ------------------------------------------------------------------------------------- property-based

KEYS = ["model", "data", "training", "optimizer", "search", "tracking", "storage", "name", "kwargs", "space", "lr",
        "low", "high", "log", "int", "choices", "value", "trials", "steps", "epochs", "sampler", "pruner", "seed",
        "batch_size", "enqueue", "args", "metric", "device", "hidden", "timeout", "enabled", "uri"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**40, 10**40), st.floats(allow_nan=True),
                    st.text(max_size=12), st.sampled_from(["mlp", "digits", "kfac", "tpe", "median", "cpu"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.sampled_from(KEYS), inner, max_size=5)),
                      max_leaves=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=st.one_of(st.dictionaries(st.sampled_from(KEYS), values, max_size=6).map(yaml.safe_dump),
                          st.text(max_size=200)))
def test_load_config_raises_only_config_error(document: str, tmp_path: Path) -> None:
    if "callable" in document:  # importing arbitrary modules is not what this property is about
        return
    path = tmp_path / "fuzz.yaml"
    path.write_text(document, encoding="utf-8")
    try:
        assert isinstance(load_config(path), Config)
    except ConfigError as error:
        assert "\n" not in str(error).strip() and str(path) in str(error)


def test_numpy_numbers_in_a_config_given_as_data_are_numbers() -> None:
    """The Python API takes a dict: np.int64(5) (from a grid, a DataFrame) was a bare TypeError from the copy, or
    pydantic's misleading "must be an integer"; anything else that is not data is a ConfigError."""
    import numpy as np

    from kfac_tune.config import parse_config

    data = {"training": {"steps": np.int64(5), "seed": np.uint32(3)}, "data": {"validation": np.float32(0.25)}}
    cfg = parse_config(data, {"search.trials": np.int16(4), "training.eval_every": np.int64(2)})
    assert (cfg.training.steps, cfg.training.seed, cfg.search.trials, cfg.training.eval_every) == (5, 3, 4, 2)
    assert type(cfg.training.steps) is int and cfg.data.validation == 0.25
    with pytest.raises(ConfigError, match="expected plain data .*Object of type object"):
        parse_config({"training": {"steps": object()}})
