"""Describe every live feature of a transcoder set: one pass over a corpus of the model's own traces.

Per feature (``[F, ...]`` arrays per layer, saved by :mod:`crv.features.store`):

- **activation-based**: the top-``K`` activating contexts (one per sequence, highest first) with the
  feature's activation at every token of a window around them, activation quantiles over its firings,
  firing frequency, and the tokens that carry most of its activation mass;
- **WeightLens** (:mod:`crv.features.weightlens`): input and output tokens from the weights, the
  context-independence flag, and the input tokens that survive the co-activation filter
  ``P(fires | token) >= coactivation_min`` on the corpus;
- **CircuitLens**: the feature's expected upstream attribution over the contexts where it fires,
  weighted by its activation: ``sum_i a_i * A_i[s] / sum_i a_i`` over its firings ``i`` (``A_i`` the
  firing's row of the attribution graph: direct effects of every upstream feature, error and token on its
  pre-activation, attention and norms frozen, exactly the graph's edges), grouped by upstream identity
  (feature ``layer:index``, error layer, the firing's own token, an earlier token by id); and, where the firings'
  upstream patterns split in two (k-means, silhouette >= ``cluster_silhouette``), the two clusters.

Position 0 (the lead token, where activations are outliers) is left out everywhere.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from crv.attribution.attributor import Attributor
from crv.features.corpus import Corpus
from crv.features.weightlens import weight_lens

#: upstream source kinds of CircuitLens keys
FEATURE, ERROR, TOKEN_HERE, TOKEN_BEFORE = 0, 1, 2, 3
KIND_NAMES = ("feature", "error", "token", "earlier token")


def pack_key(kind: torch.Tensor | int, layer: torch.Tensor | int, index: torch.Tensor | int) -> torch.Tensor:
    """One int64 per upstream identity: ``kind << 40 | layer << 24 | index``."""
    return (torch.as_tensor(kind, dtype=torch.long) << 40) | (torch.as_tensor(layer, dtype=torch.long) << 24) \
        | torch.as_tensor(index, dtype=torch.long)


def unpack_key(key: int) -> tuple[int, int, int]:
    return key >> 40, (key >> 24) & 0xFFFF, key & 0xFFFFFF


@dataclass(frozen=True)
class DescribeConfig:
    """What a description store holds and how it is computed."""

    top_examples: int = 10  # activating contexts kept per feature
    window_before: int = 16  # tokens shown before an example's activating token
    window_after: int = 4
    tokens: int = 10  # WeightLens / activation tokens kept per feature
    coactivation_min: float = 0.05  # P(fires | token) a WeightLens input token needs to pass the filter
    context_independent_eta2: float = 0.5
    circuit_rows_per_trace: int | None = 128  # CircuitLens firings per trace, drawn at random (None: every one)
    circuit_top: int = 8  # upstream sources kept per firing and per feature
    cluster_min_firings: int = 8
    cluster_silhouette: float = 0.25
    cluster_min_share: float = 0.2
    seed: int = 0


@dataclass
class _Pass:
    """What one pass over the corpus collects (flat, one entry per firing)."""

    gid: list[torch.Tensor]
    act: list[torch.Tensor]
    seq: list[torch.Tensor]
    pos: list[torch.Tensor]
    tok: list[torch.Tensor]
    c_gid: list[torch.Tensor]
    c_act: list[torch.Tensor]
    c_keys: list[torch.Tensor]
    c_vals: list[torch.Tensor]


def _one_trace(att: Attributor, ids: torch.Tensor, i: int, cfg: DescribeConfig, F: int, gen: torch.Generator,
               acc: _Pass, sampled: torch.Tensor) -> None:
    ta = att.trace(ids)
    fe = ta.active_features
    layer, pos, feat, act = (t.cpu() for t in (fe.layer, fe.pos, fe.feat, fe.act.float()))
    keep = (pos >= 1).nonzero(as_tuple=True)[0]
    gid = layer[keep] * F + feat[keep]
    acc.gid.append(gid)
    acc.act.append(act[keep])
    acc.seq.append(torch.full_like(gid, i))
    acc.pos.append(pos[keep])
    acc.tok.append(ids[pos[keep]])
    T = len(ids)
    chosen = keep
    if cfg.circuit_rows_per_trace is not None and len(keep) > cfg.circuit_rows_per_trace:
        # the firings of the features sampled least so far first (ties at random): rare features get rows too
        priority = sampled[gid].float() + torch.rand(len(gid), generator=gen)
        chosen = keep[priority.argsort()[: cfg.circuit_rows_per_trace]].sort().values
    sampled.index_add_(0, layer[chosen] * F + feat[chosen], torch.ones(len(chosen), dtype=torch.long))
    if len(chosen) == 0:
        return
    lin = ta.lin
    rows = ta.feature_rows(chosen.to(lin.device)).float().cpu()  # [n, n_sources]
    m = min(cfg.circuit_top, rows.shape[1])
    vals, src = rows.topk(m, dim=1)  # the sources that push the feature up most
    n_f, eo, to = lin.n_features, lin.error_offset, lin.token_offset
    is_feat, is_err = src < n_f, (src >= eo) & (src < to)
    sf = src.clamp(max=n_f - 1)
    tpos = (src - to).clamp(min=0, max=T - 1)
    here = tpos == pos[chosen].unsqueeze(1)
    kind = torch.where(is_feat, FEATURE, torch.where(is_err, ERROR, torch.where(here, TOKEN_HERE, TOKEN_BEFORE)))
    key_layer = torch.where(is_feat, layer[sf], torch.where(is_err, (src - eo).div(T, rounding_mode="floor"), 0))
    # the firing's own token is one identity ("its own token": which tokens they are, the activation tokens say);
    # earlier tokens keep their ids
    key_index = torch.where(is_feat, feat[sf], torch.where(is_err | here, 0, ids[tpos]))
    acc.c_gid.append(layer[chosen] * F + feat[chosen])
    acc.c_act.append(act[chosen])
    acc.c_keys.append(pack_key(kind, key_layer, key_index))
    acc.c_vals.append(vals)


def _group_rank(sorted_group: torch.Tensor) -> torch.Tensor:
    """Rank of each entry within its run of equal values (``sorted_group`` ascending)."""
    n = len(sorted_group)
    if n == 0:
        return sorted_group
    start = torch.ones(n, dtype=torch.bool)
    start[1:] = sorted_group[1:] != sorted_group[:-1]
    idx = torch.arange(n)
    first = torch.cummax(torch.where(start, idx, torch.zeros_like(idx)), 0).values
    return idx - first


def _top_per_group(group: torch.Tensor, score: torch.Tensor, n_groups: int, k: int, *payload: torch.Tensor
                   ) -> list[torch.Tensor]:
    """For each group, the ``k`` entries of highest ``score``: ``[n_groups, k]`` arrays of score and each payload
    (missing entries: score NaN, payload -1)."""
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    g = group[order]
    r = _group_rank(g)
    sel = r < k
    out = [torch.full((n_groups, k), float("nan"))]
    out[0][g[sel], r[sel]] = score[order][sel].float()
    for p in payload:
        t = torch.full((n_groups, k), -1, dtype=p.dtype)
        t[g[sel], r[sel]] = p[order][sel]
        out.append(t)
    return out


def _clusters(keys: torch.Tensor, vals: torch.Tensor, cfg: DescribeConfig, gen: torch.Generator) -> tuple[int, float, list]:
    """Split one feature's firings by their upstream pattern: (clusters, larger share, per cluster [(key, mean)])."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    if len(keys) > 200:
        pick = torch.randperm(len(keys), generator=gen)[:200]
        keys, vals = keys[pick], vals[pick]
    uniq, inv = torch.unique(keys, return_inverse=True)
    X = torch.zeros(len(keys), len(uniq))
    X.scatter_add_(1, inv, vals.clamp(min=0))
    X = X / X.norm(dim=1, keepdim=True).clamp_min(1e-12)
    if len(uniq) < 2 or torch.unique(X, dim=0).shape[0] < 2:
        return 1, 1.0, []
    km = KMeans(n_clusters=2, n_init=4, random_state=cfg.seed).fit(X.numpy())
    labels = torch.as_tensor(km.labels_)
    share = float(max((labels == 0).float().mean(), (labels == 1).float().mean()))
    if 1 - share < cfg.cluster_min_share or silhouette_score(X.numpy(), km.labels_) < cfg.cluster_silhouette:
        return 1, 1.0, []
    out = []
    for c in (0, 1):
        mean = X[labels == c].mean(0)
        top = mean.topk(min(4, len(uniq)))
        out.append([(int(uniq[j]), float(v)) for v, j in zip(top.values, top.indices)])
    return 2, share, out


@torch.no_grad()
def describe_features(att: Attributor, corpus: Corpus, cfg: DescribeConfig = DescribeConfig(), progress: bool = True
                      ) -> tuple[dict[str, torch.Tensor], dict]:
    """Every layer's description arrays (``"{layer}.{name}"``, ``[F, ...]``) and the store's index (settings, counts)."""
    t0 = time.time()
    L, F = att.transcoders.shape.n_layers, att.transcoders.shape.d_transcoder
    gen = torch.Generator().manual_seed(cfg.seed)
    acc = _Pass([], [], [], [], [], [], [], [], [])
    sampled = torch.zeros(L * F, dtype=torch.long)
    for i in tqdm(range(len(corpus)), desc="describe features", unit="trace", disable=not progress):
        _one_trace(att, corpus.sequence(i), i, cfg, F, gen, acc, sampled)
    gid, act, seq, pos, tok = (torch.cat(x) for x in (acc.gid, acc.act, acc.seq, acc.pos, acc.tok))
    n_all, S = L * F, len(corpus)
    V = max(int(corpus.tokens.max()) + 1, att.model.get_input_embeddings().weight.shape[0])
    count = torch.bincount(gid, minlength=n_all)
    act_max = torch.zeros(n_all).scatter_reduce(0, gid, act, "amax", include_self=False)
    act_sum = torch.zeros(n_all).index_add_(0, gid, act)

    # top contexts: the best firing of each (feature, sequence), then the best sequences per feature
    pair = gid * S + seq
    best = torch.argsort(act, descending=True, stable=True)
    best = best[torch.argsort(pair[best], stable=True)]
    first = _group_rank(pair[best]) == 0
    b = best[first]
    K = cfg.top_examples
    top_act, top_seq, top_pos = _top_per_group(gid[b], act[b], n_all, K, seq[b], pos[b])

    # the feature's activation over each example's window
    W = cfg.window_before + 1 + cfg.window_after
    win_start = (top_pos - cfg.window_before).clamp(min=0)
    win_acts = torch.zeros(n_all, K, W)
    ex = (top_seq >= 0).nonzero(as_tuple=False)  # [n_ex, 2] (gid, rank)
    ex_pair = ex[:, 0] * S + top_seq[ex[:, 0], ex[:, 1]]
    in_ex = torch.isin(pair, ex_pair)
    lookup = {int(p): j for j, p in enumerate(ex_pair.tolist())}
    for j_entry in in_ex.nonzero(as_tuple=True)[0].tolist():  # firings inside some example's sequence
        j = lookup[int(pair[j_entry])]
        g, r = int(ex[j, 0]), int(ex[j, 1])
        off = int(pos[j_entry]) - int(win_start[g, r])
        if 0 <= off < W:
            win_acts[g, r, off] = act[j_entry]

    # activation quantiles over each feature's firings
    qs = torch.tensor([0.25, 0.5, 0.75, 0.9, 0.99])
    order = torch.argsort(act, stable=True)
    order = order[torch.argsort(gid[order], stable=True)]
    starts = torch.cat([torch.zeros(1, dtype=torch.long), count.cumsum(0)[:-1]])
    qidx = starts.unsqueeze(1) + ((count.unsqueeze(1) - 1).clamp(min=0) * qs).long()
    quantiles = torch.where(count.unsqueeze(1) > 0, act[order][qidx.clamp(max=len(act) - 1)], torch.zeros(()))

    # tokens by activation mass, and P(fires | token) for the co-activation filter
    tk = gid * V + tok
    uk, inv = torch.unique(tk, return_inverse=True)
    mass = torch.zeros(len(uk)).index_add_(0, inv, act)
    fires = torch.bincount(inv, minlength=len(uk))
    act_tok_mass, act_tok = _top_per_group(uk // V, mass, n_all, cfg.tokens, uk % V)
    body = torch.cat([corpus.sequence(i)[1:] for i in range(S)])
    tok_count = torch.bincount(body, minlength=V)

    # context independence: the share of each feature's activation variance (over every body token, zeros
    # included) that token identity explains
    N = float(len(body))
    mean = act_sum / N
    ss_tot = torch.zeros(n_all).index_add_(0, gid, act.double().pow(2).float()) - N * mean.pow(2)
    n_t = tok_count[uk % V].float()
    ss_between = torch.zeros(n_all).index_add_(0, uk // V, mass.pow(2) / n_t.clamp(min=1)) - N * mean.pow(2)
    eta2 = torch.where(ss_tot > 1e-12, ss_between / ss_tot.clamp_min(1e-12), torch.zeros(()))

    # WeightLens over the tokens the corpus contains
    seen = (tok_count > 0).nonzero(as_tuple=True)[0]
    arrays: dict[str, torch.Tensor] = {}
    n_ci = []
    for l in range(L):
        sl = slice(l * F, (l + 1) * F)
        wl = weight_lens(att.model, att.transcoders, l, cfg.tokens, vocab=seen)
        ci = (eta2[sl] >= cfg.context_independent_eta2) & (count[sl] > 0)
        key = l * F * V + torch.arange(F).unsqueeze(1) * V + wl.in_tokens  # [F, n] (gid, token) keys
        loc = torch.searchsorted(uk, key.flatten()).clamp(max=max(len(uk) - 1, 0)).view_as(key)
        found = uk[loc] == key if len(uk) else torch.zeros_like(key, dtype=torch.bool)
        f_count = torch.where(found, fires[loc], 0)
        p_fire = f_count.float() / tok_count[wl.in_tokens].clamp(min=1).float()
        passed = p_fire >= cfg.coactivation_min
        filt = torch.full_like(wl.in_tokens, -1)
        rank = passed.long().cumsum(1) - 1
        filt[passed.nonzero(as_tuple=True)[0], rank[passed]] = wl.in_tokens[passed]
        n_ci.append(int(ci.sum()))
        arrays.update({
            f"{l}.count": count[sl], f"{l}.act_max": act_max[sl], f"{l}.act_mean": act_sum[sl] / count[sl].clamp(min=1),
            f"{l}.quantiles": quantiles[sl], f"{l}.top_act": top_act[sl], f"{l}.top_seq": top_seq[sl],
            f"{l}.top_pos": top_pos[sl], f"{l}.win_start": win_start[sl], f"{l}.win_acts": win_acts[sl],
            f"{l}.act_tokens": act_tok[sl], f"{l}.act_token_mass": act_tok_mass[sl],
            f"{l}.wl_in": wl.in_tokens, f"{l}.wl_in_score": wl.in_scores, f"{l}.wl_in_coactivation": p_fire,
            f"{l}.wl_in_filtered": filt, f"{l}.wl_out": wl.out_tokens, f"{l}.wl_out_score": wl.out_scores,
            f"{l}.wl_neg": wl.neg_tokens, f"{l}.wl_neg_score": wl.neg_scores, f"{l}.context_independent": ci, f"{l}.eta2": eta2[sl],
        })

    # CircuitLens: activation-weighted expected upstream attribution, and clusters of firings
    M = cfg.circuit_top
    cl_keys = torch.full((n_all, M), -1, dtype=torch.long)
    cl_vals = torch.full((n_all, M), float("nan"))
    n_clusters = torch.ones(n_all, dtype=torch.long)
    share = torch.ones(n_all)
    cluster_keys = torch.full((n_all, 2, 4), -1, dtype=torch.long)
    cluster_vals = torch.full((n_all, 2, 4), float("nan"))
    firings = torch.zeros(n_all, dtype=torch.long)
    if acc.c_gid:
        cg, ca, ck, cv = (torch.cat(x) for x in (acc.c_gid, acc.c_act, acc.c_keys, acc.c_vals))
        firings = torch.bincount(cg, minlength=n_all)
        weight = torch.zeros(n_all).index_add_(0, cg, ca)
        pairs = torch.stack([cg.unsqueeze(1).expand_as(ck).flatten(), ck.flatten()], 1)
        up, pinv = torch.unique(pairs, dim=0, return_inverse=True)
        tot = torch.zeros(len(up)).index_add_(0, pinv, (cv * ca.unsqueeze(1)).flatten())
        tot = tot / weight[up[:, 0]].clamp_min(1e-12)
        cl_vals, cl_keys = _top_per_group(up[:, 0], tot, n_all, M, up[:, 1])
        order = torch.argsort(cg, stable=True)
        bounds = torch.cat([torch.zeros(1, dtype=torch.long), firings.cumsum(0)])
        for g in (firings >= cfg.cluster_min_firings).nonzero(as_tuple=True)[0].tolist():
            rows = order[bounds[g] : bounds[g + 1]]
            c, s, tops = _clusters(ck[rows], cv[rows], cfg, gen)
            n_clusters[g], share[g] = c, s
            for ci_, lst in enumerate(tops):
                for j, (kk, vv) in enumerate(lst):
                    cluster_keys[g, ci_, j], cluster_vals[g, ci_, j] = kk, vv
    for l in range(L):
        sl = slice(l * F, (l + 1) * F)
        arrays.update({f"{l}.circuit_keys": cl_keys[sl], f"{l}.circuit_scores": cl_vals[sl],
                       f"{l}.circuit_firings": firings[sl], f"{l}.clusters": n_clusters[sl],
                       f"{l}.cluster_share": share[sl], f"{l}.cluster_keys": cluster_keys[sl],
                       f"{l}.cluster_scores": cluster_vals[sl]})
    arrays["corpus.tokens"] = corpus.tokens
    arrays["corpus.offsets"] = corpus.offsets
    live = [int((count[l * F : (l + 1) * F] > 0).sum()) for l in range(L)]
    index = {
        "n_layers": L, "d_transcoder": F, "config": asdict(cfg), "corpus": {"source": corpus.source, "sequences": S,
        "tokens": int(len(corpus.tokens))}, "vocab_seen": int(len(seen)), "live": live,
        "context_independent": n_ci, "polysemantic": [int((n_clusters[l * F : (l + 1) * F] == 2).sum()) for l in range(L)],
        "model": att.model_id, "transcoders": att.transcoders.checksum(), "prompt_format": att.prompt_format,
        "seconds": round(time.time() - t0, 1),
    }
    return arrays, index
