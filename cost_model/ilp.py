"""The strategy-selection ILP (Alpa's formulation), behind a typed boundary.

One binary per (node, strategy) with exactly one chosen per node. Each edge between
two nodes carries a cost that depends only on the producer's output layout class
and the consumer's required layout class; it gets continuous variables e[a, b] whose
row and column sums equal the chosen classes (integral choices force e to 0/1).
Ties force two nodes to pick the same layout class (state in == state out).
"""

from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

# Relative slack of evaluate's memory check (float rounding of summed bytes).
EVAL_TOLERANCE = 1e-9
# HiGHS stops when the incumbent is within this relative gap of the bound: plans,
# and the least-memory search behind MemoryBudgetError's message.
MIP_REL_GAP = 1e-6
MIN_MEMORY_REL_GAP = 1e-4
# HiGHS's presolve on the strategy ILP. Off: on the demo GPT's (2, 4) problem presolve
# leaves HiGHS without a good incumbent for over a minute, or not, depending on the
# last bits of the costs; without it the same problem solves in about a second.
# (benchmarks/plan_time.py: equal or faster on every case with it off, same plans).
PRESOLVE = False


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


# A linear form over the choices: const plus, per (node, coefficients), the chosen
# strategy's coefficient.
Terms = tuple[tuple[int, np.ndarray], ...]


def _form(terms: Terms, const: float, choice) -> float:
    return const + sum(float(c[choice[n]]) for n, c in terms)


@dataclass(frozen=True)
class Copy:
    """A resharded copy (a gathered parameter, say): nbytes per device, alive when
    any witness is positive. A witness is a linear form over the choices (`Terms`, and
    a constant) that is 1 when the copy exists at the row's point (a reader before it,
    or the step's start for a copy of a step argument, and one after it both want the
    layout, and the producer does not already have it) and at most 0 otherwise. In the
    ILP each copy is a variable in [0, 1] at least every witness, so the rows count it
    exactly at integral choices."""

    nbytes: float
    witnesses: tuple[tuple[Terms, float], ...]

    def alive(self, choice) -> bool:
        return any(_form(t, c, choice) > 0.5 for t, c in self.witnesses)

    @functools.cached_property
    def key(self) -> tuple:
        """Equal for copies with equal witnesses (one ILP variable serves them)."""
        return tuple(witness_key(t, k) for t, k in self.witnesses)


def witness_key(terms: Terms, const: float) -> tuple:
    return tuple((n, np.asarray(c, float).tobytes()) for n, c in terms), const


def merge_copies(copies) -> tuple[Copy, ...]:
    """Copies with equal witnesses (copies of repeated layers) as one, bytes summed."""
    merged: dict[tuple, Copy] = {}
    for c in copies:
        k = c.key
        old = merged.get(k)
        merged[k] = c if old is None else Copy(old.nbytes + c.nbytes, c.witnesses)
    return tuple(merged.values())


@dataclass(frozen=True)
class MemoryRow:
    """Per-device bytes alive at one point of the step: `const` plus, for each (node,
    bytes), the chosen strategy's entry of bytes (linear in the choices), plus the
    resharded copies alive there (`Copy`)."""

    terms: Terms
    const: float = 0.0
    copies: tuple[Copy, ...] = ()

    def value(self, choice) -> float:
        copies = sum(c.nbytes for c in self.copies if c.alive(choice))
        return _form(self.terms, self.const, choice) + copies


@dataclass(frozen=True)
class SolverRequest:
    node_costs: tuple[np.ndarray, ...]
    edges: tuple[Edge, ...] = ()
    ties: tuple[Tie, ...] = ()
    time_limit: float = 60.0
    shared: tuple[SharedCost, ...] = ()
    memory: tuple[MemoryRow, ...] = ()  # each must stay within memory_budget
    memory_budget: float | None = None
    # only plans cheaper than this are wanted (a plan found elsewhere costs it): HiGHS
    # prunes every branch whose bound reaches it, as an incumbent of that cost would
    # let it; status "cutoff" when no plan is cheaper
    cutoff: float | None = None


@dataclass(frozen=True)
class SolverResult:
    choice: tuple[int, ...]
    objective: float
    status: str  # "optimal" | "time_limit" | "fallback" | "infeasible" | "cutoff"
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
    if request.memory_budget is not None:
        for k, row in enumerate(request.memory):
            if row.value(choice) > request.memory_budget * (1 + EVAL_TOLERANCE):
                bad.append(f"memory row {k}: {row.value(choice):.0f} > {request.memory_budget:.0f}")
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

    def ineq(self, cols, vals, rhs: float = 0.0) -> None:
        """sum(vals * x[cols]) <= rhs."""
        self.add(cols, vals, rhs)
        self.is_ineq[-1] = True

    def one_each(self, request: SolverRequest, offs) -> None:
        """Exactly one strategy per node."""
        for i in range(len(request.node_costs)):
            self.add(range(offs[i], offs[i + 1]), [1.0] * int(offs[i + 1] - offs[i]), 1.0)

    def constraint(self, n_var: int) -> LinearConstraint:
        a = sp.csr_array((self.v, (self.r, self.c)), shape=(len(self.rhs), n_var))
        lo = np.array(self.rhs, float)
        lo[self.is_ineq] = -np.inf
        return LinearConstraint(a, lo, self.rhs)

    def ties(self, request: SolverRequest, offs) -> None:
        """Per tie and class: (u picks that class) == (v picks that class)."""
        for t in request.ties:
            for k in np.union1d(t.u_class, t.v_class):
                coef: dict[int, float] = {}
                for j in offs[t.u] + np.flatnonzero(t.u_class == k):
                    coef[int(j)] = coef.get(int(j), 0.0) + 1.0
                for j in offs[t.v] + np.flatnonzero(t.v_class == k):
                    coef[int(j)] = coef.get(int(j), 0.0) - 1.0
                self.add(list(coef), list(coef.values()), 0)

    def memory(self, request: SolverRequest, offs, n_var: int, extra: int | None = None) -> int:
        """Each memory row <= the budget, or (extra given) <= the variable x[extra]
        (in `memory_unit`s).
        Resharded copies get variables from n_var on (one per distinct copy, in
        [0, 1], each at least its witnesses); returns the variable count after them."""
        copy_var: dict[tuple, int] = {}
        unit = memory_unit(request)
        for row in request.memory:
            cols, vals = [], []
            for n, b in row.terms:
                cols += list(offs[n] + np.arange(len(b)))
                vals += list(np.asarray(b, float) / unit)
            for cp in row.copies:
                key = cp.key
                if key not in copy_var:
                    copy_var[key] = n_var
                    for terms, const in cp.witnesses:  # witness - z <= 0
                        wc, wv = _linear(terms, offs)
                        self.ineq([*wc, n_var], [*wv, -1.0], -const)
                    n_var += 1
                cols.append(copy_var[key])
                vals.append(cp.nbytes / unit)
            if extra is None:
                self.ineq(cols, vals, (request.memory_budget - row.const) / unit)
            else:
                self.ineq([*cols, extra], [*vals, -1.0], -row.const / unit)
        return n_var


def memory_unit(request: SolverRequest) -> float:
    """The bytes of one unit of the memory rows as HiGHS gets them: the largest entry
    of any row. In bytes (coefficients up to ~1e11 beside the 0/1 rows of resharded
    copies) HiGHS can find a feasible problem infeasible."""
    most = [float(np.max(np.abs(b), initial=0.0)) for r in request.memory for _, b in r.terms]
    most += [c.nbytes for r in request.memory for c in r.copies]
    return max([1.0, *most])


def _linear(terms: Terms, offs) -> tuple[list[int], list[float]]:
    """Columns and coefficients of a linear form over the strategy variables."""
    cols: list[int] = []
    vals: list[float] = []
    for n, coef in terms:
        coef = np.asarray(coef, float)
        nz = np.flatnonzero(coef)
        cols += (offs[n] + nz).tolist()
        vals += coef[nz].tolist()
    return cols, vals


def _problem(request: SolverRequest):
    """(objective, constraints, integer strategy count, offsets) of the full ILP:
    one-hot node choices, edge variables tied to them, ties, memory rows, shared costs."""
    offs = np.cumsum([0] + [len(c) for c in request.node_costs])
    n_s = int(offs[-1])
    cost = [np.asarray(c, float) for c in request.node_costs]
    rows = _Rows()
    rows.one_each(request, offs)
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
    rows.ties(request, offs)
    if request.memory_budget is not None:
        before = n_var
        n_var = rows.memory(request, offs, n_var)
        cost.append(np.zeros(n_var - before))  # resharded copies' variables
    for sc in request.shared:  # y >= chosen(node in members), y in [0, 1], cost * y
        y = n_var
        n_var += 1
        cost.append(np.array([sc.cost]))
        for n, js in sc.members:
            rows.ineq(list(offs[n] + np.asarray(js)) + [y], [1.0] * len(js) + [-1.0])
    return np.concatenate(cost), rows.constraint(n_var), n_s, offs


def lower_bound(request: SolverRequest, time_limit: float) -> float | None:
    """The LP relaxation's optimum: no plan of the request costs less. None if the LP
    does not finish within time_limit seconds (or is infeasible).

    Example:
      >>> lower_bound(SolverRequest((np.array([2.0, 1.0]),)), 1.0)
      1.0
    """
    c, cons, _, _ = _problem(request)
    res = milp(c, constraints=cons, bounds=Bounds(0, 1), options={"time_limit": time_limit})
    return float(res.fun) if res.status == 0 else None


def solve(request: SolverRequest) -> SolverResult:
    """Solve exactly with HiGHS (scipy.optimize.milp). If no feasible point comes back
    (time-out before one is found, or an infeasible request), or the time-limited
    incumbent costs more than it, the result is strategy 0 everywhere (fully
    replicated) with status "fallback". With a cutoff and no plan cheaper than it,
    status "cutoff" and the cutoff as objective (every plan costs at least that)."""
    t0 = time.perf_counter()
    c, cons, n_s, offs = _problem(request)
    n_var = len(c)
    integrality = np.r_[np.ones(n_s), np.zeros(n_var - n_s)]
    options = {"time_limit": request.time_limit, "mip_rel_gap": MIP_REL_GAP, "presolve": PRESOLVE}
    with warnings.catch_warnings():  # scipy passes the option on to HiGHS and says so
        warnings.filterwarnings("ignore", "Unrecognized options", RuntimeWarning)
        if request.cutoff is not None:
            options["objective_bound"] = request.cutoff
        res = milp(
            c, constraints=cons, integrality=integrality, bounds=Bounds(0, 1), options=options
        )
    if res.x is None:
        choice = tuple(0 for _ in request.node_costs)
        status = "infeasible" if res.status == 2 and request.memory else "fallback"
    else:
        choice = _decode(res.x, offs)
        status = "optimal" if res.status == 0 else "time_limit"
    obj, _ = evaluate(request, choice)
    cut = request.cutoff
    if cut is not None and (obj >= cut if res.x is not None else res.status == 2):
        # pruned at the cutoff (HiGHS may stop with a point that does not beat it)
        t = time.perf_counter() - t0
        return SolverResult(choice, cut, "cutoff", t, n_var, cons.A.shape[0])
    replicated = tuple(0 for _ in request.node_costs)
    rep_obj, rep_bad = evaluate(request, replicated)
    if status == "time_limit" and rep_obj < obj and not rep_bad:
        # a time-limited incumbent can be far from optimal; never return worse than
        # the always-feasible replicated plan
        choice, obj, status = replicated, rep_obj, "fallback"
    return SolverResult(choice, obj, status, time.perf_counter() - t0, n_var, cons.A.shape[0])


def _decode(x, offs) -> tuple[int, ...]:
    """The chosen strategy of each node from the solver's variables."""
    return tuple(int(np.argmax(x[offs[i] : offs[i + 1]])) for i in range(len(offs) - 1))


def min_memory(request: SolverRequest) -> tuple[tuple[int, ...], float]:
    """The choice whose largest memory row is smallest (costs and edges ignored), and
    that row's bytes: the least memory per device any plan reaches at these points."""
    choice, value, _ = min_memory_bound(request)
    return choice, value


def memory_floor(request: SolverRequest) -> float:
    """A lower bound on the largest memory row of every choice (the solver's dual
    bound, valid when it stops at its time limit too; 0 if it has none).

    Example:
      >>> row = MemoryRow(((0, np.array([4.0, 1.0])),))
      >>> memory_floor(SolverRequest((np.zeros(2),), memory=(row,)))
      1.0
    """
    return min_memory_bound(request)[2]


def min_memory_bound(request: SolverRequest) -> tuple[tuple[int, ...], float, float]:
    """One least-memory solve: (the choice whose largest memory row is smallest, that
    row's bytes, a lower bound on the largest row of every choice). The bound is the
    solver's dual bound (valid when it stops at its time limit too; 0 if it has none).

    Example:
      >>> row = MemoryRow(((0, np.array([4.0, 1.0])),))
      >>> min_memory_bound(SolverRequest((np.zeros(2),), memory=(row,)))
      ((1,), 1.0, 1.0)
    """
    res, offs = _min_memory(request)
    choice = tuple(0 for _ in request.node_costs) if res.x is None else _decode(res.x, offs)
    value = max((r.value(choice) for r in request.memory), default=0.0)
    bound = getattr(res, "mip_dual_bound", None)
    if res.status == 0 and res.fun is not None:
        bound = min(float(res.fun), bound if bound is not None else np.inf)
    floor = float(bound) * memory_unit(request) if bound is not None and np.isfinite(bound) else 0.0
    return choice, value, min(floor, value)


def _min_memory(request: SolverRequest):
    offs = np.cumsum([0] + [len(c) for c in request.node_costs])
    n_s = int(offs[-1])
    rows = _Rows()
    rows.one_each(request, offs)
    rows.ties(request, offs)
    n_var = rows.memory(request, offs, n_s + 1, extra=n_s)
    n_copies = n_var - n_s - 1  # resharded copies' variables, after the peak's
    c = np.r_[np.zeros(n_s), 1.0, np.zeros(n_copies)]
    res = milp(
        c,
        constraints=rows.constraint(n_var),
        integrality=np.r_[np.ones(n_s), np.zeros(1 + n_copies)],
        bounds=Bounds(
            np.zeros(n_var), np.r_[np.ones(n_s), np.inf, np.ones(n_copies)]
        ),
        options={"time_limit": request.time_limit, "mip_rel_gap": MIN_MEMORY_REL_GAP},
    )
    return res, offs
