"""Training the reasoner on freshly generated canonical chains of thought."""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from crv.lm.encode import encode_text
from crv.lm.load import load_model
from crv.reasoner.model import ModelConfig, build_model, save_reasoner
from crv.reasoner.tokenizer import build_tokenizer
from crv.tasks.cot import TASKS, GeneratorConfig, make_problem


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a reasoner training run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    iterations: int = 2000
    tokens_per_batch: int = 16_384  # padded tokens per optimiser step
    lr: float = 2e-3
    min_lr_ratio: float = 0.05
    warmup: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    n_min: int = 1
    n_max: int = 10
    task_weights: tuple[tuple[str, float], ...] = (("arith", 0.5), ("bool", 0.5))
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    seed: int = 0
    checkpoint_every: int = 0  # 0: only the final model
    init_from: str | None = None  # continue from this reasoner directory instead of a fresh init
    threads: int = 0  # 0: leave torch's default

    def __post_init__(self) -> None:
        if not 1 <= self.n_min <= self.n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got n_min={self.n_min}, n_max={self.n_max}")
        if self.iterations < 1 or self.tokens_per_batch < 1:
            raise ValueError("iterations and tokens_per_batch must be positive")
        weights = [w for _, w in self.task_weights]
        if any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"task weights must be >= 0 with a positive sum, got {self.task_weights}")


@dataclass
class Example:
    ids: list[int]
    n_prompt: int  # tokens (incl. BOS) that are conditioning, not trained on


def encode_example(tokenizer: PreTrainedTokenizerFast, prompt: str, completion: str) -> Example:
    """BOS + prompt + completion + EOS, with the prompt length for loss masking."""
    p = encode_text(tokenizer, prompt)
    c = encode_text(tokenizer, completion, add_bos=False) + [tokenizer.eos_token_id]
    return Example(p + c, len(p))


class BatchStream:
    """Endless length-bucketed batches of fresh problems under a padded-token budget."""

    def __init__(self, cfg: TrainConfig, tokenizer: PreTrainedTokenizerFast, pool: int = 2048):
        self.cfg, self.tok, self.pool = cfg, tokenizer, pool
        self.rng = random.Random(cfg.seed)
        self.queue: list[list[Example]] = []
        self.counter = 0
        names = [t for t, _ in cfg.task_weights]
        unknown = set(names) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown task(s) in task_weights: {sorted(unknown)}")
        self.tasks, self.weights = names, [w for _, w in cfg.task_weights]

    def _refill(self) -> None:
        examples = []
        for _ in range(self.pool):
            task = self.rng.choices(self.tasks, self.weights)[0]
            n = self.rng.randint(self.cfg.n_min, self.cfg.n_max)
            prob = make_problem(task, n, self.rng, f"train-{self.counter}", self.cfg.generator)  # type: ignore[arg-type]
            self.counter += 1
            examples.append(encode_example(self.tok, prob.prompt, prob.completion))
        examples.sort(key=lambda e: len(e.ids))
        batches, cur = [], []
        for ex in examples:
            if cur and len(ex.ids) * (len(cur) + 1) > self.cfg.tokens_per_batch:
                batches.append(cur)
                cur = []
            cur.append(ex)
        if cur:
            batches.append(cur)
        self.rng.shuffle(batches)
        self.queue.extend(batches)

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.queue:
            self._refill()
        return collate(self.queue.pop(), self.tok.pad_token_id)


def collate(batch: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and a mask of the positions whose next token is trained on."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        mask[i, e.n_prompt - 1 : len(e.ids) - 1] = True  # predict completion tokens and EOS
    return ids, mask


def lm_loss(model: LlamaForCausalLM, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the masked positions (right padding needs no attention mask)."""
    logits = model(input_ids=ids).logits[:, :-1]
    target = ids[:, 1:]
    m = mask[:, :-1]
    return F.cross_entropy(logits[m], target[m])


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.iterations - cfg.warmup))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train_reasoner(
    cfg: TrainConfig, out_dir: str | Path, progress: bool = True, command: str | None = None
) -> LlamaForCausalLM:
    """Train a reasoner from scratch and save it (and optional checkpoints) under ``out_dir``.

    ``command`` (the command line that started the run) is recorded next to the weights.
    """
    out_dir = Path(out_dir)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.init_from:
        model, tokenizer = load_model(cfg.init_from)
    else:
        tokenizer = build_tokenizer()
        model = build_model(cfg.model, tokenizer, seed=cfg.seed)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.95),
    )
    stream = BatchStream(cfg, tokenizer)
    log: list[dict] = []
    tokens = 0
    start = time.time()
    bar = tqdm(range(cfg.iterations), desc="train reasoner", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        ids, mask = next(stream)
        loss = lm_loss(model, ids, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        tokens += ids.numel()
        if step % 10 == 0 or step == cfg.iterations - 1:
            entry = {"step": step, "loss": round(loss.item(), 5), "tokens": tokens, "seconds": round(time.time() - start, 1)}
            log.append(entry)
            bar.set_postfix(loss=f"{loss.item():.4f}", tok=f"{tokens / 1e6:.1f}M")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.iterations:
            _save(model, tokenizer, out_dir / "checkpoints" / f"step{step + 1:06d}", cfg, step + 1, log, tokens, start, command)
            model.train()
    _save(model, tokenizer, out_dir / "final", cfg, cfg.iterations, log, tokens, start, command)
    model.eval()
    return model


def _save(model, tokenizer, path: Path, cfg: TrainConfig, step: int, log: list[dict], tokens: int, start: float, command: str | None) -> None:  # type: ignore[no-untyped-def]
    model.eval()
    extra = {"command": command, "config": asdict(cfg), "step": step, "tokens": tokens, "seconds": round(time.time() - start, 1), "last": log[-1] if log else None}
    save_reasoner(model, tokenizer, path, extra)
    (path / "train_log.json").write_text(json.dumps(log) + "\n")
