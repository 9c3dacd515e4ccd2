"""A small Vision Transformer for 32x32 images (Dosovitskiy et al., 2021), trainable from scratch.

Patch embedding (a strided Conv2d), a class token and learned position embeddings, a pre-norm
``nn.TransformerEncoder`` (its ``nn.MultiheadAttention`` projections and MLP Linear layers are
quantized like any other layer), a final LayerNorm and a Linear head.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from hmqsearch.errors import UserError


class ViT(nn.Module):
    """``image_size`` / ``patch_size`` squared patches of ``dim`` features, ``depth`` encoder layers."""

    def __init__(
        self, num_classes: int = 10, image_size: int = 32, patch_size: int = 4, in_channels: int = 3,
        dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: int = 2, dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise UserError(f"model.net.patch_size={patch_size} does not divide image_size={image_size}")
        if dim % heads:
            raise UserError(f"model.net.heads={heads} does not divide dim={dim}")
        tokens = (image_size // patch_size) ** 2 + 1
        self.patch = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, dim * mlp_ratio, dropout, activation="gelu", batch_first=True, norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.position
        return self.head(self.norm(self.encoder(x)[:, 0]))
