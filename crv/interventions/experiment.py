"""The intervention experiment: correct flagged faulty steps by editing features, against controls.

For every faulty step the verifier flags (and whose unedited regeneration reproduces the
fault), four arms regenerate the trace from that step:

- ``targeted_suppress``: clamp to 0 the ``k`` features with the largest positive effect on the
  suspect prediction (see :mod:`crv.interventions.select`);
- ``targeted_amplify``: scale by ``factor`` the ``k`` features with the most negative effect
  (those arguing against the suspect prediction);
- ``random_suppress`` / ``random_amplify``: the same edits on random active features of the
  same layers (the control).

A fix = the regenerated step is correct / the final answer is right. The harm rate applies the
targeted arms to correct steps of solved traces: harm = the final answer is no longer right.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from crv.attribution.attributor import Attributor
from crv.classify.model import StepClassifier
from crv.fingerprint.features import step_fingerprint
from crv.interventions.patch import FeatureEdit
from crv.interventions.regenerate import POSITIONS, Regeneration, regenerate
from crv.interventions.select import LOCATE, Candidate, candidates, random_like, suggest, suspect_position
from crv.tasks.schema import Record

ARMS = ("targeted_suppress", "targeted_amplify", "random_suppress", "random_amplify")


@dataclass(frozen=True)
class InterventionConfig:
    """Settings of the experiment."""

    k: int = 3  # features edited per arm
    factor: float = 3.0  # the amplify arms' scale
    positions: str = "suspect"  # "suspect" (the suspect position only), "step" or "from_step"
    locate: str = "uncertain"  # "uncertain" (no labels needed) or "oracle"
    threshold: float = 0.5  # verifier's p_faulty at or above which a step is flagged
    max_faulty: int | None = None  # flagged faulty steps to try (None: all)
    harm_steps: int | None = None  # correct steps to test for harm (None: as many as flagged faulty)
    seed: int = 0
    n_examples: int = 3  # worked examples kept per task

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("k must be at least 1")
        if self.positions not in ("suspect", *POSITIONS):
            raise ValueError(f"unknown positions {self.positions!r}; choose from suspect, {', '.join(POSITIONS)}")
        if self.locate not in LOCATE:
            raise ValueError(f"unknown locate rule {self.locate!r}; choose from {', '.join(LOCATE)}")


@dataclass
class StepPlan:
    """What the verifier and the graph say about one step."""

    record: Record
    step_index: int
    p_faulty: float
    suspect_position: int
    suppress: list[Candidate]
    amplify: list[Candidate]
    random_suppress: list[Candidate]
    random_amplify: list[Candidate]


def plan_step(att: Attributor, classifier: StepClassifier, record: Record, step_index: int, cfg: InterventionConfig,
              rng: np.random.Generator) -> StepPlan:
    """Score a step with the verifier and choose the features of each arm (one forward pass)."""
    steps = att.record_steps(record)
    tr, enc = steps.shared, steps.encoding
    target = classifier.graph_settings()["step_target"]  # the graph the classifier was trained on
    fp = step_fingerprint(steps.step(step_index, target))
    p = float(classifier.predict_proba(pd.DataFrame([fp]))[0, 1])
    if cfg.positions == "suspect":
        sug = suggest(att, record, step_index, cfg.k, cfg.locate, trace=(tr, enc))
        pos, suppress, amplify, active = sug.position, sug.suppress, sug.amplify, sug.active
    else:  # candidates from every position of the step
        pos = suspect_position(enc, step_index, tr.logits, record.task, cfg.locate)
        first, end = enc.spans[step_index][0] - 1, enc.last(step_index)  # first predicts the step's first token
        cands = candidates(tr.graph(pos=pos, step_index=step_index), first)
        suppress = [c for c in cands if c.effect > 0][: cfg.k]
        amplify = [c for c in reversed(cands) if c.effect < 0][: cfg.k]
        feats = tr.active_features
        in_step = (feats.pos >= first) & (feats.pos <= end)
        active = list(zip(feats.layer[in_step].tolist(), feats.feat[in_step].tolist()))
    return StepPlan(record, step_index, p, pos, suppress, amplify, random_like(suppress, active, rng),
                    random_like(amplify, active, rng))


def _edits(cands: list[Candidate], mode: str, value: float) -> list[FeatureEdit]:
    return [FeatureEdit(c.layer, c.feature, mode, value) for c in cands]


def run_arms(att: Attributor, plan: StepPlan, cfg: InterventionConfig, arms: Sequence[str] = ARMS) -> dict[str, Regeneration]:
    """The unedited regeneration (``none``) and every arm with features to edit."""
    sets = {"targeted_suppress": _edits(plan.suppress, "clamp", 0.0), "targeted_amplify": _edits(plan.amplify, "scale", cfg.factor),
            "random_suppress": _edits(plan.random_suppress, "clamp", 0.0), "random_amplify": _edits(plan.random_amplify, "scale", cfg.factor)}
    out = {"none": regenerate(att.model, att.encoder, att.transcoders, plan.record, plan.step_index)}
    where = plan.suspect_position if cfg.positions == "suspect" else cfg.positions
    for arm in arms:
        if sets[arm]:
            out[arm] = regenerate(att.model, att.encoder, att.transcoders, plan.record, plan.step_index, sets[arm], where)
    return out


def _rate(values: list[bool]) -> float | None:
    return float(np.mean(values)) if values else None


def _example(plan: StepPlan, runs: dict[str, Regeneration], describe=None) -> dict:  # type: ignore[no-untyped-def]
    """A worked case; ``describe(layer, feature) -> str`` names each edited feature (its card's description)."""
    name = describe or (lambda layer, feature: None)
    return {
        "problem_id": plan.record.problem_id, "question": plan.record.question, "step_index": plan.step_index,
        "p_faulty": round(plan.p_faulty, 4), "before": plan.record.steps[plan.step_index],
        "arms": {arm: {"step": r.new_step, "step_correct": r.step_correct, "solved": r.solved,
                       "final_answer": r.record.final_answer,
                       "features": [(e.layer, e.feature, e.mode, e.value) for e in r.edits],
                       "descriptions": [name(e.layer, e.feature) for e in r.edits]} for arm, r in runs.items()},
    }


def run_experiment(att: Attributor, classifier: StepClassifier, records: Sequence[Record],
                   config: InterventionConfig = InterventionConfig(), progress: bool = True) -> dict:
    """The experiment on a labelled dataset, per task: rates of every arm, the controls and the harm rate."""
    from crv.features.store import FeatureStore, FeatureStoreError

    rng = np.random.default_rng(config.seed)
    out: dict = {"settings": asdict(config)}
    try:  # the edited features are named by their descriptions where the set has some
        store = FeatureStore.beside(att.transcoder_dir) if att.transcoder_dir is not None else None
    except FeatureStoreError:
        store = None
    describe = (lambda layer, feature: store.card(layer, feature).description) if store is not None else None
    for task in sorted({r.task for r in records}):
        recs = [r for r in records if r.task == task and r.steps]
        faulty = [(r, len(r.steps) - 1) for r in recs if r.labels[-1] == 0]
        flagged, rows, examples = [], [], []
        for r, k in tqdm(faulty, desc=f"{task}: faulty steps", unit="step", disable=not progress):
            if config.max_faulty is not None and len(rows) >= config.max_faulty:
                break
            plan = plan_step(att, classifier, r, k, config, rng)
            if plan.p_faulty < config.threshold:
                continue
            flagged.append(plan)
            runs = run_arms(att, plan, config)
            reproduced = not runs["none"].step_correct
            rows.append({"problem_id": r.problem_id, "step_index": k, "p_faulty": plan.p_faulty, "reproduced": reproduced,
                         **{f"{a}.step": runs[a].step_correct for a in ARMS if a in runs},
                         **{f"{a}.solved": runs[a].solved for a in ARMS if a in runs}})
            if reproduced and any(runs[a].solved for a in ARMS[:2] if a in runs) and len(examples) < config.n_examples:
                examples.append(_example(plan, runs, describe))
        n_harm = config.harm_steps if config.harm_steps is not None else max(len(rows), 1)
        solved = [r for r in recs if r.solved]
        harm_rows = []
        for i in tqdm(rng.permutation(len(solved))[:n_harm], desc=f"{task}: correct steps", unit="step", disable=not progress):
            r = solved[int(i)]
            k = int(rng.integers(len(r.steps)))
            plan = plan_step(att, classifier, r, k, config, rng)
            runs = run_arms(att, plan, config, arms=ARMS[:2])
            harm_rows.append({"problem_id": r.problem_id, "step_index": k, "p_faulty": plan.p_faulty,
                              "flagged": plan.p_faulty >= config.threshold, "reproduced": runs["none"].solved,
                              **{f"{a}.solved": runs[a].solved for a in ARMS[:2] if a in runs}})
        out[task] = summarize(faulty, rows, harm_rows)
        out[task]["examples"] = examples
        out[task]["_rows"] = rows
        out[task]["_harm_rows"] = harm_rows
    return out


def summarize(faulty: list, rows: list[dict], harm_rows: list[dict]) -> dict:
    """Rates over the flagged faulty steps whose fault the unedited regeneration reproduces."""
    rep = [r for r in rows if r["reproduced"]]
    per_arm = {a: {"step_fix_rate": _rate([bool(r.get(f"{a}.step", False)) for r in rep]),
                   "answer_fix_rate": _rate([bool(r.get(f"{a}.solved", False)) for r in rep])} for a in ARMS}
    any_of = lambda rs, arms: _rate([any(bool(r.get(f"{a}.solved", False)) for a in arms) for r in rs])  # noqa: E731
    harm_ok = [r for r in harm_rows if r["reproduced"]]
    harm = {a: _rate([not r.get(f"{a}.solved", True) for r in harm_ok]) for a in ARMS[:2]}
    broken = lambda rs: _rate([not all(bool(r.get(f"{a}.solved", True)) for a in ARMS[:2]) for r in rs])  # noqa: E731
    flagged_ok = [r for r in harm_ok if r["flagged"]]
    return {
        "faulty_steps": len(faulty),
        "flagged_faulty": len(rows),
        "reproduced": len(rep),
        "targeted_fix_rate": any_of(rep, ARMS[:2]),
        "random_fix_rate": any_of(rep, ARMS[2:]),
        "harm_rate": broken(harm_ok),
        "harm_steps": len(harm_ok),
        "harm_rate_flagged": broken(flagged_ok),  # on the correct steps the verifier flags (false alarms)
        "harm_steps_flagged": len(flagged_ok),
        "arms": per_arm,
        "harm_by_arm": harm,
    }


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def markdown(results: dict) -> str:
    """The experiment's table (percent)."""
    tasks = [t for t in results if isinstance(results[t], dict) and "arms" in results[t]]
    lines = ["| task | flagged faulty | reproduced | targeted fix (answer) | random fix (answer) | harm on correct steps | harm on flagged correct steps |",
             "|---|---|---|---|---|---|---|"]
    for t in tasks:
        r = results[t]
        lines.append(f"| {t} | {r['flagged_faulty']} of {r['faulty_steps']} | {r['reproduced']} | {_pct(r['targeted_fix_rate'])} | "
                     f"{_pct(r['random_fix_rate'])} | {_pct(r['harm_rate'])} (n={r['harm_steps']}) | "
                     f"{_pct(r['harm_rate_flagged'])} (n={r['harm_steps_flagged']}) |")
    lines += ["", "| task | arm | step fixed | answer fixed |", "|---|---|---|---|"]
    for t in tasks:
        for arm, v in results[t]["arms"].items():
            lines.append(f"| {t} | {arm} | {_pct(v['step_fix_rate'])} | {_pct(v['answer_fix_rate'])} |")
    return "\n".join(lines)


def format_example(ex: dict) -> str:
    """A worked example: the step before and after each arm."""
    lines = [f"{ex['problem_id']}: {ex['question']}  (step {ex['step_index']}, p_faulty {ex['p_faulty']:.2f})",
             f"  before:            {ex['before']}"]
    for arm, a in ex["arms"].items():
        mark = "answer right" if a["solved"] else "answer wrong"
        lines.append(f"  {arm + ':':<18} {a['step']}   [{'step ok' if a['step_correct'] else 'step wrong'}, {mark}]")
        for (l, f, mode, value), desc in zip(a["features"], a.get("descriptions") or [None] * len(a["features"])):
            lines.append(f"      edits L{l}:{f} ({mode} {value:g})" + (f": {desc}" if desc else ""))
    return "\n".join(lines)


def write_results(results: dict, run_dir: str | Path, command: str = "") -> dict[str, Path]:
    """``interventions.json`` (with per-step rows), ``interventions.md`` (table and examples) in ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    public = {k: ({kk: vv for kk, vv in v.items() if not kk.startswith("_")} if isinstance(v, dict) else v) for k, v in results.items()}
    rows = {t: {"faulty": v["_rows"], "correct": v["_harm_rows"]} for t, v in results.items() if isinstance(v, dict) and "_rows" in v}
    files = {"json": run_dir / "interventions.json", "md": run_dir / "interventions.md"}
    files["json"].write_text(json.dumps({**public, "rows": rows, "command": command}, indent=1, default=float) + "\n")
    examples = [format_example(e) for t in public.values() if isinstance(t, dict) and "arms" in t for e in t["examples"]]
    files["md"].write_text(f"# Interventions\n\n`{command}`\n\n{markdown(results)}\n\n## Worked examples\n\n"
                           + ("\n\n".join(f"```\n{e}\n```" for e in examples) or "none") + "\n")
    return files
