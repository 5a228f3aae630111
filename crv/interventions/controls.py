"""Matched controls: features like the targeted ones in every way but the selection.

An edit of feature ``f`` (activation ``a_f`` at the edited position, decoder row ``d_f``) by a scale ``lam``
changes the MLP output by ``(lam - 1) a_f d_f``: its size is ``|lam - 1| * a_f * ||d_f||``. A control set
for a targeted set has the same count, each feature in the same layer and active at the same position,
none of them targeted, and total size ``sum a_f ||d_f||`` within ``tolerance`` (10%) of the targeted set's
(so any edit scale gives both arms the same size). Drawn at random among the features closest in size to
each targeted one; when no draw matches within the tolerance the arm is *unmatched* (None): reported as
such, never counted as a failure or a success.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ActiveFeature:
    """A feature active at the edited position: layer, index, activation there and its decoder row's norm."""

    layer: int
    feature: int
    activation: float
    decoder_norm: float

    @property
    def size(self) -> float:
        """``a_f * ||d_f||``: the size of a unit-scale edit of it."""
        return abs(self.activation) * self.decoder_norm


def total_size(features: list[ActiveFeature]) -> float:
    return float(sum(f.size for f in features))


def match_control(targeted: list[ActiveFeature], active: list[ActiveFeature], rng: np.random.Generator,
                  tolerance: float = 0.10, nearest: int = 3, tries: int = 50) -> list[ActiveFeature] | None:
    """A control set for ``targeted`` from ``active`` (see the module docstring), or None when unmatched.

    Each targeted feature draws, uniformly, one of the ``nearest`` same-layer candidates closest to it in
    size not drawn yet; up to ``tries`` draws, the first within ``tolerance`` wins."""
    if not targeted:
        return None
    chosen = {(t.layer, t.feature) for t in targeted}
    pool: dict[int, list[ActiveFeature]] = {}
    for a in active:
        if (a.layer, a.feature) not in chosen:
            pool.setdefault(a.layer, []).append(a)
    goal = total_size(targeted)
    for _ in range(tries):
        used: set[tuple[int, int]] = set()
        out = []
        for t in targeted:
            options = [a for a in pool.get(t.layer, []) if (a.layer, a.feature) not in used]
            if not options:
                return None  # the layer has too few other active features at this position
            options.sort(key=lambda a: abs(a.size - t.size))
            pick = options[int(rng.integers(min(nearest, len(options))))]
            used.add((pick.layer, pick.feature))
            out.append(pick)
        if abs(total_size(out) - goal) <= tolerance * goal:
            return out
    return None
