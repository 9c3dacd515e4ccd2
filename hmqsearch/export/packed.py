"""Packed checkpoint: integer weights at their bit-width, and a loader that rebuilds the model.

``<base>.safetensors`` holds, per quantized layer:

* ``<layer>.weight_packed`` (uint8): the weight codes densely packed at b bits
  (:mod:`hmqsearch.export.intpack`, b-bit two's complement), ceil(n * b / 8) bytes;
* ``<layer>.weight_exp`` (int8): the power-of-two threshold exponent of each channel
  (step = 2^(exp - (b - 1))), one per scale;
* ``<layer>.bias`` (float32); ``<layer>.weight`` (float32) instead of the two above when the
  weights are pinned to float;
* ``extra/<key>``: any other state of the network (e.g. a batch norm that could not be folded,
  layer norms, biases of layers left float);
* ``input/<name>``: one sample of the model's inputs, dtypes kept (int64 token ids stay int64),
  which the loader runs once to rebuild the quantized model.

The weight-tensor bytes are exactly :func:`hmqsearch.cost.size.exact_weight_bytes` on the
"packed" basis, and the exponent and bias bytes exactly :func:`hmqsearch.cost.size.overhead_bytes`.  ``<base>.json`` holds the architecture (a Hydra ``_target_`` and its
arguments, or null), the QuantSpec, the inputs' structure, the assignment (as in precision.yaml)
and the sha256 of the tensor file.  :func:`load_packed` loads into a model the
caller constructs (``load_packed(path, MyModel())``), or builds it from the ``_target_``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from hmqsearch.cost.size import exact_weight_bytes, overhead_bytes
from hmqsearch.errors import UserError
from hmqsearch.export.deployed import dequantize_codes, deployed_layers
from hmqsearch.export.intpack import pack, packed_size, unpack
from hmqsearch.inputs import Inputs, named_tensors, rebuild, structure, take
from hmqsearch.io import atomic_write, write_json
from hmqsearch.quant.assignment import Assignment
from hmqsearch.quant.prepare import Pin, QuantLayer, QuantModel, QuantSpec, prepare
from hmqsearch.quant.scheme import Scheme
from hmqsearch.quant.spiq import restore_input_scales

FORMAT = "hmqsearch-packed"
VERSION = 2  # 2: the inputs' structure and one example sample (1: a float input_shape only)
READABLE_VERSIONS = (1, 2)
EXTRA = "extra/"
INPUT = "input/"


def packed_paths(path: str | Path) -> tuple[Path, Path]:
    """(tensor file, metadata file) for ``model.packed``, ``model.packed.safetensors`` or ``.json``."""
    p = Path(path)
    base = p.with_suffix("") if p.suffix in (".safetensors", ".json") else p
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def _layer_tensors(qmodel: QuantModel) -> tuple[dict[str, np.ndarray], dict[str, int], int]:
    """Tensors to store, per-layer weight-tensor bytes, and the scale + bias (overhead) bytes."""
    tensors: dict[str, np.ndarray] = {}
    per_layer: dict[str, int] = {}
    overhead = 0
    for d in deployed_layers(qmodel):
        mine: dict[str, np.ndarray] = {}
        if d.wscheme is None or d.codes is None:
            mine[f"{d.name}.weight"] = d.weight.astype(np.float32)
        else:
            exps = np.array(d.wscheme.threshold_exp, dtype=np.int64)
            if exps.min() < -128 or exps.max() > 127:
                raise UserError(f"{d.name}: threshold exponents {exps.min()}..{exps.max()} do not fit an int8")
            mine[f"{d.name}.weight_packed"] = pack(d.codes, d.wscheme.bits, d.wscheme.signed)
            mine[f"{d.name}.weight_exp"] = exps.astype(np.int8)
        if d.bias is not None:
            mine[f"{d.name}.bias"] = d.bias.astype(np.float32)
        weight_keys = (f"{d.name}.weight", f"{d.name}.weight_packed")
        per_layer[d.name] = sum(t.nbytes for k, t in mine.items() if k in weight_keys)
        overhead += sum(t.nbytes for k, t in mine.items() if k not in weight_keys)
        tensors.update(mine)
    return tensors, per_layer, overhead


def _extra_state(qmodel: QuantModel) -> dict[str, np.ndarray]:
    """State of the network outside its quantized layers, keyed as in ``qmodel.net``."""
    prefixes = tuple(f"{name}." for name in qmodel.layer_names)
    return {
        EXTRA + k: v.detach().cpu().numpy()
        for k, v in qmodel.net.state_dict().items() if not k.startswith(prefixes)
    }


def _spec_dict(spec: QuantSpec) -> dict[str, Any]:
    d = dataclasses.asdict(spec)
    d["weight_bits"], d["act_bits"] = list(spec.weight_bits), list(spec.act_bits)
    return d


def _example_tensors(example: Inputs) -> dict[str, np.ndarray]:
    return {INPUT + name: np.ascontiguousarray(t.detach().cpu().numpy()) for name, t in named_tensors(take(example, 1))}


def _input_shape(example: Inputs) -> list[int] | None:
    """One sample's shape when the model takes one float tensor (what version-1 readers use)."""
    named = named_tensors(example)
    if len(named) == 1 and named[0][0] == "input" and named[0][1].is_floating_point():
        return list(named[0][1].shape[1:])
    return None


def save_packed(
    path: str | Path, qmodel: QuantModel, *, spec: QuantSpec, example: Inputs, arch: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Write the packed checkpoint of ``qmodel``'s argmax assignment; returns its metadata.

    ``spec``: the QuantSpec it was prepared with; ``example``: a batch of the model's inputs
    (its first sample is stored); ``arch``: optionally the network as a Hydra node
    (``{"_target_": "pkg.module.factory", **kwargs}``), so that the checkpoint loads without
    the caller constructing the model.
    """
    if arch is not None and "_target_" not in arch:
        raise UserError(f"architecture {arch!r} has no _target_; pass the model's Hydra config (model.net) or None")
    st_path, json_path = packed_paths(path)
    tensors, per_layer, overhead = _layer_tensors(qmodel)
    packed_bytes = sum(per_layer.values())
    expected = sum(exact_weight_bytes(qmodel, "packed").values())
    if packed_bytes != expected or overhead != overhead_bytes(qmodel, "packed"):  # a bug, not a user mistake
        raise AssertionError(
            f"packed checkpoint holds {packed_bytes} weight + {overhead} scale/bias bytes, the size model says "
            f"{expected} + {overhead_bytes(qmodel, 'packed')}"
        )
    extra = _extra_state(qmodel)
    inputs = _example_tensors(example)
    blob = st_save({**tensors, **extra, **inputs}, metadata={"format": FORMAT, "metadata": json_path.name})
    atomic_write(st_path, lambda p: p.write_bytes(blob))
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "architecture": arch,
        "quant_spec": _spec_dict(spec),
        "input_shape": _input_shape(example),
        "inputs": structure(example),
        "layer_names": list(qmodel.layer_names),
        "folded_batchnorm": [list(p) for p in qmodel.folded],
        "layers": Assignment.of(qmodel).to_dict(),
        "packed_bytes": packed_bytes,
        "per_layer_packed_bytes": per_layer,
        "overhead_bytes": overhead,
        "extra_bytes": sum(v.nbytes for v in extra.values()),
        "example_bytes": sum(v.nbytes for v in inputs.values()),
        "file_bytes": len(blob),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    write_json(json_path, meta)
    return meta


# ------------------------------------------------------------------------------- loading
def read_packed_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a packed checkpoint, checked for format and version."""
    _, json_path = packed_paths(path)
    if not json_path.is_file():
        raise UserError(f"packed checkpoint metadata {json_path} does not exist (written beside the .safetensors)")
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"packed checkpoint metadata {json_path} is not valid JSON (corrupt or truncated?): {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{json_path} is not a hmqsearch packed checkpoint (format {FORMAT!r} expected)")
    if meta.get("version") not in READABLE_VERSIONS:
        raise UserError(
            f"{json_path} has version {meta.get('version')!r}; this hmqsearch reads versions {list(READABLE_VERSIONS)}"
        )
    missing = [k for k in ("architecture", "quant_spec", "input_shape", "layers", "layer_names", "sha256") if k not in meta]
    if missing:
        raise UserError(f"packed checkpoint metadata {json_path} lacks {', '.join(missing)}")
    return meta


def _read_tensors(st_path: Path, meta: dict[str, Any]) -> dict[str, np.ndarray]:
    if not st_path.is_file():
        raise UserError(f"packed checkpoint {st_path} does not exist")
    blob = st_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise UserError(
            f"packed checkpoint {st_path} is corrupt or truncated: {len(blob)} bytes whose sha256 differs "
            f"from the one recorded in its metadata ({meta.get('file_bytes')} bytes expected)"
        )
    try:
        return st_load(blob)
    except SafetensorError as exc:
        raise UserError(f"packed checkpoint {st_path} is not a valid safetensors file: {exc}") from exc


def _tensor(tensors: dict[str, np.ndarray], key: str, st_path: Path) -> np.ndarray:
    if key not in tensors:
        raise UserError(f"packed checkpoint {st_path} lacks tensor {key!r}")
    return tensors[key]


def float_input_shape(meta: dict[str, Any]) -> tuple[int, ...]:
    """One sample's shape for random verification inputs; only a model taking one float tensor has one."""
    if meta.get("input_shape") is None:
        raise UserError(
            f"the packed checkpoint's model takes {meta.get('inputs', {}).get('names')} (not one float tensor): "
            "random inputs cannot stand in for them; verify on real data (--data-from a run directory)"
        )
    return tuple(meta["input_shape"])


def _architecture(meta: dict[str, Any], source: Path) -> Any:
    from hydra.utils import instantiate

    arch = meta["architecture"]
    if not arch:
        raise UserError(
            f"{source} was saved without a Hydra architecture (_target_); construct the model and pass it: "
            "load_packed(path, MyModel(...))"
        )
    try:
        return instantiate(arch)
    except Exception as exc:  # noqa: BLE001 - any failure to import or build the target
        raise UserError(f"{source}: cannot build the architecture {arch.get('_target_')!r}: {exc}") from exc


def _stored_example(meta: dict[str, Any], tensors: dict[str, np.ndarray], source: Path) -> Inputs:
    """The example inputs saved with the checkpoint (version 1: a float tensor of ``input_shape``)."""
    if meta["version"] == 1:
        return torch.zeros(1, *meta["input_shape"])
    desc = meta.get("inputs")
    if not isinstance(desc, dict) or "names" not in desc:
        raise UserError(f"{source} lacks the inputs' structure ('inputs')")
    missing = [n for n in desc["names"] if INPUT + n not in tensors]
    if missing:
        raise UserError(f"{source}: the tensor file lacks the example inputs {missing}")
    return rebuild(desc, [torch.from_numpy(tensors[INPUT + n].copy()) for n in desc["names"]])


def _build(meta: dict[str, Any], source: Path, net: Any, example: Inputs) -> QuantModel:
    spec_d = dict(meta["quant_spec"])
    spec_d["pins"] = [Pin(**p) for p in spec_d.get("pins", [])]
    try:
        spec = QuantSpec(**spec_d)
    except TypeError as exc:
        raise UserError(f"{source}: quant_spec {meta['quant_spec']!r} is not a QuantSpec ({exc})") from exc
    qmodel = prepare(net, spec, example)
    if list(qmodel.layer_names) != list(meta["layer_names"]):
        missing = sorted(set(meta["layer_names"]) - set(qmodel.layer_names))[:5]
        unknown = sorted(set(qmodel.layer_names) - set(meta["layer_names"]))[:5]
        raise UserError(
            f"{source}: the model {type(net).__name__} has other quantized layers than the checkpoint "
            f"(missing {missing}, not in the checkpoint {unknown})"
        )
    return qmodel


def _stored_weight(
    tensors: dict[str, np.ndarray], name: str, layer: QuantLayer, scheme: Scheme | None, paths: tuple[Path, Path]
) -> np.ndarray:
    """The layer's float32 weights: stored as float, or unpacked and dequantized at ``scheme``."""
    st_path, json_path = paths
    if scheme is None:
        return _tensor(tensors, f"{name}.weight", st_path)
    exps = _tensor(tensors, f"{name}.weight_exp", st_path)
    if tuple(int(e) for e in exps) != scheme.threshold_exp:
        raise UserError(f"packed checkpoint {st_path}: {name}.weight_exp disagrees with {json_path.name}")
    data = _tensor(tensors, f"{name}.weight_packed", st_path)
    n = layer.weight.numel()
    if data.size != packed_size(n, scheme.bits):
        raise UserError(f"packed checkpoint {st_path}: {name}.weight_packed has {data.size} bytes, expected {packed_size(n, scheme.bits)}")
    codes = unpack(data, n, scheme.bits, scheme.signed).reshape(tuple(layer.weight.shape))
    return dequantize_codes(codes, scheme)


@torch.no_grad()
def load_packed(path: str | Path, model: torch.nn.Module | None = None, example: Inputs | None = None) -> QuantModel:
    """Rebuild the runnable fixed-state quantized model from a packed checkpoint.

    ``model``: the float network, constructed by the caller (its weights are replaced by the
    checkpoint's; it is not modified); without it the checkpoint's architecture ``_target_`` is
    imported and called, as Hydra does with a config: load checkpoints from sources you trust.
    ``example``: inputs to trace the model with; default the sample stored in the checkpoint.
    """
    st_path, json_path = packed_paths(path)
    meta = read_packed_meta(json_path)
    tensors = _read_tensors(st_path, meta)
    net = model if model is not None else _architecture(meta, json_path)
    qmodel = _build(meta, json_path, net, example if example is not None else _stored_example(meta, tensors, json_path))
    Assignment.from_dict(meta["layers"], str(json_path)).apply(qmodel, str(json_path))
    layers = dict(qmodel.layers())
    for name, schemes in Assignment.of(qmodel).items():
        layer = layers[name]
        weight = _stored_weight(tensors, name, layer, schemes.weight, (st_path, json_path))
        if tuple(weight.shape) != tuple(layer.weight.shape):
            raise UserError(f"packed checkpoint {st_path}: {name} weight shape {weight.shape} != {tuple(layer.weight.shape)}")
        layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        if layer.bias is not None:
            layer.bias.copy_(torch.from_numpy(_tensor(tensors, f"{name}.bias", st_path)))
    extra = {k.removeprefix(EXTRA): torch.from_numpy(v) for k, v in tensors.items() if k.startswith(EXTRA)}
    restore_input_scales(qmodel, extra)  # a SPIQ model's per-channel input scales
    prefixes = tuple(f"{name}." for name in qmodel.layer_names)
    expected = {k for k in qmodel.net.state_dict() if not k.startswith(prefixes)}
    if set(extra) != expected:
        raise UserError(f"packed checkpoint {st_path}: other state {sorted(set(extra) ^ expected)[:5]} does not match the architecture")
    qmodel.net.load_state_dict(extra, strict=False)
    qmodel.set_state("fixed")
    return qmodel.eval()
