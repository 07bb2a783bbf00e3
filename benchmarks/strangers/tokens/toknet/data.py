"""Generated token sequences: which of the marker tokens 1, 2, 3 occurs most often (3 classes, no ties).

Sequences of 24 tokens from a vocabulary of 16; filler tokens 4..15 are uniform, the markers appear a random
number of times each. Fixed seed.
"""
import numpy as np
import torch
from torch.utils.data import TensorDataset


def _make(rng, n, length, vocab):
    xs, ys = [], []
    while len(xs) < n:
        counts = rng.integers(0, 6, 3)
        if (counts == counts.max()).sum() > 1:
            continue
        seq = np.concatenate([np.repeat([1, 2, 3], counts), rng.integers(4, vocab, length - counts.sum())])
        xs.append(rng.permutation(seq))
        ys.append(int(counts.argmax()))
    return torch.from_numpy(np.array(xs, dtype=np.int64)), torch.tensor(ys, dtype=torch.int64)


def load(train_size=3000, test_size=1500, length=24, vocab=16):
    rng = np.random.default_rng(4321)
    return TensorDataset(*_make(rng, train_size, length, vocab)), TensorDataset(*_make(rng, test_size, length, vocab))
