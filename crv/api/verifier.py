"""The online step verifier: one forward pass per request, a graph, fingerprint and verdict per step.

This is what ``crv serve`` wraps; it is usable on its own::

    v = Verifier.load()                                     # shipped reasoner, transcoders, verifier
    for s in v.verify("arith", "(3+4)*2", ["3+4=7 => 7*2", "7*2=15 => 15"]):
        print(s.index, s.p_faulty, s.flagged)
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from crv.attribution.attributor import Attributor
from crv.attribution.engine import AttributionConfig
from crv.attribution.export import graph_json
from crv.fingerprint.features import step_fingerprint
from crv.classify.model import DEFAULT_CLASSIFIER, StepClassifier
from crv.lm.encode import EncodedTrace
from crv.tasks.cot import ANSWER_PREFIX


class StepFormatError(ValueError):
    """A request's steps cannot be verified as given (empty, multi-line, ...)."""


@dataclass
class StepVerdict:
    """The verdict on one step."""

    index: int
    text: str
    p_faulty: float
    flagged: bool
    threshold: float
    top_features: list[tuple[int, int, int, float]]  # (layer, position, feature, influence), most influential first
    fingerprint: dict[str, float]
    graph: dict | None = field(default=None)  # the pruned graph as nodes / edges (on request)
    #: for a flagged step, the one-line descriptions of its first top features (None where no store is beside the set)
    descriptions: list[str | None] = field(default_factory=list)


def split_text(text: str) -> list[str]:
    """Steps of a free-text CoT: one per non-empty line, the final ``Answer:`` line left out."""
    return [line for line in (l.strip() for l in text.split("\n")) if line and not line.startswith(ANSWER_PREFIX.strip())]


def _file_checksum(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


class Verifier:
    """An attributor (model + transcoders + settings) and a trained step classifier."""

    #: top features of a flagged step that get their description in the verdict
    DESCRIBED = 5

    def __init__(self, att: Attributor, classifier: StepClassifier, threshold: float = 0.5, target: str = "last",
                 top_k: int = 10, classifier_id: str = "") -> None:
        from crv.features.store import FeatureStore

        self.att, self.classifier, self.threshold, self.target, self.top_k = att, classifier, threshold, target, top_k
        self.classifier_id = classifier_id
        self.features = FeatureStore.find(att.transcoder_dir)  # the descriptions beside the set, if any

    @classmethod
    def load(cls, model_dir: str | Path | None = None, transcoder_dir: str | Path | None = None,
             classifier: str | Path | None = None, threshold: float = 0.5, prompt_format: str | None = None,
             device: str = "cpu", dtype: torch.dtype = torch.float32, k: int | None = None,
             max_feature_nodes: int | None = None, batch_size: int = 64) -> "Verifier":
        """Load everything once; the graph settings default to the ones the classifier was trained with."""
        path = Path(classifier) if classifier is not None else DEFAULT_CLASSIFIER
        clf = StepClassifier.load(path)
        prov = clf.graph_settings()
        cap = max_feature_nodes if max_feature_nodes is not None else prov["max_feature_nodes"]
        att = Attributor.load(model_dir, transcoder_dir, AttributionConfig(max_feature_nodes=cap or None, batch_size=batch_size),
                             dtype=dtype, device=device, prompt_format=prompt_format, k=k)
        cid = _file_checksum(path.with_name(path.name + ".xgb.json"), path.with_name(path.name + ".meta.json"))
        return cls(att, clf, threshold, prov["step_target"], classifier_id=f"{path.name}@{cid}")

    def info(self) -> dict:
        """Versions and checksums of what answers."""
        from importlib.metadata import version

        return {
            "crv": version("crv"), "model": self.att.model_id, "transcoders": self.att.transcoders.checksum(),
            "prompt_format": self.att.prompt_format, "classifier": self.classifier_id, "threshold": self.threshold, "step_target": self.target,
            "attribution": dataclasses.asdict(self.att.config),
            "trained_on": self.classifier.meta_.get("provenance", {}).get("tasks"),
        }

    def text_patterns(self) -> dict[str, str] | None:
        """JSON-Schema ``pattern`` s of the text this model's tokenizer can read, where it reads only some characters
        (a character-level vocabulary): ``line`` (a question or a step: one line, not blank) and ``text`` (several
        lines). None for byte-level and SentencePiece tokenizers, which read any text."""
        tok = self.att.tokenizer
        if tok.unk_token_id is None or len(tok) > 4096:
            return None
        chars = sorted({c for t in tok.get_vocab() if len(t) == 1 for c in t if c.isprintable()})
        if not chars:
            return None

        def cls(cs: list[str]) -> str:
            return "[" + "".join("\\" + c if c in "\\]^-[" else c for c in cs) + "]"

        solid = [c for c in chars if not c.isspace()]
        any_line, multi = cls(chars), cls(chars)[:-1] + "\\n]"
        return {"line": f"^{any_line}*{cls(solid)}{any_line}*$", "text": f"^{multi}*{cls(solid)}{multi}*$"}

    def n_tokens(self, task: str, question: str, steps: Sequence[str]) -> int:
        """Tokens of the trace as the model reads it (prompt format and specials included)."""
        return self.encode(task, question, steps).n_tokens

    def encode(self, task: str, question: str, steps: Sequence[str]) -> EncodedTrace:
        """The request's trace in the model's prompt format, with step token spans."""
        if not steps:
            raise StepFormatError("no steps to verify")
        for i, s in enumerate(steps):
            if not s.strip():
                raise StepFormatError(f"step {i} is empty")
            if "\n" in s:
                raise StepFormatError(f"step {i} contains a newline (send one step per list item)")
        return self.att.encoder.encode(task, question, steps)

    @torch.no_grad()
    def verify(self, task: str, question: str, steps: Sequence[str], include_graph: bool = False,
               stage_seconds: dict[str, float] | None = None) -> list[StepVerdict]:
        """Verdicts for every step; all share one forward pass and one row cache. ``stage_seconds``, if given, is
        added the engine's time per stage (forward, rows, greedy, adjacency, logits)."""
        trace = self.att.steps(self.encode(task, question, steps), {"task": task})
        out, rows = [], []
        for k in range(len(steps)):
            view = trace.step(k, self.target)
            graph, pr, fp = view.graph, view.pruned, step_fingerprint(view)
            rows.append(fp)
            sel = graph.active_features[graph.selected_features].tolist()
            infl = pr.node_influence[: graph.n_features]
            order = torch.argsort(infl, descending=True)[: self.top_k].tolist()
            top = [(int(sel[i][0]), int(sel[i][1]), int(sel[i][2]), float(infl[i])) for i in order]
            g = graph_json(graph, pr, self.att.tokenizer.decode) if include_graph else None
            out.append(StepVerdict(k, steps[k], 0.0, False, self.threshold, top, fp, g))
        if stage_seconds is not None:
            for stage, sec in trace.shared.timer.totals.items():
                stage_seconds[stage] = stage_seconds.get(stage, 0.0) + sec
        p = self.classifier.predict_proba(pd.DataFrame(rows))[:, 1]
        for v, pk in zip(out, p):
            v.p_faulty, v.flagged = float(pk), bool(pk >= self.threshold)
            if v.flagged and self.features is not None:
                v.descriptions = [self.features.description(l, f) for l, _, f, _ in v.top_features[: self.DESCRIBED]]
        return out
