"""A tabular classifier as a user would write it: LayerNorm + GELU residual blocks."""
from torch import nn


class Block(nn.Module):
    """Pre-norm residual MLP block."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)
        self.act = nn.GELU()

    def forward(self, x):
        return x + self.act(self.fc(self.norm(x)))


def tabular_net(input_shape, num_classes, width=64, depth=2):
    return nn.Sequential(nn.Linear(input_shape[0], width), *[Block(width) for _ in range(depth)],
                         nn.LayerNorm(width), nn.Linear(width, num_classes))
