"""Recipes: the best trial of a study as a small YAML file, per architecture.

A recipe is what outlives the study: the optimizer's name and constructor arguments (``KFAC(model,
**recipe.hyperparameters)`` works), the training settings they were tuned for, the result they gave and where
it came from. Files are written atomically (temp file in the same directory + ``os.replace``) because a half
written recipe that still parses would silently train with defaults; loading rejects anything incomplete with a
``RecipeError`` that names the file and the field.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from kfac_tune import catalog
from kfac_tune.config import ConfigError, read_yaml
from kfac_tune.files import FileError, writable_target, write_atomic

RECIPE_FORMAT = 1
DEFAULT_DIRECTORY = Path("recipes")
SHIPPED_DIRECTORY = Path(__file__).resolve().parents[1] / "recipes"  # the checkout's recipes/, when run from one
NAME_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}")


class RecipeError(ValueError):
    """A recipe that cannot be written, read, or used for this model; the message says which and why."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TrainingSettings(_Strict):
    """The setting the hyperparameters were tuned in: they do not transfer blindly to another batch size."""

    dataset: str
    batch_size: int = Field(ge=1)
    steps: int = Field(ge=1)
    # under a seconds budget: the training seconds the recipe was scored at (the budget, or with objective best
    # the seconds where its best value was reached); null under a steps budget
    seconds: float | None = Field(None, gt=0)
    loss: str
    metric: str
    seed: int


class Result(_Strict):
    """``value`` is the metric that selected the recipe, measured on ``split`` (recipes from before validation
    splits were selected on the test split): the ``objective`` quantity of its validation curve (``final`` for
    recipes from before the field), and after a race the mean over ``seeds`` with ``spread`` their sample standard
    deviation; ``test_value`` the same metric on the test split, measured once (seed ``training.seed``) after the
    search chose."""

    metric: str
    value: float
    objective: Literal["final", "best", "auc"] = "final"
    spread: float | None = Field(None, ge=0)
    seeds: list[int] | None = None
    direction: Literal["minimize", "maximize"]
    trials: int = Field(ge=1, description="finished trials (complete + pruned) when the recipe was exported")
    split: Literal["validation", "test"] = "test"
    test_value: float | None = None
    train_seconds: float | None = Field(None, ge=0)
    pick: str | None = None  # how it was chosen from the study: best | fastest-within=P%


class Provenance(_Strict):
    study: str
    trial: int
    mlflow_run_id: str | None = None
    config_hash: str
    architecture: str
    signature: dict[str, Any]
    device: str
    date: str
    versions: dict[str, str]


class Recipe(_Strict):
    """A tuned optimizer for one architecture. ``optimizer`` and ``hyperparameters`` are all
    ``optimizer_from_recipe`` needs; the rest says when the numbers can be trusted."""

    format: int = RECIPE_FORMAT
    architecture: str
    optimizer: str  # a name in kfac_tune.catalog.OPTIMIZERS
    hyperparameters: dict[str, Any]
    # how an optimizer made of several (muon: Muon + AdamW) split the model: its rule and each group's size
    parameter_groups: dict[str, Any] | None = None
    # what the search sampled, in the space's vocabulary (K-FAC's mode, batch_size); train applies batch_size
    searched: dict[str, Any] = Field(default_factory=dict)
    training: TrainingSettings
    result: Result
    provenance: Provenance

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, name: str) -> str:
        return catalog.optimizer(name).name

    @field_validator("format")
    @classmethod
    def _readable_format(cls, version: int) -> int:
        if version != RECIPE_FORMAT:
            newer = " (written by a newer kfac-tune?)" if version > RECIPE_FORMAT else ""
            raise ValueError(f"expected format {RECIPE_FORMAT}, the recipe format this kfac-tune reads; found "
                             f"{version}{newer}")
        return version

    @field_validator("hyperparameters")
    @classmethod
    def _usable_hyperparameters(cls, hyperparameters: dict[str, Any]) -> dict[str, Any]:
        check_hyperparameters(hyperparameters)
        return hyperparameters


# What a recipe's numbers must be, whatever the optimizer: name -> (kind, low, high, low inclusive, high inclusive).
# Names not listed must still be finite scalars (or lists/mappings of them); the optimizer's constructor judges
# the rest when the recipe is used.
_NUMBER, _INTEGER, _FLAG, _TEXT = "a number", "an integer", "true or false", "a string"
_RULES: dict[str, tuple[str, float, float, bool, bool]] = {
    name: rule
    for names, rule in (
        (("lr", "damping", "min_damping", "max_damping", "kl_clip", "eps"), (_NUMBER, 0, math.inf, False, False)),
        (("momentum", "dampening"), (_NUMBER, 0, 1, True, True)),
        (("factor_decay", "damping_adaptation_decay", "stat_fraction"), (_NUMBER, 0, 1, False, True)),
        (("weight_decay",), (_NUMBER, 0, math.inf, True, False)),
        (("beta1", "beta2"), (_NUMBER, 0, 1, True, False)),
        (("inv_update_freq", "cov_update_freq", "damping_adaptation_interval"), (_INTEGER, 1, math.inf, True, False)),
        (("nesterov", "adaptive_damping", "adaptive_lr", "adaptive_momentum"), (_FLAG, 0, 0, True, True)),
        (("loss", "fisher", "damping_mode"), (_TEXT, 0, 0, True, True)))
    for name in names
}
_OPTIONAL = {"kl_clip"}  # null means "off"


def check_hyperparameters(hyperparameters: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first hyperparameter that no optimizer could use: a recipe must never rank
    first in ``recipe find`` or seed a warm start with a NaN, a negative learning rate or ``lr: true``."""
    if "lr" not in hyperparameters:
        raise ValueError("expected the optimizer's hyperparameters, at least lr (the learning rate)")
    for name, value in hyperparameters.items():
        try:
            _check_value(name, value)
        except ValueError as error:
            raise ValueError(f"{name}: {error}") from None


def _check_value(name: str, value: Any) -> None:
    if value is None and name in _OPTIONAL:
        return
    rule = _RULES.get(name)
    if rule is None:
        _check_finite(value)
        return
    kind, low, high, low_in, high_in = rule
    if kind == _FLAG:
        ok = isinstance(value, bool)
    elif kind == _TEXT:
        ok = isinstance(value, str)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
            (kind == _NUMBER or float(value).is_integer())
    if not ok:
        raise ValueError(f"expected {kind}, found {value!r}")
    if kind in (_NUMBER, _INTEGER):
        below = value < low or (value == low and not low_in)
        above = value > high or (value == high and not high_in)
        if not math.isfinite(value) or below or above:
            interval = ("[" if low_in else "(") + f"{low:g}, {high:g}" + ("]" if high_in else ")")
            raise ValueError(f"expected a finite number in {interval}, found {value!r}")


def _check_finite(value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, found {value!r}")
    if isinstance(value, (dict, list)):
        for item in value.values() if isinstance(value, dict) else value:
            _check_finite(item)
    elif not isinstance(value, (bool, int, float, str)) and value is not None:
        raise ValueError(f"expected a number, a string or true/false, found {value!r}")


# --------------------------------------------------------------------------------------------- read / write
def default_path(study: str, directory: Path = DEFAULT_DIRECTORY) -> Path:
    """``<directory>/<study>.yaml``: one file per study, so studies of one architecture do not overwrite each
    other's recipe. ``study`` (read from a storage, which anyone with access to a shared one may have written)
    must be a plain name, so the file lands in ``directory`` and nowhere else."""
    check_name(study, "name")
    return directory / f"{study}.yaml"


def check_overwrite(path: str | Path, study: str, force: bool = False, config: str | Path | None = None) -> Path:
    """``path``, unless (and not ``force``) it holds the recipe of another study, is the model YAML ``config``
    itself, or is a symbolic link (kfac-tune makes none: one planted at ``recipes/<study>.yaml`` would have the
    recipe replace the file it points to): a ``RecipeError`` saying which (exit 2), so a search or export never
    replaces a file it was not asked to, silently. A special file is refused even with ``force``
    (``files.writable_target``); a file that is not a readable recipe is left to the writer to judge."""
    path = Path(path)
    target = writable_target(path)
    if force:
        return path
    if path.is_symlink():
        raise RecipeError(f"{path} is a symbolic link to {target}, which kfac-tune did not make: writing the recipe "
                          f"would replace that file. Pass --force to write through the link, or -o PATH to write "
                          f"elsewhere")
    if config is not None and target.exists() and Path(config).exists() and target.samefile(config):
        raise RecipeError(f"{path} is the model YAML {config} itself: writing the recipe there would replace it. "
                          f"Pass -o PATH to write the recipe elsewhere (or --force to replace the config)")
    if not path.is_file():
        return path
    try:
        previous = load_recipe(path).provenance.study
    except (RecipeError, ConfigError, OSError):
        return path
    if previous != study:
        raise RecipeError(f"{path} holds the recipe of study {previous!r}, not of study {study!r}: pass --force "
                          f"to overwrite it, or -o PATH to write elsewhere")
    return path


def check_name(name: str, what: str) -> str:
    """Refuse a ``name`` that would leave the directory it is joined to (separators, ``..``, a leading dot)."""
    if not (isinstance(name, str) and NAME_PATTERN.fullmatch(name)):
        raise RecipeError(f"the study's {what} {name!r} cannot name a recipe file: expected letters, digits, '_', "
                          f"'-' and '.', starting with a letter, digit or '_' (at most 128 characters); pass -o PATH")
    return name


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write ``recipe`` to ``path`` atomically (``files.write_atomic``): on any failure the previous file, if any,
    is left untouched. Returns the path written (a symlink's target)."""
    path = Path(path)
    try:
        text = _header(recipe) + yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
    except (yaml.YAMLError, ValueError, TypeError) as error:
        raise RecipeError(f"cannot serialise the recipe for {recipe.architecture!r}: {error}") from None
    try:
        return write_atomic(path, text)
    except FileError as error:
        raise RecipeError(f"cannot write recipe: {error}; nothing was written") from None
    except OSError as error:
        raise RecipeError(f"cannot write recipe {path} ({error.strerror or error}); any previous file there is "
                          "unchanged") from None


def _header(recipe: Recipe) -> str:
    return (f"# kfac-tune recipe: {recipe.optimizer} for {recipe.architecture!r}, "
            f"{recipe.result.metric} = {recipe.result.value:.6g} after {recipe.result.trials} trials.\n"
            "# Use it: kfac_tune.optimizer_from_recipe(model, PATH)  or  kfac-tune train CONFIG --recipe PATH\n")


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe; a missing, corrupt, truncated, special or foreign file raises ``RecipeError`` naming the
    problem (the field, for a bad value)."""
    path = Path(path)
    try:
        raw, _ = read_yaml(path)
    except ConfigError as error:
        raise RecipeError(f"recipe {error}") from None  # the message starts with the path
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} is not a kfac-tune recipe: expected a mapping, found {type(raw).__name__}")
    try:
        return _pin_conventions(Recipe.model_validate(raw))
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(top level)"
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "value_error" and where == "hyperparameters" and ":" in message:
            name, message = message.split(": ", 1)
            where = f"hyperparameters.{name}"
        raise RecipeError(
            f"recipe {path} is incomplete or invalid (a partial write or a hand edit?): {where}: {message}"
            + (f" ({error.error_count() - 1} more)" if error.error_count() > 1 else "")) from None


def _pin_conventions(recipe: Recipe) -> Recipe:
    """A recipe written before one of its optimizer's conventions existed keeps the meaning it was tuned under (the
    catalog entry's ``stored``: ``KFAC.stored_arguments``), so it reproduces; today's recipes record every
    convention already."""
    stored = catalog.optimizer(recipe.optimizer).stored_arguments(recipe.hyperparameters)
    return recipe.model_copy(update={"hyperparameters": stored})


def check_architecture(recipe: Recipe, architecture: str, signature: dict[str, Any]) -> None:
    """Refuse a recipe tuned for another network: K-FAC's damping and lr do not transfer across layer shapes."""
    theirs = recipe.provenance
    if theirs.architecture != architecture:
        raise RecipeError(f"the recipe was tuned for architecture {theirs.architecture!r}, but the model is "
                          f"{architecture!r}")
    if theirs.signature.get("hash") != signature.get("hash"):
        raise RecipeError(_mismatch(recipe, "this model", signature))


def recipe_for_model(recipe: Recipe | str | os.PathLike[str], model: Any, *, strict: bool = True) -> Recipe:
    """``recipe`` (a path or a loaded recipe), checked against ``model``: what ``optimizer_from_recipe``
    builds from.

    Why: a recipe's damping and learning rate are tuned to its network's layer shapes, and a Python caller has no
    ``--ignore-architecture`` prompt to make them think twice, so a recipe whose architecture signature differs
    from ``model``'s raises ``RecipeError`` naming both networks. ``strict=False`` skips the check. A model object
    has no architecture name, so the signature hash alone decides.
    """
    from kfac_tune.zoo.models import architecture_signature  # torch: only when a model is at hand anyway

    loaded = _pin_conventions(recipe) if isinstance(recipe, Recipe) else load_recipe(recipe)
    if not strict:
        return loaded
    ours = architecture_signature(model)
    if loaded.provenance.signature.get("hash") != ours.get("hash"):
        raise RecipeError(f"{_mismatch(loaded, f'this model, {type(model).__name__},', ours)}; its hyperparameters "
                          "may not suit it. Pass strict=False to use it anyway")
    return loaded


def optimizer_from_recipe(model: Any, recipe: Recipe | str | os.PathLike[str], *, strict: bool = True,
                          **overrides: Any) -> Any:
    """The optimizer a recipe (a path or a loaded ``Recipe``) describes, over ``model``; ``overrides`` win.

    Works for every optimizer in the catalog (a K-FAC recipe gives a ``KFAC``). The recipe's hyperparameters are
    complete constructor arguments, so this builds exactly what the search ran. A recipe tuned for another network
    raises ``RecipeError`` naming both, unless ``strict=False``. It lives with the recipes, not on ``KFAC``: the
    optimizer knows nothing of the tool's files.
    """
    recipe = recipe_for_model(recipe, model, strict=strict)
    arguments = {**recipe.hyperparameters, **overrides}
    return catalog.build_optimizer(recipe.optimizer, model, arguments,
                                   loss=arguments.pop("loss", recipe.training.loss))


def _mismatch(recipe: Recipe, model: str, signature: dict[str, Any]) -> str:
    theirs = recipe.provenance
    return (f"the recipe was tuned for {theirs.architecture!r} with layers {_layers(theirs.signature)} (signature "
            f"{theirs.signature.get('hash')}), but {model} has layers {_layers(signature)} (signature "
            f"{signature.get('hash')}): {_first_difference(theirs.signature, signature)}")


def _layers(signature: dict[str, Any]) -> str:
    shapes = ["x".join(str(d) for d in layer.get("weight_shape", [])) for layer in signature.get("layers", [])]
    return "[" + ", ".join(shapes[:6]) + (", ..." if len(shapes) > 6 else "") + "]"


def _first_difference(recipe: dict[str, Any], model: dict[str, Any]) -> str:
    """What tells the two signatures apart, in words: equal shape lists can hide another module path (a model
    written with other attribute names, or a ``Flatten`` first in its ``Sequential``), a missing bias or other
    activations, and a user cannot act on two identical-looking lists."""
    theirs, ours = recipe.get("layers", []), model.get("layers", [])
    for index, (a, b) in enumerate(zip(theirs, ours), start=1):
        if a != b:
            return f"layer {index} is {_layer(a)} in the recipe and {_layer(b)} here"
    if len(theirs) != len(ours):
        return f"the recipe's network has {len(theirs)} layers with weights, this one {len(ours)}"
    if recipe.get("activations") != model.get("activations"):
        return (f"the parameter-free modules differ: {', '.join(recipe.get('activations') or ['none'])} in the "
                f"recipe, {', '.join(model.get('activations') or ['none'])} here")
    return "the layers and activations read the same, so the recipe's signature was computed another way"


def _layer(layer: dict[str, Any]) -> str:
    shape = "x".join(str(d) for d in layer.get("weight_shape", []))
    bias = "with bias" if layer.get("bias") else "without bias"
    return f"{layer.get('path')!r} ({layer.get('type')} {shape}, {bias})"


# ------------------------------------------------------------------------------------------------ finding
MatchKind = Literal["exact", "architecture", "nearest"]
_KIND_RANK = {"exact": 0, "architecture": 1, "nearest": 2}
TYPE_MISMATCH = 10.0  # distance of a layer of another type, or of a missing/extra layer


@dataclass(frozen=True)
class Match:
    """A recipe on disk and how close its network is to the one asked about.

    ``kind``: ``exact`` (same architecture name and signature hash), ``architecture`` (same name, other shapes),
    ``nearest`` (another name; only the layer shapes are alike). ``distance`` is ``signature_distance``.
    """

    path: Path
    recipe: Recipe
    kind: MatchKind
    distance: float


def match(path: Path, recipe: Recipe, architecture: str, signature: dict[str, Any]) -> Match:
    """How close ``recipe`` is to the network ``architecture`` with ``signature``: the one rule for ``kind``."""
    theirs = recipe.provenance
    same_name = theirs.architecture == architecture
    kind: MatchKind = ("exact" if same_name and theirs.signature.get("hash") == signature.get("hash")
                       else "architecture" if same_name else "nearest")
    return Match(path, recipe, kind, signature_distance(theirs.signature, signature))


def recipe_directories(extra: Iterable[str | Path] = ()) -> list[Path]:
    """Where to look for recipes: ``extra`` first, then ``./recipes``, then the checkout's shipped ``recipes/``."""
    found: list[Path] = []
    for directory in (*map(Path, extra), DEFAULT_DIRECTORY, SHIPPED_DIRECTORY):
        resolved = directory.resolve()
        if resolved.is_dir() and resolved not in found:
            found.append(resolved)
    return found


def signature_distance(a: dict[str, Any], b: dict[str, Any]) -> float:
    """How far apart two networks are for K-FAC's purposes, 0 for identical layer lists.

    Layers are compared in order: the same type costs the summed ``|log2|`` ratio of the weight dimensions (a
    layer twice as wide costs 1), another type or a layer one network lacks costs ``TYPE_MISMATCH``. A heuristic
    for "which recipe to start from", not a metric with a theory behind it: damping and learning rate scale with
    layer widths, so widths are what it looks at.
    """
    layers_a, layers_b = a.get("layers", []), b.get("layers", [])
    distance = TYPE_MISMATCH * abs(len(layers_a) - len(layers_b))
    for x, y in zip(layers_a, layers_b):
        shape_x, shape_y = x.get("weight_shape", []), y.get("weight_shape", [])
        if x.get("type") != y.get("type") or len(shape_x) != len(shape_y):
            distance += TYPE_MISMATCH
            continue
        distance += sum(abs(math.log2(max(p, 1) / max(q, 1))) for p, q in zip(shape_x, shape_y))
    return distance


def find_recipes(architecture: str, signature: dict[str, Any], optimizer: str,
                 directories: Sequence[Path], dataset: str | None = None) -> list[Match]:
    """Recipes for ``optimizer`` in ``directories`` (``*.yaml``), closest first.

    Order: exact matches, then the same architecture name, then any other, each by ``signature_distance``; ties go
    to a recipe tuned on ``dataset``, then by path. Files that are not valid recipes are skipped: a recipes
    directory may hold other YAML, and one bad file must not hide the good ones.
    """
    matches = []
    for directory in directories:
        for path in sorted(directory.glob("*.yaml")):
            try:
                recipe = load_recipe(path)
            except RecipeError:
                continue
            if recipe.optimizer != optimizer:
                continue
            matches.append(match(path, recipe, architecture, signature))
    return sorted(matches, key=lambda m: (_KIND_RANK[m.kind], m.distance, m.recipe.training.dataset != dataset,
                                          str(m.path)))
