"""A Conv1d sequence classifier: two conv blocks with BatchNorm, global max pooling, a linear head."""
from torch import nn


def conv1d_net(input_shape, num_classes, width=32, kernel=5):
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv1d(channels, width, kernel, padding=kernel // 2), nn.BatchNorm1d(width), nn.ReLU(),
        nn.Conv1d(width, width, kernel, padding=kernel // 2, dilation=1), nn.BatchNorm1d(width), nn.ReLU(),
        nn.AdaptiveMaxPool1d(1), nn.Flatten(), nn.Linear(width, num_classes))
