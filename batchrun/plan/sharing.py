"""Which shared prefixes to group sequences under: the choice that saves the most.

A group of m sequences that share their first P tokens (or KV blocks) needs that prefix once
instead of m times: it saves P * (m - 1). Each sequence joins at most one group, whose prefix
is a node on its path in the prefix tree, and `choose_groups` picks the nodes whose groups
save the most in total. Two parts of batchrun ask this question: the planner, of a whole
job's block tree (which requests run as a prefix group, computing the prefix once), and the
attention backends, of one engine step's block tables (which sequences read a prefix once).

Worked example, five sequences: a 2-block system prompt S shared by all, and a 6-block
document D after it shared by two of them::

    root -- S (depth 2: a, b, c, d, e) -- D (depth 6: a, b)

- one group under S, all five:                 2 * (5 - 1) = 8
- a group under D (a, b) and one under S for the other three:
                                    6 * (2 - 1) + 2 * (3 - 1) = 10   <- chosen
- a group under D alone:                        6 * (2 - 1) = 6

A node's group holds the sequences of its subtree that no deeper group took (BatchLLM's
dynamic programme lets a node's group take its whole subtree or none of it, a smaller family
of choices, so this never saves less).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .prefix_tree import PrefixTree


def choose_groups(tree: PrefixTree, *, deeper_wins_ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """The groups that maximise sum(P * (members - 1)) over the tree's sequences.

    Returns, per node: `owner`, the nearest chosen node at or above it (0, the root: no
    group), so a sequence's group is `owner[tree.request_node[position]]`; and `group_parent`,
    for chosen nodes the enclosing chosen node (0: none), -1 for the others.

    On a tie, `deeper_wins_ties` takes the deeper group: the planner wants that, a sequence
    sharing a prefix only with deeper groups then runs next to them as a group of one (see
    `_pick`). Otherwise the sequences stay in the enclosing group: fewer, larger groups,
    which is what a kernel launch per group wants.
    """
    levels = _Levels.of(tree.node_parent, tree.node_depth)
    direct = np.bincount(tree.request_node, minlength=tree.num_nodes)
    as_group, joining = _best_savings(tree, levels, direct)
    return _pick(tree, levels, as_group, joining, deeper_wins_ties)


@dataclass(frozen=True)
class _Levels:
    """The tree's nodes level by level (a node's level: how many ancestors it has), so that
    a dynamic programme over the tree is one vectorised step per level.

    E.g. root (0) > S (1) > D (2), and a second system prompt T (3) under the root:
    level = [0, 1, 2, 1], nodes = [[0], [1, 3], [2]], row = [0, 0, 0, 1] (T is the second
    node of level 1), ancestor_depths[2] = [[0, 2]] (D's ancestors: the root, S)."""

    level: np.ndarray  # per node
    nodes: list[np.ndarray]  # per level: its nodes, in pre-order
    row: np.ndarray  # per node: its place among the nodes of its level
    ancestor_depths: list[np.ndarray]  # per level k: [nodes of level k, k], root first

    @classmethod
    def of(cls, parent: np.ndarray, depth: np.ndarray) -> _Levels:
        level = node_levels(parent)
        nodes = [np.flatnonzero(level == k) for k in range(int(level.max()) + 1)]
        row = np.empty(len(parent), dtype=np.int64)
        for at_level in nodes:
            row[at_level] = np.arange(len(at_level))
        ancestor_depths = [np.zeros((1, 0), dtype=np.int64)]
        for at_level in nodes[1:]:
            up = parent[at_level]
            ancestor_depths.append(np.hstack([ancestor_depths[-1][row[up]], depth[up][:, None]]))
        return cls(level, nodes, row, ancestor_depths)


def node_levels(parent: np.ndarray) -> np.ndarray:
    """Number of ancestors of each node (root: 0), by pointer jumping: each round doubles how
    far `up` reaches, so a chain of n nodes takes log2(n) rounds."""
    level = (parent >= 0).astype(np.int64)
    up = np.maximum(parent, 0)
    while (up > 0).any():
        level += level[up]
        up = up[up]
    return level


def _best_savings(tree: PrefixTree, levels: _Levels,
                  direct: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Bottom-up, level by level: what each node's subtree can save.

    best(u, Q) is the most a subtree saves when its sequences that join no group inside it
    join an enclosing group whose prefix is Q tokens long:

        best(u, Q)  = max(as_group(u), joining(u, Q))
        as_group(u) = sum_c best(c, P_u) + P_u * direct(u) - P_u   (u's own group)
        joining(u, Q) = sum_c best(c, Q) + Q * direct(u)           (no group at u)

    over u's children c, with `direct(u)` the sequences whose deepest node is u and P_u its
    depth. Q only takes the depths of u's ancestors, so a level is one array with a column
    per ancestor. In the module's example, with D's column for Q = S's depth 2:
    as_group(D) = 6 * 2 - 6 = 6 and joining(D, 2) = 2 * 2 = 4; then as_group(S) =
    best(D, 2) + 2 * 3 - 2 = 6 + 4 = 10.
    Returns as_group and joining per level (index 0, the root, unused).
    """
    depth, parent = tree.node_depth, tree.node_parent
    top = len(levels.nodes) - 1
    as_group: list[np.ndarray] = [np.zeros(0, dtype=np.int64)] * (top + 1)
    joining: list[np.ndarray] = [np.zeros((0, 0), dtype=np.int64)] * (top + 1)
    best_of_level = None  # best(u, Q) of the level below, one row per node
    for k in range(top, 0, -1):
        nodes = levels.nodes[k]
        children = np.zeros((len(nodes), k + 1), dtype=np.int64)  # sum_c best(c, Q)
        if best_of_level is not None:  # children follow their parents' order (pre-order)
            up = levels.row[parent[levels.nodes[k + 1]]]
            runs = np.flatnonzero(np.diff(up, prepend=-1))
            children[up[runs]] = np.add.reduceat(best_of_level, runs, axis=0)
        p, d = depth[nodes], direct[nodes]
        as_group[k] = children[:, k] + p * d - p
        joining[k] = children[:, :k] + levels.ancestor_depths[k] * d[:, None]
        best_of_level = np.maximum(as_group[k][:, None], joining[k])
    return as_group, joining


def _pick(tree: PrefixTree, levels: _Levels, as_group: list[np.ndarray],
          joining: list[np.ndarray], deeper_wins_ties: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-down, level by level: a node forms a group when that saves more than joining the
    group its parent's sequences join (`choose_groups` returns what this finds).

    A tie at the root, with deeper groups winning ties, is a sequence that shares u's prefix
    only with deeper groups: as a group of u it runs next to them (in no group, it would
    compute the prefix again). An empty group never ties: it loses P_u.
    """
    parent = tree.node_parent
    owner = np.zeros(tree.num_nodes, dtype=np.int64)
    group_parent = np.full(tree.num_nodes, -1, dtype=np.int64)
    for k in range(1, len(levels.nodes)):
        nodes = levels.nodes[k]
        outer = owner[parent[nodes]]
        alone, joined = as_group[k], joining[k][np.arange(len(nodes)), levels.level[outer]]
        chosen = alone >= joined if deeper_wins_ties else alone > joined
        owner[nodes] = np.where(chosen, nodes, outer)
        group_parent[nodes[chosen]] = outer[chosen]
    return owner, group_parent
