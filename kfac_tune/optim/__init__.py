"""The K-FAC optimizer package: ``from kfac_tune.optim import KFAC``."""
from kfac_tune.optim.callsite import KFACWarning
from kfac_tune.optim.optimizer import KFAC

__all__ = ["KFAC", "KFACWarning"]
