"""Largest clique: exact against brute force, planted cliques in noise, the step budget."""

import itertools
import time

import numpy as np

from copyscan.search.memorized.clique import greedy_clique, max_clique, threshold_graph


def _random_graph(n: int, p: float, rng: np.random.Generator) -> np.ndarray:
    upper = np.triu(rng.random((n, n)) < p, 1)
    return upper | upper.T


def _is_clique(adj: np.ndarray, members) -> bool:
    members = list(members)
    sub = adj[np.ix_(members, members)]
    return bool((sub | np.eye(len(members), dtype=bool)).all())


def _brute_force(adj: np.ndarray) -> int:
    n = adj.shape[0]
    for size in range(n, 0, -1):
        if any(_is_clique(adj, c) for c in itertools.combinations(range(n), size)):
            return size
    return 0


def test_exact_on_random_small_graphs():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(1, 13))
        adj = _random_graph(n, float(rng.uniform(0.1, 0.9)), rng)
        found = max_clique(adj)
        assert found.exact and _is_clique(adj, found.members)
        assert len(found.members) == _brute_force(adj), trial


def test_greedy_can_be_beaten_and_search_finds_the_maximum():
    # a star of triangles around a hub (greedy from the hub finds 3) and a separate 4-clique
    adj = np.zeros((12, 12), dtype=bool)
    for a, b in [(0, 1), (0, 2), (1, 2), (0, 3), (0, 4), (3, 4), (0, 5), (0, 6), (5, 6), (0, 7), (7, 1)]:
        adj[a, b] = adj[b, a] = True
    for a, b in itertools.combinations([8, 9, 10, 11], 2):
        adj[a, b] = adj[b, a] = True
    assert len(greedy_clique(adj)) >= 3
    assert max_clique(adj).members == (8, 9, 10, 11)


def test_planted_clique_in_500_vertices_is_found_fast():
    rng = np.random.default_rng(1)
    adj = _random_graph(500, 0.03, rng)
    planted = sorted(rng.choice(500, 12, replace=False).tolist())
    for a, b in itertools.combinations(planted, 2):
        adj[a, b] = adj[b, a] = True
    start = time.perf_counter()
    found = max_clique(adj)
    assert found.exact and list(found.members) == planted
    assert time.perf_counter() - start < 5.0
    # a complete graph (every generation identical) is proven by the greedy floor alone
    full = ~np.eye(500, dtype=bool)
    assert max_clique(full) == max_clique(full).__class__(tuple(range(500)), True, 0)


def test_step_budget_returns_a_stated_lower_bound():
    rng = np.random.default_rng(2)
    adj = _random_graph(150, 0.5, rng)  # dense and random: the hard case
    bounded = max_clique(adj, max_steps=50)
    assert not bounded.exact and _is_clique(adj, bounded.members)
    assert len(bounded.members) >= len(greedy_clique(adj))
    full = max_clique(adj, max_steps=10_000_000)
    assert full.exact and len(full.members) >= len(bounded.members)


def test_threshold_graph():
    D = np.array([[0.0, 0.05, 0.2], [0.05, 0.0, 0.09], [0.2, 0.09, 0.0]])
    assert threshold_graph(D, 0.1).tolist() == [
        [False, True, False],
        [True, False, True],
        [False, True, False],
    ]
    assert max_clique(threshold_graph(D, 0.1)).members in ((0, 1), (1, 2))
    assert max_clique(np.zeros((0, 0), dtype=bool)).members == ()
