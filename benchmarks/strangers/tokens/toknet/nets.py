"""A small transformer classifier: token + position embeddings, one nn.TransformerEncoderLayer, mean pooling."""
import torch
from torch import nn


class TinyTransformer(nn.Module):
    def __init__(self, vocab, length, num_classes, d_model=32, heads=4, ff=64, layers=1):
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(length, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ff, dropout=0.0, batch_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, num_classes)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.head(self.encoder(self.tokens(ids) + self.positions(pos)).mean(1))


def tiny_transformer(input_shape, num_classes, vocab=16, **kwargs):
    return TinyTransformer(vocab, input_shape[0], num_classes, **kwargs)
