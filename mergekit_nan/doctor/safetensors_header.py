"""safetensors headers, read and checked without touching tensor data.

A safetensors file starts with an 8-byte little-endian header length and a
JSON header giving every tensor's dtype, shape and byte range (relative to
the end of the header); the tensor data follows. :func:`read_safetensors_header`
reads the length and the header only, never more bytes than the file holds,
and refuses anything malformed with a :class:`HeaderError` naming the file
and the tensor.

This is not ``safetensors.safe_open``, which the adapter checks use: it
refuses a truncated file outright, where ``check`` still plans and
estimates the merge from the header and reports the truncation, and its
errors name neither the tensor nor the fault (an unknown dtype, a byte range
that is not shape x dtype, overlapping tensors), which these one-line errors do.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple

__all__ = ["HeaderError", "TensorHeader", "dtype_size", "read_safetensors_header"]

# safetensors dtype codes: (torch name, bytes per element)
_SAFETENSORS_DTYPES: Dict[str, Tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
_SIZES: Dict[str, int] = {name: size for name, size in _SAFETENSORS_DTYPES.values()}
_FLOATS = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


def dtype_size(name: str) -> int:
    """Bytes per element of a dtype named as torch names it (``bfloat16``, ``torch.float32``)."""
    name = name[len("torch.") :] if name.startswith("torch.") else name
    if name not in _SIZES:
        raise ValueError(f"unknown dtype {name!r}")
    return _SIZES[name]


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as a safetensors header describes it (``dtype`` as torch names it)."""

    shape: Tuple[int, ...]
    dtype: str
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype in _FLOATS

    @property
    def itemsize(self) -> int:
        """Bytes per element: from the dtype, or from the byte range for an unknown dtype."""
        return _SIZES.get(self.dtype) or self.nbytes // max(1, self.numel)


class HeaderError(Exception):
    """A safetensors file whose header cannot be read or does not describe its tensors."""


def _entry(path: str, name: str, info: Any) -> Tuple[TensorHeader, int, int]:
    """One header entry as (tensor, start, stop); :class:`HeaderError` naming it if malformed."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, Mapping):
        raise HeaderError(f"{where} is described by {type(info).__name__}, not an object")
    code, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(code, str) or code not in _SAFETENSORS_DTYPES:
        raise HeaderError(f"{where} has an unknown dtype {code!r}")
    if not isinstance(shape, list) or not all(_count(n) for n in shape):
        raise HeaderError(f"{where} has an invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_count, offsets))):
        raise HeaderError(f"{where} has invalid data_offsets {offsets!r}")
    start, stop = offsets
    dtype, size = _SAFETENSORS_DTYPES[code]
    expected = math.prod(shape) * size
    if stop - start != expected:
        raise HeaderError(
            f"{where} spans bytes {start}-{stop} ({stop - start} bytes) but its shape "
            f"{shape} in {dtype} needs {expected}"
        )
    return TensorHeader(tuple(shape), dtype, expected), start, stop


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_safetensors_header(path: str) -> Tuple[Dict[str, TensorHeader], int]:
    """The tensors a safetensors file declares, and the file size its header implies.

    Reads the 8-byte header length and the JSON header only, never tensor
    data, and never more bytes than the file holds. Raises
    :class:`HeaderError`, naming the file (and the tensor), when the length
    field exceeds the file or the format's limit, the header is not a JSON
    object, an entry has an unknown dtype, an invalid shape or offsets, a
    byte range that does not match shape x dtype, or ranges overlap. A file
    shorter than its data is not an error here: the implied size says so.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise HeaderError(f"{path} is {len(prefix)} bytes, too short to be a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER, size - 8):
            raise HeaderError(
                f"{path} declares a {length}-byte header but the file holds "
                f"{size - 8} bytes after the length field; not a readable safetensors file"
            )
        raw = file.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as error:
        raise HeaderError(f"{path} has an unreadable safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise HeaderError(f"{path} has a safetensors header that is not a JSON object")
    header.pop("__metadata__", None)
    tensors: Dict[str, TensorHeader] = {}
    ranges = []
    for name, info in header.items():
        tensors[name], start, stop = _entry(path, name, info)
        ranges.append((start, stop, name))
    ranges.sort()
    for (_, stop, first), (start, _, second) in zip(ranges, ranges[1:]):
        if start < stop:
            raise HeaderError(f"{path}: the bytes of tensors {first!r} and {second!r} overlap")
    end = max((stop for _, stop, _ in ranges), default=0)
    return tensors, 8 + length + end
