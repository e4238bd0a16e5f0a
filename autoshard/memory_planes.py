"""Plans within a memory budget: cutting planes on the per-device memory rows, the
least-memory fallback of a timed-out solve, and the over-budget error message."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from autoshard.cost_model.ilp import (
    SolverRequest,
    SolverResult,
    evaluate,
    memory_floor,
    min_memory,
)
from autoshard.mesh_plan import MeshPlan, operand_specs, value_specs
from autoshard.passes.liveness import Liveness
from autoshard.passes.simplify import Problem, decode

# Relative slack when a plan's predicted memory is compared with the budget (rounding).
FIT_TOLERANCE = 1e-6

# Cutting-plane rounds: each adds up to MEMORY_POINTS points where the last plan's
# memory went over.
MEMORY_ROUNDS = 12
MEMORY_POINTS = 8
# The least-memory search behind MemoryBudgetError's message: budgets stepped down by
# this factor from the best plan known, at most this many times.
LEAST_MEMORY_STEP = 0.92
LEAST_MEMORY_STEPS = 8
# ... and for at most this many seconds (each solve is a full ILP with memory rows).
LEAST_MEMORY_TIME = 15.0


def _new_points(profile, points, args: float, limit: float) -> list[int]:
    """The highest steps of profile above limit (arguments included) not yet rows."""
    over = [int(t) for t in np.argsort(-profile) if args + profile[t] > limit * (1 + FIT_TOLERANCE)]
    return [t for t in over if t not in points][:MEMORY_POINTS]


def _peak(live: Liveness, problem: Problem, picks) -> float:
    """Predicted per-device memory of a plan, resharded copies included."""
    args, full = live.profile(value_specs(problem, picks), operand_specs(problem, picks))
    return args + float(full.max(initial=0.0))


def _within(mp: MeshPlan, budget: float, request: SolverRequest | None = None, deadline=None):
    """(result, picks, request) of the cheapest plan within budget, by cutting planes:
    memory rows at the steps where the last plan went over. Resharded copies are not
    linear in the choices; when only they push a plan over, the rows aim lower. With
    a deadline (time.perf_counter() seconds), no round starts after it."""
    problem, live = mp.problem, mp.liveness
    request = mp.request if request is None else request
    node_of_root = mp.node_of_root
    replicated = decode(problem, [0] * len(problem.roots))
    args, prof = live.profile(value_specs(problem, replicated))
    points = _new_points(prof, [], args, budget)
    target, low, high = budget, None, None  # low: a target found infeasible
    for _ in range(MEMORY_ROUNDS):
        rows = tuple(live.row(t, node_of_root) for t in points)
        req = replace(request, memory=rows, memory_budget=target)
        if deadline is not None:
            left = deadline - time.perf_counter()
            if left <= 0:
                none = SolverResult((0,) * len(problem.roots), np.inf, "timed_out", 0.0, 0, 0)
                return none, replicated, req
            req = replace(req, time_limit=max(1.0, min(req.time_limit, left)))
        result = mp.solve(req)
        picks = decode(problem, result.choice)
        if result.status == "fallback":  # the time limit came before any feasible plan
            return _least_memory_fallback(mp, req, result, budget)
        if result.status == "infeasible":
            if high is None:
                break  # infeasible at the budget itself
            low, target = target, (target + high) / 2
            continue
        specs = value_specs(problem, picks)
        args, prof = live.profile(specs)
        _, full = live.profile(specs, operand_specs(problem, picks))
        if args + full.max() <= budget * (1 + FIT_TOLERANCE):
            return result, picks, req
        new = _new_points(prof, points, args, target)
        if not new:
            high = target
            target = target - (args + full.max() - budget) if low is None else (low + target) / 2
            new = _new_points(full, points, args, budget)
        points += new
    return replace(result, status="infeasible"), replicated, req


def _least_memory_fallback(mp: MeshPlan, req: SolverRequest, result: SolverResult, budget):
    """When the solver found nothing within its time limit: every ILP node takes its
    least-memory strategy (the cheapest among equals), which shards parameters, optimizer
    state and activations as far as they go (FSDP over every axis). Kept if it keeps
    state ties and fits the budget; otherwise the result says "timed_out"."""
    problem = mp.problem
    mem = [np.zeros(len(c)) for c in req.node_costs]
    for row in req.memory:
        for n, b in row.terms:
            mem[n] = mem[n] + b
    choice = tuple(
        int(np.lexsort((np.asarray(c, float), m))[0])
        for c, m in zip(req.node_costs, mem, strict=True)
    )
    obj, bad = evaluate(replace(req, memory=()), choice)
    choice = mp.expand(choice)
    picks = decode(problem, choice)
    if not bad and _peak(mp.liveness, problem, picks) <= budget * (1 + FIT_TOLERANCE):
        return replace(result, choice=choice, objective=obj, status="fallback"), picks, req
    return replace(result, status="timed_out"), picks, req


def excluded_by_memory(mp: MeshPlan, budget: float, time_limit: float) -> float | None:
    """A lower bound on the per-device memory of every plan on mp's mesh when it
    exceeds the budget, else None (also when the replicated plan fits). The bound: the
    least, over the choices, of the largest memory row at the replicated plan's
    highest steps (one small ILP without costs or edges, at most time_limit seconds),
    so a mesh no plan fits on is told apart without solving its full ILP."""
    problem, live = mp.problem, mp.liveness
    args, prof = live.profile(value_specs(problem, decode(problem, [0] * len(problem.roots))))
    if args + prof.max(initial=0.0) <= budget * (1 + FIT_TOLERANCE):
        return None
    node_of_root = mp.node_of_root
    rows = tuple(live.row(t, node_of_root) for t in _new_points(prof, [], args, budget))
    req = replace(mp.request, memory=rows, memory_budget=None, time_limit=time_limit)
    floor = memory_floor(req)
    return floor if floor > budget * (1 + FIT_TOLERANCE) else None


def least_memory(mp: MeshPlan) -> tuple[float, list[tuple[float, str, str]]]:
    """About the least per-device memory a plan on mp's mesh reaches, and what is
    alive at its peak: (bytes, kind, what), largest first. A lower bound comes from
    the memory rows alone; plans found under budgets stepped down from the best plan
    known narrow it down."""
    problem, live = mp.problem, mp.liveness
    node_of_root = mp.node_of_root
    args, prof = live.profile(value_specs(problem, mp.picks))
    points = _new_points(prof, [], args, 0.0)
    free = replace(mp.request, memory=(), memory_budget=None)
    for _ in range(MEMORY_ROUNDS):
        rows = tuple(live.row(t, node_of_root) for t in points)
        req = replace(free, memory=rows)
        choice, bound = min_memory(req)
        choice = mp.expand(choice)
        args, prof = live.profile(value_specs(problem, decode(problem, choice)))
        new = _new_points(prof, points, args, bound)
        if not new:
            break
        points += new
    candidates = [decode(problem, choice), decode(problem, mp.solve(free).choice)]
    best = min(candidates, key=lambda p: _peak(live, problem, p))
    high = _peak(live, problem, best)
    # step the budget down from the best plan known while plans keep fitting
    deadline = time.perf_counter() + LEAST_MEMORY_TIME
    for _ in range(LEAST_MEMORY_STEPS):
        target = max(bound, LEAST_MEMORY_STEP * high)
        result, picks, _ = _within(mp, target, free, deadline)
        if result.status == "timed_out":
            break  # out of time: keep the best plan found so far
        if result.status == "infeasible" or target <= bound:
            break
        best, high = picks, min(high, _peak(live, problem, picks))
    specs = value_specs(problem, best)
    _, full = live.profile(specs, operand_specs(problem, best))
    return high, live.alive_at(int(np.argmax(full)), specs)


def over_budget_message(over: list[MeshPlan], budget: float) -> str:
    timed = [mp for mp in over if mp.result.status == "timed_out"]
    if timed:
        shapes = ", ".join(str(tuple(mp.mesh.axis_sizes)) for mp in timed)
        return (
            f"autoshard: the ILP solver reached its time limit before finding a plan within "
            f"memory_budget={_size(budget)} per device on mesh {shapes}, and no "
            "least-memory plan (everything sharded as far as it goes) fits either. Raise "
            "time_limit, raise memory_budget, or use more devices."
        )
    # the least-memory search runs on one mesh: the one with the lowest memory floor
    # (the first where none is known); the others' plans are no smaller than it
    mp = min(over, key=lambda m: np.inf if m.memory_floor is None else m.memory_floor)
    need, alive = least_memory(mp)
    kinds: dict[str, list[tuple[float, str]]] = {}
    for nbytes, kind, what in alive:
        kinds.setdefault(kind, []).append((nbytes, what))
    parts = sorted(
        ((sum(b for b, _ in items), kind, items[0]) for kind, items in kinds.items()),
        reverse=True,
    )
    peak = "; ".join(
        f"{kind} {_size(total)} (largest: {what}, {_size(b)})" for total, kind, (b, what) in parts
    )
    return (
        f"autoshard: no plan fits memory_budget={_size(budget)} per device on "
        f"{mp.mesh.size} devices. The least memory found for any plan is {_size(need)} "
        f"per device (mesh {tuple(mp.mesh.axis_sizes)}); at its peak: {peak}. Raise "
        "memory_budget (or Hardware(memory=...)), use more devices, or shrink the model or "
        "batch."
    )


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"
