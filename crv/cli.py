"""The ``crv`` command line."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="crv: verify chain-of-thought steps via attribution graphs.")


@app.callback()
def _root() -> None:
    """crv: verify chain-of-thought steps via attribution graphs."""


def _load(fn):  # type: ignore[no-untyped-def]
    """Run a loader; a model, transcoder set or prompt format that cannot be used becomes a CLI error naming the fix."""
    from crv.lm.families import UnsupportedModelError
    from crv.lm.load import ModelLoadError
    from crv.transcoders.formats import TranscoderFormatError

    try:
        return fn()
    except (ModelLoadError, UnsupportedModelError, TranscoderFormatError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from e
    except ValueError as e:  # e.g. an unknown prompt format, or chat without a chat template
        hint = "--prompt-format" if "prompt format" in str(e) or "chat template" in str(e) else None
        raise typer.BadParameter(str(e), param_hint=hint) from e


#: torch threads, on every command that computes (on a shared machine 1 keeps times steady)
#: the paper's feature-node cap, AttributionConfig's default (tests/test_cli_defaults.py keeps the two equal)
MAX_FEATURE_NODES = 4096
CAP_OPTION = typer.Option(MAX_FEATURE_NODES, help="Feature-node cap of the graphs (the paper's; 0: uncapped).")
THREADS_OPTION = typer.Option(0, help="torch threads (0: torch's default; on a busy shared machine, 1 keeps times steady).")


def _set_threads(n: int) -> None:
    import torch

    if n:
        torch.set_num_threads(n)


#: engine options shared by attribute, evaluate and serve
DEVICE_OPTION = typer.Option("cpu", help="cpu or cuda[:i]: where the model, the active transcoder rows and every engine tensor live.")
DTYPE_OPTION = typer.Option("float32", help="Model weights: float32, bfloat16 or float16 (transcoder weights stay in their "
                                            "file dtype; the engine computes in float32).")
BATCH_OPTION = typer.Option(64, help="Greedy visit batch in features: part of what defines a capped graph (features are "
                                       "re-ranked every 4 batches, so a cap keeps other features at another size). "
                                       "512 = circuit-tracer 0.5.0's default graph; 64 is within the paper's 16-64.")
K_OPTION = typer.Option(None, "--k", help="TopK size for a transcoder set whose config.yaml has no k "
                                          "(e.g. 128 for facebook/crv-8b-instruct-transcoders, which crv also recognises).")


def _attributor(model: Optional[Path], transcoders: Optional[Path], config, prompt_format: Optional[str],  # type: ignore[no-untyped-def]
                device: str = "cpu", dtype: str = "float32", k: Optional[int] = None):
    from crv.attribution.attributor import Attributor

    def load():  # type: ignore[no-untyped-def]
        att = Attributor.load(model, transcoders, config, dtype=_dtype(dtype), device=device, prompt_format=prompt_format, k=k)
        typer.echo(f"transcoders: {att.transcoders.describe()}", err=True)
        return att

    return _load(load)


def _dtype(name: str):  # type: ignore[no-untyped-def]
    from crv.lm.load import parse_dtype

    try:
        return parse_dtype(name)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--dtype") from e


def _model_and_encoder(model: Optional[Path], prompt_format: Optional[str]):  # type: ignore[no-untyped-def]
    """A model directory's model and its :class:`~crv.lm.encode.TraceEncoder` (tokenizer + prompt format)."""
    from crv.lm.adapter import open_model

    def load():  # type: ignore[no-untyped-def]
        lm = open_model(model, prompt_format=prompt_format)
        return lm.model, lm.encoder

    return _load(load)


@app.command("import-model")
def import_model_cmd(
    source: Path = typer.Argument(..., help="A .gguf file or a local Hugging Face model directory (safetensors)."),
    out: Path = typer.Option(..., help="Output directory (safetensors, tokenizer, crv_model.json)."),
    prompt_format: Optional[str] = typer.Option(None, help="Record this prompt format (default: chat if the tokenizer has a chat template, else plain)."),
) -> None:
    """Convert a GGUF file or HF directory into a local directory every crv command reads with --model."""
    import json

    from crv.lm.importer import import_model
    from crv.lm.load import CRV_MODEL_FILE
    from crv.lm.prompt import PROMPT_FORMATS

    if prompt_format is not None and prompt_format not in PROMPT_FORMATS:
        raise typer.BadParameter(f"choose from {', '.join(PROMPT_FORMATS)}", param_hint="--prompt-format")
    if not source.exists():
        raise typer.BadParameter(f"no such file or directory: {source}", param_hint="SOURCE")
    _load(lambda: import_model(source, out, prompt_format=prompt_format))
    notes = json.loads((out / CRV_MODEL_FILE).read_text())
    typer.echo(f"imported {notes['family']} model to {out} (prompt format {notes['prompt_format']})")
    for fix in notes["fixes"]:
        typer.echo(f"  fixed: {fix}")


@app.command("train-reasoner")
def train_reasoner_cmd(
    out: Path = typer.Option(Path("runs/reasoner"), help="Run directory (final/ and checkpoints/ go here)."),
    iterations: int = typer.Option(2000, help="Optimiser steps."),
    tokens_per_batch: int = typer.Option(16_384, help="Padded tokens per step."),
    d_model: int = typer.Option(128),
    n_layers: int = typer.Option(4),
    n_heads: int = typer.Option(4),
    d_mlp: int = typer.Option(512),
    lr: float = typer.Option(2e-3),
    warmup: int = typer.Option(100),
    n_min: int = typer.Option(1, help="Smallest number of operators in training problems."),
    n_max: int = typer.Option(10, help="Largest number of operators in training problems."),
    arith_weight: float = typer.Option(0.65, help="Share of arithmetic problems (rest boolean)."),
    max_abs: int = typer.Option(999, help="Arithmetic: largest |intermediate value| allowed."),
    checkpoint_every: int = typer.Option(0, help="Save a checkpoint every N steps (0: final only)."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0, help="torch threads (0: default)."),
    init_from: Optional[Path] = typer.Option(None, help="Continue from this reasoner directory (its shape wins)."),
) -> None:
    """Train the reasoner on generated canonical CoT (from scratch, or continuing with --init-from)."""
    from crv.reasoner.model import ModelConfig
    from crv.reasoner.train import TrainConfig, train_reasoner
    from crv.tasks.cot import GeneratorConfig

    cfg = TrainConfig(
        model=ModelConfig(d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_mlp=d_mlp),
        iterations=iterations,
        tokens_per_batch=tokens_per_batch,
        lr=lr,
        warmup=warmup,
        n_min=n_min,
        n_max=n_max,
        task_weights=(("arith", arith_weight), ("bool", 1.0 - arith_weight)),
        generator=GeneratorConfig(max_abs=max_abs),
        checkpoint_every=checkpoint_every,
        seed=seed,
        threads=threads,
        init_from=str(init_from) if init_from else None,
    )
    train_reasoner(cfg, out, command="crv " + " ".join(sys.argv[1:]))
    typer.echo(f"saved {out / 'final'}")


@app.command("train-transcoders")
def train_transcoders_cmd(
    out: Path = typer.Option(Path("runs/transcoders"), help="Output directory (circuit-tracer layout)."),
    model: Optional[Path] = typer.Option(None, help="Model directory (default: the shipped reasoner; `crv import-model` makes one from GGUF / HF)."),
    prompt_format: Optional[str] = typer.Option(None, help="Prompt format: plain or chat (default: the model's own)."),
    expansion: int = typer.Option(8, help="d_transcoder = expansion * d_model (8 ships; the paper used 32 on an 8B model)."),
    k: int = typer.Option(16, help="Active features per token (TopK)."),
    steps: int = typer.Option(2000),
    batch_tokens: int = typer.Option(4096),
    buffer_tokens: int = typer.Option(65_536, help="Activation buffer (tokens); memory ~ 8 * layers * d_model * this bytes."),
    pool_tokens: int = typer.Option(0, help="> 0: harvest this many tokens once and train in epochs over them (memory ~ "
                                    "4 * layers * d_model * this bytes; the fast way on a CPU); 0: fresh traces every buffer."),
    lr: float = typer.Option(1e-3),
    aux_k: int = typer.Option(256, help="Dead features the auxiliary (AuxK) loss uses per token."),
    resample_every: int = typer.Option(100, help="Steps between dead-feature resamplings (0: never)."),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0, help="torch threads (0: default)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the checkpoint in OUT/checkpoint."),
    checkpoint_seconds: float = typer.Option(300.0, help="Seconds between checkpoints (OUT/checkpoint)."),
) -> None:
    """Train one TopK transcoder per MLP layer of a model, on CoT text in its prompt format (resumable)."""
    import torch

    from crv.lm.load import DEFAULT_MODEL_DIR
    from crv.transcoders.train import TranscoderTrainConfig, train_transcoders

    if threads:
        torch.set_num_threads(threads)
    lm, encoder = _model_and_encoder(model, prompt_format)
    cfg = TranscoderTrainConfig(
        expansion=expansion, k=k, steps=steps, batch_tokens=batch_tokens, buffer_tokens=buffer_tokens, lr=lr, aux_k=aux_k,
        resample_every=resample_every, seed=seed, pool_tokens=pool_tokens
    )
    name = (model or DEFAULT_MODEL_DIR).resolve().name
    try:
        train_transcoders(lm, encoder, cfg, out, model_name=name, command="crv " + " ".join(sys.argv[1:]), resume=resume,
                          checkpoint_seconds=checkpoint_seconds)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--resume / --out") from e
    typer.echo(f"saved {out}")


@app.command("tune-transcoders")
def tune_transcoders_cmd(
    transcoders: Path = typer.Option(..., help="The trained transcoder set to start from (TopK)."),
    out: Path = typer.Option(..., help="Output directory for the tuned set (checkpoints in OUT/checkpoint)."),
    model: Optional[Path] = typer.Option(None, help="Model directory (default: the shipped reasoner)."),
    prompt_format: Optional[str] = typer.Option(None, help="Prompt format: plain or chat (default: the model's own)."),
    steps: int = typer.Option(300),
    sequences: int = typer.Option(8, help="CoT traces per step."),
    lr: float = typer.Option(5e-5),
    local_coef: float = typer.Option(1.0, help="Weight of the layers' mean FVU beside the KL (keeps each transcoder local)."),
    seed: int = typer.Option(1),
    threads: int = typer.Option(0, help="torch threads (0: default)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the checkpoint in OUT/checkpoint."),
    checkpoint_seconds: float = typer.Option(300.0, help="Seconds between checkpoints."),
) -> None:
    """Tune a transcoder set end to end: KL(model || replacement model) on assistant tokens + local FVU (resumable)."""
    import torch

    from crv.lm.load import DEFAULT_MODEL_DIR
    from crv.transcoders.io import load_transcoders
    from crv.transcoders.kl_tune import KLTuneConfig, kl_tune

    if threads:
        torch.set_num_threads(threads)
    lm, encoder = _model_and_encoder(model, prompt_format)
    cfg = KLTuneConfig(steps=steps, sequences=sequences, lr=lr, local_coef=local_coef, seed=seed)
    try:
        kl_tune(lm, encoder, load_transcoders(transcoders, model=lm), cfg, out,
                model_name=(model or DEFAULT_MODEL_DIR).resolve().name, command="crv " + " ".join(sys.argv[1:]),
                resume=resume, checkpoint_seconds=checkpoint_seconds)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--transcoders / --resume") from e
    typer.echo(f"saved {out}")


@app.command("finetune")
def finetune_cmd(
    model: Path = typer.Option(..., help="Base model directory (`crv import-model` makes one from GGUF / HF)."),
    out: Path = typer.Option(..., help="Output: the merged model directory; adapter in OUT/adapter, checkpoints in OUT/finetune."),
    task: list[str] = typer.Option(["arith", "bool"], "--task", help="Task(s) to train on (repeat the option)."),
    n: list[int] = typer.Option([1, 2, 3, 4, 5, 6], "--n", help="Operator counts drawn uniformly (repeat the option)."),
    steps: int = typer.Option(600, help="Total optimiser steps (raise it to extend a run; the schedule is warm-up then constant)."),
    batch_size: int = typer.Option(8),
    lr: float = typer.Option(1e-3),
    lora_rank: int = typer.Option(16),
    lora_alpha: int = typer.Option(32),
    seed: int = typer.Option(0),
    eval_every: int = typer.Option(100, help="Steps between held-out step-accuracy checks (0: only the final one)."),
    checkpoint_seconds: float = typer.Option(180.0, help="Seconds between checkpoints."),
    resume: bool = typer.Option(False, "--resume", help="Continue the checkpoint in OUT/finetune (exactly)."),
    device: str = DEVICE_OPTION,
    threads: int = typer.Option(0, help="torch threads (0: default)."),
) -> None:
    """LoRA fine-tuning on crv's canonical chain of thought in the model's chat template (loss on the assistant
    turn only), resumable; writes the merged model (read by every crv command) and the adapter."""
    import torch

    from crv.finetune.train import FinetuneConfig, FinetuneRun

    if threads:
        torch.set_num_threads(threads)
    cfg = FinetuneConfig(tasks=tuple(task), ns=tuple(n), steps=steps, batch_size=batch_size, lr=lr, lora_rank=lora_rank,
                         lora_alpha=lora_alpha, seed=seed, eval_every=eval_every, checkpoint_seconds=checkpoint_seconds)
    run = _load(lambda: FinetuneRun(cfg, model, out, device=device))
    try:
        pr = run.train(resume=resume)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--resume / --out") from e
    acc = run.evaluate()
    typer.echo(f"trained {pr.step} steps, {pr.tokens_seen} tokens in {pr.seconds:.0f} s; held-out step accuracy "
               + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    run.export(command="crv " + " ".join(sys.argv[1:]))
    typer.echo(f"saved {out} (merged model) and {out / 'adapter'}")


@app.command("merge-adapter")
def merge_adapter_cmd(
    adapter: Path = typer.Option(..., help="A crv finetune adapter folder (adapter_config.json, adapter_model.safetensors, "
                                           "crv_finetune.json), e.g. models/smollm2-crv-lora."),
    base: Path = typer.Option(..., help="The base model directory (`crv import-model` of the source the manifest names)."),
    out: Path = typer.Option(..., help="Output: the merged model directory crv reads like any other."),
) -> None:
    """Rebuild a fine-tuned model from its shipped LoRA adapter: base + adapter merged, checked against the
    manifest's sha256 of the merged weights."""
    import json

    from crv.digest import sha256_file
    from crv.finetune.train import merge_adapter

    manifest_path = adapter / "crv_finetune.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    _load(lambda: merge_adapter(base, adapter, out))
    got, want = sha256_file(out / "model.safetensors"), manifest.get("merged_sha256")
    if want and got != want:
        raise typer.BadParameter(f"merged weights sha256 {got[:16]}… differ from the manifest's {want[:16]}…: the base is "
                                 f"not the one the adapter was trained on ({manifest.get('base_notes', {}).get('source')})",
                                 param_hint="--base")
    typer.echo(f"merged {adapter} into {base} -> {out} (sha256 {got[:16]}…" + (", as the manifest says)" if want else ")"))


def _write_with_summary(records, out: Path) -> None:  # type: ignore[no-untyped-def]
    """Write records as JSONL and print their per-task summary."""
    from crv.tasks.schema import write_records
    from crv.tasks.stats import format_table, summarize_by

    write_records(records, out)
    typer.echo(format_table(summarize_by(records)))
    typer.echo(f"wrote {len(records)} records to {out}")


def _problems(tasks: list[str], ns: list[int], count: int, seed: int):  # type: ignore[no-untyped-def]
    from crv.tasks.cot import TASKS, generate_problems

    problems = []
    for task in tasks:
        if task not in TASKS:
            raise typer.BadParameter(f"unknown task {task!r}; choose from {', '.join(TASKS)}", param_hint="--task")
        for n in ns:
            if n < 1:
                raise typer.BadParameter(f"n must be >= 1, got {n}", param_hint="--n")
            problems += generate_problems(task, n, count, seed=seed)  # type: ignore[arg-type]
    return problems


@app.command("generate")
def generate_cmd(
    task: list[str] = typer.Option(["arith"], help="Task(s): arith, bool (repeat the option for several)."),
    n: list[int] = typer.Option([5], help="Number(s) of operators (repeat the option for several)."),
    count: int = typer.Option(100, help="Problems per task and n."),
    out: Path = typer.Option(..., help="Output JSONL of labelled records."),
    model: Optional[Path] = typer.Option(None, help="Model directory (default: the shipped reasoner; `crv import-model` makes one from GGUF / HF)."),
    prompt_format: Optional[str] = typer.Option(None, help="Prompt format: plain or chat (default: the model's own)."),
    seed: int = typer.Option(1, help="Problem seed."),
    batch_size: int = typer.Option(64),
    threads: int = typer.Option(0, help="torch threads (0: default)."),
) -> None:
    """Let the reasoner solve fresh problems (greedy) and write labelled records."""
    import torch

    from crv.reasoner.generate import GenerationConfig, generate_records

    if threads:
        torch.set_num_threads(threads)
    problems = _problems(task, n, count, seed)
    lm, encoder = _model_and_encoder(model, prompt_format)
    records = generate_records(lm, encoder, problems, GenerationConfig(batch_size=batch_size))
    _write_with_summary(records, out)


@app.command("import-gsm8k")
def import_gsm8k_cmd(
    out: Path = typer.Option(..., help="Output JSONL of labelled records."),
    data_dir: Optional[Path] = typer.Option(None, help="GSM8K directory (default ../shared/data/gsm8k)."),
    include_reference: bool = typer.Option(False, help="Also import the (all-correct) reference solutions."),
) -> None:
    """Import GSM8K model solutions as labelled step records."""
    from crv.tasks.gsm8k import load_gsm8k

    records = load_gsm8k(data_dir, include_reference)
    _write_with_summary(records, out)


@app.command("import-dataset")
def import_dataset_cmd(
    path: Path = typer.Argument(..., help="The dataset file (JSON array or JSON Lines)."),
    format: str = typer.Option(..., "--format", help="crv-release (facebook/crv annotated JSON) or first-error (ProcessBench layout)."),
    out: Path = typer.Option(..., help="Output JSONL of labelled crv records."),
    task: Optional[str] = typer.Option(None, help="Task name of the records (default: from the file name)."),
) -> None:
    """Import another dataset's labelled steps as crv records (validated; errors name file:line)."""
    from crv.tasks.datasets import DATASET_FORMATS, read_dataset
    from crv.tasks.schema import RecordError

    if format not in DATASET_FORMATS:
        raise typer.BadParameter(f"unknown format {format!r}; choose from {', '.join(DATASET_FORMATS)}", param_hint="--format")
    try:
        records = read_dataset(path, format, task)
    except (RecordError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e), param_hint="PATH") from e
    _write_with_summary(records, out)


@app.command("label")
def label_cmd(
    records: Path = typer.Argument(..., help="JSONL of records to relabel (their labels may be placeholders)."),
    out: Path = typer.Option(..., help="Output JSONL: the records with rollout labels (truncated after the first faulty step)."),
    rollouts: int = typer.Option(8, help="Continuations sampled from the end of each step."),
    temperature: float = typer.Option(1.0, help="Sampling temperature of the continuations."),
    max_new_tokens: int = typer.Option(256, help="Longest continuation."),
    model: Optional[Path] = typer.Option(None, help="The model under test (default: the shipped reasoner)."),
    prompt_format: Optional[str] = typer.Option(None, help="Prompt format: plain or chat (default: the model's own)."),
    seed: int = typer.Option(0),
    threads: int = THREADS_OPTION,
) -> None:
    """Label steps without a checker (Math-Shepherd): a step is correct if some continuation from it reaches the answer."""
    _set_threads(threads)
    import json

    from crv.reasoner.rollout_labels import RolloutConfig, label_with_rollouts
    from crv.tasks.schema import read_records, write_records

    if rollouts < 1:
        raise typer.BadParameter("needs at least one rollout", param_hint="--rollouts")
    recs = read_records(records)
    lm, encoder = _model_and_encoder(model, prompt_format)
    done = label_with_rollouts(lm, encoder, recs, RolloutConfig(rollouts, temperature, max_new_tokens, seed=seed))
    write_records([d.record for d in done], out)
    soft = out.with_name(out.name + ".soft.json")
    soft.write_text(json.dumps({r.problem_id: list(d.soft) for r, d in zip(recs, done)}) + "\n")
    changed = sum(d.record.labels != r.labels for r, d in zip(recs, done))
    typer.echo(f"wrote {len(done)} records to {out} ({changed} relabelled), per-step soft estimates to {soft}")
    if done and not any(x > 0 for d in done for x in d.soft):
        typer.echo(f"crv: error: no rollout reached the reference answer from any step of any record, so every step "
                   f"was labelled faulty; the labels say nothing. Check the records' `answer` field, --max-new-tokens "
                   f"({max_new_tokens}), --temperature and that the model writes `A: <answer>` in its prompt format.",
                   err=True)
        raise typer.Exit(1)


@app.command("attribute")
def attribute_cmd(
    records: Path = typer.Argument(..., help="JSONL of labelled records (crv generate / import-gsm8k)."),
    out: Path = typer.Option(Path("graphs/run"), help="Directory for the graphs (<problem_id>/step<k>.json.gz; with --full also .safetensors + .json)."),
    model: Optional[Path] = typer.Option(None, help="Model directory (default: the shipped reasoner; `crv import-model` makes one from GGUF / HF)."),
    prompt_format: Optional[str] = typer.Option(None, help="Prompt format: plain or chat (default: the model's own)."),
    transcoders: Optional[Path] = typer.Option(None, help="Transcoder directory (default: the shipped set)."),
    max_feature_nodes: int = CAP_OPTION,
    limit: int = typer.Option(0, help="Only the first N records (0: all)."),
    export_circuit_tracer: bool = typer.Option(False, help="Also write circuit-tracer frontend JSON per graph."),
    full: bool = typer.Option(False, "--full", help="Also write each graph's dense adjacency (<step>.safetensors + .json: "
                                                     "n_nodes^2 floats, ~70 MB per step at 4096 features on the shipped "
                                                     "model); by default only the pruned graph (<step>.json.gz, ~10 KB)."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    batch_size: int = BATCH_OPTION,
    k: Optional[int] = K_OPTION,
    threads: int = THREADS_OPTION,
) -> None:
    """Build one attribution graph per step of every record and save them (pruned, compressed; --full adds the dense
    adjacency)."""
    _set_threads(threads)
    from tqdm.auto import tqdm

    from crv.attribution.engine import AttributionConfig
    from crv.attribution.export import write_circuit_tracer_files, write_pruned_graph
    from crv.attribution.prune import prune
    from crv.tasks.schema import read_records

    recs = read_records(records)
    if limit:
        recs = recs[:limit]
    att = _attributor(model, transcoders, AttributionConfig(max_feature_nodes=max_feature_nodes or None, batch_size=batch_size),
                      prompt_format, device, dtype, k)
    ct_kwargs: dict = {}
    if export_circuit_tracer:  # feature descriptions travel with the export where the set has some
        from crv.features.store import FeatureStore

        store = FeatureStore.find(att.transcoder_dir)
        if store is not None:
            ct_kwargs = {"describe": store.description,
                         "feature_file": lambda l, f, i: store.card(l, f).circuit_tracer_json(att.transcoders.checksum(), i)}
        else:
            typer.echo("no feature descriptions beside the transcoder set (`crv describe-features` writes them): "
                       "the export's feature nodes carry no examples", err=True)
    n, skipped = 0, []
    for rec in tqdm(recs, desc="attribute", unit="trace"):
        try:
            graphs = list(att.iter_step_graphs(rec))  # a record that cannot be read is skipped whole, never half-written
        except ValueError as e:
            skipped.append(rec.problem_id)
            tqdm.write(f"skipped {rec.problem_id}: {e}", file=sys.stderr)
            continue
        for g in graphs:
            name = f"step{g.meta['step_index']:03d}"
            write_pruned_graph(g, prune(g), out / rec.problem_id / name, att.tokenizer.decode)
            if full:
                g.save(out / rec.problem_id / name)
            if export_circuit_tracer:
                write_circuit_tracer_files(g, out / "circuit-tracer", f"{rec.problem_id}-{name}", att.tokenizer.decode,
                                           **ct_kwargs)
            n += 1
    typer.echo(f"wrote {n} graphs for {len(recs) - len(skipped)} traces to {out}"
               + (f"; skipped {len(skipped)} record(s) that could not be attributed (see above)" if skipped else ""))


@app.command("describe-features")
def describe_features_cmd(
    model: Optional[Path] = typer.Option(None, help="Model directory (default: the shipped reasoner)."),
    transcoders: Optional[Path] = typer.Option(None, help="Transcoder directory (default: the shipped set)."),
    corpus: Optional[Path] = typer.Option(None, help="JSONL of records to read features on (default: the model's own "
                                                     "greedy traces on fresh problems, --task x --n x --per-cell)."),
    out: Optional[Path] = typer.Option(None, help="Output directory (default: TRANSCODERS/features, where `crv feature`, "
                                                  "the service and `crv verify` look)."),
    task: list[str] = typer.Option(["arith", "bool"], help="Tasks of the generated corpus."),
    n: list[int] = typer.Option([2, 4, 6], help="Operator counts of the generated corpus."),
    per_cell: int = typer.Option(20, help="Generated traces per task and n."),
    seed: int = typer.Option(5, help="Problem seed of the generated corpus."),
    rows_per_trace: int = typer.Option(128, help="CircuitLens firings per trace (0: every one; rows are the cost)."),
    prompt_format: Optional[str] = typer.Option(None, help="Prompt format: plain or chat (default: the model's own)."),
    k: Optional[int] = K_OPTION,
    threads: int = THREADS_OPTION,
) -> None:
    """Describe every live feature: top activating contexts, WeightLens input/output tokens, CircuitLens upstream."""
    _set_threads(threads)
    from crv.attribution.engine import AttributionConfig
    from crv.features.corpus import corpus_from_records, own_traces
    from crv.features.describe import DescribeConfig, describe_features
    from crv.features.store import STORE_DIRNAME, save_store
    from crv.tasks.schema import read_records

    att = _attributor(model, transcoders, AttributionConfig(), prompt_format, k=k)
    if corpus is not None:
        records, source = read_records(corpus), str(corpus)
    else:
        records = own_traces(att, task, n, per_cell, seed)
        source = f"own greedy traces: tasks {task}, n {n}, {per_cell} each, seed {seed}"
    cfg = DescribeConfig(circuit_rows_per_trace=rows_per_trace or None)
    arrays, index = describe_features(att, corpus_from_records(att, records, source), cfg)
    index["command"] = "crv " + " ".join(sys.argv[1:])
    dest = out or att.transcoder_dir / STORE_DIRNAME  # type: ignore[operator]
    save_store(arrays, index, lambda i: att.tokenizer.decode([i]), dest)
    typer.echo(f"described {sum(index['live'])} live features of {index['n_layers']} layers in {index['seconds']} s -> {dest}")


def _feature_store(store: Optional[Path], transcoders: Optional[Path]):  # type: ignore[no-untyped-def]
    from crv.features.store import FeatureStore, FeatureStoreError
    from crv.transcoders.io import DEFAULT_TRANSCODER_DIR

    try:
        return FeatureStore(store) if store is not None else FeatureStore.beside(transcoders or DEFAULT_TRANSCODER_DIR)
    except FeatureStoreError as e:
        raise typer.BadParameter(str(e), param_hint="--store / --transcoders") from e


@app.command("feature")
def feature_cmd(
    feature: str = typer.Argument(..., help="LAYER:INDEX, e.g. 2:40."),
    transcoders: Optional[Path] = typer.Option(None, help="Transcoder directory whose descriptions to read (default: the shipped set)."),
    store: Optional[Path] = typer.Option(None, help="A description store directory (default: TRANSCODERS/features)."),
    as_json: bool = typer.Option(False, "--json", help="Print the card as JSON."),
) -> None:
    """Print one feature's card (descriptions written by `crv describe-features`)."""
    import json as _json

    try:
        layer, index = (int(x) for x in feature.split(":"))
    except ValueError as e:
        raise typer.BadParameter(f"{feature!r} is not LAYER:INDEX (e.g. 2:40)", param_hint="FEATURE") from e
    st = _feature_store(store, transcoders)
    try:
        card = st.card(layer, index)
    except IndexError as e:
        raise typer.BadParameter(str(e), param_hint="FEATURE") from e
    typer.echo(_json.dumps(card.to_dict(), ensure_ascii=False, indent=1) if as_json else card.text())


@app.command("evaluate")
def evaluate_cmd(
    data: list[Path] = typer.Option([], help="Labelled JSONL record file(s); if none, the reasoner solves fresh problems."),
    task: list[str] = typer.Option(["arith", "bool"], help="Task(s) to generate (without --data)."),
    n: list[int] = typer.Option([3, 5, 7, 10], help="Operator counts to generate (without --data)."),
    count: int = typer.Option(50, help="Problems per task and n to generate (without --data)."),
    seed: int = typer.Option(11, help="Problem seed (without --data)."),
    run_dir: Path = typer.Option(Path("runs/evaluate"), help="Report, step table and classifiers go here."),
    graph_dir: Optional[Path] = typer.Option(None, help="Graph cache (default: graphs/<run-dir name>)."),
    archive: Optional[Path] = typer.Option(None, help="Fingerprint archive (.parquet): traces it holds need no graphs; "
                                                      "this run's fingerprints are added to it (small enough to keep or commit)."),
    model: Optional[Path] = typer.Option(None, help="Model directory (default: the shipped reasoner; `crv import-model` makes one from GGUF / HF)."),
    prompt_format: Optional[str] = typer.Option(None, help="Prompt format: plain or chat (default: the model's own)."),
    transcoders: Optional[Path] = typer.Option(None, help="Transcoder directory (default: the shipped set)."),
    max_feature_nodes: int = CAP_OPTION,
    step_target: str = typer.Option("last", help="Where a step's graph is computed: last (paper), result, uncertain."),
    extra_target: list[str] = typer.Option([], help="Also evaluate CRV on graphs at these step targets (method crv_<target>)."),
    scoring: str = typer.Option("out-of-fold", help="out-of-fold: every step scored by the fold fit that never saw its problem; split: one held-out split."),
    folds: int = typer.Option(5, help="Folds over problems for out-of-fold scoring."),
    test_fraction: float = typer.Option(0.2, help="Share of problems held out for testing (--scoring split)."),
    n_boot: int = typer.Option(1000, help="Bootstrap resamples of the problems for the intervals."),
    prm_epochs: int = typer.Option(8, help="Fine-tuning epochs of the PRM baseline (0: no PRM baselines)."),
    executor: str = typer.Option("local", help="Where graphs are computed: local (this process) or ray."),
    address: Optional[str] = typer.Option(None, help="Ray cluster to join (auto, ray://host:port); default: start one here."),
    workers: int = typer.Option(2, help="Ray workers (one actor each, holding the model once)."),
    threads: int = typer.Option(0, help="torch threads (0: default; per worker with --executor ray)."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    batch_size: int = BATCH_OPTION,
    k: Optional[int] = K_OPTION,
) -> None:
    """Evaluate CRV against the baselines on a labelled CoT dataset (AUROC / AUPR / FPR@95 with intervals by problem,
    paired differences to CRV, AUROC per n, ablation, transfer); out of fold by default."""
    import torch

    from crv.attribution.engine import AttributionConfig
    from crv.evaluate.methods import EvalConfig
    from crv.evaluate.pipeline import run_evaluation
    from crv.evaluate.prm import PRMConfig
    from crv.reasoner.generate import generate_records
    from crv.tasks.schema import read_records, write_records

    from crv.attribution.attributor import STEP_TARGETS

    from crv.extract import LocalExecutor, RayExecutor

    for t in [step_target, *extra_target]:
        if t not in STEP_TARGETS:
            raise typer.BadParameter(f"unknown step target {t!r}; choose from {', '.join(STEP_TARGETS)}", param_hint="--step-target")
    if executor not in ("local", "ray"):
        raise typer.BadParameter(f"unknown executor {executor!r}; choose local or ray", param_hint="--executor")
    if scoring not in ("out-of-fold", "split"):
        raise typer.BadParameter(f"unknown scoring {scoring!r}; choose out-of-fold or split", param_hint="--scoring")
    try:
        eval_config = EvalConfig(scoring=scoring.replace("-", "_"), folds=folds, test_fraction=test_fraction, n_boot=n_boot,
                                 prm=PRMConfig(epochs=prm_epochs) if prm_epochs > 0 else None)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--folds / --test-fraction") from None
    runner = (RayExecutor(num_workers=workers, address=address, threads_per_worker=threads or 1) if executor == "ray"
              else LocalExecutor())
    if threads:
        torch.set_num_threads(threads)
    att = _attributor(model, transcoders, AttributionConfig(max_feature_nodes=max_feature_nodes or None, batch_size=batch_size),
                      prompt_format, device, dtype, k)
    if data:
        records = [r for path in data for r in read_records(path)]
    else:
        records = generate_records(att.model, att.encoder, _problems(task, n, count, seed))
        write_records(records, run_dir / "records.jsonl")
    results = run_evaluation(records, att, run_dir, graph_dir or Path("graphs") / run_dir.name,
                             eval_config, command="crv " + " ".join(sys.argv[1:]),
                             target=step_target, extra_targets=tuple(extra_target), executor=runner, archive=archive)
    typer.echo("\n" + results.extra["markdown"])
    typer.echo("\nwrote " + ", ".join(results.extra["files"].values()))


@app.command("train-verifier")
def train_verifier_cmd(
    steps: list[Path] = typer.Argument(..., help="Step tables (steps.parquet or fingerprints.parquet of `crv evaluate`)."),
    out: Optional[Path] = typer.Option(None, help="Writes <out>.xgb.json and <out>.meta.json (default: models/classifiers/default)."),
    task: list[str] = typer.Option([], help="Only these tasks' steps (default: all)."),
    model: Optional[Path] = typer.Option(None, help="For tables that do not record it: the model the fingerprints came from (default: the shipped reasoner)."),
    transcoders: Optional[Path] = typer.Option(None, help="For tables that do not record it: their transcoders (default: the shipped set)."),
    max_feature_nodes: int = typer.Option(1024, help="For tables that do not record it: the feature-node cap of the fingerprints."),
    step_target: str = typer.Option("last", help="For tables that do not record it: the step target of the fingerprints."),
) -> None:
    """Fit the CRV verifier (xgboost on fingerprints) on every labelled step of the tables and save it, with the
    settings that produced the tables (recorded in them by `crv evaluate`) as its provenance."""
    import json

    import pandas as pd

    from crv.classify.model import DEFAULT_CLASSIFIER, StepClassifier
    from crv.extract.steps import column_groups

    out = out or DEFAULT_CLASSIFIER
    missing = [str(p) for p in steps if not p.is_file()]
    if missing:
        raise typer.BadParameter(f"no such step table: {', '.join(missing)}")
    tables = [pd.read_parquet(p) for p in steps]
    recorded = {json.dumps(t.attrs.get("settings"), sort_keys=True) for t in tables}
    if len(recorded) > 1:
        raise typer.BadParameter("the step tables were made with different settings (model, transcoders or graph "
                                 "settings); train one verifier per setting")
    table = pd.concat(tables, ignore_index=True)
    if task:
        table = table[table["task"].isin(task)]
    if table.empty or table["faulty"].nunique() < 2:
        raise typer.BadParameter("the tables need both faulty and correct steps")
    fp = column_groups(table)["fingerprint"]
    clf = StepClassifier().fit(table[fp], table["faulty"].to_numpy())
    settings = json.loads(recorded.pop())
    if settings is not None:
        made = {"model": settings["model"], "prompt_format": settings["prompt_format"], "transcoders": settings["transcoders"],
                "attribution": {**settings["attribution"], "step_target": settings["target"]}}
    else:  # a table from before the settings were recorded: the options say what made it
        from crv.attribution.attributor import Attributor

        att = Attributor.load(model, transcoders)
        made = {"model": att.model_id, "prompt_format": att.prompt_format, "transcoders": att.transcoders.checksum(),
                "attribution": {"max_feature_nodes": max_feature_nodes, "step_target": step_target}}
    clf.meta_["provenance"] = {"tables": [str(p) for p in steps], "tasks": sorted(table["task"].unique().tolist()),
                               **made, "command": "crv " + " ".join(sys.argv[1:])}
    clf.save(out)
    typer.echo(f"trained on {len(table)} steps ({int(table['faulty'].sum())} faulty) -> {out}.xgb.json, {out}.meta.json")


@app.command("intervene")
def intervene_cmd(
    data: list[Path] = typer.Option(..., help="Labelled JSONL record file(s) (arith / bool)."),
    classifier: Optional[Path] = typer.Option(None, help="Verifier (<path>.xgb.json + <path>.meta.json; default: the shipped one)."),
    run_dir: Path = typer.Option(Path("runs/interventions"), help="interventions.json / .md go here."),
    model: Optional[Path] = typer.Option(None, help="Model directory (default: the shipped reasoner; `crv import-model` makes one from GGUF / HF)."),
    prompt_format: Optional[str] = typer.Option(None, help="Prompt format: plain or chat (default: the model's own)."),
    transcoders: Optional[Path] = typer.Option(None, help="Transcoder directory (default: the shipped set)."),
    max_feature_nodes: Optional[int] = typer.Option(None, help="Feature-node cap of the graphs (default: the verifier's training setting)."),
    edits: int = typer.Option(3, help="Features edited per arm (--k is the TopK size everywhere else)."),
    factor: float = typer.Option(0.0, help="The edit: the chosen features' activations at the suspect position times this (0: clamp)."),
    rule: str = typer.Option("logit", help="Primary selection rule: logit, fingerprint or anomalous (all three are compared)."),
    locate: str = typer.Option("uncertain", help="Suspect position: uncertain (no labels) or oracle (first wrong character)."),
    threshold: float = typer.Option(0.5, help="p_faulty at or above which the verifier flags a step."),
    max_faulty: Optional[int] = typer.Option(None, help="Flagged faulty steps to try per task (default: all)."),
    harm_steps: Optional[int] = typer.Option(None, help="Correct steps to test for harm (default: as many as flagged faulty)."),
    seed: int = typer.Option(0),
    threads: int = THREADS_OPTION,
) -> None:
    """Correct flagged faulty steps by editing the features a rule selects, against matched controls (dose-response,
    three selection rules, harm on correct steps, problem-bootstrap intervals)."""
    _set_threads(threads)

    from crv.attribution.engine import AttributionConfig
    from crv.classify.model import DEFAULT_CLASSIFIER, StepClassifier
    from crv.interventions.experiment import InterventionConfig, format_example, markdown, run_experiment, write_results
    from crv.tasks.schema import read_records

    try:
        cfg = InterventionConfig(k=edits, factor=factor, rule=rule, locate=locate, threshold=threshold,
                                 max_faulty=max_faulty, harm_steps=harm_steps, seed=seed)
        clf = StepClassifier.load(classifier or DEFAULT_CLASSIFIER)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from e
    records = [r for path in data for r in read_records(path)]
    if max_feature_nodes is None:
        max_feature_nodes = clf.graph_settings()["max_feature_nodes"]
    att = _attributor(model, transcoders, AttributionConfig(max_feature_nodes=max_feature_nodes or None), prompt_format)
    results = run_experiment(att, clf, records, cfg)
    files = write_results(results, run_dir, "crv " + " ".join(sys.argv[1:]))
    typer.echo("\n" + markdown(results))
    for t in results.tasks.values():
        for ex in t.examples[:1]:
            typer.echo("\n" + format_example(ex))
    typer.echo("\nwrote " + ", ".join(str(f) for f in files.values()))


@app.command("serve")
def serve_cmd(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (beyond loopback an API key is required)."),
    port: int = typer.Option(8000),
    model: Optional[Path] = typer.Option(None, help="Model directory (default: the shipped reasoner; `crv import-model` makes one from GGUF / HF)."),
    prompt_format: Optional[str] = typer.Option(None, help="Prompt format: plain or chat (default: the model's own)."),
    transcoders: Optional[Path] = typer.Option(None, help="Transcoder directory (default: the shipped set)."),
    classifier: Optional[Path] = typer.Option(None, help="Verifier (default: the shipped one)."),
    threshold: float = typer.Option(0.5, help="p_faulty at or above which a step is flagged."),
    max_queue: int = typer.Option(16, help="Requests that may wait for the model (429 beyond)."),
    max_wait: float = typer.Option(2.0, help="Seconds an accepted request may wait for the model (503 + Retry-After beyond)."),
    threads: int = typer.Option(1, help="torch threads of the model thread (1: on a 2-core machine shared with another "
                                        "busy process, 2 threads took 14.9 s for a 4-step verify, 1 thread 82 ms/step)."),
    max_feature_nodes: Optional[int] = typer.Option(None, help="Feature-node cap (default: the classifier's training setting; 0: uncapped)."),
    device: str = DEVICE_OPTION,
    dtype: str = DTYPE_OPTION,
    batch_size: int = BATCH_OPTION,
    k: Optional[int] = K_OPTION,
) -> None:
    """Serve the step-verification API and trace viewer (API key from $CRV_API_KEY)."""
    import os
    import signal

    import torch
    import uvicorn

    from crv.api.app import API_KEY_ENV, ServiceSettings, check_bind, create_app
    from crv.api.verifier import Verifier

    key = os.environ.get(API_KEY_ENV) or None
    try:
        check_bind(host, key)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--host") from e
    torch.set_num_threads(1)  # the model runs on its own thread (with `threads`); see crv/api/app.py
    verifier = _load(lambda: Verifier.load(model, transcoders, classifier, threshold, prompt_format, device=device,
                                           dtype=_dtype(dtype), k=k, max_feature_nodes=max_feature_nodes, batch_size=batch_size))
    typer.echo(f"crv serve: {verifier.att.model_id}, classifier {verifier.classifier_id}; http://{host}:{port}/ (docs at /docs)")
    # uvicorn shuts down gracefully on SIGTERM (stops accepting, answers what is in flight, stops the model thread),
    # then re-raises the signal to the handler it found: a no-op here, so a graceful stop exits 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(create_app(verifier, ServiceSettings(max_queue=max_queue, max_wait_s=max_wait, api_key=key,
                                                       torch_threads=threads)),
                host=host, port=port, log_level="warning", timeout_graceful_shutdown=30)
    typer.echo("crv serve: stopped (requests in flight were answered)")


@app.command("verify")
def verify_cmd(
    data: Path = typer.Argument(..., help="JSONL records (or objects with task, question, steps)."),
    server: str = typer.Option(..., help="URL of a running `crv serve`."),
    out: Optional[Path] = typer.Option(None, help="Write one JSON line of verdicts per trace here (default: stdout)."),
    include_graph: bool = typer.Option(False, help="Also return each step's pruned graph."),
) -> None:
    """Verify every trace of a file against a crv server (API key from $CRV_API_KEY)."""
    import json
    import os

    from tqdm.auto import tqdm

    from crv.client import Client, ServiceError

    if not data.is_file():
        raise typer.BadParameter(f"no such file: {data}")
    lines = [l for l in data.read_text().splitlines() if l.strip()]
    sink = open(out, "w") if out is not None else None
    n_steps = n_flagged = 0
    with Client(server, os.environ.get("CRV_API_KEY")) as client:
        for i, line in enumerate(tqdm(lines, desc="verify", unit="trace", disable=sink is None)):
            try:
                obj = json.loads(line)
                steps = client.verify(obj["task"], obj["question"], obj["steps"], include_graph)
            except (ValueError, KeyError) as e:
                raise typer.BadParameter(f"{data}:{i + 1}: not a trace ({e})") from e
            except ServiceError as e:
                raise typer.BadParameter(f"{data}:{i + 1}: the server refused it: {e}") from e
            n_steps += len(steps)
            n_flagged += sum(s["flagged"] for s in steps)
            row = json.dumps({"problem_id": obj.get("problem_id"), "steps": steps})
            if sink is not None:
                sink.write(row + "\n")
            else:
                typer.echo(row)
    if sink is not None:
        sink.close()
        typer.echo(f"{len(lines)} traces, {n_steps} steps, {n_flagged} flagged -> {out}")


@app.command("demo")
def demo_cmd(
    count: int = typer.Option(30, help="Arithmetic problems per n (5, 7, 10); half as many boolean n=10 problems."),
    out_dir: Path = typer.Option(Path("runs/demo"), help="Where the demo writes its data and report."),
    max_feature_nodes: int = typer.Option(512, help="Feature-node cap of the graphs (the paper's is 4096; 0: uncapped, as everywhere)."),
    seed: int = typer.Option(7),
    threads: int = typer.Option(2, help="torch threads (on a busy shared machine, 1 keeps times steady)."),
    interventions: int = typer.Option(10, help="Flagged faulty steps to try interventions on (and as many correct steps for harm)."),
) -> None:
    """The main job on the embedded default: solve fresh problems, label steps, verify them with CRV vs baselines."""
    _set_threads(threads)

    from crv.attribution.attributor import Attributor
    from crv.attribution.engine import AttributionConfig
    from crv.evaluate.methods import EvalConfig
    from crv.evaluate.pipeline import run_evaluation
    from crv.reasoner.generate import generate_records
    import dataclasses

    from crv.classify.model import DEFAULT_CLASSIFIER, StepClassifier
    from crv.interventions.experiment import InterventionConfig, format_example, markdown, run_experiment, write_results
    from crv.lm.load import DEFAULT_MODEL_DIR
    from crv.tasks.schema import write_records
    from crv.tasks.stats import format_table, summarize_by

    att = Attributor.load(config=AttributionConfig(max_feature_nodes=max_feature_nodes or None))
    typer.echo(f"reasoner: {DEFAULT_MODEL_DIR} ({sum(p.numel() for p in att.model.parameters()):,} parameters)")
    # boolean errors are rare with the shipped reasoner (first-error rate ~5% at n=10), so few boolean traces
    problems = _problems(["arith"], [5, 7, 10], count, seed) + _problems(["bool"], [10], max(1, count // 2), seed)
    records = generate_records(att.model, att.encoder, problems)
    write_records(records, out_dir / "records.jsonl")
    example = next((r for r in records if 0 in r.labels), None)
    if example is not None:
        typer.echo(f"\nA faulty trace ({example.problem_id}):\nQ: {example.question}")
        for step, label in zip(example.steps, example.labels):
            typer.echo(f"  [{'ok' if label else 'FAULTY'}] {step}")
    typer.echo("\n" + format_table(summarize_by(records)) + "\n")
    results = run_evaluation(records, att, out_dir, Path("graphs") / "demo", EvalConfig(n_boot=200),
                             command="crv demo " + " ".join(sys.argv[2:]))
    typer.echo("\nStep verification on held-out problems (percent; faulty = positive class):\n")
    typer.echo(results.extra["markdown"])
    typer.echo("\nwrote " + ", ".join(results.extra["files"].values()))

    # interventions: the shipped verifier flags faulty steps; edit the features its graph rests on
    clf = StepClassifier.load(DEFAULT_CLASSIFIER)
    cap = clf.graph_settings()["max_feature_nodes"]
    iatt = dataclasses.replace(att, config=AttributionConfig(max_feature_nodes=cap))
    arith = [r for r in records if r.task == "arith"]
    inter = run_experiment(iatt, clf, arith, InterventionConfig(max_faulty=interventions, harm_steps=interventions,
                                                                doses=(0.0, -1.0)))
    files = write_results(inter, out_dir / "interventions", "crv demo " + " ".join(sys.argv[2:]))
    typer.echo(f"\nInterventions on up to {interventions} flagged faulty arithmetic steps (percent):\n")
    typer.echo(markdown(inter))
    examples = inter.tasks["arith"].examples if "arith" in inter.tasks else []
    typer.echo("\n" + (f"A worked correction:\n{format_example(examples[0])}" if examples else
                       "No flagged step was corrected in this demo run (see the rates above)."))
    typer.echo("\nwrote " + ", ".join(str(f) for f in files.values()))


def main() -> None:
    """The ``crv`` entry point: an expected error (bad input, a missing file, a model or transcoder set crv cannot
    use) is one line on stderr naming the fix, exit status 2; ``CRV_DEBUG=1`` shows the traceback instead."""
    import os

    from crv.errors import USER_ERRORS

    try:
        app()
    except USER_ERRORS as e:
        if os.environ.get("CRV_DEBUG"):
            raise
        typer.echo(f"crv: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":  # pragma: no cover
    main()
