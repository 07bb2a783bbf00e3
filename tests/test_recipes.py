"""Recipes: round trip, atomic writes that never damage the previous file, clear errors for bad files."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from torch import nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kfac_tune.recipes import Recipe, RecipeError, check_architecture, load_recipe, save_recipe

SIGNATURE = {"layers": [{"path": "1", "type": "Linear", "weight_shape": [32, 64], "bias": True}], "hash": "abc123"}


def make_recipe(value: float = 0.25, **hyperparameters: object) -> Recipe:
    return Recipe.model_validate({
        "architecture": "mlp",
        "optimizer": "kfac",
        "hyperparameters": {"lr": 0.05, "damping": 3e-3, "inv_update_freq": 10, "loss": "cross_entropy",
                            **hyperparameters},
        "training": {"dataset": "digits", "batch_size": 64, "steps": 100, "loss": "cross_entropy",
                     "metric": "eval_loss", "seed": 0},
        "result": {"metric": "eval_loss", "value": value, "direction": "minimize", "trials": 12},
        "provenance": {"study": "s", "trial": 7, "mlflow_run_id": None, "config_hash": "f00", "architecture": "mlp",
                       "signature": SIGNATURE, "device": "cpu", "date": "2026-11-23T10:00:00+00:00",
                       "versions": {"torch": "2.14.1"}},
    })


def test_round_trip(tmp_path: Path) -> None:
    recipe = make_recipe()
    path = save_recipe(recipe, tmp_path / "recipes" / "mlp.yaml")
    assert load_recipe(path) == recipe
    assert path.read_text().startswith("# kfac-tune recipe")
    assert recipe.optimizer == "kfac" and recipe.hyperparameters["lr"] == 0.05
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_keeps_old_file(tmp_path: Path) -> None:
    path = save_recipe(make_recipe(0.5), tmp_path / "mlp.yaml")
    before = path.read_bytes()
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(RecipeError, match="unchanged"):
            save_recipe(make_recipe(0.1), path)
    finally:
        tmp_path.chmod(0o700)
    assert path.read_bytes() == before


@pytest.mark.parametrize("interruption", [OSError(18, "Invalid cross-device link"), KeyboardInterrupt()],
                         ids=["rename fails", "ctrl-c at rename"])
def test_target_that_cannot_be_replaced_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       interruption: BaseException) -> None:
    """The rename fails (or Ctrl-C lands) after the temp file was written: the temp file must go, the old file
    stay. The fault is injected at ``os.replace``, the one call between a complete temp file and the new name."""
    import kfac_tune.files

    path = save_recipe(make_recipe(0.5), tmp_path / "mlp.yaml")
    before = path.read_bytes()

    def blocked(*args: object) -> None:
        raise interruption

    monkeypatch.setattr(kfac_tune.files.os, "replace", blocked)
    with pytest.raises(RecipeError if isinstance(interruption, OSError) else KeyboardInterrupt):
        save_recipe(make_recipe(0.1), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.yaml"]


def test_unserialisable_recipe_never_touches_the_file(tmp_path: Path) -> None:
    path = save_recipe(make_recipe(0.5), tmp_path / "mlp.yaml")
    before = path.read_bytes()
    recipe = make_recipe(0.1)  # validation refuses such a value; model_copy does not validate, YAML cannot dump it
    broken = recipe.model_copy(update={"hyperparameters": {**recipe.hyperparameters, "fisher": object()}})
    with pytest.raises(RecipeError, match="cannot serialise"):
        save_recipe(broken, path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("text, match", [
    ("", "expected a mapping"),
    ("architecture: mlp\noptimizer: kfac\nhyperparameters: {lr: 0.1", "valid YAML"),
    ("architecture: mlp\noptimizer: kfac\n", "incomplete"),
    ("- 1\n- 2\n", "expected a mapping"),
    ("\x00\x01binary", "valid YAML"),
])
def test_corrupt_or_partial_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(RecipeError, match=match):
        load_recipe(path)


def test_truncated_recipe_is_rejected(tmp_path: Path) -> None:
    full = save_recipe(make_recipe(), tmp_path / "full.yaml").read_text()
    for cut in range(40, len(full), max(len(full) // 15, 1)):
        path = tmp_path / "cut.yaml"
        path.write_text(full[:cut])
        with pytest.raises(RecipeError):
            load_recipe(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="cannot read"):
        load_recipe(tmp_path / "nope.yaml")


def test_architecture_mismatch_names_both() -> None:
    recipe = make_recipe()
    with pytest.raises(RecipeError, match="'mlp'.*'convnet'"):
        check_architecture(recipe, "convnet", SIGNATURE)
    wider = {"layers": [{"path": "1", "type": "Linear", "weight_shape": [128, 64], "bias": True}], "hash": "zzz"}
    with pytest.raises(RecipeError, match=r"32x64.*128x64"):
        check_architecture(recipe, "mlp", wider)
    check_architecture(recipe, "mlp", SIGNATURE)


def _digits_mlp(*, flatten: bool = True, activation: type = nn.ReLU, last_bias: bool = True,
                extra: bool = False) -> nn.Sequential:
    """The network of the shipped ``digits_mlp`` recipes, or a variant of it that differs in one respect."""
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    layers += [nn.Linear(64, 64), activation(), nn.Linear(64, 64), activation()]
    layers += [nn.Linear(64, 64), activation()] if extra else []
    return nn.Sequential(*layers, nn.Linear(64, 10, bias=last_bias))


@pytest.mark.parametrize(("variant", "named"), [
    ({"flatten": False}, r"layer 1 is '1' \(Linear 64x64, with bias\) in the recipe and '0' \(Linear 64x64, with bias\) here"),
    ({"last_bias": False}, r"layer 3 is '5' \(Linear 10x64, with bias\) in the recipe and '5' \(Linear 10x64, without bias\)"),
    ({"extra": True}, r"layer 3 is '5' \(Linear 10x64, with bias\) in the recipe and '5' \(Linear 64x64, with bias\)"),
    ({"activation": nn.Tanh}, r"parameter-free modules differ: Flatten, ReLU, ReLU in the recipe, Flatten, Tanh, Tanh here"),
])
def test_a_recipe_refused_for_a_model_names_what_differs(variant: dict, named: str) -> None:
    """Equal shape lists can hide another module path, bias or activation; the refusal says which one, since two
    identical-looking layer lists give the user nothing to act on."""
    from kfac_tune import optimizer_from_recipe

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "digits_mlp-kfac.yaml"
    optimizer_from_recipe(_digits_mlp(), recipe)  # the network it was tuned on is accepted
    with pytest.raises(RecipeError, match=named):
        optimizer_from_recipe(_digits_mlp(**variant), recipe)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.text(max_size=300), st.recursive(
    st.one_of(st.none(), st.booleans(), st.floats(), st.integers(), st.text(max_size=10)),
    lambda inner: st.dictionaries(st.sampled_from(["architecture", "optimizer", "hyperparameters", "training",
                                                   "result", "provenance", "lr", "value"]), inner, max_size=6),
    max_leaves=15).map(yaml.safe_dump)))
def test_load_recipe_raises_only_recipe_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path)
    except RecipeError as error:
        assert str(path) in str(error)


# ------------------------------------------------------------------------------------------------ issue 13


def _special(kind: str, path: Path) -> Path:
    """Make a non-regular file of ``kind`` at ``path`` (or return the system one); the caller checks it survives."""
    import socket

    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "directory":
        path.mkdir()
        (path / "keep").write_text("x")
    elif kind == "device":
        private_device(path, "null")
    elif kind == "link to device":
        path.symlink_to(private_device(path.with_name("null"), "null"))
    elif kind == "symlink loop":
        path.symlink_to(path.name)
    return path


def private_device(path: Path, which: str) -> Path:
    """A character device node like /dev/null or /dev/zero, but private to the test: a writer that replaces its
    target (the defect under test) must never get to replace the system's /dev/null. Needs CAP_MKNOD (root)."""
    try:
        os.mknod(path, 0o666 | 0o020000, os.makedev(1, {"null": 3, "zero": 5}[which]))
    except PermissionError:
        pytest.skip("creating a device node needs root (CAP_MKNOD)")
    return path


def _kind_of(path: Path) -> str:
    import stat

    mode = path.lstat().st_mode
    return next(name for test, name in ((stat.S_ISLNK, "link"), (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket"),
                                        (stat.S_ISDIR, "dir"), (stat.S_ISCHR, "chr"), (stat.S_ISREG, "file"))
                if test(mode))


SPECIAL = ["fifo", "socket", "directory", "device", "link to device", "symlink loop"]


@pytest.mark.parametrize("kind", SPECIAL)
def test_writes_go_only_to_regular_files(tmp_path: Path, kind: str) -> None:
    target = _special(kind, tmp_path / "mlp.yaml")
    before = _kind_of(target)
    with pytest.raises(RecipeError, match="not a regular file|cannot be resolved"):
        save_recipe(make_recipe(), target)
    assert _kind_of(target) == before
    if target.parent == tmp_path:
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")], "a temp file was left"


@pytest.mark.parametrize("kind", SPECIAL)
def test_reads_take_only_regular_files(tmp_path: Path, kind: str) -> None:
    """A FIFO must not block the reader, an endless device must not fill memory: each read runs in a child with a
    2 GiB address-space limit and a timeout, so a regression fails the test instead of the machine."""
    import subprocess
    import sys

    path = private_device(tmp_path / "zero", "zero") if kind == "device" else _special(kind, tmp_path / "mlp.yaml")
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30)); "
            "from kfac_tune.config import ConfigError, load_config; from kfac_tune.recipes import RecipeError, "
            "load_recipe\nfor load, error in ((load_recipe, RecipeError), (load_config, ConfigError)):\n"
            "    try:\n        load(sys.argv[1])\n    except error as e:\n        print(type(e).__name__, e)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["RecipeError", "ConfigError"], done.stdout
    assert all("not a regular file" in line or "cannot read" in line for line in lines), done.stdout


def test_reads_refuse_oversized_files(tmp_path: Path) -> None:
    from kfac_tune.config import ConfigError, load_config
    from kfac_tune.files import MAX_YAML_BYTES

    path = tmp_path / "huge.yaml"
    path.write_text("# padding\n" * (MAX_YAML_BYTES // 10 + 1))
    with pytest.raises(RecipeError, match="larger than"):
        load_recipe(path)
    with pytest.raises(ConfigError, match="larger than"):
        load_config(path)


def test_a_symlink_is_written_through(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    versions = tmp_path / "versions"
    versions.mkdir()
    (versions / "v1.yaml").write_text("old")
    link = tmp_path / "cur.yaml"
    link.symlink_to("versions/v1.yaml")
    written = save_recipe(make_recipe(0.125), link)
    assert written == versions / "v1.yaml" and link.is_symlink()
    assert load_recipe(versions / "v1.yaml").result.value == 0.125
    assert f"{link} is a symbolic link; writing through to {versions / 'v1.yaml'}" in capsys.readouterr().err
    dangling = tmp_path / "next.yaml"
    dangling.symlink_to("versions/v2.yaml")
    save_recipe(make_recipe(0.5), dangling)
    assert dangling.is_symlink() and load_recipe(versions / "v2.yaml").result.value == 0.5


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o600, 0o664])
def test_an_overwrite_keeps_the_files_mode(tmp_path: Path, mode: int) -> None:
    path = save_recipe(make_recipe(), tmp_path / "mlp.yaml")
    path.chmod(mode)
    save_recipe(make_recipe(0.1), path)
    assert path.stat().st_mode & 0o7777 == mode


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077, 0o002])
def test_a_new_file_follows_the_umask(tmp_path: Path, umask: int) -> None:
    previous = os.umask(umask)
    try:
        path = save_recipe(make_recipe(), tmp_path / "mlp.yaml")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o7777 == 0o666 & ~umask


def test_the_temp_file_of_a_killed_writer_is_removed_by_the_next_write(tmp_path: Path) -> None:
    """A real SIGKILL between fsync and rename leaves ``.mlp.yaml.tmp-<pid>``; the next write removes it, but never
    the temp file of a writer that still runs."""
    import subprocess
    import sys

    path = save_recipe(make_recipe(0.5), tmp_path / "mlp.yaml")
    before = path.read_bytes()
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys; import kfac_tune.files as f; "
        "f.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL); f.write_atomic(sys.argv[1], 'half')"),
        str(path)], env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=120)
    assert killed.returncode == -9
    stale = tmp_path / f".mlp.yaml.tmp-{killed.args and _pid_of(tmp_path)}"
    assert stale.read_text() == "half" and path.read_bytes() == before
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        running = tmp_path / f".mlp.yaml.tmp-{alive.pid}"
        running.write_text("in progress")
        save_recipe(make_recipe(0.1), path)
        assert not stale.exists(), "the dead writer's temp file stayed"
        assert running.exists(), "a live writer's temp file was removed"
    finally:
        alive.kill()
        alive.wait()
    assert load_recipe(path).result.value == 0.1


def _pid_of(directory: Path) -> str:
    (temp,) = [p.name for p in directory.iterdir() if p.name.startswith(".mlp.yaml.tmp-")]
    return temp.rsplit("-", 1)[1]


@pytest.mark.parametrize("hyperparameters, field", [
    ({"lr": float("nan")}, "hyperparameters.lr"),
    ({"lr": float("inf")}, "hyperparameters.lr"),
    ({"lr": -0.1}, "hyperparameters.lr"),
    ({"lr": 0.0}, "hyperparameters.lr"),
    ({"lr": "fast"}, "hyperparameters.lr"),
    ({"lr": True}, "hyperparameters.lr"),
    ({}, "hyperparameters: expected the optimizer's hyperparameters"),
    ({"damping": 1e-3}, "hyperparameters: expected the optimizer's hyperparameters"),
    ({"lr": 0.1, "momentum": 1.5}, "hyperparameters.momentum"),
    ({"lr": 0.1, "beta2": 1.0}, "hyperparameters.beta2"),
    ({"lr": 0.1, "inv_update_freq": 2.5}, "hyperparameters.inv_update_freq"),
    ({"lr": 0.1, "inv_update_freq": 0}, "hyperparameters.inv_update_freq"),
    ({"lr": 0.1, "nesterov": "yes"}, "hyperparameters.nesterov"),
    ({"lr": 0.1, "kl_clip": float("nan")}, "hyperparameters.kl_clip"),
    ({"lr": 0.1, "custom": {"deep": [1.0, float("nan")]}}, "hyperparameters.custom"),
])
def test_unusable_hyperparameters_are_refused_naming_the_recipe_field(tmp_path: Path, hyperparameters: dict,
                                                                      field: str) -> None:
    raw = make_recipe().model_dump(mode="json")
    raw["hyperparameters"] = hyperparameters
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(RecipeError, match=f"recipe {path} .*{field}"):
        load_recipe(path)


def test_a_nan_recipe_is_never_found_or_ranked(tmp_path: Path) -> None:
    from kfac_tune.recipes import find_recipes

    good = save_recipe(make_recipe(0.5), tmp_path / "good.yaml")
    raw = make_recipe(0.01).model_dump(mode="json")
    raw["hyperparameters"]["lr"] = float("nan")
    (tmp_path / "nan.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    assert [m.path for m in find_recipes("mlp", SIGNATURE, "kfac", [tmp_path])] == [good]


@pytest.mark.parametrize("version", [0, 2, 99])
def test_an_unknown_format_is_refused(tmp_path: Path, version: int) -> None:
    raw = make_recipe().model_dump(mode="json")
    raw["format"] = version
    path = tmp_path / "future.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(RecipeError, match=f"format: expected format 1.*found {version}"):
        load_recipe(path)


@pytest.mark.parametrize("section", ["training", "hyperparameters", "lr"])
def test_a_key_given_twice_is_refused_naming_both_lines(tmp_path: Path, section: str) -> None:
    lines = save_recipe(make_recipe(), tmp_path / "mlp.yaml").read_text().splitlines()
    first = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{section}:"))
    if section == "lr":  # a nested key: repeated right below itself
        lines.insert(first + 1, lines[first].replace(lines[first].split(": ")[1], "9.0"))
        second = first + 1
    else:  # a section: repeated at the end, as a pasted block would be
        lines.append(f"{section}: {{}}")
        second = len(lines) - 1
    (tmp_path / "mlp.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(RecipeError, match=f"line {second + 1}: key '{section}' is given twice \\(first on line "
                                          f"{first + 1}\\)"):
        load_recipe(tmp_path / "mlp.yaml")


@pytest.mark.parametrize("name", ["../../outside/x", "/etc/cron.d/x", "a/b", ".hidden", "..", "", "x" * 200,
                                  "new\nline"])
def test_a_name_read_from_a_study_never_leaves_the_recipes_directory(tmp_path: Path, name: str) -> None:
    from kfac_tune.recipes import default_path

    with pytest.raises(RecipeError, match="cannot name a recipe file"):
        default_path(name, tmp_path / "recipes")
    assert default_path("digits_mlp-v2.1", tmp_path / "recipes") == tmp_path / "recipes" / "digits_mlp-v2.1.yaml"
