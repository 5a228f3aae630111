"""Do weights alone describe a feature as its activations do? (WeightLens vs activation-based top tokens)"""

from __future__ import annotations

import torch

from crv.features.store import FeatureStore


def precision_at_k(wl: torch.Tensor, act: torch.Tensor, k: int = 5) -> torch.Tensor:
    """Per feature: the share of its top-``k`` WeightLens input tokens among its top-``k`` activation tokens,
    out of ``min(k, #activation tokens)`` (so a feature that fires on 2 token types can reach 1); NaN where
    it has no activation token. ``wl``, ``act``: ``[F, >=k]`` token ids, -1 padded."""
    w, a = wl[:, :k], act[:, :k]
    hit = ((w.unsqueeze(2) == a.unsqueeze(1)) & (a.unsqueeze(1) >= 0)).any(2).sum(1).float()
    denom = (a >= 0).sum(1).clamp(max=k).float()
    return torch.where(denom > 0, hit / denom.clamp(min=1), torch.full_like(hit, float("nan")))


def weightlens_agreement(store: FeatureStore, k: int = 5, boot: int = 2000, seed: int = 0) -> dict:
    """Share of live features WeightLens-classified context-independent, and precision@k of their weight-based
    input tokens against activation-based top tokens (mean, 95% bootstrap interval over features), beside the
    same for context-dependent features and the chance level (``k / tokens in the corpus``)."""
    gen = torch.Generator().manual_seed(seed)

    def summary(p: torch.Tensor) -> dict:
        p = p[~torch.isnan(p)]
        if len(p) == 0:
            return {"features": 0, "precision": None, "ci": None}
        means = p[torch.randint(len(p), (boot, len(p)), generator=gen)].mean(1)
        return {"features": int(len(p)), "precision": round(float(p.mean()), 4),
                "ci": [round(float(means.quantile(0.025)), 4), round(float(means.quantile(0.975)), 4)]}

    per_layer, all_ci, all_cd = [], [], []
    live_total = ci_total = 0
    for l in range(store.n_layers):
        live = store.get(l, "count") > 0
        ci = store.get(l, "context_independent") & live
        p = precision_at_k(store.get(l, "wl_in"), store.get(l, "act_tokens"), k)
        all_ci.append(p[ci])
        all_cd.append(p[live & ~ci])
        live_total += int(live.sum())
        ci_total += int(ci.sum())
        per_layer.append({"layer": l, "live": int(live.sum()), "context_independent": int(ci.sum()),
                          "share_context_independent": round(float(ci.sum()) / max(1, int(live.sum())), 4),
                          f"precision_at_{k}": summary(p[ci])})
    return {
        "k": k, "live_features": live_total, "context_independent": ci_total,
        "share_context_independent": round(ci_total / max(1, live_total), 4),
        f"precision_at_{k}_context_independent": summary(torch.cat(all_ci)),
        f"precision_at_{k}_context_dependent": summary(torch.cat(all_cd)),
        f"chance_precision_at_{k}": round(k / max(1, int(store.index["vocab_seen"])), 4),
        "layers": per_layer,
    }
