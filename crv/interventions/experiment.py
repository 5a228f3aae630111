"""The intervention experiment: do edits of the features a rule selects fix flagged faulty steps better than
matched controls, without breaking correct ones?

For every flagged faulty step (flags from the verifier, or given: e.g. out-of-fold scores, so that no step is
flagged by a classifier that saw it) the trace is regenerated greedily from the step:

- ``none``: unedited. Only steps whose unedited regeneration *reproduces* the fault enter the rates;
- per selection rule (:mod:`crv.interventions.rules`): ``targeted``, the rule's ``k`` features at the step's
  suspect position scaled by ``factor`` (0: clamped), and ``control``, the same edit on a matched control set
  (:mod:`crv.interventions.controls`: same layers, position and count, edit size within 10%); an unmatched
  control is reported, never counted;
- for the primary rule, the same two arms at every ``doses`` factor (the dose-response curve).

A **step fix**: the edited regeneration's step is correct (crv's checker). An **answer fix**: the final answer
is right, counted only where the unedited regeneration's answer was wrong (a trace that corrects itself later
is not a fix). **Harm**: the primary edit applied to correct steps (a random sample, and the correct steps the
verifier flags), the share of steps it makes faulty among those the unedited regeneration keeps correct.
Rates carry 95% intervals from a bootstrap over problems; targeted − control differences are paired per step.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from crv.attribution.attributor import Attributor
from crv.classify.model import StepClassifier
from crv.fingerprint.features import step_fingerprint
from crv.interventions.controls import ActiveFeature, match_control, total_size
from crv.interventions.patch import FeatureEdit
from crv.interventions.regenerate import regenerate
from crv.interventions.rules import RULES, FeatureReference, active_at, feature_reference, select
from crv.interventions.select import LOCATE, suspect_position
from crv.tasks.schema import Record

ARMS = ("targeted", "control")


@dataclass(frozen=True)
class InterventionConfig:
    """Settings of the experiment."""

    k: int = 3  # features edited per arm
    factor: float = 0.0  # the edit: the chosen features' activations at the suspect position times this (0: clamp)
    doses: tuple[float, ...] = (1.5, 0.5, 0.0, -1.0, -3.0)  # factors of the dose-response curve (primary rule)
    rule: str = "logit"  # the primary rule (top-level rates, dose-response, harm)
    rules: tuple[str, ...] = RULES  # every rule compared at ``factor``
    locate: str = "uncertain"  # suspect position: "uncertain" (no labels needed) or "oracle"
    tolerance: float = 0.10  # matched controls' total edit size within this share of the targeted set's
    threshold: float = 0.5  # p_faulty at or above which a step is flagged
    max_faulty: int | None = None  # flagged faulty steps to try per task (None: all)
    harm_steps: int | None = None  # correct steps of each harm sample (None: as many as flagged faulty)
    seed: int = 0
    n_examples: int = 3  # worked cases kept per task
    bootstrap: int = 2000

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError("k must be at least 1")
        if self.locate not in LOCATE:
            raise ValueError(f"unknown locate rule {self.locate!r}; choose from {', '.join(LOCATE)}")
        for r in (self.rule, *self.rules):
            if r not in RULES:
                raise ValueError(f"unknown selection rule {r!r}; choose from {', '.join(RULES)}")
        if self.rule not in self.rules:
            raise ValueError(f"the primary rule {self.rule!r} must be among rules {self.rules}")


def _key(rule: str, arm: str, factor: float) -> str:
    return f"{rule}.{arm}@{factor:g}"


def _edits(feats: list[ActiveFeature], factor: float) -> list[FeatureEdit]:
    return [FeatureEdit(f.layer, f.feature, "scale", factor) for f in feats]


def step_probability(att: Attributor, classifier: StepClassifier, record: Record, k: int) -> float:
    """The verifier's p_faulty for step ``k`` (graph at the step target it was trained on)."""
    view = att.record_steps(record).step(k, classifier.graph_settings()["step_target"])
    return float(classifier.predict_proba(pd.DataFrame([step_fingerprint(view)]))[0, 1])


def run_step(att: Attributor, record: Record, k: int, cfg: InterventionConfig, rng: np.random.Generator,
             reference: FeatureReference | None, p_faulty: float, doses: bool = True, describe=None) -> tuple[dict, dict]:  # type: ignore[no-untyped-def]
    """One step: the unedited regeneration and every arm; returns its row and a worked-case record."""
    steps = att.record_steps(record)
    tr, enc = steps.shared, steps.encoding
    pos = suspect_position(enc, k, tr.logits, record.task, cfg.locate)
    graph = tr.graph(pos=pos, step_index=k)
    active = active_at(att, tr, pos)
    none = regenerate(att.model, att.encoder, att.transcoders, record, k)
    row: dict = {"problem_id": record.problem_id, "step_index": k, "p_faulty": p_faulty, "position": pos,
                 "reproduced": not none.step_correct, "none.step": none.step_correct, "none.solved": none.solved}
    case: dict = {"problem_id": record.problem_id, "question": record.question, "step_index": k, "position": pos,
                  "token": att.tokenizer.decode([int(enc.ids[pos + 1])]) if pos + 1 < len(enc.ids) else "",
                  "p_faulty": round(p_faulty, 4), "before": record.steps[k], "none": none.new_step, "rules": {}}
    for rule in cfg.rules:
        tgt = select(rule, graph, pos, active, cfg.k, reference)
        ctl = match_control(tgt, active, rng, cfg.tolerance)
        row[f"{rule}.n"], row[f"{rule}.matched"] = len(tgt), ctl is not None
        row[f"{rule}.size"] = total_size(tgt)
        row[f"{rule}.control_size"] = total_size(ctl) if ctl else None
        factors = cfg.doses if (doses and rule == cfg.rule) else ()
        arms_case = {}
        for factor in dict.fromkeys((cfg.factor, *factors)):
            for arm, feats in (("targeted", tgt), ("control", ctl)):
                if not feats:
                    continue
                out = regenerate(att.model, att.encoder, att.transcoders, record, k, _edits(feats, factor), pos)
                row[_key(rule, arm, factor) + ".step"] = out.step_correct
                row[_key(rule, arm, factor) + ".solved"] = out.solved
                if factor == cfg.factor:
                    arms_case[arm] = {"step": out.new_step, "step_correct": out.step_correct, "solved": out.solved,
                                      "features": [{"layer": f.layer, "feature": f.feature, "position": pos,
                                                    "activation": round(f.activation, 4), "size": round(f.size, 4),
                                                    "description": describe(f.layer, f.feature) if describe else None}
                                                   for f in feats]}
        case["rules"][rule] = arms_case
    return row, case


def _boot(values: np.ndarray, groups: np.ndarray, B: int, rng: np.random.Generator) -> dict:
    """Mean of the non-NaN ``values`` and its 95% interval from a bootstrap over ``groups`` (problems)."""
    ok = ~np.isnan(values)
    if not ok.any():
        return {"value": None, "ci": None, "n": 0}
    v, g = values[ok], groups[ok]
    uniq, inv = np.unique(g, return_inverse=True)
    sums, counts = np.bincount(inv, v, len(uniq)), np.bincount(inv, None, len(uniq))
    draws = rng.integers(len(uniq), size=(B, len(uniq)))
    means = sums[draws].sum(1) / np.maximum(counts[draws].sum(1), 1)
    return {"value": round(float(v.mean()), 4), "ci": [round(float(np.percentile(means, 2.5)), 4),
                                                      round(float(np.percentile(means, 97.5)), 4)], "n": int(len(v))}


def _col(rows: list[dict], key: str, where: Sequence[bool] | None = None) -> np.ndarray:
    out = np.array([float(r[key]) if r.get(key) is not None else np.nan for r in rows])
    if where is not None:
        out[~np.asarray(where, dtype=bool)] = np.nan
    return out


def _fix_rates(rows: list[dict], rule: str, factor: float, B: int, rng: np.random.Generator) -> dict:
    """Step and answer fix rates of both arms, and the paired targeted - control differences (with intervals)."""
    groups = np.array([r["problem_id"] for r in rows])
    rep = np.array([bool(r["reproduced"]) for r in rows], dtype=bool)
    answer_open = rep & np.array([not r["none.solved"] for r in rows], dtype=bool)  # self-correcting traces are left out
    matched = np.array([bool(r.get(f"{rule}.matched")) for r in rows], dtype=bool)
    out: dict = {}
    for what, base in (("step_fix", rep), ("answer_fix", answer_open)):
        suffix = ".step" if what == "step_fix" else ".solved"
        t = _col(rows, _key(rule, "targeted", factor) + suffix, base)
        c = _col(rows, _key(rule, "control", factor) + suffix, base & matched)
        out[what] = {"targeted": _boot(t, groups, B, rng), "control": _boot(c, groups, B, rng),
                     "difference": _boot(np.where(matched, t - c, np.nan), groups, B, rng)}
    out["unmatched"] = int((rep & ~matched).sum())
    return out


def _harm(rows: list[dict], rule: str, factor: float, B: int, rng: np.random.Generator) -> dict:
    """Share of correct steps the edit makes faulty, among those the unedited regeneration keeps correct."""
    if not rows:
        return {"targeted": {"value": None, "ci": None, "n": 0}, "control": {"value": None, "ci": None, "n": 0}}
    groups = np.array([r["problem_id"] for r in rows])
    kept = np.array([bool(r["none.step"]) for r in rows], dtype=bool)
    matched = np.array([bool(r.get(f"{rule}.matched")) for r in rows], dtype=bool)
    broke = lambda arm, where: np.where(where, 1.0 - _col(rows, _key(rule, arm, factor) + ".step"), np.nan)  # noqa: E731
    return {"targeted": _boot(broke("targeted", kept), groups, B, rng), "control": _boot(broke("control", kept & matched), groups, B, rng)}


def summarize(faulty: list, rows: list[dict], harm_rows: list[dict], flagged_harm_rows: list[dict], cfg: InterventionConfig,
              seed: int = 0) -> dict:
    """A task's figures: legacy top-level rates (primary rule at ``factor``), ``ci``, ``dose_response``, ``rules``."""
    rng = np.random.default_rng(seed)
    B, r0, f0 = cfg.bootstrap, cfg.rule, cfg.factor
    main = _fix_rates(rows, r0, f0, B, rng)
    harm, harm_flagged = _harm(harm_rows, r0, f0, B, rng), _harm(flagged_harm_rows, r0, f0, B, rng)
    rules = {}
    for rule in cfg.rules:
        rates = _fix_rates(rows, rule, f0, B, rng)
        rules[rule] = {**rates, "harm": _harm(harm_rows, rule, f0, B, rng)["targeted"],
                       "features": round(float(np.mean([r.get(f"{rule}.n", 0) for r in rows])), 3) if rows else None,
                       "matched_share": round(float(np.mean([bool(r.get(f"{rule}.matched")) for r in rows])), 3) if rows else None}
    dose = [{"factor": f, **_fix_rates(rows, r0, f, B, rng)} for f in cfg.doses]
    rep = sum(bool(r["reproduced"]) for r in rows)
    return {
        "faulty_steps": len(faulty), "flagged_faulty": len(rows), "reproduced": rep,
        "targeted_fix_rate": main["answer_fix"]["targeted"]["value"], "random_fix_rate": main["answer_fix"]["control"]["value"],
        "harm_rate": harm["targeted"]["value"], "harm_steps": harm["targeted"]["n"],
        "harm_rate_flagged": harm_flagged["targeted"]["value"], "harm_steps_flagged": harm_flagged["targeted"]["n"],
        "arms": {arm: {"step_fix_rate": main["step_fix"][arm]["value"], "answer_fix_rate": main["answer_fix"][arm]["value"]}
                 for arm in ARMS},
        "harm_by_arm": {arm: harm[arm]["value"] for arm in ARMS},
        "ci": {"answer_fix": main["answer_fix"], "step_fix": main["step_fix"], "unmatched": main["unmatched"],
               "harm": harm, "harm_flagged": harm_flagged},
        "dose_response": dose, "rules": rules,
    }


@dataclass
class TaskInterventions:
    """One task's experiment: ``figures`` (what :func:`summarize` computes: counts, rates, ``ci``,
    ``dose_response``, ``rules``), worked ``examples`` and the per-step rows behind them (flagged faulty steps,
    random correct steps, flagged correct steps)."""

    figures: dict
    examples: list[dict] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)
    harm_rows: list[dict] = field(default_factory=list)
    flagged_harm_rows: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The task's section of ``interventions.json`` (figures and examples; the rows go under ``rows``)."""
        return {**self.figures, "examples": self.examples}

    def rows_dict(self) -> dict:
        return {"faulty": self.rows, "correct": self.harm_rows, "flagged_correct": self.flagged_harm_rows}

    @classmethod
    def from_dict(cls, d: dict, rows: dict | None = None) -> "TaskInterventions":
        """A section of :meth:`to_dict` (and its ``rows`` entry, if kept); also reads the section layout with
        ``_rows`` / ``_harm_rows`` / ``_flagged_harm_rows`` inside it."""
        rows = rows or {}
        figures = {k: v for k, v in d.items() if k != "examples" and not k.startswith("_")}
        return cls(figures, list(d.get("examples", [])), rows.get("faulty", d.get("_rows", [])),
                   rows.get("correct", d.get("_harm_rows", [])), rows.get("flagged_correct", d.get("_flagged_harm_rows", [])))


@dataclass
class InterventionResults:
    """The experiment on every task of a dataset, with its settings."""

    settings: dict
    tasks: dict[str, TaskInterventions] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"settings": self.settings, **{t: r.to_dict() for t, r in self.tasks.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "InterventionResults":
        """Read ``interventions.json`` (a task is a section with ``dose_response``)."""
        rows = d.get("rows", {})
        return cls(d.get("settings", {}), {t: TaskInterventions.from_dict(v, rows.get(t)) for t, v in d.items()
                                           if isinstance(v, dict) and "dose_response" in v})


def run_experiment(att: Attributor, classifier: StepClassifier | None, records: Sequence[Record],
                   config: InterventionConfig = InterventionConfig(), progress: bool = True,
                   scores: Mapping[tuple[str, int], float] | None = None) -> InterventionResults:
    """The experiment on a labelled dataset, per task (see the module docstring).

    ``scores``: ``{(problem_id, step_index): p_faulty}`` to flag by (e.g. out of fold); else ``classifier`` scores
    each step. The anomalous rule's reference statistics come from the solved traces of ``records``."""
    from crv.features.store import FeatureStore

    if scores is None and classifier is None:
        raise ValueError("give a classifier or precomputed scores to flag steps by")
    rng = np.random.default_rng(config.seed)
    store = FeatureStore.find(att.transcoder_dir)  # edited features are named by their descriptions, if any
    describe = store.description if store is not None else None
    p_of = (lambda r, k: float(scores.get((r.problem_id, k), float("nan")))) if scores is not None else \
        (lambda r, k: step_probability(att, classifier, r, k))  # type: ignore[arg-type]
    out = InterventionResults(asdict(config))
    for task in sorted({r.task for r in records}):
        recs = [r for r in records if r.task == task and r.steps]
        solved = [r for r in recs if r.solved]
        reference = feature_reference(att, solved[:100]) if "anomalous" in config.rules and solved else None
        faulty = [(r, len(r.steps) - 1) for r in recs if r.labels[-1] == 0]
        rows, cases = [], []
        for r, k in tqdm(faulty, desc=f"{task}: faulty steps", unit="step", disable=not progress):
            if config.max_faulty is not None and len(rows) >= config.max_faulty:
                break
            p = p_of(r, k)
            if not p >= config.threshold:
                continue
            row, case = run_step(att, r, k, config, rng, reference, p, describe=describe)
            rows.append(row)
            rc = case["rules"].get(config.rule, {})
            if row["reproduced"] and rc.get("targeted", {}).get("step_correct") and len(cases) < config.n_examples:
                cases.append(case)
        n_harm = config.harm_steps if config.harm_steps is not None else max(len(rows), 1)
        correct = [(r, k) for r in solved for k in range(len(r.steps))]
        harm_rows, flagged_rows = [], []
        for i in tqdm(rng.permutation(len(correct))[:n_harm], desc=f"{task}: correct steps", unit="step", disable=not progress):
            r, k = correct[int(i)]
            harm_rows.append(run_step(att, r, k, config, rng, reference, p_of(r, k), doses=False)[0])
        if scores is not None:  # the correct steps the verifier flags (false alarms)
            alarms = [(r, k) for r in recs for k in range(len(r.steps)) if r.labels[k] == 1 and p_of(r, k) >= config.threshold]
            for i in rng.permutation(len(alarms))[:n_harm]:
                r, k = alarms[int(i)]
                flagged_rows.append(run_step(att, r, k, config, rng, reference, p_of(r, k), doses=False)[0])
        else:
            flagged_rows = [h for h in harm_rows if h["p_faulty"] >= config.threshold]
        out.tasks[task] = TaskInterventions(summarize(faulty, rows, harm_rows, flagged_rows, config, config.seed),
                                            cases, rows, harm_rows, flagged_rows)
    return out


def _pct(v: float | None) -> str:
    return "—" if v is None else f"{100 * v:.1f}"


def _ci(d: dict) -> str:
    if d.get("value") is None:
        return "—"
    lo, hi = d["ci"]
    return f"{100 * d['value']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown(results: InterventionResults) -> str:
    """The experiment's tables (percent, 95% intervals over problems)."""
    s = results.settings
    lines = [f"Primary rule `{s.get('rule')}`, factor {s.get('factor')} (0 = clamp), k = {s.get('k')}, edits at the "
             "suspect position; rates over flagged faulty steps whose unedited regeneration reproduces the fault.", "",
             "| task | flagged faulty | reproduced | unmatched | answer fix: targeted | control | targeted − control | "
             "step fix: targeted | control | targeted − control | harm (random correct) | harm (flagged correct) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t, task in results.tasks.items():
        r = task.figures
        a, st = r["ci"]["answer_fix"], r["ci"]["step_fix"]
        lines.append(f"| {t} | {r['flagged_faulty']} of {r['faulty_steps']} | {r['reproduced']} | {r['ci']['unmatched']} | "
                     f"{_ci(a['targeted'])} | {_ci(a['control'])} | {_ci(a['difference'])} | {_ci(st['targeted'])} | "
                     f"{_ci(st['control'])} | {_ci(st['difference'])} | {_ci(r['ci']['harm']['targeted'])} | "
                     f"{_ci(r['ci']['harm_flagged']['targeted'])} |")
    lines += ["", "Selection rules (at the primary factor):", "",
              "| task | rule | matched | step fix: targeted | control | difference | answer fix: difference | harm |",
              "|---|---|---|---|---|---|---|---|"]
    for t, task in results.tasks.items():
        for rule, v in task.figures["rules"].items():
            lines.append(f"| {t} | {rule} | {_pct(v['matched_share'])} | {_ci(v['step_fix']['targeted'])} | "
                         f"{_ci(v['step_fix']['control'])} | {_ci(v['step_fix']['difference'])} | "
                         f"{_ci(v['answer_fix']['difference'])} | {_ci(v['harm'])} |")
    lines += ["", "Dose-response (primary rule; factor 1 = no edit, 0 = clamp, < 0 = reversed):", "",
              "| task | factor | step fix: targeted | control | difference |", "|---|---|---|---|---|"]
    for t, task in results.tasks.items():
        for d in task.figures["dose_response"]:
            lines.append(f"| {t} | {d['factor']:g} | {_ci(d['step_fix']['targeted'])} | {_ci(d['step_fix']['control'])} | "
                         f"{_ci(d['step_fix']['difference'])} |")
    return "\n".join(lines)


def format_example(ex: dict) -> str:
    """A worked case: the step, the unedited regeneration, each arm of each rule with the features it edited."""
    lines = [f"{ex['problem_id']}: {ex['question']}  (step {ex['step_index']}, p_faulty {ex['p_faulty']:.2f}; "
             f"suspect position {ex['position']}, before {json.dumps(ex['token'])})",
             f"  written:            {ex['before']}", f"  unedited regen.:    {ex['none']}"]
    for rule, arms in ex["rules"].items():
        for arm, a in arms.items():
            mark = "answer right" if a["solved"] else "answer wrong"
            lines.append(f"  {rule + ' ' + arm + ':':<20} {a['step']}   [{'step ok' if a['step_correct'] else 'step wrong'}, {mark}]")
            for f in a["features"]:
                lines.append(f"      L{f['layer']}:{f['feature']} at position {f['position']} (activation {f['activation']:.3f}, "
                             f"edit size {f['size']:.3f})" + (f": {f['description']}" if f.get("description") else ""))
    return "\n".join(lines)


def write_results(results: InterventionResults, run_dir: str | Path, command: str = "") -> dict[str, Path]:
    """``interventions.json`` (with per-step rows), ``interventions.md`` (tables and worked cases) in ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = {t: r.rows_dict() for t, r in results.tasks.items()}
    files = {"json": run_dir / "interventions.json", "md": run_dir / "interventions.md"}
    files["json"].write_text(json.dumps({**results.to_dict(), "rows": rows, "command": command}, indent=1, default=float) + "\n")
    examples = [format_example(e) for r in results.tasks.values() for e in r.examples]
    files["md"].write_text(f"# Interventions\n\n`{command}`\n\n{markdown(results)}\n\n## Worked cases\n\n"
                           + ("\n\n".join(f"```\n{e}\n```" for e in examples) or "none") + "\n")
    return files
