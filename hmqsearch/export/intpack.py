"""Dense bit packing of integer codes at any width b in 1..8.

Values are laid out as one little-endian bit stream: value i occupies bits
``[i*b, (i+1)*b)`` counted from the least significant bit of byte 0.  At b = 4 this is
exactly ONNX's int4/uint4 layout (first element in the low nibble), at b = 8 plain bytes.
Signed values are stored in b-bit two's complement, unsigned ones as they are; signed 1-bit
values are the binary grid {-1, +1} (hmqsearch.quant.functional), one bit each: 1 for +1,
0 for -1.
"""

from __future__ import annotations

import numpy as np


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` values of ``bits`` bits take: ceil(n * bits / 8)."""
    return (n * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r}; allowed: an integer 1..8")


def pack(values: np.ndarray, bits: int, signed: bool) -> np.ndarray:
    """Pack integer ``values`` (any shape, flattened in C order) into a uint8 array."""
    _check_bits(bits)
    v = np.asarray(values).reshape(-1).astype(np.int64)
    if bits == 1 and signed:
        if v.size and not np.isin(v, (-1, 1)).all():
            raise ValueError(f"values {sorted(set(v.tolist()) - {-1, 1})[:5]} are not on the binary grid {{-1, +1}}")
        return np.packbits((v > 0).astype(np.uint8), bitorder="little")
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    if v.size and (v.min() < lo or v.max() > hi):
        kind = "signed" if signed else "unsigned"
        raise ValueError(f"values in [{v.min()}, {v.max()}] do not fit {bits}-bit {kind} [{lo}, {hi}]")
    codes = (v & ((1 << bits) - 1)).astype(np.uint8)  # two's complement for negatives
    if bits == 8:
        return codes
    bit_planes = (codes[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return np.packbits(bit_planes.reshape(-1), bitorder="little")


def unpack(data: np.ndarray, n: int, bits: int, signed: bool) -> np.ndarray:
    """Inverse of :func:`pack`: the first ``n`` values as int32."""
    _check_bits(bits)
    data = np.asarray(data, dtype=np.uint8).reshape(-1)
    if data.size < packed_size(n, bits):
        raise ValueError(f"{data.size} bytes hold fewer than {n} values of {bits} bits")
    if bits == 1 and signed:
        return np.unpackbits(data, count=n, bitorder="little").astype(np.int32) * 2 - 1
    if bits == 8:
        codes = data[:n].astype(np.int32)
    else:
        bit_planes = np.unpackbits(data, count=n * bits, bitorder="little").reshape(n, bits)
        codes = bit_planes.astype(np.int32) @ (1 << np.arange(bits, dtype=np.int32))
    if signed:
        codes = np.where(codes >= 1 << (bits - 1), codes - (1 << bits), codes)
    return codes.astype(np.int32)
