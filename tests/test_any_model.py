"""Models unlike the zoo's, end to end through the Python API.

Each goes prepare -> calibrate -> search -> repair/fill -> fine-tune -> ONNX export -> onnxruntime
agreement >= 99.5 % -> packed checkpoint loaded into a freshly constructed model, identical logits.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import hmqsearch
from hmqsearch.errors import UserError
from hmqsearch.inputs import run_model
from hmqsearch.quant.attention import DecomposedAttention
from hmqsearch.quant.layers import QuantEmbedding, QuantLinear

EXPORT = {"compare_float": False, "latency_warmup": 1, "latency_repeats": 2}
VOCAB, LENGTH, CLASSES = 24, 12, 3


# ------------------------------------------------------------------------------ models
class SharedCNN(nn.Module):
    """Functional activations, a depthwise + pointwise pair, a concatenation and one convolution
    called twice; odd input size (9 x 11)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(16 * 4 * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        a = F.relu(self.shared(x))
        b = F.relu(self.shared(F.relu(self.pw(self.dw(a)))))
        return self.head(F.max_pool2d(torch.cat([a, b], 1), 2).flatten(1))


class HandTransformer(nn.Module):
    """Token and position embeddings, q/k/v/out projections, a GELU MLP; dict inputs
    (int64 ``input_ids`` and an ``attention_mask`` of ones and zeros)."""

    def __init__(self, dim: int = 64, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.tokens = nn.Embedding(VOCAB, dim, padding_idx=0)
        self.position = nn.Parameter(torch.randn(1, LENGTH, dim) * 0.02)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.classifier = nn.Linear(dim, CLASSES)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.tokens(input_ids) + self.position
        n, length, dim = x.shape
        h = self.norm1(x)
        split = lambda t: t.reshape(n, length, self.heads, dim // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        scores = q @ k.transpose(-2, -1) / (dim // self.heads) ** 0.5
        scores = scores.masked_fill(attention_mask[:, None, None, :] == 0, -1e4)
        x = x + self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(n, length, dim))
        x = x + self.mlp(self.norm2(x))
        pooled = (x * attention_mask[..., None]).sum(1) / attention_mask.sum(1, keepdim=True)
        return self.classifier(pooled)


class EncoderClassifier(nn.Module):
    """nn.TransformerEncoder (its nn.MultiheadAttention quantized) on token ids; tuple inputs
    (int64 ids, a boolean padding mask)."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, dim)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.classifier = nn.Linear(dim, CLASSES)

    def forward(self, ids: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        x = self.encoder(self.tokens(ids), src_key_padding_mask=padding)
        keep = (~padding).float()[..., None]
        return self.classifier((x * keep).sum(1) / keep.sum(1))


# ------------------------------------------------------------------------------ data
def digits_loaders() -> tuple[DataLoader, DataLoader]:
    digits = load_digits()
    x = F.pad(torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0, (1, 2, 0, 1))  # 9 x 11
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(x[:1200], y[:1200]), batch_size=64, shuffle=True, generator=g)
    return train, DataLoader(TensorDataset(x[1200:], y[1200:]), batch_size=200)


def token_task(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids (0 = padding) whose class is the most frequent of tokens 1..3, lengths 5..12."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    ids = torch.randint(4, VOCAB, (n, LENGTH), generator=g)
    marked = torch.rand(n, LENGTH, generator=g) < 0.4
    ids = torch.where(marked, (y + 1)[:, None].expand(-1, LENGTH), ids)
    lengths = torch.randint(5, LENGTH + 1, (n,), generator=g)
    mask = (torch.arange(LENGTH)[None, :] < lengths[:, None]).long()
    return ids * mask, mask, y


class DictTokens(Dataset):
    def __init__(self, n: int, seed: int) -> None:
        self.ids, self.mask, self.y = token_task(n, seed)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):  # noqa: ANN204
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i]}, self.y[i]


def dict_loaders() -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(0)
    return (DataLoader(DictTokens(768, 0), batch_size=64, shuffle=True, generator=g),
            DataLoader(DictTokens(400, 1), batch_size=200))


def tuple_loaders() -> tuple[DataLoader, DataLoader]:
    def loader(n: int, seed: int, **kw: object) -> DataLoader:
        ids, mask, y = token_task(n, seed)
        pairs = [((ids[i], mask[i] == 0), y[i]) for i in range(n)]
        return DataLoader(pairs, **kw)

    g = torch.Generator().manual_seed(0)
    return loader(768, 0, batch_size=64, shuffle=True, generator=g), loader(400, 1, batch_size=200)


# ------------------------------------------------------------------------------ the flow
def quantize_and_reload(model: nn.Module, fresh: nn.Module, loaders, tmp_path, epochs: int = 6):  # noqa: ANN001, ANN201
    torch.manual_seed(0)
    train, test = loaders
    hmqsearch.fit_float(model, train, epochs=epochs, lr=3e-3)
    result = hmqsearch.quantize(
        model, train, test, tmp_path, budget=hmqsearch.Budget(weight_compression=8), export_options=EXPORT,
    )
    assert result.search.feasible
    assert result.model_bytes_packed <= result.model_float_bytes / 8
    v = result.export["verify"]
    assert v["reference_agreement"] >= 99.5 and v["agreement"] >= 99.5, v
    assert result.float_top1 > 60.0 and result.quant_top1 > 50.0, (result.float_top1, result.quant_top1)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["compression_model"] == pytest.approx(result.compression_model)

    loaded = hmqsearch.load_packed(tmp_path / "model.packed", fresh)
    batch = next(iter(test))[0]
    with torch.no_grad():
        assert torch.equal(run_model(loaded, batch), run_model(result.qmodel.eval(), batch))
    return result, loaded


def onnx_inputs(path) -> dict[str, int]:  # noqa: ANN001
    return {i.name: i.type.tensor_type.elem_type for i in onnx.load(str(path)).graph.input}


def test_cnn_with_a_layer_called_twice(tmp_path):
    result, _ = quantize_and_reload(SharedCNN(), SharedCNN(), digits_loaders(), tmp_path, epochs=4)
    shared = dict(result.qmodel.layers())["shared"]
    assert shared.shape.calls == 2
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    weights = [i.name for i in graph.initializer if i.name.startswith("shared.weight")]
    assert len([w for w in weights if w == "shared.weight_quantized"]) == 1  # stored once, used by both calls
    assert sum(1 for n in graph.node if n.op_type == "Conv" and n.name.startswith("shared")) == 2


def test_hand_written_transformer_with_token_ids_and_attention_mask(tmp_path):
    result, _ = quantize_and_reload(HandTransformer(), HandTransformer(), dict_loaders(), tmp_path)
    layers = dict(result.qmodel.layers())
    assert isinstance(layers["tokens"], QuantEmbedding) and layers["tokens"].aq.float_pinned
    assert onnx_inputs(tmp_path / "model.onnx") == {
        "input_ids": onnx.TensorProto.INT64, "attention_mask": onnx.TensorProto.INT64,
    }
    reasons = {t.name: t.reason for t in result.qmodel.float_parameters()}
    assert "position" in reasons and "norm1.weight" in reasons and "tokens.weight" not in reasons
    assert result.compression_model < result.compression_layers  # float parameters count in the whole model


def test_transformer_encoder_attention_is_quantized_in_eval_under_no_grad(tmp_path):
    result, loaded = quantize_and_reload(EncoderClassifier(), EncoderClassifier(), tuple_loaders(), tmp_path)
    qmodel = result.qmodel.eval()
    attention = qmodel.net.encoder.layers[0].self_attn
    assert isinstance(attention, DecomposedAttention)
    assert {"encoder.layers.0.self_attn.in_proj", "encoder.layers.0.self_attn.out_proj"} <= set(qmodel.layer_names)
    calls = []
    for name, layer in qmodel.layers():
        if "self_attn" in name:
            assert isinstance(layer, QuantLinear)
            for q in (layer.wq, layer.aq):
                q.register_forward_hook(lambda m, i, o, name=name: calls.append((name, m.is_discrete())))
    ids, padding = next(iter(tuple_loaders()[1]))[0]
    with torch.no_grad():
        out = qmodel(ids, padding)
    assert len(calls) == 8 and all(discrete for _, discrete in calls)  # 2 layers x (in, out) x (weight, input)
    assert torch.backends.mha.get_fastpath_enabled()  # switched off only while the quantized model runs
    with torch.no_grad():
        assert torch.equal(loaded(ids, padding), out)
    assert onnx_inputs(tmp_path / "model.onnx") == {"input_0": onnx.TensorProto.INT64, "input_1": onnx.TensorProto.BOOL}


def test_fast_path_never_runs_float_weights_silently():
    """A transformer layer of the prepared network, called outside the QuantModel with the fast
    path on, fails loudly instead of reading float weights."""
    model = EncoderClassifier().eval()
    ids, padding = next(iter(tuple_loaders()[1]))[0]
    qmodel = hmqsearch.prepare(model, (ids[:4], padding[:4]), weight_bits=[2], act_bits=[8])
    qmodel.set_state("fixed")
    with torch.no_grad():
        assert not torch.equal(qmodel(ids, padding), model(ids, padding))  # 2-bit weights change the logits
        with pytest.raises(RuntimeError, match="fast path would run this quantized attention with float weights"):
            qmodel.net(ids, padding)


def test_bert_tiny_from_config(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
        max_position_embeddings=LENGTH, num_labels=CLASSES, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )

    def bert() -> nn.Module:
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(config)

    result, _ = quantize_and_reload(bert(), bert(), dict_loaders(), tmp_path)
    names = set(result.qmodel.layer_names)
    assert {"bert.embeddings.word_embeddings", "bert.encoder.layer.0.attention.self.query", "classifier"} <= names
    assert onnx_inputs(tmp_path / "model.onnx") == {
        "input_ids": onnx.TensorProto.INT64, "attention_mask": onnx.TensorProto.INT64,
    }


def test_prepare_reports_float_parameters_and_refuses_tied_weights(caplog):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.head = nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.emb(ids).mean(1))

    ids = torch.randint(0, 10, (4, 5))
    with pytest.raises(UserError, match=r"emb.weight is the same tensor as head.weight \(tied weights\); .* untie them"):
        hmqsearch.prepare(Tied(), ids)

    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, add_bias_kv=True, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.attn(x, x, x)[0].mean(1))

    caplog.set_level("INFO")
    qmodel = hmqsearch.prepare(Odd(), torch.randn(2, 4, 8))
    assert qmodel.layer_names == ["fc"]
    reasons = {t.name: t.reason for t in qmodel.float_parameters()}
    assert reasons["attn.in_proj_weight"] == reasons["attn.out_proj.weight"] == (
        "nn.MultiheadAttention with add_bias_kv=True is not quantized"
    )
    assert "never called" not in caplog.text and "batch norm" not in caplog.text
    assert np.isclose(qmodel.model_float_bytes, 4 * sum(p.numel() for p in Odd().parameters()))


def test_conv1d_and_linear_subclasses_export_without_training(tmp_path):
    """Conv1d (+ a folded BatchNorm1d) and a Linear subclass are quantized; a Linear subclass with
    its own forward stays float, with the reason; the graph agrees with PyTorch."""

    class Tagged(nn.Linear):  # a subclass that keeps nn.Linear.forward
        pass

    class Scaled(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2.0 * super().forward(x)

    class Signal(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(2, 8, 5, stride=2, padding=2)
            self.bn = nn.BatchNorm1d(8)
            self.conv2 = nn.Conv1d(8, 8, 3, padding="same", groups=4)
            self.tagged, self.scaled = Tagged(8 * 10, 16), Scaled(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = F.relu(self.conv2(F.relu(self.bn(self.conv(x)))))
            return self.scaled(F.relu(self.tagged(x.flatten(1))))

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 2, 20, generator=g), torch.randint(0, 4, (64,), generator=g)) for _ in range(4)]
    model = Signal().eval()
    qmodel = hmqsearch.prepare(model, data[0][0][:8], weight_bits=[4, 8], act_bits=[8])
    assert qmodel.layer_names == ["conv", "conv2", "tagged"] and qmodel.folded == [("conv", "bn")]
    reasons = {t.name: t.reason for t in qmodel.float_parameters()}
    assert reasons["scaled.weight"] == "Scaled overrides Linear.forward, so its computation is not known to hmqsearch"
    hmqsearch.calibrate(qmodel, data)
    report = hmqsearch.search(qmodel, data, hmqsearch.Budget(weight_compression=4), epochs=0)
    assert report.feasible
    figures = hmqsearch.export_model(qmodel, tmp_path, data, **EXPORT)
    assert figures["verify"]["reference_agreement"] == 100.0 and figures["verify"]["agreement"] >= 99.5

    kept = hmqsearch.prepare(model, data[0][0][:8], weight_bits=[4, 8], act_bits=[8], fold_bn=False)
    hmqsearch.calibrate(kept, data)
    hmqsearch.search(kept, data, hmqsearch.Budget(weight_compression=4), epochs=0)
    figures = hmqsearch.export_model(kept, tmp_path / "kept", data, **EXPORT)  # BatchNorm1d folded into the scales
    graph = onnx.load(str(tmp_path / "kept" / "model.onnx")).graph
    assert not any(n.op_type == "BatchNormalization" for n in graph.node)
    assert figures["verify"]["agreement"] >= 99.5
