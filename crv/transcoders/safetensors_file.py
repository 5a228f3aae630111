"""Read parts of a safetensors file without loading it: headers, row ranges, gathered rows.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw data. :class:`SafetensorsFile` parses
the header once and reads tensors, contiguous row ranges or an arbitrary set of rows
through a read-only memory map, so that gathering the decoder rows of a trace's active
features touches only those rows' pages, never the whole ``W_dec`` (2 GB per layer for
a 131k x 4096 bf16 transcoder). Every read is counted in :attr:`SafetensorsFile.bytes_read`
so tests and benchmarks can check what was touched.

No pickle anywhere: the header is JSON and the data are raw numbers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

#: safetensors dtype name -> (torch dtype, numpy dtype used to read its bytes)
DTYPES: dict[str, tuple[torch.dtype, type]] = {
    "F32": (torch.float32, np.float32),
    "F16": (torch.float16, np.float16),
    "BF16": (torch.bfloat16, np.uint16),  # numpy has no bfloat16: read the bits, view them in torch
    "F64": (torch.float64, np.float64),
    "I64": (torch.int64, np.int64),  # e.g. a ``k`` tensor in a state_dict-style transcoder file
    "I32": (torch.int32, np.int32),
}


class SafetensorsError(ValueError):
    """A file is not a readable safetensors file, or lacks a tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lies in its file."""

    dtype: str  # safetensors name: F32, F16, BF16, F64
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the first element
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype][0]

    @property
    def row_bytes(self) -> int:
        return (self.end - self.start) // max(self.shape[0], 1) if self.shape else self.end - self.start


def read_header(path: Path) -> tuple[bytes, dict]:
    """The raw JSON header of a safetensors file and its parsed form (reads only the header)."""
    try:
        with path.open("rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            if n > 100_000_000:
                raise SafetensorsError(f"{path}: header length {n} is not plausible")
            raw = fh.read(n)
        return raw, json.loads(raw)
    except SafetensorsError:
        raise
    except Exception as e:
        raise SafetensorsError(f"{path}: not a readable safetensors file ({e})") from None


class SafetensorsFile:
    """A safetensors file opened for partial reads (header parsed once, data memory-mapped on demand)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.header_bytes, header = read_header(self.path)
        data_start = 8 + len(self.header_bytes)
        self.metadata: dict = header.pop("__metadata__", {}) or {}
        self.tensors: dict[str, TensorInfo] = {}
        for name, h in header.items():
            if h["dtype"] not in DTYPES:
                raise SafetensorsError(f"{self.path}: tensor {name} has dtype {h['dtype']}; crv reads {', '.join(DTYPES)}")
            b, e = h["data_offsets"]
            self.tensors[name] = TensorInfo(h["dtype"], tuple(h["shape"]), data_start + b, data_start + e)
        self.bytes_read: dict[str, int] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            raise SafetensorsError(f"{self.path}: no tensor {name!r} (has {', '.join(sorted(self.tensors))})")
        return self.tensors[name]

    def _map(self, info: TensorInfo) -> np.ndarray:
        shape = info.shape or (1,)
        return np.memmap(self.path, dtype=DTYPES[info.dtype][1], mode="r", offset=info.start, shape=shape)

    def _to_torch(self, array: np.ndarray, info: TensorInfo) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(array))
        return t.view(torch.bfloat16) if info.dtype == "BF16" else t

    def _count(self, name: str, n: int) -> None:
        self.bytes_read[name] = self.bytes_read.get(name, 0) + n

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor, in its file dtype."""
        info = self.info(name)
        self._count(name, info.end - info.start)
        t = self._to_torch(np.array(self._map(info)), info)
        return t.reshape(info.shape)

    def row_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a tensor (first axis), in its file dtype."""
        info = self.info(name)
        self._count(name, (stop - start) * info.row_bytes)
        return self._to_torch(np.array(self._map(info)[start:stop]), info)

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` (any order, repeats allowed) of a tensor, reading each distinct row once."""
        info = self.info(name)
        index = index.detach().cpu().long()
        if len(index) == 0:
            return torch.empty((0, *info.shape[1:]), dtype=info.torch_dtype)
        unique, inverse = torch.unique(index, return_inverse=True)  # sorted: sequential page access
        self._count(name, len(unique) * info.row_bytes)
        got = self._to_torch(self._map(info)[unique.numpy()], info)
        return got[inverse]
