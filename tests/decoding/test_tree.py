"""Tests of the draft-tree IR (effx/decoding/tree.py)."""

from __future__ import annotations

import itertools
import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from effx.decoding import tree as tree_lib
from effx.decoding.tree import DraftTree

WORKED = [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]


# ---------------------------------------------------------------------------------------------
# Published Medusa trees and the worked example of reference 1.2.


def test_mc_sim_7b_63_matches_published_shape():
  t = tree_lib.load_medusa_tree("mc_sim_7b_63")
  assert t.num_nodes == 64
  assert t.max_depth == 4
  assert t.num_paths == 42
  assert t.paths.shape == (42, 5)
  assert t.nodes_per_depth.tolist() == [1, 10, 28, 23, 2]
  gather = t.medusa_gather_index(10)
  assert gather[0] == 0 and gather[1:].min() >= 1 and gather.max() <= 40
  # Every leaf is on exactly one path and every node on at least one.
  assert set(t.paths[np.arange(42), t.path_lengths - 1].tolist()) == set(t.leaves.tolist())
  assert set(t.paths[t.paths >= 0].tolist()) == set(range(64))


def test_all_shipped_medusa_trees_load_and_are_left_packed():
  names = tree_lib.medusa_tree_names()
  assert "mc_sim_7b_63" in names and len(names) == 9
  assert "Medusa" in tree_lib.medusa_trees_source()
  for name in names:
    t = tree_lib.load_medusa_tree(name)
    assert t.num_nodes == 64, name
    for node in range(t.num_nodes):
      kids = t.children[node][t.children[node] >= 0]
      # Left-packed: a node's children are ranks 0..k-1, in rank order.
      assert t.rank[kids].tolist() == list(range(len(kids))), (name, node)


def test_shipped_json_equals_published_copy_and_round_trips():
  from importlib import resources
  text = resources.files("effx.decoding").joinpath("data", "medusa_trees.json").read_text()
  data = json.loads(text)
  assert set(data) == {"source", "trees"}
  for name, choices in data["trees"].items():
    t = tree_lib.load_medusa_tree(name)
    assert sorted(map(tuple, t.to_choices())) == sorted(map(tuple, choices))


def test_load_medusa_tree_unknown_name():
  with pytest.raises(ValueError, match="unknown Medusa tree 'nope'"):
    tree_lib.load_medusa_tree("nope")


def test_worked_example_exactly():
  t = tree_lib.from_choices(WORKED)
  assert t.num_nodes == 7 and t.max_depth == 3
  assert t.medusa_gather_index(10).tolist() == [0, 1, 2, 11, 12, 11, 21]
  assert t.depth.tolist() == [0, 1, 1, 2, 2, 2, 3]
  assert t.parent.tolist() == [-1, 0, 0, 1, 1, 2, 3]
  assert t.rank.tolist() == [0, 0, 1, 0, 1, 0, 0]
  assert {tuple(r) for r in t.paths.tolist()} == {(0, 1, 3, 6), (0, 2, 5, -1), (0, 1, 4, -1)}
  rows = ["1000000", "1100000", "1010000", "1101000", "1100100", "1010010", "1101001"]
  assert ["".join(str(int(v)) for v in row) for row in t.mask] == rows
  assert t.children.tolist() == [[1, 2], [3, 4], [5, -1], [6, -1], [-1, -1], [-1, -1],
                                 [-1, -1]]
  assert t.leaves.tolist() == [4, 5, 6]
  assert sorted(t.path_lengths.tolist()) == [3, 3, 4]
  # Any input order gives the same tree.
  shuffled = list(reversed(WORKED))
  assert tree_lib.from_choices(shuffled) == t
  assert hash(tree_lib.from_choices(shuffled)) == hash(t)


def test_derived_arrays_are_read_only():
  t = tree_lib.from_choices(WORKED)
  for arr in (t.parent, t.depth, t.rank, t.mask, t.paths, t.children):
    with pytest.raises(ValueError):
      arr.flat[0] = 5


def test_tree_is_a_static_jit_argument():
  calls = []

  def f(x, tree):
    calls.append(1)
    return x + jnp.asarray(tree.depth).sum()

  g = jax.jit(f, static_argnames=("tree",))
  a = g(jnp.int32(1), tree=tree_lib.from_choices(WORKED))
  b = g(jnp.int32(1), tree=tree_lib.from_choices(list(reversed(WORKED))))
  c = g(jnp.int32(1), tree=tree_lib.chain(3))
  assert int(a) == int(b) == 1 + 11 and int(c) == 1 + 6
  assert len(calls) == 2  # equal trees share one trace


# ---------------------------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize("choices, top_k, message", [
    ([], None, "choices: empty"),
    ([[0], []], None, r"choices\[1\]: empty path"),
    ([[0], [0, 1, 0]], None, r"needs its parent path \[0, 1\], which is missing"),
    ([[1, 0]], None, r"needs its parent path \[1\], which is missing"),
    ([[0], [0], [1]], None, r"choices\[1\]: duplicate path \[0\]"),
    ([[0], [-1]], None, "negative rank -1"),
    ([[0], [10]], 10, "rank 10; must be < top_k=10"),
    ([[0], [0.5]], None, "non-integer rank 0.5"),
    ([[0], "ab"], None, "not a sequence of ranks"),
    ("abc", None, "must be a list of rank paths"),
    ([[0]], 0, "top_k: got 0"),
])
def test_from_choices_rejects_invalid(choices, top_k, message):
  with pytest.raises(ValueError, match=message) as info:
    tree_lib.from_choices(choices, top_k=top_k)
  assert "\n" not in str(info.value)


@pytest.mark.parametrize("parent, depth, rank, message", [
    ([0, 0], [0, 1], [0, 0], "node 0 must be the root"),
    ([-1, 2, 0], [0, 2, 1], [0, 0, 0], "parents come before their children"),
    ([-1, 0, 0], [0, 1, 2], [0, 0, 1], "node 2 has depth 2 but its parent 0 has depth 0"),
    ([-1, 0, 0], [0, 1, 1], [0, 1, 1], "repeats rank 1 among the children of node 0"),
    ([-1, 0], [0, 1], [0, -2], "rank -2"),
    ([], [], [], "non-empty 1-D"),
    ([-1, 0], [0, 1], [0], "one length"),
    ([-1.0, 0.0], [0, 1], [0, 0], "must hold integers"),
])
def test_draft_tree_rejects_invalid(parent, depth, rank, message):
  with pytest.raises(ValueError, match=message):
    DraftTree(parent=np.array(parent), depth=np.array(depth), rank=np.array(rank))


def test_medusa_gather_index_needs_large_enough_top_k():
  t = tree_lib.from_choices([[0], [3]])
  assert t.medusa_gather_index(4).tolist() == [0, 1, 4]
  with pytest.raises(ValueError, match="ranks must be < top_k"):
    t.medusa_gather_index(3)


# ---------------------------------------------------------------------------------------------
# Chains and parents.


def test_chain():
  t = tree_lib.chain(3)
  assert t.parent.tolist() == [-1, 0, 1, 2]
  assert t.depth.tolist() == [0, 1, 2, 3]
  assert np.array_equal(t.mask, np.tril(np.ones((4, 4), bool)))
  assert t.paths.tolist() == [[0, 1, 2, 3]]
  assert t.children.tolist() == [[1], [2], [3], [-1]]
  assert t == tree_lib.from_choices([[0], [0, 0], [0, 0, 0]])
  assert t.is_chain and not tree_lib.from_choices([[0], [1]]).is_chain
  assert not tree_lib.from_parents([-1, 0, 0, 1]).is_chain
  root = tree_lib.chain(0)
  assert root.num_nodes == 1 and root.paths.tolist() == [[0]] and root.max_children == 1
  assert root.is_chain
  with pytest.raises(ValueError, match="length: got -1"):
    tree_lib.chain(-1)


def test_from_parents_derives_depth_and_rank():
  t = tree_lib.from_parents([-1, 0, 0, 1, 1, 2, 3])
  assert t == tree_lib.from_choices(WORKED)


# ---------------------------------------------------------------------------------------------
# Random valid choice lists (hypothesis): derived tables agree with the prefix relation.


@st.composite
def choice_lists(draw):
  n = draw(st.integers(1, 14))
  paths = [()]
  used = {(): set()}
  for _ in range(n):
    parent = draw(st.sampled_from(paths))
    if len(parent) >= 4:
      parent = ()
    free = [r for r in range(5) if r not in used[parent]]
    if not free:
      continue
    path = parent + (draw(st.sampled_from(free)),)
    used[parent].add(path[-1])
    used[path] = set()
    paths.append(path)
  order = draw(st.permutations(paths[1:]))
  return [list(p) for p in order]


@settings(max_examples=40, deadline=None)
@given(choice_lists())
def test_random_choice_lists(choices):
  t = tree_lib.from_choices(choices, top_k=5)
  paths = [()] + sorted({tuple(c) for c in choices}, key=lambda p: (len(p), p))
  assert t.num_nodes == len(paths)
  for i, pi in enumerate(paths):
    assert t.depth[i] == len(pi)
    if i:
      assert paths[t.parent[i]] == pi[:-1] and t.rank[i] == pi[-1]
      assert t.medusa_gather_index(5)[i] == pi[-1] + 5 * (len(pi) - 1) + 1
    for j, pj in enumerate(paths):
      assert t.mask[i, j] == (pi[:len(pj)] == pj), (pi, pj)  # ancestor-or-self = prefix
  leaves = [p for p in paths if not any(q[:len(p)] == p and q != p for q in paths)]
  got = {tuple(paths[n] for n in row if n >= 0) for row in t.paths.tolist()}
  assert got == {tuple(p[:k] for k in range(len(p) + 1)) for p in leaves}
  assert sorted(t.path_lengths.tolist()) == sorted(len(p) + 1 for p in leaves)
  assert t.paths.shape == (len(leaves), max(len(p) for p in paths) + 1)
  assert sorted(map(tuple, t.to_choices())) == sorted(paths[1:])
  for node in range(t.num_nodes):
    kids = [k for k in t.children[node] if k >= 0]
    assert kids == sorted((k for k in range(t.num_nodes) if t.parent[k] == node),
                          key=lambda k: t.rank[k])


# ---------------------------------------------------------------------------------------------
# Tree search.

MEDUSA_TOP5 = np.array([  # Vicuna-7B per-head accuracies shaped like reference 1.5.
    [0.56, 0.10, 0.05, 0.04, 0.03],
    [0.32, 0.10, 0.06, 0.05, 0.03],
    [0.20, 0.09, 0.05, 0.04, 0.03],
    [0.15, 0.08, 0.05, 0.03, 0.03],
])


def _chain_value(acc, length):
  return float(sum(np.prod(acc[:i, 0]) for i in range(1, length + 1)))


def test_expected_accept_length_of_a_chain_and_the_worked_example():
  assert tree_lib.expected_accept_length(tree_lib.chain(3), MEDUSA_TOP5) == pytest.approx(
      0.56 + 0.56 * 0.32 + 0.56 * 0.32 * 0.20)
  acc = MEDUSA_TOP5
  w = tree_lib.from_choices(WORKED)
  expected = (acc[0, 0] + acc[0, 1] + acc[0, 0] * acc[1, 0] + acc[0, 0] * acc[1, 1]
              + acc[0, 1] * acc[1, 0] + acc[0, 0] * acc[1, 0] * acc[2, 0])
  assert tree_lib.expected_accept_length(w, acc) == pytest.approx(expected)
  with pytest.raises(ValueError, match="does not cover the tree"):
    tree_lib.expected_accept_length(tree_lib.chain(5), acc)


def test_optimal_tree_beats_chain_and_is_consistent():
  previous = 0.0
  for budget in range(0, 25):
    t, value = tree_lib.optimal_tree(MEDUSA_TOP5, budget)
    assert t.num_nodes == budget + 1
    assert value == pytest.approx(tree_lib.expected_accept_length(t, MEDUSA_TOP5))
    assert value >= previous - 1e-12
    previous = value
    if 1 <= budget <= 4:
      assert value >= _chain_value(MEDUSA_TOP5, budget) - 1e-12
    # Prefix-closed (from_choices would refuse otherwise) and left-packed.
    if budget:
      assert tree_lib.from_choices(t.to_choices(), top_k=5) == t
    for node in range(t.num_nodes):
      kids = t.children[node][t.children[node] >= 0]
      assert t.rank[kids].tolist() == list(range(len(kids)))
  big, value = tree_lib.optimal_tree(MEDUSA_TOP5, 24)
  assert value > _chain_value(MEDUSA_TOP5, 4) + 0.1  # branching pays off with these heads
  assert big.max_depth <= 4


def _all_prefix_closed_values(acc):
  depth, k = acc.shape
  nodes = [p for d in range(1, depth + 1) for p in itertools.product(range(k), repeat=d)]
  value = {p: float(np.prod([acc[i, r] for i, r in enumerate(p)])) for p in nodes}
  best = {}
  for mask in range(1 << len(nodes)):
    chosen = {nodes[i] for i in range(len(nodes)) if mask >> i & 1}
    if all(len(p) == 1 or p[:-1] in chosen for p in chosen):
      n = len(chosen)
      best[n] = max(best.get(n, 0.0), sum(value[p] for p in chosen))
  return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_optimal_tree_is_optimal_for_decreasing_accuracies(seed):
  rng = np.random.default_rng(seed)
  acc = -np.sort(-rng.uniform(0, 1, size=(2, 3)), axis=1)  # decreasing along each row
  best = _all_prefix_closed_values(acc)
  for budget in range(1, 13):
    _, value = tree_lib.optimal_tree(acc, budget)
    assert value == pytest.approx(best[budget], abs=1e-12), budget


def test_optimal_tree_validation():
  with pytest.raises(ValueError, match="node_budget: got 7; must be in \\[0, 6\\]"):
    tree_lib.optimal_tree([[0.5, 0.2], [0.3, 0.1]], 7)
  with pytest.raises(ValueError, match="must lie in \\[0, 1\\]"):
    tree_lib.optimal_tree([[1.5]], 1)
  with pytest.raises(ValueError, match="must be \\[depth, top_k\\]"):
    tree_lib.optimal_tree([0.5, 0.2], 1)


def test_choose_node_budget():
  acc = MEDUSA_TOP5
  cpu = {2: 1.5, 4: 1.9, 8: 2.6, 16: 3.4, 64: 6.4}  # reference 1.7, relative to one token
  pick = tree_lib.choose_node_budget(acc, cpu)
  rates = {t: (1 + tree_lib.optimal_tree(acc, t - 1)[1]) / s for t, s in cpu.items()}
  assert pick.num_nodes == max(rates, key=rates.get)
  assert pick.tokens_per_second == pytest.approx(max(rates.values()))
  assert pick.tree.num_nodes == pick.num_nodes
  assert pick.expected_accepted == pytest.approx(
      tree_lib.expected_accept_length(pick.tree, acc))
  # Flat latency (a memory-bound GPU): the biggest tree wins; steep latency: the smallest.
  assert tree_lib.choose_node_budget(acc, {2: 1.0, 16: 1.0, 64: 1.0}).num_nodes == 64
  assert tree_lib.choose_node_budget(acc, {1: 1.0, 2: 10.0, 64: 100.0}).num_nodes == 1
  with pytest.raises(ValueError, match="empty"):
    tree_lib.choose_node_budget(acc, {})
  with pytest.raises(ValueError, match="must be a positive time"):
    tree_lib.choose_node_budget(acc, {4: 0.0})
  with pytest.raises(ValueError, match="key 0 must be a tree size"):
    tree_lib.choose_node_budget(acc, {0: 1.0})



def test_choose_node_budget_counts_the_proposal_cost():
  acc = np.full((4, 1), 0.9)  # one candidate per head: the best trees are chains
  verify = {2: 1.0, 5: 2.5}
  assert tree_lib.choose_node_budget(acc, verify).num_nodes == 2
  # A fixed drafting cost per step (Hydra++'s prefix layer) favours the deeper tree ...
  pick = tree_lib.choose_node_budget(acc, verify, {1: 3.0, 4: 3.0})
  assert pick.num_nodes == 5
  assert pick.tokens_per_second == pytest.approx((1 + 0.9 + 0.81 + 0.729 + 0.6561) / 5.5)
  # ... a cost growing with the depth (one head call per level) the shallower one.
  assert tree_lib.choose_node_budget(acc, {2: 1.0, 5: 1.2}, {1: 0.1, 4: 10.0}).num_nodes == 2
  assert tree_lib.choose_node_budget(acc, {2: 1.0, 5: 1.2}, {1: 0.1, 4: 0.1}).num_nodes == 5
  with pytest.raises(ValueError, match="no time for depth 4"):
    tree_lib.choose_node_budget(acc, verify, {1: 0.1})
  with pytest.raises(ValueError, match="must be a time >= 0"):
    tree_lib.choose_node_budget(acc, verify, {1: -1.0, 4: 0.1})

def test_random_trees_have_consistent_medusa_mask_rows():
  rnd = random.Random(0)
  for _ in range(5):
    names = tree_lib.medusa_tree_names()
    t = tree_lib.load_medusa_tree(rnd.choice(names))
    for i in range(t.num_nodes):
      anc, node = set(), i
      while node >= 0:
        anc.add(node)
        node = int(t.parent[node])
      assert set(np.flatnonzero(t.mask[i]).tolist()) == anc
