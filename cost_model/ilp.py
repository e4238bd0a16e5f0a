"""The strategy-selection ILP (Alpa's formulation), behind a typed boundary.

One binary per (node, strategy) with exactly one chosen per node. Each edge between
two nodes carries a cost that depends only on the producer's output layout class
and the consumer's required layout class; it gets continuous variables e[a, b] whose
row and column sums equal the chosen classes (integral choices force e to 0/1).
Ties force two nodes to pick the same layout class (state in == state out).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp


@dataclass(frozen=True)
class Edge:
    """Cost between node u's class (row) and node v's class (column)."""

    u: int
    v: int
    u_class: np.ndarray  # per strategy of u: its row class
    v_class: np.ndarray  # per strategy of v: its column class
    cost: np.ndarray  # [rows, columns] seconds


@dataclass(frozen=True)
class Tie:
    """Nodes u and v must choose strategies of the same class (a shared numbering)."""

    u: int
    v: int
    u_class: np.ndarray
    v_class: np.ndarray


@dataclass(frozen=True)
class SharedCost:
    """A cost paid once if any listed (node, strategies) choice is made: the latency
    of one fused collective shared by every operation that joins it."""

    cost: float
    members: tuple[tuple[int, tuple[int, ...]], ...]  # (node, its strategies that join)


@dataclass(frozen=True)
class SolverRequest:
    node_costs: tuple[np.ndarray, ...]
    edges: tuple[Edge, ...] = ()
    ties: tuple[Tie, ...] = ()
    time_limit: float = 60.0
    shared: tuple[SharedCost, ...] = ()


@dataclass(frozen=True)
class SolverResult:
    choice: tuple[int, ...]
    objective: float
    status: str  # "optimal" | "time_limit" | "fallback"
    solve_time: float
    num_variables: int
    num_constraints: int


def evaluate(request: SolverRequest, choice) -> tuple[float, list[str]]:
    """Recompute the objective of a choice and list every violated constraint."""
    bad = [
        f"node {i}: strategy {k} out of range"
        for i, (c, k) in enumerate(zip(request.node_costs, choice, strict=True))
        if not 0 <= k < len(c)
    ]
    if bad:
        return float("nan"), bad
    obj = sum(float(c[k]) for c, k in zip(request.node_costs, choice, strict=True))
    for e in request.edges:
        obj += float(e.cost[e.u_class[choice[e.u]], e.v_class[choice[e.v]]])
    for sc in request.shared:
        if any(choice[n] in js for n, js in sc.members):
            obj += sc.cost
    for t in request.ties:
        if t.u_class[choice[t.u]] != t.v_class[choice[t.v]]:
            bad.append(f"tie {t.u}-{t.v}: classes differ")
    return obj, bad


class _Rows:
    """Accumulates sparse rows: equalities, and `<= 0` inequalities."""

    def __init__(self) -> None:
        self.r, self.c, self.v, self.rhs = [], [], [], []
        self.is_ineq: list[bool] = []

    def add(self, cols, vals, rhs: float) -> None:
        n = len(self.rhs)
        self.r += [n] * len(cols)
        self.c += list(cols)
        self.v += list(vals)
        self.rhs.append(rhs)
        self.is_ineq.append(False)

    def ineq(self, cols, vals) -> None:
        """sum(vals * x[cols]) <= 0."""
        self.add(cols, vals, 0.0)
        self.is_ineq[-1] = True


def solve(request: SolverRequest) -> SolverResult:
    """Solve exactly with HiGHS (scipy.optimize.milp). If no feasible point comes back
    (time-out before one is found, or an infeasible request), or the time-limited
    incumbent costs more than it, the result is strategy 0 everywhere (fully
    replicated) with status "fallback"."""
    t0 = time.perf_counter()
    offs = np.cumsum([0] + [len(c) for c in request.node_costs])
    n_s = int(offs[-1])
    cost = [np.asarray(c, float) for c in request.node_costs]
    rows = _Rows()
    for i in range(len(cost)):
        rows.add(range(offs[i], offs[i + 1]), [1.0] * len(cost[i]), 1.0)
    n_var = n_s
    for e in request.edges:
        nr, nc = e.cost.shape
        base = n_var
        n_var += nr * nc
        cost.append(e.cost.ravel())
        for a in range(nr):
            us = offs[e.u] + np.flatnonzero(e.u_class == a)
            rows.add(
                [base + a * nc + b for b in range(nc)] + list(us), [1.0] * nc + [-1.0] * len(us), 0
            )
        for b in range(nc):
            vs = offs[e.v] + np.flatnonzero(e.v_class == b)
            rows.add(
                [base + a * nc + b for a in range(nr)] + list(vs), [1.0] * nr + [-1.0] * len(vs), 0
            )
    for t in request.ties:
        for k in np.union1d(t.u_class, t.v_class):
            us = list(offs[t.u] + np.flatnonzero(t.u_class == k))
            vs = list(offs[t.v] + np.flatnonzero(t.v_class == k))
            coef: dict[int, float] = {}
            for j in us:
                coef[j] = coef.get(j, 0.0) + 1.0
            for j in vs:
                coef[j] = coef.get(j, 0.0) - 1.0
            rows.add(list(coef), list(coef.values()), 0)
    for sc in request.shared:  # y >= chosen(node in members), y in [0, 1], cost * y
        y = n_var
        n_var += 1
        cost.append(np.array([sc.cost]))
        for n, js in sc.members:
            rows.ineq(list(offs[n] + np.asarray(js)) + [y], [1.0] * len(js) + [-1.0])
    c = np.concatenate(cost)
    a = sp.csr_array((rows.v, (rows.r, rows.c)), shape=(len(rows.rhs), n_var))
    lo = np.array(rows.rhs, float)
    lo[rows.is_ineq] = -np.inf
    integrality = np.r_[np.ones(n_s), np.zeros(n_var - n_s)]
    res = milp(
        c,
        constraints=LinearConstraint(a, lo, rows.rhs),
        integrality=integrality,
        bounds=Bounds(0, 1),
        options={"time_limit": request.time_limit, "mip_rel_gap": 1e-6},
    )
    if res.x is None:
        choice = tuple(0 for _ in request.node_costs)
        status = "fallback"
    else:
        x = res.x[:n_s]
        choice = tuple(
            int(np.argmax(x[offs[i] : offs[i + 1]])) for i in range(len(request.node_costs))
        )
        status = "optimal" if res.status == 0 else "time_limit"
    obj, _ = evaluate(request, choice)
    replicated = tuple(0 for _ in request.node_costs)
    if status == "time_limit" and evaluate(request, replicated)[0] < obj:
        # a time-limited incumbent can be far from optimal; never return worse than
        # the always-feasible replicated plan
        choice, obj, status = replicated, evaluate(request, replicated)[0], "fallback"
    return SolverResult(choice, obj, status, time.perf_counter() - t0, n_var, len(rows.rhs))
