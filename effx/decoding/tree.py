"""Draft trees for speculative decoding: one representation, several builders.

A draft tree of T nodes is given by three int32 arrays (node 0 is the root, the token the
base model already chose):

  parent[T]  the parent's node id (-1 for the root); parents come before their children;
  depth[T]   0 for the root, parent depth + 1 otherwise;
  rank[T]    which candidate of its depth the node is (the top-k index of the head that
             proposes it; for sampled children, the draw index). Siblings have distinct ranks.

Everything else (tree mask, retrieve paths, children table, Medusa gather index) is derived.
Builders: `from_choices` (Medusa's lists of rank paths), `chain`, `load_medusa_tree` (the
published Medusa trees), `optimal_tree` (Medusa's greedy growth from measured head accuracies)
and `choose_node_budget` (pick the tree size from measured verify latency).

Pure numpy; a `DraftTree` is hashable so it can be a static argument of `jax.jit`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import heapq
import importlib.resources
import json
import math
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np


def _readonly_int32(values: np.ndarray) -> np.ndarray:
  out = np.array(values, dtype=np.int32)
  out.setflags(write=False)
  return out


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class DraftTree:
  """A static draft tree (see the module docstring).

  Attributes:
    parent: int32 [T]; -1 for the root (node 0), otherwise a smaller node id.
    depth: int32 [T]; 0 for the root, depth[parent] + 1 otherwise.
    rank: int32 [T]; >= 0, the root's is 0, distinct among siblings.

  Arrays are read-only numpy; equality and hashing compare their contents, so a tree can
  be a static argument of `jax.jit`. Derived tables are computed once and cached.
  """

  parent: np.ndarray
  depth: np.ndarray
  rank: np.ndarray

  def __post_init__(self):
    arrays = {}
    for name in ("parent", "depth", "rank"):
      value = np.asarray(getattr(self, name))
      if value.ndim != 1 or value.size == 0:
        raise ValueError(f"DraftTree.{name}: must be a non-empty 1-D array, got shape "
                         f"{value.shape}")
      if not np.issubdtype(value.dtype, np.integer):
        raise ValueError(f"DraftTree.{name}: must hold integers, got dtype {value.dtype}")
      arrays[name] = value
    parent, depth, rank = arrays["parent"], arrays["depth"], arrays["rank"]
    if not parent.shape == depth.shape == rank.shape:
      raise ValueError(f"DraftTree: parent, depth and rank must have one length, got "
                       f"{parent.shape}, {depth.shape}, {rank.shape}")
    if parent[0] != -1 or depth[0] != 0 or rank[0] != 0:
      raise ValueError(f"DraftTree: node 0 must be the root (parent -1, depth 0, rank 0), got "
                       f"parent {parent[0]}, depth {depth[0]}, rank {rank[0]}")
    seen = set()
    for i in range(1, parent.size):
      p = int(parent[i])
      if not 0 <= p < i:
        raise ValueError(f"DraftTree.parent: node {i} has parent {p}; must be in [0, {i}) "
                         "(parents come before their children)")
      if depth[i] != depth[p] + 1:
        raise ValueError(f"DraftTree.depth: node {i} has depth {depth[i]} but its parent {p} "
                         f"has depth {depth[p]}")
      if rank[i] < 0:
        raise ValueError(f"DraftTree.rank: node {i} has rank {rank[i]}; must be >= 0")
      if (p, int(rank[i])) in seen:
        raise ValueError(f"DraftTree.rank: node {i} repeats rank {rank[i]} among the children "
                         f"of node {p}")
      seen.add((p, int(rank[i])))
    for name, value in arrays.items():
      object.__setattr__(self, name, _readonly_int32(value))

  # Identity: contents, so equal trees share one jit cache entry.
  def _key(self) -> tuple[bytes, bytes, bytes]:
    return (self.parent.tobytes(), self.depth.tobytes(), self.rank.tobytes())

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, DraftTree):
      return NotImplemented
    return self._key() == other._key()

  def __hash__(self) -> int:
    return hash(self._key())

  def __repr__(self) -> str:
    return (f"DraftTree(num_nodes={self.num_nodes}, max_depth={self.max_depth}, "
            f"num_paths={self.num_paths}, nodes_per_depth={self.nodes_per_depth.tolist()})")

  # Sizes.
  @property
  def num_nodes(self) -> int:
    """T, the number of nodes including the root."""
    return int(self.parent.size)

  @property
  def max_depth(self) -> int:
    """D, the depth of the deepest node (the most draft tokens one step can accept)."""
    return int(self.depth.max())

  @property
  def is_chain(self) -> bool:
    """Whether node i's parent is node i - 1 for every i >= 1: every root-to-node path is then
    nodes 0..d, so accepted nodes already sit in contiguous KV-cache slots."""
    return bool(np.array_equal(self.parent[1:], np.arange(self.num_nodes - 1)))

  @property
  def num_paths(self) -> int:
    """P, the number of leaves (= root-to-leaf paths)."""
    return int(self.leaves.size)

  @functools.cached_property
  def nodes_per_depth(self) -> np.ndarray:
    """int32 [D+1]: how many nodes sit at each depth (index 0 is the root)."""
    return _readonly_int32(np.bincount(self.depth, minlength=self.max_depth + 1))

  # Derived tables.
  @functools.cached_property
  def mask(self) -> np.ndarray:
    """bool [T, T]: mask[i, j] iff j is i or an ancestor of i (the root column is all True)."""
    t = self.num_nodes
    mask = np.zeros((t, t), dtype=bool)
    mask[0, 0] = True
    for i in range(1, t):
      mask[i] = mask[self.parent[i]]
      mask[i, i] = True
    mask.setflags(write=False)
    return mask

  @functools.cached_property
  def num_children(self) -> np.ndarray:
    """int32 [T]: number of children of each node."""
    return _readonly_int32(np.bincount(self.parent[1:], minlength=self.num_nodes))

  @property
  def max_children(self) -> int:
    """C, the largest number of children of one node (at least 1, so tables are never empty)."""
    return max(1, int(self.num_children.max()))

  @functools.cached_property
  def children(self) -> np.ndarray:
    """int32 [T, C]: each node's children in increasing rank order, padded with -1.

    This is the order in which verifiers try siblings.
    """
    table = np.full((self.num_nodes, self.max_children), -1, dtype=np.int32)
    kids = collections.defaultdict(list)
    for i in range(1, self.num_nodes):
      kids[int(self.parent[i])].append((int(self.rank[i]), i))
    for p, items in kids.items():
      table[p, :len(items)] = [i for _, i in sorted(items)]
    table.setflags(write=False)
    return table

  @functools.cached_property
  def leaves(self) -> np.ndarray:
    """int32 [P]: the leaf node ids, increasing."""
    return _readonly_int32(np.flatnonzero(self.num_children == 0))

  @functools.cached_property
  def paths(self) -> np.ndarray:
    """int32 [P, D+1]: one row per leaf (increasing leaf id), root-to-leaf node ids, -1 padded."""
    table = np.full((self.num_paths, self.max_depth + 1), -1, dtype=np.int32)
    for row, leaf in enumerate(self.leaves):
      node = int(leaf)
      while node >= 0:
        table[row, self.depth[node]] = node
        node = int(self.parent[node])
    table.setflags(write=False)
    return table

  @property
  def path_lengths(self) -> np.ndarray:
    """int32 [P]: valid entries per row of `paths` (leaf depth + 1, the root included)."""
    return _readonly_int32(self.depth[self.leaves] + 1)

  def medusa_gather_index(self, top_k: int) -> np.ndarray:
    """int32 [T]: node -> index into the flat candidates [root, head0 top-k, head1 top-k, ...].

    Node at depth d >= 1 with rank r takes r + top_k * (d - 1) + 1; the root takes 0. Valid for
    Medusa-style trees, whose node token depends only on (depth, rank).
    """
    if not isinstance(top_k, (int, np.integer)) or top_k < 1:
      raise ValueError(f"top_k: got {top_k!r}; must be a positive integer")
    if self.rank.max() >= top_k:
      raise ValueError(f"top_k: got {top_k}, but the tree uses rank {self.rank.max()}; "
                       f"ranks must be < top_k")
    index = self.rank + top_k * (self.depth - 1) + 1
    index[0] = 0
    return _readonly_int32(index)

  def to_choices(self) -> list[list[int]]:
    """The Medusa choice list of this tree (rank paths of the non-root nodes, in node order)."""
    out = []
    for i in range(1, self.num_nodes):
      path, node = [], i
      while node > 0:
        path.append(int(self.rank[node]))
        node = int(self.parent[node])
      out.append(path[::-1])
    return out


def from_parents(parent: Sequence[int], rank: Sequence[int] | None = None) -> DraftTree:
  """A tree from parent ids (parents before children); depth is derived, rank defaults to the
  order among siblings."""
  parent = np.asarray(parent)
  if parent.ndim != 1 or parent.size == 0:
    raise ValueError(f"parent: must be a non-empty 1-D sequence, got shape {parent.shape}")
  depth = np.zeros(parent.size, dtype=np.int64)
  counts = collections.Counter()
  default_rank = np.zeros(parent.size, dtype=np.int64)
  for i in range(1, parent.size):
    p = int(parent[i])
    if not 0 <= p < i:
      raise ValueError(f"parent: node {i} has parent {p}; must be in [0, {i})")
    depth[i] = depth[p] + 1
    default_rank[i] = counts[p]
    counts[p] += 1
  return DraftTree(parent=parent, depth=depth,
                   rank=default_rank if rank is None else np.asarray(rank))


def from_choices(choices: Sequence[Sequence[int]], top_k: int | None = None) -> DraftTree:
  """A tree from a Medusa-style choice list.

  Args:
    choices: one entry per draft node: the path of per-depth ranks from the root, e.g.
      [[0], [1], [0, 0]]. Must be non-empty, duplicate-free and prefix-closed (every
      entry's parent path is listed too). Any order; nodes are numbered by (length,
      lexicographic), node 0 being the implicit root.
    top_k: if given, every rank must be < top_k.

  Raises:
    ValueError (one line) naming the offending entry.
  """
  if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
    raise ValueError(f"top_k: got {top_k!r}; must be a positive integer or None")
  if isinstance(choices, (str, bytes)) or not isinstance(choices, Sequence):
    raise ValueError(f"choices: must be a list of rank paths, got {type(choices).__name__}")
  if len(choices) == 0:
    raise ValueError("choices: empty; list at least one draft node (the root is implicit)")
  paths = []
  for i, choice in enumerate(choices):
    if isinstance(choice, (str, bytes)) or not isinstance(choice, Sequence):
      raise ValueError(f"choices[{i}]: {choice!r} is not a sequence of ranks")
    if len(choice) == 0:
      raise ValueError(f"choices[{i}]: empty path; the root is implicit, list draft nodes only")
    for r in choice:
      if isinstance(r, bool) or not isinstance(r, (int, np.integer)):
        raise ValueError(f"choices[{i}]: {list(choice)!r} has a non-integer rank {r!r}")
      if r < 0:
        raise ValueError(f"choices[{i}]: {list(choice)} has a negative rank {r}")
      if top_k is not None and r >= top_k:
        raise ValueError(f"choices[{i}]: {list(choice)} has rank {r}; must be < top_k={top_k}")
    paths.append(tuple(int(r) for r in choice))
  seen = set()
  for i, path in enumerate(paths):
    if path in seen:
      raise ValueError(f"choices[{i}]: duplicate path {list(path)}")
    seen.add(path)
  ordered = sorted(paths, key=lambda p: (len(p), p))
  for path in ordered:
    if len(path) > 1 and path[:-1] not in seen:
      raise ValueError(f"choices: not prefix-closed: {list(path)} needs its parent path "
                       f"{list(path[:-1])}, which is missing")
  node_of = {(): 0}
  for i, path in enumerate(ordered, start=1):
    node_of[path] = i
  parent = [-1] + [node_of[p[:-1]] for p in ordered]
  depth = [0] + [len(p) for p in ordered]
  rank = [0] + [p[-1] for p in ordered]
  return DraftTree(parent=np.array(parent), depth=np.array(depth), rank=np.array(rank))


def chain(length: int) -> DraftTree:
  """A chain of `length` draft nodes after the root (classic speculative decoding, γ = length)."""
  if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length < 0:
    raise ValueError(f"length: got {length!r}; must be an integer >= 0")
  t = int(length) + 1
  return DraftTree(parent=np.arange(-1, t - 1), depth=np.arange(t), rank=np.zeros(t, np.int64))


_MEDUSA_TOP_K = 10


@functools.cache
def _medusa_data() -> dict:
  text = importlib.resources.files("effx.decoding").joinpath("data", "medusa_trees.json")
  return json.loads(text.read_text(encoding="utf-8"))


def medusa_tree_names() -> list[str]:
  """Names of the published Medusa trees shipped with effx (effx/decoding/data)."""
  return sorted(_medusa_data()["trees"])


def medusa_trees_source() -> str:
  """Where the shipped Medusa choice lists come from."""
  return _medusa_data()["source"]


def load_medusa_tree(name: str) -> DraftTree:
  """One of Medusa's published trees (63 draft nodes, top-k 10), e.g. "mc_sim_7b_63"."""
  trees = _medusa_data()["trees"]
  if name not in trees:
    raise ValueError(f"name: unknown Medusa tree {name!r}; available: {sorted(trees)}")
  return from_choices(trees[name], top_k=_MEDUSA_TOP_K)


def _check_acceptance(acceptance: np.ndarray) -> np.ndarray:
  acc = np.asarray(acceptance, dtype=np.float64)
  if acc.ndim != 2 or acc.shape[0] == 0 or acc.shape[1] == 0:
    raise ValueError(f"acceptance: must be [depth, top_k] with both > 0, got shape {acc.shape}")
  if not np.all(np.isfinite(acc)) or acc.min() < 0 or acc.max() > 1:
    raise ValueError(f"acceptance: probabilities must lie in [0, 1], got range "
                     f"[{acc.min()}, {acc.max()}]")
  return acc


def expected_accept_length(tree: DraftTree, acceptance: np.ndarray) -> float:
  """Expected accepted draft tokens per step under independent per-head accuracies.

  Args:
    tree: a tree with max_depth <= D and ranks < K.
    acceptance: float [D, K]; acceptance[d, r] = P(head d's rank-r candidate is right).

  Returns:
    Σ over non-root nodes of the product of acceptance along the node's path (each node is
    accepted iff every candidate on its path is right; siblings are mutually exclusive).
  """
  acc = _check_acceptance(acceptance)
  if tree.max_depth > acc.shape[0] or tree.rank.max() >= acc.shape[1]:
    raise ValueError(f"acceptance: shape {acc.shape} does not cover the tree (depth "
                     f"{tree.max_depth}, largest rank {tree.rank.max()})")
  value = np.ones(tree.num_nodes)
  for i in range(1, tree.num_nodes):
    value[i] = value[tree.parent[i]] * acc[tree.depth[i] - 1, tree.rank[i]]
  return float(value[1:].sum())


def optimal_tree(acceptance: np.ndarray, node_budget: int) -> tuple[DraftTree, float]:
  """Medusa's greedy tree search from measured per-head accuracies.

  Starting from the root, repeatedly add the neighbour of the current node set (the next
  sibling, rank + 1, of a node in the set, or the first child, rank 0, of a node in the set)
  whose path product Π_i acceptance[i, rank_i] is largest (ties: shorter, then lexicographically
  smaller path). The tree stays prefix-closed and left-packed. When acceptance decreases along
  each row (the usual case: a rank-r candidate is likelier than a rank-(r+1) one), the result
  maximises the expected accepted length among all trees of that size.

  Args:
    acceptance: float [D, K] in [0, 1]; acceptance[d, r] = P(head d's rank-r candidate right).
    node_budget: number of draft (non-root) nodes; the tree has node_budget + 1 nodes.

  Returns:
    (tree, expected accepted draft tokens per step = Σ of node path products).
  """
  acc = _check_acceptance(acceptance)
  depth, top_k = acc.shape
  if isinstance(node_budget, bool) or not isinstance(node_budget, (int, np.integer)):
    raise ValueError(f"node_budget: got {node_budget!r}; must be an integer")
  capacity = sum(top_k ** d for d in range(1, depth + 1))
  if not 0 <= node_budget <= capacity:
    raise ValueError(f"node_budget: got {node_budget}; must be in [0, {capacity}] for "
                     f"acceptance of shape {acc.shape}")
  if node_budget == 0:
    return chain(0), 0.0
  # Heap entries: (-value, len(path), path, parent_value).
  heap = [(-acc[0, 0], 1, (0,), 1.0)]
  chosen, total = [], 0.0
  while len(chosen) < node_budget:
    neg_value, length, path, parent_value = heapq.heappop(heap)
    value = -neg_value
    chosen.append(list(path))
    total += value
    r = path[-1]
    if r + 1 < top_k:
      heapq.heappush(heap, (-parent_value * acc[length - 1, r + 1], length,
                            path[:-1] + (r + 1,), parent_value))
    if length < depth:
      heapq.heappush(heap, (-value * acc[length, 0], length + 1, path + (0,), value))
  return from_choices(chosen, top_k=top_k), float(total)


class TreeBudget(NamedTuple):
  """The tree size `choose_node_budget` picked.

  Attributes:
    num_nodes: T, tree size including the root (a key of the latency table).
    tree: the optimal tree with T nodes.
    expected_accepted: expected accepted draft tokens per step.
    tokens_per_second: (1 + expected_accepted) / seconds per step, the criterion maximised.
  """

  num_nodes: int
  tree: DraftTree
  expected_accepted: float
  tokens_per_second: float


def choose_node_budget(acceptance: np.ndarray, latency_per_tree_size: Mapping[int, float],
                       proposal_latency_per_depth: Mapping[int, float] | None = None
                       ) -> TreeBudget:
  """Picks the tree size with the most expected tokens per second.

  Args:
    acceptance: float [D, K] per-head accuracies (see `optimal_tree`).
    latency_per_tree_size: measured seconds of one verify step (forward over T tree tokens,
      plus whatever else one step costs) for candidate sizes T = num_nodes, the root included.
    proposal_latency_per_depth: measured seconds the proposer takes to draft (and commit) a
      tree of depth d, for every depth 1..D a candidate tree can have; added to the verify
      latency of each candidate (drafting is not free: Hydra runs a head per level, Hydra++
      also a prefix layer).

  Returns:
    `TreeBudget` maximising (1 + expected accepted) / (latency[T] + proposal[depth of the
    tree]); ties go to the smaller T.
  """
  acc = _check_acceptance(acceptance)
  if not latency_per_tree_size:
    raise ValueError("latency_per_tree_size: empty; give seconds per verify step for at least "
                     "one tree size")
  proposal = dict(proposal_latency_per_depth or {})
  for d, seconds in proposal.items():
    if not (math.isfinite(float(seconds)) and seconds >= 0):
      raise ValueError(f"proposal_latency_per_depth[{d}]: got {seconds}; must be a time >= 0")
  capacity = sum(acc.shape[1] ** d for d in range(1, acc.shape[0] + 1))
  best = None
  for size in sorted(latency_per_tree_size):
    seconds = float(latency_per_tree_size[size])
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not (
        1 <= size <= capacity + 1):
      raise ValueError(f"latency_per_tree_size: key {size!r} must be a tree size in "
                       f"[1, {capacity + 1}] (nodes including the root)")
    if not (math.isfinite(seconds) and seconds > 0):
      raise ValueError(f"latency_per_tree_size[{size}]: got {seconds}; must be a positive time")
    tree, expected = optimal_tree(acc, int(size) - 1)
    if proposal_latency_per_depth is not None and tree.max_depth > 0:  # a root alone: no drafts
      if tree.max_depth not in proposal:
        raise ValueError(f"proposal_latency_per_depth: no time for depth {tree.max_depth} (the "
                         f"best tree of {size} nodes); measured depths {sorted(proposal)}")
      seconds += float(proposal[tree.max_depth])
    rate = (1.0 + expected) / seconds
    if best is None or rate > best.tokens_per_second:
      best = TreeBudget(int(size), tree, expected, rate)
  return best


__all__ = ["DraftTree", "TreeBudget", "chain", "choose_node_budget", "expected_accept_length",
           "from_choices", "from_parents", "load_medusa_tree", "medusa_tree_names",
           "medusa_trees_source", "optimal_tree"]
