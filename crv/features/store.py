"""The description store beside a transcoder set: ``features.safetensors`` + ``index.json`` + ``vocab.json``.

``features.safetensors`` holds ``"{layer}.{name}"`` arrays of shape ``[F, ...]`` (see
:mod:`crv.features.describe`) and the corpus (``corpus.tokens``, ``corpus.offsets``); ``index.json`` the
settings, counts and provenance; ``vocab.json`` the decoded text of every token id the store mentions, so a
card is printed without loading the model. No pickle; every file written atomically, ``index.json`` last
(the commit point).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from crv.features.describe import TOKEN_BEFORE, TOKEN_HERE, unpack_key

#: default place of a set's descriptions: ``<transcoder dir>/features``
STORE_DIRNAME = "features"


class FeatureStoreError(FileNotFoundError):
    """No description store where one was asked for (the message names the command that writes one)."""


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def token_ids_used(arrays: dict[str, torch.Tensor]) -> set[int]:
    """Every token id a store mentions (corpus, WeightLens, activation tokens, CircuitLens token sources)."""
    ids: set[int] = set(arrays["corpus.tokens"].unique().tolist())
    for name, t in arrays.items():
        if name.endswith((".wl_in", ".wl_out", ".wl_neg", ".act_tokens", ".wl_in_filtered")):
            ids.update(t[t >= 0].unique().tolist())
        elif name.endswith((".circuit_keys", ".cluster_keys")):
            k = t[t >= 0]
            kind = k >> 40
            ids.update((k[kind == TOKEN_BEFORE] & 0xFFFFFF).unique().tolist())
    return ids


def save_store(arrays: dict[str, torch.Tensor], index: dict, decode, out: str | Path) -> Path:  # type: ignore[no-untyped-def]
    """Write a store to ``out`` (``decode(id) -> str`` fills ``vocab.json``)."""
    from safetensors.torch import save

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / "features.safetensors", save({k: v.contiguous() for k, v in arrays.items()}))
    vocab = {str(i): decode(i) for i in sorted(token_ids_used(arrays))}
    _atomic_write(out / "vocab.json", json.dumps(vocab, ensure_ascii=False).encode())
    _atomic_write(out / "index.json", (json.dumps(index, indent=1) + "\n").encode())
    return out


class FeatureStore:
    """A loaded description store; :meth:`card` gives one feature's :class:`~crv.features.card.FeatureCard`."""

    def __init__(self, path: str | Path) -> None:
        from safetensors.torch import load_file

        self.path = Path(path)
        if not (self.path / "index.json").is_file():
            raise FeatureStoreError(f"no feature descriptions at {self.path}: write them with `crv describe-features "
                                    f"--model DIR --transcoders DIR --out {self.path}`")
        self.index = json.loads((self.path / "index.json").read_text())
        self.vocab = {int(k): v for k, v in json.loads((self.path / "vocab.json").read_text()).items()}
        self.arrays = load_file(str(self.path / "features.safetensors"))
        self.n_layers, self.d_transcoder = int(self.index["n_layers"]), int(self.index["d_transcoder"])
        self._descriptions: dict[tuple[int, int], str] = {}

    @classmethod
    def beside(cls, transcoder_dir: str | Path) -> "FeatureStore":
        """The store saved beside a transcoder set (``<dir>/features``)."""
        return cls(Path(transcoder_dir) / STORE_DIRNAME)

    @classmethod
    def find(cls, transcoder_dir: str | Path | None) -> "FeatureStore | None":
        """The store beside a transcoder set, or None where the set has none (descriptions are optional)."""
        if transcoder_dir is None:
            return None
        try:
            return cls.beside(transcoder_dir)
        except FeatureStoreError:
            return None

    def description(self, layer: int, index: int) -> str:
        """A feature's one-line description (cached: verdicts and reports ask for the same features often)."""
        key = (int(layer), int(index))
        if key not in self._descriptions:
            self._descriptions[key] = self.card(layer, index).description
        return self._descriptions[key]

    def get(self, layer: int, name: str) -> torch.Tensor:
        return self.arrays[f"{layer}.{name}"]

    def token(self, i: int) -> str:
        return self.vocab.get(int(i), f"<{int(i)}>")

    def sequence(self, i: int) -> torch.Tensor:
        off = self.arrays["corpus.offsets"]
        return self.arrays["corpus.tokens"][int(off[i]) : int(off[i + 1])]

    def check(self, layer: int, index: int) -> None:
        """Raise ``IndexError`` naming the valid range when ``layer:index`` is not a feature of the set."""
        if not 0 <= layer < self.n_layers:
            raise IndexError(f"layer {layer} out of range: the set has layers 0..{self.n_layers - 1}")
        if not 0 <= index < self.d_transcoder:
            raise IndexError(f"feature {index} out of range: layer {layer} has features 0..{self.d_transcoder - 1}")

    def source_label(self, key: int) -> str:
        """A CircuitLens upstream identity as text: ``L3:17``, ``error L2``, ``own token``, ``earlier token "+"``."""
        kind, layer, index = unpack_key(int(key))
        if kind == 0:
            return f"L{layer}:{index}"
        if kind == 1:
            return f"error L{layer}"
        if kind == TOKEN_HERE:
            return "own token"
        return "earlier token " + json.dumps(self.token(index), ensure_ascii=False)

    def card(self, layer: int, index: int):  # type: ignore[no-untyped-def]
        from crv.features.card import build_card

        self.check(layer, index)
        return build_card(self, layer, index)
