"""Largest clique of a threshold graph: exact branch and bound, with a step budget and a greedy floor.

Carlini et al. flag a prompt as memorised when the largest clique of its generations' graph (edge = tiled
ℓ2 below a threshold) has ≥ 10 members. Maximum clique is NP-hard in general, but these graphs are easy:
unrelated generations give almost no edges, and memorised ones give one dense block. The search is:

1. **greedy floor**: from each of the 8 highest-degree vertices, repeatedly add the candidate with the
   most neighbours among the remaining candidates; the largest result is a lower bound ``L``;
2. **core pruning**: a clique larger than ``L`` needs every member to have degree ≥ ``L``, so vertices
   below that are removed, repeatedly (what remains is the L-core); an empty core proves ``L`` optimal;
3. **exact search** on the core: Bron–Kerbosch with Tomita pivoting (branch only on candidates not
   adjacent to the pivot, which loses no maximum clique) and the bound ``|R| + |P| ≤ best`` → prune,
   on Python-int bitsets (one big-int AND per step).

The exact search is bounded by ``max_steps`` recursive calls. Past it, the best clique found so far (at
least the greedy one) is returned with ``exact=False``: a lower bound, stated as such in the output.
In practice a 500-vertex group with one planted clique and sparse noise finishes in a few thousand steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GREEDY_SEEDS = 8


@dataclass(frozen=True)
class Clique:
    members: tuple[int, ...]  # vertex indices, sorted
    exact: bool  # True: proven maximum; False: the step budget ran out (members is a lower bound)
    steps: int  # recursive calls of the exact search


class _OutOfSteps(Exception):
    pass


def threshold_graph(D: np.ndarray, threshold: float) -> np.ndarray:
    """Adjacency of ``D < threshold``: D (n, n) float distances → (n, n) bool, no self-loops."""
    adj = np.asarray(D) < threshold
    np.fill_diagonal(adj, False)
    return adj & adj.T


def greedy_clique(adj: np.ndarray, seeds: int = GREEDY_SEEDS) -> list[int]:
    """A maximal clique grown greedily from each of the ``seeds`` highest-degree vertices; the largest."""
    n = adj.shape[0]
    if n == 0:
        return []
    degree = adj.sum(axis=1)
    best: list[int] = [int(np.argmax(degree))]
    for seed in np.argsort(-degree, kind="stable")[:seeds]:
        members = [int(seed)]
        candidates = adj[seed].copy()
        inner = adj[:, candidates].sum(axis=1)  # each vertex's neighbours among the candidates
        while candidates.any():
            pick = int(np.argmax(np.where(candidates, inner, -1)))
            members.append(pick)
            removed = candidates & ~adj[pick]  # includes pick itself (no self-loops)
            candidates &= adj[pick]
            inner -= adj[:, removed].sum(axis=1)  # each vertex leaves once: O(n²) per seed
        if len(members) > len(best):
            best = members
    return sorted(best)


def _core(adj: np.ndarray, min_degree: int) -> np.ndarray:
    """Indices of the vertices left after repeatedly removing those of degree < ``min_degree``."""
    alive = np.ones(adj.shape[0], dtype=bool)
    while True:
        degree = (adj & alive[None, :]).sum(axis=1)
        drop = alive & (degree < min_degree)
        if not drop.any():
            return np.nonzero(alive)[0]
        alive &= ~drop


def max_clique(adj: np.ndarray, max_steps: int = 200_000) -> Clique:
    """The largest clique of the graph ``adj`` ((n, n) bool, symmetric, no self-loops).

    Ties between maximum cliques are broken deterministically (vertex order), not by distance.
    """
    n = adj.shape[0]
    if n == 0:
        return Clique((), True, 0)
    best = greedy_clique(adj)
    core = _core(adj, len(best))  # members of any larger clique
    if len(core) <= len(best):
        return Clique(tuple(best), True, 0)
    vertices, neighbours = _bitsets(adj, core)
    search = _BranchAndBound(neighbours, len(best), max_steps)
    exact = True
    try:
        search.expand([], (1 << len(vertices)) - 1)
    except _OutOfSteps:
        exact = False
    if search.members:
        best = sorted(int(vertices[i]) for i in search.members)
    return Clique(tuple(best), exact, int(search.steps))


def _bitsets(adj: np.ndarray, core: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """The ``core`` vertices reordered, high degree first (the bitset's low bits are the vertices the
    pivot rule sees most often), and each one's neighbours as a Python-int bitset over that order."""
    sub = adj[np.ix_(core, core)]
    order = np.argsort(-sub.sum(axis=1), kind="stable")
    sub = sub[np.ix_(order, order)]
    neighbours = [int(sum(1 << int(j) for j in np.nonzero(sub[i])[0])) for i in range(len(order))]
    return core[order], neighbours


class _BranchAndBound:
    """Bron–Kerbosch with Tomita pivoting on bitsets, pruned by ``|R| + |P| ≤ best``; raises _OutOfSteps
    past ``max_steps`` calls. ``members``: the largest clique found above the initial ``best`` size
    (positions in the bitset order), [] when none is larger."""

    def __init__(self, neighbours: list[int], best: int, max_steps: int) -> None:
        self.neighbours = neighbours
        self.best = best
        self.members: list[int] = []
        self.steps = 0
        self.max_steps = max_steps

    def expand(self, chosen: list[int], candidates: int) -> None:
        """Grows the clique ``chosen`` (R) from the bitset ``candidates`` (P)."""
        self.steps += 1
        if self.steps > self.max_steps:
            raise _OutOfSteps
        if not candidates:
            if len(chosen) > self.best:
                self.best, self.members = len(chosen), list(chosen)
            return
        if len(chosen) + candidates.bit_count() <= self.best:
            return
        branch = candidates & ~self.neighbours[self._pivot(candidates)]
        while branch:
            low = branch & -branch
            v = low.bit_length() - 1
            branch ^= low
            chosen.append(v)
            self.expand(chosen, candidates & self.neighbours[v])
            chosen.pop()
            candidates &= ~low
            if len(chosen) + candidates.bit_count() <= self.best:
                return

    def _pivot(self, candidates: int) -> int:
        """The candidate with the most neighbours among ``candidates`` (the lowest bit on ties)."""
        pivot, most = -1, -1
        rest = candidates
        while rest:
            low = rest & -rest
            u = low.bit_length() - 1
            rest ^= low
            count = (candidates & self.neighbours[u]).bit_count()
            if count > most:
                pivot, most = u, count
        return pivot
