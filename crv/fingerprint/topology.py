"""Topology of a small directed graph given as edge arrays: networkx's numbers, computed in bulk.

The fingerprint's topology family (density, degree centralities, betweenness, weak components,
longest token -> logit path) on the pruned step graph, without building a networkx ``DiGraph``
node by node. Every function returns what networkx returns on the same graph
(``tests/test_fingerprint.py`` checks it against networkx on real step graphs):

- betweenness is Brandes' algorithm run from all source nodes at once (dense ``[sources, m]``
  path counts, one sparse product per BFS level), with networkx's pivot sample
  (``random.Random(seed).sample(nodes, k)``) and its rescaling for ``normalized=True``;
- weak components come from :func:`scipy.sparse.csgraph.connected_components`;
- the longest path is a relaxation over the DAG's levels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components


@dataclass(frozen=True)
class EdgeGraph:
    """A directed graph on nodes ``0..m-1``: edges ``src[i] -> dst[i]`` (no duplicates)."""

    m: int
    src: np.ndarray
    dst: np.ndarray

    @property
    def n_edges(self) -> int:
        return int(len(self.src))

    def matrix(self) -> sp.csr_matrix:
        """``A[u, v] = 1`` for every edge ``u -> v``."""
        ones = np.ones(self.n_edges, dtype=np.float64)
        return sp.csr_matrix((ones, (self.src, self.dst)), shape=(self.m, self.m))


def density(g: EdgeGraph) -> float:
    """``networkx.density`` of a directed graph."""
    return g.n_edges / (g.m * (g.m - 1)) if g.m > 1 else 0.0


def degree_centrality(g: EdgeGraph) -> tuple[np.ndarray, np.ndarray]:
    """``networkx.in_degree_centrality`` and ``out_degree_centrality`` as arrays (degree / (m - 1))."""
    s = 1.0 / (g.m - 1) if g.m > 1 else 1.0
    return np.bincount(g.dst, minlength=g.m) * s, np.bincount(g.src, minlength=g.m) * s


def betweenness(g: EdgeGraph, k: int | None = None, seed: int = 0) -> np.ndarray:
    """``networkx.betweenness_centrality(G, k=k, seed=seed, normalized=True)`` of the graph (unweighted)."""
    m = g.m
    if k is not None and k >= m:
        k = None
    sources = np.arange(m) if k is None else np.asarray(random.Random(seed).sample(range(m), k))
    bc = np.zeros(m)
    if m == 0:
        return bc
    A = g.matrix()
    AT = A.T.tocsr()
    S = len(sources)
    rows = np.arange(S)
    sigma = np.zeros((S, m))
    sigma[rows, sources] = 1.0
    level = np.full((S, m), -1, dtype=np.int64)
    level[rows, sources] = 0
    frontier = sigma.copy()
    depth = 0
    while frontier.any():  # BFS from every source at once: path counts of the next level
        reach = (AT @ frontier.T).T
        new = (reach > 0) & (level < 0)
        depth += 1
        level[new] = depth
        sigma[new] = reach[new]
        frontier = np.where(new, reach, 0.0)
    delta = np.zeros((S, m))
    for d in range(depth, 0, -1):  # dependencies, deepest level first
        at_d = level == d
        coeff = np.where(at_d, (1.0 + delta) / np.where(at_d, sigma, 1.0), 0.0)
        pulled = (A @ coeff.T).T  # sum over successors w at level d of coeff[w]
        parents = level == d - 1
        delta[parents] += sigma[parents] * pulled[parents]
    delta[rows, sources] = 0.0  # a source's own dependency is not betweenness
    bc = delta.sum(0)
    # networkx's rescaling (normalized, directed, endpoints=False)
    N = m - 1
    if N < 2:
        return bc
    if k is None:
        return bc / (N * (N - 1))
    scale = np.full(m, 1.0 / (k * (N - 1)))
    scale[sources] = 1.0 / ((k - 1) * (N - 1)) if k > 1 else np.nan
    return bc * scale


def weak_components(g: EdgeGraph) -> int:
    """``networkx.number_weakly_connected_components``."""
    if g.m == 0:
        return 0
    return int(connected_components(g.matrix(), directed=True, connection="weak")[0])


def longest_path_from(g: EdgeGraph, starts: np.ndarray, ends: np.ndarray) -> int:
    """Edges on the longest path of a DAG from a node in ``starts`` (bool) to one in ``ends`` (0 if none)."""
    best = np.where(starts, 0.0, -np.inf)
    for _ in range(g.m + 1):
        cand = best.copy()
        np.maximum.at(cand, g.dst, best[g.src] + 1)
        cand = np.maximum(cand, best)
        if np.array_equal(cand, best):
            break
        best = cand
    else:
        raise ValueError("the graph has a cycle")
    reach = best[ends]
    reach = reach[np.isfinite(reach)]
    return int(reach.max()) if len(reach) else 0
