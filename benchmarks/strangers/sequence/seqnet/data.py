"""Noisy-pattern detection: which of 4 fixed 3-channel motifs (or none) is hidden in a noisy sequence.

Each sequence is (3 channels, 64 steps) of Gaussian noise; in 4 of 5 classes one motif of length 8, scaled by a
random amplitude in [0.6, 1.2], is added at a random position. Fixed seed: the data never changes.
"""
import numpy as np
import torch
from torch.utils.data import TensorDataset


def _make(rng, motifs, n, length):
    y = rng.integers(0, len(motifs) + 1, n)
    x = rng.normal(size=(n, motifs.shape[1], length)).astype(np.float32)
    for i, label in enumerate(y):
        if label < len(motifs):
            start = rng.integers(0, length - motifs.shape[2])
            x[i, :, start:start + motifs.shape[2]] += rng.uniform(0.6, 1.2) * motifs[label]
    return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))


def load(train_size=3000, test_size=1500, length=64):
    rng = np.random.default_rng(1234)
    motifs = rng.normal(size=(4, 3, 8)).astype(np.float32)
    train, test = _make(rng, motifs, train_size, length), _make(rng, motifs, test_size, length)
    return TensorDataset(*train), TensorDataset(*test)
