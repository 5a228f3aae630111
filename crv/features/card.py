"""One feature's card: what it responds to, what it promotes, what drives it, and where it fires."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from crv.features.store import FeatureStore


@dataclass(frozen=True)
class Example:
    """An activating context: tokens of a window, the feature's activation on each, the activating token's place."""

    tokens: list[str]
    activations: list[float]
    highlight: int
    activation: float


@dataclass(frozen=True)
class FeatureCard:
    layer: int
    index: int
    live: bool
    description: str
    frequency: float  # firings per corpus token (position 0 left out)
    firings: int
    act_max: float
    act_mean: float
    quantiles: dict[str, float]
    context_independent: bool
    eta2: float  # share of its activation variance that token identity explains
    input_tokens: list[tuple[str, float]]  # WeightLens, by direct-path pre-activation
    input_tokens_filtered: list[str]  # ... that co-activate in the corpus
    output_tokens: list[tuple[str, float]]  # logit lens of the decoder row (promoted)
    suppressed_tokens: list[tuple[str, float]]
    activation_tokens: list[tuple[str, float]]  # tokens carrying most of its activation mass (share of the mass)
    upstream: list[tuple[str, float]]  # CircuitLens: activation-weighted expected upstream attribution
    clusters: list[list[tuple[str, float]]] = field(default_factory=list)  # two upstream patterns if polysemantic
    examples: list[Example] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def text(self) -> str:
        """The card as plain text (``crv feature L:IDX``)."""
        q = lambda xs: ", ".join(f"{json.dumps(t, ensure_ascii=False)} {s:+.2f}" for t, s in xs)  # noqa: E731
        lines = [f"feature L{self.layer}:{self.index} -- {self.description}"]
        if not self.live:
            return "\n".join(lines + ["  never fires on the description corpus (dead there)"])
        lines += [
            f"  fires on {self.frequency:.2%} of tokens ({self.firings} firings); act mean {self.act_mean:.3f}, max "
            f"{self.act_max:.3f}; quantiles " + " ".join(f"{k}={v:.3f}" for k, v in self.quantiles.items()),
            f"  WeightLens in ({'context-independent' if self.context_independent else 'context-dependent'}, "
            f"token identity explains {self.eta2:.0%} of its variance): " + q(self.input_tokens[:6]),
            "  ... co-activating in the corpus: " + (", ".join(json.dumps(t, ensure_ascii=False)
                                                           for t in self.input_tokens_filtered[:6]) or "none"),
            "  WeightLens out (promotes): " + q(self.output_tokens[:6]),
            "  WeightLens out (suppresses): " + q(self.suppressed_tokens[:6]),
            "  activation tokens (share of its activation): "
            + ", ".join(f"{json.dumps(t, ensure_ascii=False)} {s:.0%}" for t, s in self.activation_tokens[:6]),
            "  CircuitLens upstream: " + ", ".join(f"{s} {v:+.3f}" for s, v in self.upstream[:6]),
        ]
        for i, c in enumerate(self.clusters):
            lines.append(f"  pattern {i + 1}: " + ", ".join(f"{s} {v:.2f}" for s, v in c))
        lines.append("  top contexts:")
        for ex in self.examples[:5]:
            text = "".join(f"[[{t}]]" if j == ex.highlight else t for j, t in enumerate(ex.tokens))
            lines.append(f"    {ex.activation:7.3f}  {json.dumps(text, ensure_ascii=False)}")
        return "\n".join(lines)

    def circuit_tracer_json(self, transcoder_id: str, feature_index: int) -> dict:
        """circuit-tracer's feature file (``circuit_tracer/frontend/feature_models.py``: ``Model``)."""
        acts = [a for ex in self.examples for a in ex.activations]
        return {
            "transcoder_id": transcoder_id, "index": feature_index,
            "examples_quantiles": [{"quantile_name": "Top activations", "examples": [
                {"tokens_acts_list": ex.activations, "train_token_ind": ex.highlight, "is_repeated_datapoint": False,
                 "tokens": ex.tokens} for ex in self.examples]}],
            "top_logits": [t for t, _ in self.output_tokens], "bottom_logits": [t for t, _ in self.suppressed_tokens],
            "act_min": min(acts, default=0.0), "act_max": max(acts, default=1.0),
            "quantile_values": list(self.quantiles.values()), "histogram": [], "activation_frequency": self.frequency,
        }


def _pairs(tokens, scores, store: FeatureStore) -> list[tuple[str, float]]:  # type: ignore[no-untyped-def]
    return [(store.token(t), float(s)) for t, s in zip(tokens.tolist(), scores.tolist()) if t >= 0 and not math.isnan(s)]


def describe_line(card_fields: dict) -> str:
    """A one-line description from the card's parts (no explainer model)."""
    q = lambda xs: "/".join(json.dumps(t, ensure_ascii=False) for t, _ in xs[:3])  # noqa: E731
    if not card_fields["live"]:
        return "dead on the corpus"
    out = q(card_fields["output_tokens"])
    if card_fields["context_independent"] and card_fields["input_tokens_filtered"]:
        ins = "/".join(json.dumps(t, ensure_ascii=False) for t in card_fields["input_tokens_filtered"][:3])
        return f"token-level: {ins} -> promotes {out}"
    ups = ", ".join(s for s, _ in card_fields["upstream"][:2])
    acts = q(card_fields["activation_tokens"])
    return f"in context on {acts}" + (f" (driven by {ups})" if ups else "") + f" -> promotes {out}"


def build_card(store: FeatureStore, layer: int, index: int) -> FeatureCard:
    g = lambda name: store.get(layer, name)[index]  # noqa: E731
    count = int(g("count"))
    n_tokens = max(1, int(store.index["corpus"]["tokens"]) - int(store.index["corpus"]["sequences"]))
    qs = [0.25, 0.5, 0.75, 0.9, 0.99]
    examples = []
    for r in range(g("top_seq").shape[0]):
        s = int(g("top_seq")[r])
        if s < 0:
            break
        seq = store.sequence(s)
        start, p = int(g("win_start")[r]), int(g("top_pos")[r])
        w = g("win_acts")[r]
        end = min(len(seq), start + w.shape[0])
        examples.append(Example([store.token(t) for t in seq[start:end].tolist()], [round(float(a), 4) for a in w[: end - start]],
                                p - start, float(g("top_act")[r])))
    clusters = []
    if int(g("clusters")) == 2:
        for c in range(2):
            keys, vals = g("cluster_keys")[c], g("cluster_scores")[c]
            clusters.append([(store.source_label(k), float(v)) for k, v in zip(keys.tolist(), vals.tolist()) if k >= 0])
    fields = dict(
        layer=layer, index=index, live=count > 0, frequency=count / n_tokens, firings=count,
        act_max=float(g("act_max")), act_mean=float(g("act_mean")),
        quantiles={f"q{int(q * 100)}": float(v) for q, v in zip(qs, g("quantiles").tolist())},
        context_independent=bool(g("context_independent")), eta2=float(g("eta2")),
        input_tokens=_pairs(g("wl_in"), g("wl_in_score"), store),
        input_tokens_filtered=[store.token(t) for t in g("wl_in_filtered").tolist() if t >= 0],
        output_tokens=_pairs(g("wl_out"), g("wl_out_score"), store),
        suppressed_tokens=_pairs(g("wl_neg"), g("wl_neg_score"), store),
        activation_tokens=_pairs(g("act_tokens"), g("act_token_mass") / max(float(g("act_mean")) * count, 1e-12), store),
        upstream=[(store.source_label(k), float(v)) for k, v in zip(g("circuit_keys").tolist(), g("circuit_scores").tolist())
                  if k >= 0 and not math.isnan(v)],
        clusters=clusters, examples=examples,
    )
    return FeatureCard(description=describe_line(fields), **fields)
