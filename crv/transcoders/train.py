"""Training per-layer TopK transcoders on a reasoner's MLPs (all layers at once)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from crv.lm.encode import TraceEncoder

from crv.transcoders.activations import ActivationPool, ActivationStream
from crv.transcoders.io import save_transcoders
from crv.transcoders.transcoder import TopKTranscoder, TranscoderShape, topk_activation


@dataclass(frozen=True)
class TranscoderTrainConfig:
    """Everything that defines a transcoder training run."""

    expansion: int = 8  # d_transcoder = expansion * d_model (wider leaves dead features on the tiny reasoner; see README)
    k: int = 16
    steps: int = 2000
    batch_tokens: int = 4096
    buffer_tokens: int = 65_536
    lr: float = 1e-3
    warmup: int = 50
    aux_k: int = 256  # dead features used by the auxiliary loss
    aux_tokens: int = 1024  # tokens of each batch the auxiliary loss looks at (keeps it cheap)
    aux_coef: float = 1 / 32
    dead_tokens: int = 50_000  # a feature is dead after this many tokens without firing (about the held-out benchmark's size)
    resample_every: int = 100  # steps between dead-feature resamplings (0: never)
    resample_until: float = 0.7  # fraction of training after which features are left alone
    seed: int = 0
    pool_tokens: int = 0  # > 0: harvest this many tokens once and train on them in epochs (ActivationPool); 0: fresh traces


def normalized_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error divided by the target's variance (the FVU of a batch)."""
    var = (target - target.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)
    return (pred - target).pow(2).sum(-1).mean() / var


@torch.no_grad()
def resample_dead(
    tc: TopKTranscoder, dead: torch.Tensor, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Re-initialise the ``dead`` features on tokens the transcoder reconstructs worst.

    Tokens are drawn with probability proportional to their squared reconstruction
    error. Each dead feature gets the drawn token's residual (``y - recon``, unit norm)
    as its decoder row, and an encoder row along the token's input, scaled so that its
    pre-activation there is 1.25 times the token's current k-th largest one: the feature
    enters the TopK on that kind of input and starts to learn at once (a TopK variant
    of Anthropic's resampling). Returns the indices of the resampled features.
    """
    idx = dead.nonzero().flatten()
    if idx.numel() == 0:
        return idx
    pre = tc.pre_activations(x)
    kth = pre.topk(tc.k, dim=-1).values[:, -1].clamp_min(1e-3)
    resid = y - tc.decode(topk_activation(pre, tc.k))
    err = resid.pow(2).sum(-1)
    tokens = torch.multinomial(err / err.sum(), idx.numel(), replacement=idx.numel() > x.shape[0], generator=generator)
    tc.W_dec[idx] = resid[tokens] / resid[tokens].norm(dim=-1, keepdim=True).clamp_min(1e-8)
    xs = x[tokens]
    tc.W_enc[idx] = xs * (1.25 * kth[tokens] / xs.pow(2).sum(-1).clamp_min(1e-8)).unsqueeze(-1)
    tc.b_enc[idx] = 0.0
    return idx


class LayerTrainer:
    def __init__(self, tc: TopKTranscoder, cfg: TranscoderTrainConfig):
        self.tc, self.cfg = tc, cfg
        self.opt = torch.optim.Adam(tc.parameters(), lr=cfg.lr, betas=(0.9, 0.999))
        self.since_fired = torch.zeros(tc.shape.d_transcoder, dtype=torch.long)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1000 * tc.layer)

    def resample(self, x: torch.Tensor, y: torch.Tensor) -> int:
        """Resample the features dead right now; their optimiser state restarts too."""
        idx = resample_dead(self.tc, self.since_fired > self.cfg.dead_tokens, x, y, self.gen)
        if idx.numel():
            for p in (self.tc.W_enc, self.tc.W_dec, self.tc.b_enc):
                state = self.opt.state.get(p, {})
                for key in ("exp_avg", "exp_avg_sq"):
                    if key in state:
                        state[key][idx] = 0.0
            self.since_fired[idx] = 0
        return int(idx.numel())

    def _decode(self, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.embedding_bag(idx, self.tc.W_dec, per_sample_weights=vals, mode="sum")

    def step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> tuple[float, float]:
        tc = self.tc
        # every pre-activation is needed to choose the features; the gradient reaches only the chosen ones
        # (``gather``'s backward scatters into a dense [tokens, features] gradient: two dense matrix products,
        # ~6x faster on a CPU than gathering a [tokens, k, d_model] block of encoder rows)
        pre = tc.pre_activations(x)
        idx = pre.detach().topk(tc.k, dim=-1).indices
        vals = torch.relu(pre.gather(1, idx))
        recon = self._decode(idx, vals) + tc.b_dec
        loss = normalized_mse(recon, y)
        fired = torch.zeros_like(self.since_fired, dtype=torch.bool)
        fired[idx[vals.detach() > 0]] = True
        self.since_fired += x.shape[0]
        self.since_fired[fired] = 0
        dead = self.since_fired > self.cfg.dead_tokens
        aux = torch.zeros(())
        n_dead = int(dead.sum())
        if n_dead > 0:
            m = min(self.cfg.aux_tokens, x.shape[0])
            with torch.no_grad():
                a_idx = pre[:m].masked_fill(~dead, float("-inf")).topk(min(self.cfg.aux_k, n_dead), dim=-1).indices
            a_recon = self._decode(a_idx, torch.relu(pre[:m].gather(1, a_idx)))
            aux = torch.nan_to_num(normalized_mse(a_recon, (y[:m] - recon[:m]).detach()))
        total = loss + self.cfg.aux_coef * aux
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(tc.parameters(), 1.0)
        self.opt.step()
        tc.normalize_decoder()
        return loss.item(), n_dead / tc.shape.d_transcoder


def save_checkpoint(trainers: list[LayerTrainer], step: int, log: list[dict], seconds: float, cfg: Any,
                     where: Path) -> None:
    """Every layer's weights, Adam moments, dead-feature counters and generator state at ``step`` (atomic)."""
    import json
    import os

    from safetensors.torch import save_file

    where.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for i, t in enumerate(trainers):
        for name, p in t.tc.named_parameters():
            tensors[f"{i}.{name}"] = p.detach()
            for key, v in t.opt.state.get(p, {}).items():
                tensors[f"{i}.{name}.{key}"] = v if torch.is_tensor(v) else torch.tensor(v)
        tensors[f"{i}.since_fired"] = t.since_fired
        tensors[f"{i}.gen"] = t.gen.get_state()
    tmp = where / f".state-{os.getpid()}.tmp"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, where / f"state-{step}.safetensors")
    meta = {"step": step, "seconds": round(seconds, 1), "config": asdict(cfg), "log": log}
    (where / ".meta.tmp").write_text(json.dumps(meta) + "\n")
    os.replace(where / ".meta.tmp", where / "checkpoint.json")  # the commit point
    for old in where.glob("state-*.safetensors"):
        if old.name != f"state-{step}.safetensors":
            old.unlink(missing_ok=True)


def load_checkpoint(trainers: list[LayerTrainer], cfg: Any, where: Path) -> tuple[int, list[dict], float]:
    """Restore a checkpoint written by :func:`save_checkpoint` with the same dataclass ``cfg`` (its ``steps`` may
    differ); returns (next step, log, seconds so far)."""
    import json

    from safetensors.torch import load_file

    meta = json.loads((where / "checkpoint.json").read_text())
    saved = {k: v for k, v in meta["config"].items() if k != "steps"}
    asked = {k: v for k, v in asdict(cfg).items() if k != "steps"}
    if saved != asked:
        diff = {k: (saved.get(k), v) for k, v in asked.items() if saved.get(k) != v}
        raise ValueError(f"{where}: checkpoint of other settings {diff} (saved, asked); use another --out or the saved settings")
    tensors = load_file(str(where / f"state-{meta['step']}.safetensors"))
    with torch.no_grad():
        for i, t in enumerate(trainers):
            for name, p in t.tc.named_parameters():
                p.copy_(tensors[f"{i}.{name}"])
                st = {key.rsplit(".", 1)[1]: v for key, v in tensors.items() if key.startswith(f"{i}.{name}.")}
                if st:
                    t.opt.state[p] = st
            t.since_fired.copy_(tensors[f"{i}.since_fired"])
            t.gen.set_state(tensors[f"{i}.gen"])
    return int(meta["step"]) + 1, list(meta["log"]), float(meta["seconds"])


def train_transcoders(
    model: PreTrainedModel,
    encoder: TraceEncoder,
    cfg: TranscoderTrainConfig,
    out_dir: str | Path | None = None,
    model_name: str = "crv-reasoner",
    progress: bool = True,
    command: str | None = None,
    resume: bool = False,
    checkpoint_seconds: float = 300.0,
) -> list[TopKTranscoder]:
    """Train one TopK transcoder per layer on activations streamed from CoT traces in ``encoder``'s prompt format.

    With ``out_dir``, a checkpoint is kept in ``out_dir/checkpoint`` every ``checkpoint_seconds`` (weights, Adam
    moments, dead-feature counters, generators); ``resume`` continues it. The activation stream of a resumed run
    restarts from a seed derived from the step (fresh traces, not the ones the stopped run would have drawn), so a
    resumed run sees the same distribution, not the same batches.
    """
    torch.manual_seed(cfg.seed)
    d_model, n_layers = model.config.hidden_size, model.config.num_hidden_layers
    shape = TranscoderShape(d_model, cfg.expansion * d_model, cfg.k)
    ck = Path(out_dir) / "checkpoint" if out_dir is not None else None
    resuming = resume and ck is not None and (ck / "checkpoint.json").is_file()
    pool = ActivationPool(model, encoder, cfg.batch_tokens, cfg.pool_tokens, cfg.seed, progress) if cfg.pool_tokens else None
    stream = None if pool else ActivationStream(model, encoder, cfg.batch_tokens, cfg.buffer_tokens, seed=cfg.seed)
    x0, y0 = pool.batch(0) if pool else next(stream)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(cfg.seed)
    trainers = []
    for layer in range(n_layers):
        tc = TopKTranscoder(shape, layer)
        tc.reset_parameters(gen)
        with torch.no_grad():
            tc.b_dec.copy_(y0[layer].mean(0))
            # scale the encoder so that initial reconstructions have about the right size
            feats = tc.encode(x0[layer])
            recon = feats @ tc.W_dec
            scale = (y0[layer] - y0[layer].mean(0)).norm(dim=-1).mean() / recon.norm(dim=-1).mean().clamp_min(1e-8)
            tc.W_enc.mul_(scale)
        trainers.append(LayerTrainer(tc, cfg))
    log: list[dict] = []
    first, elapsed = 0, 0.0
    if resuming:
        first, log, elapsed = load_checkpoint(trainers, cfg, ck)  # type: ignore[arg-type]
        if pool is None:
            stream = ActivationStream(model, encoder, cfg.batch_tokens, cfg.buffer_tokens, seed=cfg.seed + 7919 * first)
    start = time.time() - elapsed
    last_ck = time.time()
    bar = tqdm(range(first, cfg.steps), desc="train transcoders", disable=not progress, initial=first, total=cfg.steps)
    for step in bar:
        x, y = (x0, y0) if step == 0 else pool.batch(step) if pool else next(stream)  # type: ignore[arg-type]
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup)
        if step > 0.8 * cfg.steps:  # linear decay over the last 20%
            lr *= max(0.0, (cfg.steps - step) / (0.2 * cfg.steps))
        stats = [t.step(x[i], y[i], lr) for i, t in enumerate(trainers)]
        if cfg.resample_every and step > 0 and step % cfg.resample_every == 0 and step < cfg.resample_until * cfg.steps:
            resampled = [t.resample(x[i], y[i]) for i, t in enumerate(trainers)]
            log.append({"step": step, "resampled": resampled})
        if step % 20 == 0 or step == cfg.steps - 1:
            log.append({"step": step, "fvu": [round(s[0], 4) for s in stats], "dead": [round(s[1], 4) for s in stats],
                        "seconds": round(time.time() - start, 1)})
            bar.set_postfix(fvu=" ".join(f"{s[0]:.3f}" for s in stats))
        if ck is not None and (time.time() - last_ck >= checkpoint_seconds or step == cfg.steps - 1):
            save_checkpoint(trainers, step, log, time.time() - start, cfg, ck)
            last_ck = time.time()
    transcoders = [t.tc.requires_grad_(False).eval() for t in trainers]
    if out_dir is not None:
        extra = {"train_config": asdict(cfg), "prompt_format": encoder.format.name, "command": command, "seconds": round(time.time() - start, 1), "log_tail": log[-3:]}
        save_transcoders(transcoders, out_dir, model_name, extra=extra)
    return transcoders
