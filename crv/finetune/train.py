"""``crv finetune``: LoRA fine-tuning of a supported model on crv's chain of thought, resumable exactly.

    run = FinetuneRun(FinetuneConfig(steps=600), model_dir="runs/smollm2", out="runs/smollm2-ft")
    run.train()          # resumes from out/finetune/checkpoint if there is one
    run.export()         # out/: merged model crv reads like any other; out/adapter/: the LoRA adapter

The objective is the mean next-token cross-entropy over assistant tokens only (:mod:`crv.finetune.data`);
logits are computed at those positions alone (``lm_head`` on the selected hidden states), which saves the
[B, T, vocab] product the prompt positions would cost. The optimiser is AdamW on the LoRA weights with a
linear warm-up to a constant rate, so a run can be extended (``--steps`` raised) without changing the steps
already taken. A checkpoint (LoRA weights, AdamW moments, step counters; safetensors + JSON, written
atomically) is kept every ``checkpoint_seconds``; batches are a pure function of ``(seed, step)`` and LoRA
dropout is 0, so a resumed run equals an uninterrupted one bit for bit on the same machine and threads.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from crv.digest import sha256_file
from crv.digest import record_digest
from crv.finetune.data import IGNORE, Curriculum, collate, make_example
from crv.lm.encode import TraceEncoder
from crv.lm.load import CRV_MODEL_FILE, load_model, model_notes, stop_token_ids
from crv.lm.prompt import SHORT_CHAT, make_format

#: the linear layers LoRA adapts in a Llama/Qwen decoder layer
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that defines a fine-tuning run (saved beside it; a resumed run must match)."""

    tasks: tuple[str, ...] = ("arith", "bool")
    ns: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    steps: int = 600
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 20
    weight_decay: float = 0.0
    lora_rank: int = 16
    lora_alpha: int = 32
    seed: int = 0
    checkpoint_seconds: float = 180.0
    eval_every: int = 100  # steps between held-out accuracy checks (0: only at the end)
    eval_problems: int = 16  # per task, at the middle n

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "FinetuneConfig":
        d = dict(d)
        for key in ("tasks", "ns"):
            if key in d:
                d[key] = tuple(d[key])
        return cls(**d)

    def defining(self) -> dict:
        """The settings a resumed run must share (the length, checkpoint and eval cadence may change)."""
        d = self.to_dict()
        for key in ("steps", "checkpoint_seconds", "eval_every", "eval_problems"):
            d.pop(key)
        return d


@dataclass
class Progress:
    """Where a run stands (saved in each checkpoint)."""

    step: int = 0
    tokens_seen: int = 0
    loss_tokens: int = 0
    seconds: float = 0.0
    history: list = field(default_factory=list)  # {"step", "loss", "lr", "seconds"} per logged step
    evals: list = field(default_factory=list)  # {"step", task: step accuracy}


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def _atomic_text(text: str, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class FinetuneRun:
    """One fine-tuning run of ``model_dir`` into ``out`` (see the module docstring)."""

    def __init__(self, config: FinetuneConfig, model_dir: str | Path, out: str | Path, device: str = "cpu") -> None:
        from peft import LoraConfig, get_peft_model  # the field's LoRA; imported here so crv loads without it

        self.config, self.model_dir, self.out, self.device = config, Path(model_dir), Path(out), device
        self.work = self.out / "finetune"
        base, self.tokenizer = load_model(self.model_dir, device=device)
        base.train()
        self.encoder = TraceEncoder(self.tokenizer, make_format("chat", self.tokenizer, SHORT_CHAT))
        stops = stop_token_ids(base, self.tokenizer)
        self.end_id = self.tokenizer.eos_token_id if self.tokenizer.eos_token_id in stops else min(stops)
        torch.manual_seed(config.seed)  # LoRA's A matrices are drawn from torch's generator
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules=list(LORA_TARGETS), bias="none", task_type="CAUSAL_LM")
        self.model = get_peft_model(base, lora)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.optimizer = torch.optim.AdamW(self.params.values(), lr=config.lr, weight_decay=config.weight_decay)
        self.progress = Progress()
        self.curriculum = Curriculum(config.tasks, config.ns)

    # ----------------------------------------------------------------------------- state

    def lr_at(self, step: int) -> float:
        """Linear warm-up over ``warmup`` steps, then constant."""
        return self.config.lr * min(1.0, (step + 1) / max(1, self.config.warmup))

    def save_checkpoint(self) -> None:
        """LoRA weights, AdamW state and progress under ``out/finetune/checkpoint`` (atomic, files in order)."""
        ck = self.work / "checkpoint"
        ck.mkdir(parents=True, exist_ok=True)
        opt: dict[str, torch.Tensor] = {}
        for name, p in self.params.items():
            st = self.optimizer.state.get(p, {})
            for key, value in st.items():
                opt[f"{name}::{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        tag = self.progress.step
        _atomic_save({n: p for n, p in self.params.items()}, ck / f"lora-{tag}.safetensors")
        _atomic_save(opt or {"empty": torch.zeros(1)}, ck / f"optimizer-{tag}.safetensors")
        state = {"config": self.config.to_dict(), "progress": asdict(self.progress), "tag": tag}
        _atomic_text(json.dumps(state, indent=1) + "\n", ck / "state.json")  # the commit point
        for old in ck.glob("*.safetensors"):
            if not old.name.endswith(f"-{tag}.safetensors"):
                old.unlink(missing_ok=True)

    def load_checkpoint(self) -> bool:
        """Resume from ``out/finetune/checkpoint`` if present; a checkpoint of other settings is refused."""
        ck = self.work / "checkpoint"
        if not (ck / "state.json").is_file():
            return False
        state = json.loads((ck / "state.json").read_text())
        saved = FinetuneConfig.from_dict(state["config"]).defining()
        if saved != self.config.defining():
            diff = {k: (saved.get(k), v) for k, v in self.config.defining().items() if saved.get(k) != v}
            raise ValueError(f"{ck}: checkpoint of other settings {diff} (saved, asked); use another --out "
                             "or the saved settings")
        tag = state["tag"]
        lora = load_file(str(ck / f"lora-{tag}.safetensors"))
        opt = load_file(str(ck / f"optimizer-{tag}.safetensors"))
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(lora[name])
        for name, p in self.params.items():
            st = {key.split("::", 1)[1]: v.to(p.device) for key, v in opt.items() if key.split("::", 1)[0] == name}
            if st:
                self.optimizer.state[p] = st
        self.progress = Progress(**state["progress"])
        return True

    # ----------------------------------------------------------------------------- training

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Mean cross-entropy of the assistant tokens, and their count (logits at those positions only)."""
        base = self.model.get_base_model()
        ids, mask, labels = (batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels"))
        hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, d]
        target = labels[:, 1:]
        keep = target != IGNORE
        logits = base.lm_head(hidden[:, :-1][keep]).float()  # [N, V]
        return torch.nn.functional.cross_entropy(logits, target[keep]), int(keep.sum())

    def train_step(self) -> float:
        """One optimiser step on the batch of the current step; returns its loss."""
        step = self.progress.step
        problems = self.curriculum.problems(self.config.seed, step, self.config.batch_size)
        batch = collate([make_example(self.encoder, p, self.end_id) for p in problems], self.tokenizer.pad_token_id)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(step)
        loss, n = self.loss(batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.progress.step += 1
        self.progress.tokens_seen += int(batch["attention_mask"].sum())
        self.progress.loss_tokens += n
        return loss.item()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Held-out step accuracy per task (greedy, fresh problems at the middle n, crv's checker)."""
        from crv.reasoner.generate import GenerationConfig, generate_records
        from crv.tasks.cot import generate_problems

        base = self.model.get_base_model()
        base.eval()
        n = self.config.ns[len(self.config.ns) // 2]
        out = {}
        for task in self.config.tasks:
            probs = generate_problems(task, n, self.config.eval_problems, seed=10_007)  # type: ignore[arg-type]
            recs = generate_records(base, self.encoder, probs, GenerationConfig(batch_size=16), progress=False)
            labels = [lab for r in recs for lab in r.labels]
            out[task] = sum(labels) / len(labels) if labels else 0.0
        base.train()
        return out

    def train(self, resume: bool = True, progress: bool = True) -> Progress:
        """Train up to ``config.steps`` (from the checkpoint when ``resume``), checkpointing as it goes."""
        self.work.mkdir(parents=True, exist_ok=True)
        if resume:
            self.load_checkpoint()
        elif (self.work / "checkpoint" / "state.json").is_file():
            raise ValueError(f"{self.work}/checkpoint exists; pass --resume to continue it or choose another --out")
        cfg, pr = self.config, self.progress
        bar = tqdm(total=cfg.steps, initial=pr.step, desc="finetune", unit="step", disable=not progress)
        last_ck, t0 = time.monotonic(), time.monotonic()
        start_seconds = pr.seconds
        while pr.step < cfg.steps:
            loss = self.train_step()
            pr.seconds = start_seconds + time.monotonic() - t0
            pr.history.append({"step": pr.step, "loss": round(loss, 5), "lr": self.lr_at(pr.step - 1),
                               "seconds": round(pr.seconds, 1)})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if cfg.eval_every and pr.step % cfg.eval_every == 0:
                acc = self.evaluate()
                pr.evals.append({"step": pr.step, **acc})
                bar.write(f"step {pr.step}: held-out step accuracy " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()))
            if time.monotonic() - last_ck >= cfg.checkpoint_seconds or pr.step == cfg.steps:
                self.save_checkpoint()
                last_ck = time.monotonic()
        bar.close()
        return pr

    # ----------------------------------------------------------------------------- export

    def export(self, command: str = "") -> Path:
        """Write the adapter (``out/adapter``, with ``crv_finetune.json``: base model and its sha256, LoRA
        config, progress, command, the merged weights' sha256) and the merged model (``out``)."""
        adapter = self.out / "adapter"
        self.model.save_pretrained(str(adapter), safe_serialization=True)
        out = merge_adapter(self.model_dir, adapter, self.out)
        notes = model_notes(self.model_dir)
        source = Path(notes["source"]) if notes.get("source") else None
        manifest = {
            "base_model": str(self.model_dir.resolve()), "base_notes": notes,
            "base_source_sha256": sha256_file(source) if source is not None and source.is_file() else None,
            "config": self.config.to_dict(),
            "progress": {k: v for k, v in asdict(self.progress).items() if k != "history"},
            "device": str(self.device), "command": command,
            "merged_sha256": sha256_file(out / "model.safetensors"),
            "rebuild": "crv merge-adapter --base <crv import-model of the base source> --adapter <this folder> --out DIR",
        }
        _atomic_text(json.dumps(manifest, indent=1) + "\n", adapter / "crv_finetune.json")
        return out


def merge_adapter(base_dir: str | Path, adapter_dir: str | Path, out: str | Path) -> Path:
    """The base model with the adapter's LoRA weights merged in, written to ``out`` as a crv model directory
    (safetensors, tokenizer, ``crv_model.json`` with the short chat prompt it was trained on). Deterministic:
    the same base and adapter give the same bytes."""
    from peft import PeftModel

    base_dir, out = Path(base_dir), Path(out)
    base, tok = load_model(base_dir)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), safe_serialization=True)
    record_digest(*sorted(out.glob("*.safetensors")))
    tok.padding_side = "right"
    tok.save_pretrained(str(out), legacy_format=False)
    notes = {**model_notes(base_dir), "prompt_format": "chat", "chat": SHORT_CHAT,
             "finetuned_from": str(base_dir.resolve()), "adapter": str(Path(adapter_dir).resolve())}
    _atomic_text(json.dumps(notes, indent=2) + "\n", out / CRV_MODEL_FILE)
    return out

