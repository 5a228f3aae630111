"""Transcoder sets on disk, in circuit-tracer's layout.

A directory holds ``config.yaml`` and one ``layer_{i}.safetensors`` per layer with
``W_enc [d_transcoder, d_model]``, ``W_dec [d_transcoder, d_model]``,
``b_enc [d_transcoder]`` and ``b_dec [d_model]``. ``config.yaml`` carries
``model_name``, ``model_kind: transcoder_set``, ``feature_input_hook``
(``mlp.hook_in``), ``feature_output_hook`` (``mlp.hook_out``), ``activation``
(``topk``), ``k`` and ``transcoders`` (the layer files, in layer order).

:class:`TranscoderSet` loads lazily, one layer at a time, so a 32-layer set of
131k-feature transcoders never needs to sit in memory at once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from crv.transcoders.transcoder import TopKTranscoder, TranscoderShape

#: Where the shipped transcoders live, relative to the repository root.
DEFAULT_TRANSCODER_DIR = Path(__file__).resolve().parents[2] / "models" / "transcoders"
TENSORS = ("W_enc", "W_dec", "b_enc", "b_dec")


class TranscoderLoadError(ValueError):
    """A transcoder directory is incomplete or does not fit the model."""


def save_transcoders(
    transcoders: list[TopKTranscoder],
    path: str | Path,
    model_name: str,
    dtype: torch.dtype = torch.float16,
    extra: dict | None = None,
) -> None:
    """Write a transcoder set (one safetensors file per layer + config.yaml)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    files = []
    for i, tc in enumerate(transcoders):
        if tc.layer != i:
            raise ValueError(f"transcoder {i} is for layer {tc.layer}; pass them in layer order")
        name = f"layer_{i}.safetensors"
        tensors = {n: getattr(tc, n).detach().to(dtype).contiguous().cpu() for n in TENSORS}
        save_file(tensors, str(path / name), metadata={"layer": str(i), "k": str(tc.k)})
        files.append(name)
    shape = transcoders[0].shape
    config = {
        "model_name": model_name,
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "activation": "topk",
        "k": shape.k,
        "d_model": shape.d_model,
        "d_transcoder": shape.d_transcoder,
        "n_layers": len(transcoders),
        "transcoders": files,
    }
    if extra:
        config["crv"] = extra
    (path / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


class TranscoderSet:
    """A lazily loaded, shape-checked set of per-layer transcoders.

    ``tset[layer]`` returns that layer's :class:`TopKTranscoder`; with ``cache=True``
    (the default) loaded layers are kept, with ``cache=False`` each access reads the
    file again so at most one layer need be resident.
    """

    def __init__(
        self,
        path: str | Path | None = None,
        d_model: int | None = None,
        n_layers: int | None = None,
        k: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        cache: bool = True,
    ):
        self.path = Path(path) if path is not None else DEFAULT_TRANSCODER_DIR
        self.dtype, self.device, self.cache = dtype, torch.device(device), cache
        config_path = self.path / "config.yaml"
        if not config_path.is_file():
            raise TranscoderLoadError(f"no transcoder set at {self.path}: config.yaml is missing")
        try:
            config = yaml.safe_load(config_path.read_text()) or {}
        except yaml.YAMLError as e:
            raise TranscoderLoadError(f"{config_path} is not valid YAML: {e}") from None
        self.config: dict = config
        act = str(config.get("activation", "topk")).lower()
        if act != "topk":
            raise TranscoderLoadError(f"{config_path}: activation {act!r} is not supported (only topk)")
        k = k if k is not None else config.get("k")
        if not isinstance(k, int):
            raise TranscoderLoadError(f"{config_path}: no integer 'k' (TopK size); pass k= to override")
        files = config.get("transcoders")
        if files is None:
            found = sorted(self.path.glob("layer_*.safetensors"), key=lambda p: int(p.stem.split("_")[1]))
            files = [p.name for p in found]
        self.files = [self._resolve(f) for f in files]
        expected = n_layers if n_layers is not None else len(self.files)
        if expected == 0:
            raise TranscoderLoadError(f"{self.path}: no layer_*.safetensors files")
        for i in range(expected):
            if i >= len(self.files) or not self.files[i].is_file():
                raise TranscoderLoadError(f"{self.path}: transcoder for layer {i} is missing (layer_{i}.safetensors)")
        if len(self.files) != expected:
            raise TranscoderLoadError(f"{self.path}: {len(self.files)} layers of transcoders for a model with {expected} layers")
        shape0 = self._read_shapes(0)
        self.shape = TranscoderShape(d_model=shape0["b_dec"][0], d_transcoder=shape0["b_enc"][0], k=k)
        if d_model is not None and self.shape.d_model != d_model:
            raise TranscoderLoadError(f"{self.path}: transcoders have d_model={self.shape.d_model}, the model has {d_model}")
        for i in range(len(self.files)):
            self._check_shapes(i)
        self._layers: dict[int, TopKTranscoder] = {}
        self._checksum: str | None = None

    def _resolve(self, name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() else self.path / p

    def _read_shapes(self, layer: int) -> dict[str, list[int]]:
        try:
            with safe_open(str(self.files[layer]), framework="pt") as f:
                keys = set(f.keys())
                missing = [t for t in TENSORS if t not in keys]
                if missing:
                    raise TranscoderLoadError(f"{self.files[layer]}: missing tensor(s) {', '.join(missing)}")
                return {t: list(f.get_slice(t).get_shape()) for t in TENSORS}
        except TranscoderLoadError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise TranscoderLoadError(f"{self.files[layer]}: not a readable safetensors file ({e})") from None

    def _check_shapes(self, layer: int) -> None:
        s, d, m = self._read_shapes(layer), self.shape.d_transcoder, self.shape.d_model
        want = {"W_enc": [d, m], "W_dec": [d, m], "b_enc": [d], "b_dec": [m]}
        for name, shape in want.items():
            if s[name] != shape:
                raise TranscoderLoadError(f"{self.files[layer]}: {name} has shape {s[name]}, expected {shape}")

    def __len__(self) -> int:
        return len(self.files)

    def __iter__(self) -> Iterator[TopKTranscoder]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, layer: int) -> TopKTranscoder:
        if not 0 <= layer < len(self):
            raise IndexError(f"layer {layer} out of range 0..{len(self) - 1}")
        if layer in self._layers:
            return self._layers[layer]
        tc = TopKTranscoder(self.shape, layer, dtype=self.dtype)
        with safe_open(str(self.files[layer]), framework="pt", device=str(self.device)) as f:
            state = {t: f.get_tensor(t).to(self.dtype) for t in TENSORS}
        tc.load_state_dict(state)
        tc.to(self.device).requires_grad_(False)
        if self.cache:
            self._layers[layer] = tc
        return tc

    def checksum(self) -> str:
        """SHA-256 over config and layer files (identifies the set in graphs and reports; computed once)."""
        if self._checksum is None:
            h = hashlib.sha256((self.path / "config.yaml").read_bytes())
            for f in self.files:
                h.update(f.read_bytes())
            self._checksum = h.hexdigest()[:16]
        return self._checksum


def load_transcoders(
    path: str | Path | None = None, model=None, **kwargs  # type: ignore[no-untyped-def]
) -> TranscoderSet:
    """Open a transcoder set, checking it against a model's d_model and layer count if given."""
    if model is not None:
        kwargs.setdefault("d_model", model.config.hidden_size)
        kwargs.setdefault("n_layers", model.config.num_hidden_layers)
    return TranscoderSet(path, **kwargs)
