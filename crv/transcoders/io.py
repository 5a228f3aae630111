"""Transcoder sets on disk, in circuit-tracer's layout, read lazily.

A directory holds ``config.yaml`` and one ``layer_{i}.safetensors`` per layer (see
:mod:`crv.transcoders.formats` for the tensors, activations and hooks crv reads).
``config.yaml`` carries ``model_name``, ``model_kind: transcoder_set``, ``feature_input_hook``,
``feature_output_hook``, ``activation``, ``k`` (TopK sets) and ``transcoders`` (the layer files,
in layer order; ``hf://`` entries are looked up by file name in the directory).

Memory: :class:`TranscoderSet` parses headers only. Each layer is a :class:`FileTranscoder`
that keeps its biases (and threshold / skip matrix) in memory and reads the encoder in row
chunks when it encodes and only the active features' rows of ``W_dec`` / ``W_enc`` when asked
(``resident=True`` reads both matrices once instead: the default for sets under 1 GiB).
Weights stay in their file dtype; every product is computed in float32.

    ts = load_transcoders("runs/smollm2-transcoders", model=model)          # shape-checked
    ts = load_transcoders(path, k=128, device="cuda")                       # config without k
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from crv.transcoders.activation_functions import JumpReLU, make_activation
from crv.transcoders.formats import (
    K_TENSOR, REQUIRED, SKIP, THRESHOLD, TranscoderFormat, TranscoderFormatError, read_format,
)
from crv.digest import content_identity, record_digest
from crv.transcoders.safetensors_file import SafetensorsError, SafetensorsFile
from crv.transcoders.transcoder import Transcoder

#: Where the shipped transcoders live, relative to the repository root.
DEFAULT_TRANSCODER_DIR = Path(__file__).resolve().parents[2] / "models" / "transcoders"
#: sets up to this many bytes of weights are read into memory once (``resident=None``)
RESIDENT_LIMIT = 1 << 30
#: encoder / decoder rows upcast to float32 at a time (256 MiB at d_model 4096)
CHUNK_ROWS = 16_384


class TranscoderLoadError(TranscoderFormatError):
    """A transcoder directory is incomplete, unreadable or does not fit the model."""


def save_transcoders(
    transcoders: list[Transcoder],
    path: str | Path,
    model_name: str,
    dtype: torch.dtype = torch.float16,
    extra: dict | None = None,
) -> None:
    """Write a transcoder set (one safetensors file per layer + config.yaml), readable by circuit-tracer."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files = []
    for i, tc in enumerate(transcoders):
        if tc.layer != i:
            raise ValueError(f"transcoder {i} is for layer {tc.layer}; pass them in layer order")
        name = f"layer_{i}.safetensors"
        tensors = {n: getattr(tc, n) for n in REQUIRED}
        if tc.W_skip is not None:
            tensors[SKIP] = tc.W_skip
        if isinstance(tc.activation, JumpReLU):
            tensors[THRESHOLD] = tc.activation.threshold
        tensors = {n: t.detach().to(dtype).contiguous().cpu() for n, t in tensors.items()}
        save_file(tensors, str(path / name), metadata={"layer": str(i)})
        record_digest(path / name)
        files.append(name)
    first = transcoders[0]
    config = {
        "model_name": model_name,
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "activation": first.activation.name,
    }
    if getattr(first.activation, "k", None) is not None:
        config["k"] = first.activation.k
    config.update({"d_model": first.d_model, "d_transcoder": first.d_transcoder, "n_layers": len(transcoders),
                   "transcoders": files})
    if extra:
        config["crv"] = extra
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


class FileTranscoder:
    """One layer's transcoder read from its safetensors file as needed (see the module docstring)."""

    def __init__(self, file: SafetensorsFile, layer: int, fmt: TranscoderFormat, device: torch.device,
                 dtype: torch.dtype | None = None, resident: bool = False, encode_dtype: torch.dtype = torch.float32):
        self.file, self.layer, self.device = file, layer, device
        self.encode_dtype = encode_dtype
        self.d_transcoder, self.d_model = file.info("W_enc").shape
        self.dtype = dtype or file.info("W_enc").torch_dtype  # storage dtype of the weight rows
        small = lambda name: file.read(name).to(device=device, dtype=torch.float32)  # noqa: E731
        self._b_enc, self._b_dec = small("b_enc"), small("b_dec")
        self._W_skip = small(SKIP) if fmt.skip else None
        # a half-precision encoder compares against the threshold as stored in that precision (circuit-tracer casts it)
        threshold = small(THRESHOLD).to(encode_dtype).float() if fmt.activation == "jumprelu" else None
        self.activation = make_activation(fmt.activation, fmt.k, threshold)
        self._W_enc = self._W_dec = None
        if resident:
            self._W_enc = file.read("W_enc").to(device=device, dtype=self.dtype)
            self._W_dec = file.read("W_dec").to(device=device, dtype=self.dtype)

    @property
    def b_enc(self) -> torch.Tensor:
        return self._b_enc

    @property
    def b_dec(self) -> torch.Tensor:
        return self._b_dec

    @property
    def W_skip(self) -> torch.Tensor | None:
        return self._W_skip

    def _block(self, name: str, start: int, stop: int) -> torch.Tensor:
        held = self._W_enc if name == "W_enc" else self._W_dec
        if held is not None:
            return held[start:stop]
        return self.file.row_range(name, start, stop).to(device=self.device, dtype=self.dtype)

    def _rows(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        held = self._W_enc if name == "W_enc" else self._W_dec
        if held is not None:
            return held[idx.to(held.device)]
        return self.file.rows(name, idx).to(device=self.device, dtype=self.dtype)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W_enc.T + b_enc``, reading the encoder in chunks of rows; returned as float32.

        Computed in ``encode_dtype``: float32 by default; bfloat16 / float16 when the model runs in it, which is
        what circuit-tracer does (``F.linear(x.to(W_enc.dtype), W_enc, b_enc)`` with the set cast to the model
        dtype), so near-ties at the k-th value select the same features as circuit-tracer in that precision."""
        ed = self.encode_dtype
        x = x.to(device=self.device, dtype=ed)
        out = torch.empty(*x.shape[:-1], self.d_transcoder, device=self.device)
        for a in range(0, self.d_transcoder, CHUNK_ROWS):
            b = min(a + CHUNK_ROWS, self.d_transcoder)
            out[..., a:b] = F.linear(x, self._block("W_enc", a, b).to(ed), self._b_enc[a:b].to(ed)).float()
        return out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Dense feature activations (float32)."""
        return self.activation(self.pre_activations(x))

    def encoder_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """``W_enc[idx]`` in the storage dtype (reads only those rows)."""
        return self._rows("W_enc", idx)

    def decoder_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """``W_dec[idx]`` in the storage dtype (reads only those rows)."""
        return self._rows("W_dec", idx)

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        if self._W_skip is None:
            raise ValueError(f"layer {self.layer}'s transcoder has no skip connection")
        return x.to(device=self.device, dtype=torch.float32) @ self._W_skip.T

    def decode(self, features: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """Dense reconstruction (reads the decoder in chunks; for metrics and replaced forwards)."""
        out = self._b_dec.expand(*features.shape[:-1], self.d_model).clone()
        for a in range(0, self.d_transcoder, CHUNK_ROWS):
            b = min(a + CHUNK_ROWS, self.d_transcoder)
            out += features[..., a:b].float() @ self._block("W_dec", a, b).float()
        if self._W_skip is not None:
            if x is None:
                raise ValueError("this transcoder has a skip connection: decode needs the input x")
            out += self.skip(x)
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's replacement MLP output, in ``x``'s dtype."""
        return self.decode(self.encode(x), x).to(x.dtype)


@dataclass(frozen=True)
class SetShape:
    """Size of a transcoder set."""

    d_model: int
    d_transcoder: int
    n_layers: int


class TranscoderSet:
    """A shape-checked set of per-layer transcoders, read lazily (``tset[layer]`` is a :class:`FileTranscoder`)."""

    def __init__(
        self,
        path: str | Path | None = None,
        d_model: int | None = None,
        n_layers: int | None = None,
        k: int | None = None,
        dtype: torch.dtype | None = None,
        device: str | torch.device = "cpu",
        resident: bool | None = None,
        encode_dtype: torch.dtype = torch.float32,
    ):
        self.path = Path(path) if path is not None else DEFAULT_TRANSCODER_DIR
        self.dtype, self.device = dtype, torch.device(device)
        #: precision of the encoder (pre-activations and selection): the model's dtype, as circuit-tracer computes
        self.encode_dtype = encode_dtype
        config_path = self.path / "config.yaml"
        if not config_path.is_file():
            raise TranscoderLoadError(f"no transcoder set at {self.path}: config.yaml is missing")
        try:
            config = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise TranscoderLoadError(f"{config_path} is not valid YAML: {e}") from None
        self.config: dict = config
        names = config.get("transcoders")
        if names is None:
            found = sorted((p for p in self.path.glob("layer_*.safetensors") if p.stem.split("_", 1)[1].isdigit()),
                           key=lambda p: int(p.stem.split("_")[1]))  # layer_<i> only (a stray layer_final is not a layer)
            names = [p.name for p in found]
        paths = [self._resolve(str(f)) for f in names]
        expected = n_layers if n_layers is not None else len(paths)
        if expected == 0:
            raise TranscoderLoadError(f"{self.path}: no layer_*.safetensors files")
        for i in range(expected):
            if i >= len(paths) or not paths[i].is_file():
                raise TranscoderLoadError(f"{self.path}: transcoder for layer {i} is missing (layer_{i}.safetensors)")
        if len(paths) != expected:
            raise TranscoderLoadError(f"{self.path}: {len(paths)} layers of transcoders for a model with {expected} layers")
        try:
            self.files = [SafetensorsFile(p) for p in paths]
        except SafetensorsError as e:
            raise TranscoderLoadError(str(e)) from None
        self.format = read_format(config, config_path, [set(f.tensors) for f in self.files], k, self._file_k())
        dtc, dm = self.files[0].info("W_enc").shape
        self.shape = SetShape(d_model=dm, d_transcoder=dtc, n_layers=len(self.files))
        if self.format.k is not None and not 0 < self.format.k <= dtc:
            raise TranscoderLoadError(f"{config_path}: k={self.format.k} is not in 1..d_transcoder ({dtc})")
        if d_model is not None and dm != d_model:
            raise TranscoderLoadError(f"{self.path}: transcoders have d_model={dm}, the model has {d_model}")
        for f in self.files:
            self._check_shapes(f)
        weight_bytes = sum(f.info(t).end - f.info(t).start for f in self.files for t in ("W_enc", "W_dec"))
        self.resident = weight_bytes <= RESIDENT_LIMIT if resident is None else resident
        self._layers: dict[int, FileTranscoder] = {}
        self._checksum: str | None = None

    def _file_k(self) -> int | None:
        """The value of the layer files' integer ``k`` tensor, if every file holds the same one."""
        values = set()
        for f in self.files:
            if K_TENSOR not in f:
                return None
            t = f.read(K_TENSOR)
            if t.is_floating_point() or t.numel() != 1:
                raise TranscoderLoadError(f"{f.path}: tensor {K_TENSOR!r} should be one integer (TopK's k), got "
                                          f"{t.dtype} of shape {tuple(t.shape)}")
            values.add(int(t.item()))
        if len(values) > 1:
            raise TranscoderLoadError(f"{self.path}: layer files disagree on k ({sorted(values)})")
        return values.pop()

    def _resolve(self, name: str) -> Path:
        if name.startswith("hf://"):
            return self.path / Path(name).name
        p = Path(name)
        return p if p.is_absolute() else self.path / p

    def _check_shapes(self, f: SafetensorsFile) -> None:
        d, m = self.shape.d_transcoder, self.shape.d_model
        want = {"W_enc": (d, m), "W_dec": (d, m), "b_enc": (d,), "b_dec": (m,), THRESHOLD: (d,), SKIP: (m, m)}
        for name, shape in want.items():
            if name in f and f.info(name).shape != shape:
                got = f.info(name).shape
                hint = (f" (transposed: crv and circuit-tracer read {name} as [d_transcoder, d_model]; save {name}.T)"
                        if len(shape) == 2 and got == shape[::-1] and shape[0] != shape[1] else "")
                raise TranscoderLoadError(f"{f.path}: {name} has shape {list(got)}, expected {list(shape)}{hint}")

    @property
    def k(self) -> int | None:
        return self.format.k

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[FileTranscoder]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, layer: int) -> FileTranscoder:
        if not 0 <= layer < len(self):
            raise IndexError(f"layer {layer} out of range 0..{len(self) - 1}")
        if layer not in self._layers:
            self._layers[layer] = FileTranscoder(self.files[layer], layer, self.format, self.device, self.dtype, self.resident,
                                                 self.encode_dtype)
        return self._layers[layer]

    def bytes_read(self) -> dict[str, int]:
        """Bytes read so far per tensor name, over all layers (what lazy loading touched)."""
        out: dict[str, int] = {}
        for f in self.files:
            for name, n in f.bytes_read.items():
                out[name] = out.get(name, 0) + n
        return out

    def checksum(self) -> str:
        """Identity of the set (16 hex digits): config and the sha256 of each layer file's bytes (hashed once, then
        cached beside the files while their size and mtime hold, :mod:`crv.digest`)."""
        if self._checksum is None:
            self._checksum = content_identity([f.path for f in self.files], (self.path / "config.yaml").read_bytes())
        return self._checksum

    def describe(self) -> str:
        s = self.shape
        return f"{s.n_layers} layers x {s.d_transcoder} features (d_model {s.d_model}), {self.format.describe()}"


def load_transcoders(
    path: str | Path | None = None, model=None, **kwargs  # type: ignore[no-untyped-def]
) -> TranscoderSet:
    """Open a transcoder set, checking it against a model's d_model and layer count if given."""
    if model is not None:
        kwargs.setdefault("d_model", model.config.hidden_size)
        kwargs.setdefault("n_layers", model.config.num_hidden_layers)
    return TranscoderSet(path, **kwargs)
