"""Where each command's storage, tracking store and study come from: resolved once, in one order, here.

Every command (search, show, export, train, compare, ui) asks :func:`resolve` and uses the :class:`Settings` it
returns; nothing else reads ``KFAC_TUNE_STORAGE``/``MLFLOW_TRACKING_URI`` or holds a default store. For each
setting the first of these that is given wins:

==================  ===================  =======================  ==========================  =====================
setting             1. command line      2. environment           3. the model YAML           4. default
==================  ===================  =======================  ==========================  =====================
storage             ``--storage``        ``KFAC_TUNE_STORAGE``    ``storage``                 ``DEFAULT_STORAGE``
tracking URI        ``--tracking-uri``   ``MLFLOW_TRACKING_URI``  ``tracking.uri``            ``DEFAULT_TRACKING_URI``
tracking on/off     ``--no-tracking``                             ``tracking.enabled``        on
study name          ``--study``                                   the file's stem             (show/export: the
                                                                                              storage's only study)
==================  ===================  =======================  ==========================  =====================

``--set dotted.key=value`` (search, train, compare) edits the YAML itself before it is validated, so a bad value
is reported like a bad line of the file, naming ``--set``. This module imports neither torch nor the config
schema at import time, so the CLI's ``--help`` and the schema's defaults can use it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kfac_tune.stores import DEFAULT_STORAGE, DEFAULT_TRACKING_URI

if TYPE_CHECKING:
    from kfac_tune.config import Config

STORAGE_ENV = "KFAC_TUNE_STORAGE"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


@dataclass(frozen=True)
class Settings:
    """The resolved stores of one command. ``study`` is None when neither ``--study`` nor a config names one
    (show/export then take the storage's only study); ``origin`` says where each store came from, for messages."""

    storage: str
    tracking_uri: str
    tracking: bool
    study: str | None
    experiment: str | None
    origin: Mapping[str, str]

    def apply(self, cfg: Config) -> Config:
        """``cfg`` with these stores written into it, so code that reads the config sees the resolved values."""
        tracking = cfg.tracking.model_copy(update={"uri": self.tracking_uri, "enabled": self.tracking})
        return cfg.model_copy(update={"storage": self.storage, "tracking": tracking})

    def secrets(self) -> tuple[str, ...]:
        """The URLs whose passwords ``secrets.mask`` must hide in anything this command prints or records."""
        return self.storage, self.tracking_uri


def resolve(cfg: Config | None = None, *, storage: str | None = None, tracking_uri: str | None = None,
            no_tracking: bool = False, study: str | None = None,
            environ: Mapping[str, str] | None = None) -> Settings:
    """Resolve the stores and study in the documented order (module docstring); ``cfg`` is the command's model
    YAML if it has one. A tracking URI from the command line or the environment is checked like one in a file
    (``ConfigError`` naming where it came from)."""
    from kfac_tune.config import ConfigError, check_tracking_uri

    env = os.environ if environ is None else environ
    origin: dict[str, str] = {}

    def pick(name: str, flag: str | None, flag_name: str, variable: str, from_file: str | None, default: str) -> str:
        candidates = ((flag, flag_name), (env.get(variable) or None, variable),
                      (from_file, (cfg.source if cfg is not None else None) or "the config"), (default, "default"))
        value, origin[name] = next((v, where) for v, where in candidates if v is not None)
        return value

    storage_url = pick("storage", storage, "--storage", STORAGE_ENV, cfg.storage if cfg else None, DEFAULT_STORAGE)
    uri = pick("tracking_uri", tracking_uri, "--tracking-uri", TRACKING_URI_ENV,
               cfg.tracking.uri if cfg else None, DEFAULT_TRACKING_URI)
    if origin["tracking_uri"] in ("--tracking-uri", TRACKING_URI_ENV):
        try:
            check_tracking_uri(uri)
        except ValueError as error:
            from kfac_tune.secrets import display_url

            raise ConfigError(f"{origin['tracking_uri']}: tracking.uri: {error}; found {display_url(uri)!r}.") from None
    from kfac_tune.secrets import remember

    remember(storage_url, uri, *((cfg.storage, cfg.tracking.uri) if cfg is not None else ()))  # masked anywhere
    enabled = not no_tracking and (cfg.tracking.enabled if cfg is not None else True)
    name = study or (cfg.stem if cfg is not None else None)
    experiment = (cfg.tracking.experiment if cfg is not None else None) or name
    return Settings(storage_url, uri, enabled, name, experiment, origin)


# ------------------------------------------------------------------------------------------------ --set
def parse_sets(items: Sequence[str]) -> dict[str, Any]:
    """``--set dotted.key=value`` items as overrides; values are YAML scalars (``1e-3``, ``true``, ``[32, 32]``)."""
    from kfac_tune.config_reader import ConfigError, parse_value

    overrides: dict[str, Any] = {}
    for item in items:
        key, equals, text = item.partition("=")
        key = key.strip()
        shown = shown_item(item)
        if not equals or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {shown}: expected dotted.key=value (e.g. --set training.steps=50); found "
                              f"{shown!r}.")
        overrides[key] = parse_value(text, f"--set {shown}")  # the file reader's guards: size, alias bombs
    return overrides


def shown_item(item: str) -> str:
    """A ``--set`` item as an error quotes it: a URL value's password masked (``--set storage=postgresql://...``),
    then cut to ``MAX_QUOTED`` characters (a 1 MiB value is not worth repeating)."""
    from kfac_tune.config_reader import MAX_QUOTED
    from kfac_tune.secrets import mask

    item = mask(item, item.partition("=")[2].strip())
    return item if len(item) <= MAX_QUOTED else item[:MAX_QUOTED - 3] + "..."


def load(config: str | Path | Mapping[str, Any] | Config, sets: Sequence[str] = (),
         overrides: Mapping[str, Any] | None = None) -> Config:
    """The config (a YAML path, a mapping, or a ``Config``) with ``overrides`` (dotted keys, from the command's own
    options) and then ``--set`` items applied before validation. An error about a key that ``--set`` gave names
    the ``--set`` item."""
    from kfac_tune.config import Config, ConfigError, load_config, parse_config

    given = parse_sets(sets)
    changes = {**(overrides or {}), **given}
    try:
        if isinstance(config, (str, Path)):
            return load_config(config, changes)
        if isinstance(config, Config):
            if not changes:
                return config
            config = config.model_dump(mode="json", by_alias=True, exclude_unset=True)
        return parse_config(config, changes)
    except ConfigError as error:
        message = str(error)
        for item, key in zip(sets, given):
            for form in (f": {key}:", f": {key}."):
                head, found, tail = message.partition(form)
                if found:
                    source = head.split(" line ", 1)[0]
                    raise ConfigError(f"{source}: --set {shown_item(item)}: {key}{form[len(key) + 2:]}{tail}") from None
            head, found, tail = message.partition(": ")
            if found and key.startswith(tail.split(":", 1)[0] + "."):  # an unknown key above the leaf
                raise ConfigError(f"{head.split(' line ', 1)[0]}: --set {shown_item(item)}: {tail}") from None
        raise
