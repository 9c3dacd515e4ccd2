"""Quantize a small text classifier (token ids + attention mask, nn.TransformerEncoder) with the
Python API, then load the packed checkpoint into a freshly constructed model.

    python examples/quantize_transformer.py --out quantized_transformer

The task is synthetic (no download): a sequence's class is the most frequent of three marker
tokens.  Inputs are dicts of int64 ``input_ids`` and ``attention_mask`` as a tokenizer gives them;
the ONNX graph takes them with these names and dtypes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import hmqsearch

VOCAB, LENGTH, CLASSES = 32, 16, 3


class TextClassifier(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 2, heads: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, dim, padding_idx=0)
        self.position = nn.Parameter(torch.randn(1, LENGTH, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.tokens(input_ids) + self.position, src_key_padding_mask=attention_mask == 0)
        keep = attention_mask[..., None].float()
        return self.head((x * keep).sum(1) / keep.sum(1))


def synthetic(n: int, seed: int) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """``n`` samples of variable length (6..16 tokens, 0 = padding) labelled by their majority marker token."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    ids = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
    ids = torch.where(torch.rand(n, LENGTH, generator=g) < 0.3, (y + 1)[:, None].expand(-1, LENGTH), ids)
    mask = (torch.arange(LENGTH)[None] < torch.randint(6, LENGTH + 1, (n, 1), generator=g)).long()
    return [({"input_ids": ids[i] * mask[i], "attention_mask": mask[i]}, y[i]) for i in range(n)]


def main(out: Path, samples: int = 2048, float_epochs: int = 5) -> hmqsearch.Result:
    torch.manual_seed(0)
    train = DataLoader(synthetic(samples, 0), batch_size=64, shuffle=True)
    test = DataLoader(synthetic(samples // 4, 1), batch_size=256)
    model = hmqsearch.fit_float(TextClassifier(), train, epochs=float_epochs, lr=2e-3)
    result = hmqsearch.quantize(
        model, train, test, out, budget=hmqsearch.Budget(weight_compression=8),
        spec=hmqsearch.QuantSpec(weight_bits=(2, 3, 4, 6, 8), act_bits=(8,), embedding_bits=(4, 8)),
    )
    print(result)
    for t in result.qmodel.float_parameters():
        print(f"  float: {t.name} ({t.numel} values): {t.reason}")
    loaded = hmqsearch.load_packed(out / "model.packed", TextClassifier())  # no Hydra: the model is ours
    inputs, _ = next(iter(test))
    with torch.no_grad():
        same = torch.equal(loaded(**inputs), result.qmodel(**inputs))
    print(f"reloaded packed checkpoint gives identical logits: {same}")
    if not same:
        raise SystemExit("the reloaded model disagrees with the quantized one")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("quantized_transformer"))
    args = parser.parse_args()
    main(args.out)
