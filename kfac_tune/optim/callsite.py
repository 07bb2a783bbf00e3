"""K-FAC's warnings: their category, and the line they point to (the user's, not K-FAC's or torch's).

A fixed ``stacklevel`` cannot do it: the same warning is reached through ``step()``'s ``torch.no_grad`` wrapper
(``torch/utils/_contextlib.py``), through autograd hooks, or from a direct call, each a different depth below
the user's code. :func:`user_stacklevel` counts the frames instead (``warnings.warn``'s ``skip_file_prefixes``
does this from Python 3.12 on; this package supports 3.10).
"""
from __future__ import annotations

import os
import sys

import torch

# Frames in these directories are library internals: K-FAC's own package and torch.
_INTERNAL = (os.path.dirname(os.path.abspath(__file__)) + os.sep,
             os.path.dirname(os.path.abspath(torch.__file__)) + os.sep)


class KFACWarning(RuntimeWarning):
    """K-FAC's safety acted: an update skipped or rejected and the damping raised, or a factor that could not be
    decomposed keeping its previous inverse; or, when the optimizer is built, a layer left to the first-order
    fallback has a K-FAC-visible drop-in (torch's GRU/LSTM). Worth reading in one's own training loop; a search,
    whose trials explore settings that trigger it on purpose, silences it
    (``warnings.simplefilter("ignore", KFACWarning)`` does the same anywhere)."""


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` in the calling function name the first frame outside
    kfac_tune.optim and torch: usually the user's ``optimizer.step()`` line (``kfac_tune.training``'s, for the CLI).
    Call it in the ``warnings.warn(...)`` call itself."""
    frame = sys._getframe(1)  # the function that calls warnings.warn
    level = 1
    while frame.f_back is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame = frame.f_back
        level += 1
    return level
