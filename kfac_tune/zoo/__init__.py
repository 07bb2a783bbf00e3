"""Built-in architectures and datasets, addressed by name from the model YAML."""
from __future__ import annotations

from kfac_tune.zoo.data import DATASETS, DataBundle, DatasetNotFoundError, DatasetSpec, load_dataset
from kfac_tune.zoo.models import ARCHITECTURES, ArchSpec, architecture_signature, build_model

__all__ = [
    "ARCHITECTURES",
    "DATASETS",
    "ArchSpec",
    "DataBundle",
    "DatasetNotFoundError",
    "DatasetSpec",
    "architecture_signature",
    "build_model",
    "load_dataset",
]
