"""Built-in architectures and datasets, addressed by name from the model YAML.

The registries (:mod:`.specs`, with ``build_model`` and ``load_dataset``) import no torch; the builders and
loaders are imported on first use, so checking a name against the zoo stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any

from kfac_tune.zoo.specs import ARCHITECTURES, DATASETS, ArchSpec, DatasetSpec, build_model, load_dataset

_LAZY = {"DataBundle": "kfac_tune.zoo.data", "DatasetNotFoundError": "kfac_tune.zoo.data",
         "architecture_signature": "kfac_tune.zoo.models"}

__all__ = ["ARCHITECTURES", "DATASETS", "ArchSpec", "DatasetSpec", "build_model", "load_dataset", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
