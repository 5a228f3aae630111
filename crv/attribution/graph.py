"""The attribution graph of one step: plain tensors plus metadata, saved without pickle.

Node order (as circuit-tracer): ``[selected features | error nodes (layer-major,
n_layers * n_pos) | token nodes (n_pos) | logit nodes]``. ``adjacency[target, source]``
is the direct effect of source on target; rows of error and token nodes are zero.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from jaxtyping import Float, Int
from torch import Tensor
from safetensors.torch import load_file, save_file

TENSOR_FIELDS = (
    "tokens", "active_features", "activation_values", "selected_features",
    "adjacency", "logit_tokens", "logit_probabilities",
)


@dataclass
class Graph:
    """One step's attribution graph."""

    tokens: Int[Tensor, " n_pos"]  # input token ids
    active_features: Int[Tensor, "n_active 3"]  # (layer, position, feature) of every active feature
    activation_values: Float[Tensor, " n_active"]
    selected_features: Int[Tensor, " n_selected"]  # indices into active_features, ascending
    adjacency: Float[Tensor, "n_nodes n_nodes"]  # rows = targets, columns = sources
    logit_tokens: Int[Tensor, " n_logits"]  # vocabulary ids of the logit nodes
    logit_probabilities: Float[Tensor, " n_logits"]
    n_layers: int
    meta: dict = field(default_factory=dict)  # step index, position, settings, checksums, text

    # ---------------------------------------------------------------- node table
    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.selected_features.shape[0])

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.shape[0])

    @property
    def n_nodes(self) -> int:
        return self.n_features + self.n_errors + self.n_pos + self.n_logits

    def node_kinds(self) -> list[str]:
        """``feature``, ``error``, ``token`` or ``logit`` for every node, in order."""
        return ["feature"] * self.n_features + ["error"] * self.n_errors + ["token"] * self.n_pos + ["logit"] * self.n_logits

    def node_table(self) -> list[dict]:
        """One dict per node: kind, layer, position, feature/token id, activation."""
        out: list[dict] = []
        sel = self.active_features[self.selected_features]
        acts = self.activation_values[self.selected_features]
        for (l, p, f), a in zip(sel.tolist(), acts.tolist()):
            out.append({"kind": "feature", "layer": l, "position": p, "feature": f, "activation": a})
        for l in range(self.n_layers):
            for p in range(self.n_pos):
                out.append({"kind": "error", "layer": l, "position": p})
        for p, t in enumerate(self.tokens.tolist()):
            out.append({"kind": "token", "layer": -1, "position": p, "token": t})
        for t, pr in zip(self.logit_tokens.tolist(), self.logit_probabilities.tolist()):
            out.append({"kind": "logit", "layer": self.n_layers, "position": self.n_pos - 1, "token": t, "probability": pr})
        return out

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (tensors) and ``<path>.json`` (metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {k: getattr(self, k).contiguous() for k in TENSOR_FIELDS}
        tmp = path.with_name(path.name + ".safetensors.tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path.with_name(path.name + ".safetensors"))
        meta_tmp = path.with_name(path.name + ".json.tmp")
        meta_tmp.write_text(json.dumps({"n_layers": self.n_layers, "meta": self.meta}, indent=1, default=str))
        meta_tmp.replace(path.with_name(path.name + ".json"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "Graph":
        path = Path(path)
        tensors = load_file(str(path.with_name(path.name + ".safetensors")))
        info = json.loads(path.with_name(path.name + ".json").read_text())
        return cls(**{k: tensors[k] for k in TENSOR_FIELDS}, n_layers=info["n_layers"], meta=info["meta"])
