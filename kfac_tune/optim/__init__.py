"""The K-FAC optimizer package: ``from kfac_tune.optim import KFAC``; ``register_layer`` gives a module type a
curvature block (:mod:`kfac_tune.optim.registry`)."""
from kfac_tune.optim.callsite import KFACWarning
from kfac_tune.optim.optimizer import KFAC
from kfac_tune.optim.registry import register_layer

__all__ = ["KFAC", "KFACWarning", "register_layer"]
