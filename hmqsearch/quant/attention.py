"""``nn.MultiheadAttention`` rewritten as plain modules, so that its projections are quantized.

``nn.MultiheadAttention`` keeps its q/k/v projection as a bare packed parameter
(``in_proj_weight``) and calls ``out_proj``'s weight directly; in eval mode under ``no_grad``
PyTorch may also run a fused kernel (the "fast path", in the attention and in
``nn.TransformerEncoderLayer``) that reads the float weights and skips any quantizer.
:class:`DecomposedAttention` computes the same function with two ``nn.Linear`` children,
``in_proj`` (E -> 3E, the packed projection; ``q_proj``/``k_proj``/``v_proj`` when key and value
have other widths) and ``out_proj``, which :func:`~hmqsearch.quant.prepare.prepare` then
quantizes like any Linear.  A prepared model runs with the fast path switched off
(:func:`fastpath_disabled`); a transformer layer that tries it anyway gets a clear error instead
of float weights.

Self-attention (query, key and value the same tensor) calls ``in_proj`` once.  Cross-attention
calls it once per distinct input and keeps the matching third of each output, so its one input
quantizer is shared by those call sites.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@contextlib.contextmanager
def fastpath_disabled() -> Iterator[None]:
    """PyTorch's fused attention / transformer-layer kernels off inside the block."""
    was = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(was)


def unsupported_reason(mha: nn.MultiheadAttention) -> str | None:
    """Why ``mha`` cannot be decomposed (it then stays float), or None."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "nn.MultiheadAttention with add_bias_kv=True is not quantized"
    if mha.add_zero_attn:
        return "nn.MultiheadAttention with add_zero_attn=True is not quantized"
    return None


def _linear(weight: nn.Parameter, bias: Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    layer.weight = weight
    if bias is not None:
        layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias.detach().clone())
    return layer


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (True = not attended) as 0 / -inf; a float mask as it is."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class DecomposedAttention(nn.Module):
    """The function of an ``nn.MultiheadAttention`` (same call signature) with Linear projections."""

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        reason = unsupported_reason(mha)
        if reason is not None:
            raise ValueError(reason)
        self.embed_dim, self.num_heads, self.head_dim = mha.embed_dim, mha.num_heads, mha.head_dim
        self.dropout, self.batch_first = mha.dropout, mha.batch_first
        self._qkv_same_embed_dim = mha._qkv_same_embed_dim
        bias = mha.in_proj_bias
        if mha._qkv_same_embed_dim:
            self.in_proj = _linear(mha.in_proj_weight, bias)
        else:
            biases = [None] * 3 if bias is None else list(bias.chunk(3))
            self.q_proj = _linear(mha.q_proj_weight, biases[0])
            self.k_proj = _linear(mha.k_proj_weight, biases[1])
            self.v_proj = _linear(mha.v_proj_weight, biases[2])
        self.out_proj = _linear(mha.out_proj.weight, mha.out_proj.bias)

    # nn.TransformerEncoderLayer's fast path reads these; a float read would skip the quantizers
    @property
    def in_proj_weight(self) -> Tensor:
        raise RuntimeError(
            "PyTorch's fused transformer fast path would run this quantized attention with float weights; "
            "call the prepared QuantModel (it switches the fast path off) or torch.backends.mha.set_fastpath_enabled(False)"
        )

    in_proj_bias = in_proj_weight

    def _project(self, query: Tensor, key: Tensor, value: Tensor, same: tuple[bool, bool]) -> tuple[Tensor, Tensor, Tensor]:
        if not self._qkv_same_embed_dim:
            return self.q_proj(query), self.k_proj(key), self.v_proj(value)
        e = self.embed_dim
        self_attention, key_is_value = same
        if self_attention:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
            return q, k, v
        q = self.in_proj(query)[..., :e]
        kv = self.in_proj(key)
        if key_is_value:
            return q, kv[..., e : 2 * e], kv[..., 2 * e :]
        return q, kv[..., e : 2 * e], self.in_proj(value)[..., 2 * e :]

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        same = (query is key and key is value, key is value)
        batched = query.dim() == 3
        if not batched:  # (L, E): one sequence
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._project(query, key, value, same)
        n, length, source = q.shape[0], q.shape[1], k.shape[1]
        heads = lambda t, s: t.reshape(n, s, self.num_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = heads(q, length), heads(k, source), heads(v, source)
        scores = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)  # (N, H, L, S)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(length, source, dtype=torch.bool, device=q.device).triu(1)
        if attn_mask is not None:
            mask = _additive(attn_mask, scores.dtype)
            scores = scores + (mask.reshape(n, self.num_heads, length, source) if mask.dim() == 3 else mask)
        if key_padding_mask is not None:
            scores = scores + _additive(key_padding_mask, scores.dtype).reshape(n, 1, 1, source)
        attn = F.dropout(scores.softmax(dim=-1), self.dropout, self.training)
        out = self.out_proj((attn @ v).transpose(1, 2).reshape(n, length, self.embed_dim))
        if not batched:
            out = out.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = attn.mean(dim=1) if average_attn_weights else attn
        return out, weights if batched else weights.squeeze(0)
