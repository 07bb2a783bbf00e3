"""Built-in architectures and datasets, addressed by name from the model YAML.

The registries (:mod:`.specs`) import no torch; the builders and loaders (``build_model``, ``load_dataset``, ...)
are imported on first access, so checking a name against the zoo stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

from kfac_tune.zoo.specs import ARCHITECTURES, DATASETS, ArchSpec, DatasetSpec

_LAZY = {"DataBundle": "kfac_tune.zoo.data", "DatasetNotFoundError": "kfac_tune.zoo.data",
         "load_dataset": "kfac_tune.zoo.data", "architecture_signature": "kfac_tune.zoo.models",
         "build_model": "kfac_tune.zoo.models"}

__all__ = ["ARCHITECTURES", "DATASETS", "ArchSpec", "DatasetSpec", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
