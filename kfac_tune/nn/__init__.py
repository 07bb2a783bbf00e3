"""Layers whose curvature K-FAC can see: recurrent networks built from ``nn.Linear`` maps unrolled over time.

``nn.LSTM``/``nn.GRU`` run as one fused kernel (cuDNN on GPUs), so no forward hook sees the per-step products
that K-FAC's factors are made of.  :class:`LSTM` and :class:`GRU` compute the same functions from two Linear maps
per layer -- input-to-hidden applied to the whole sequence in one product, hidden-to-hidden once per step -- both
marked as shared over time steps, so ``KFAC(model, temporal=...)`` can model their temporal correlations.
"""
from kfac_tune.nn.recurrent import GRU, LSTM

__all__ = ["GRU", "LSTM"]
