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
    min_memory,
    min_memory_bound,
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
# Seconds per cutting-plane round's ILP: memory rows make the ILP a knapsack HiGHS is
# slow to close; at this limit it keeps its incumbent, which satisfies the rows
# (on the 1.3B GPT shape on (2, 4), within 0.2% of its bound).
MEMORY_ROUND_TIME = 15.0
# ... and on a mesh whose plan must beat one found on another mesh (the best cost is
# HiGHS's cutoff). A round that finds no plan in this time leaves the mesh out: such
# rounds rarely find one (the Llama-7B fp32 step's (2, 4) mesh, 8 devices: HiGHS
# proves after 45 s that no plan within the budget beats the (8,) plan).
MEMORY_ROUND_TIME_TO_BEAT = 5.0
# When only what the rows do not see (the f32 copies of half-precision arguments of a
# `half_as_f32` compiler) pushes plans over, the rows aim lower: between a target
# found infeasible and one whose plan still went over, the search stops once they are
# this fraction of the budget apart (no plan is found).
MEMORY_TARGET_GAP = 0.01
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


def _profile(live: Liveness, problem: Problem, picks):
    """(argument bytes, live bytes after each step) of a plan, resharded copies
    included."""
    return live.profile(value_specs(problem, picks), operand_specs(problem, picks))


def _over_at(live: Liveness, problem: Problem, picks, points, budget: float) -> list[int]:
    """`_new_points` of a plan's profile."""
    args, prof = _profile(live, problem, picks)
    return _new_points(prof, points, args, budget)


def _peak(live: Liveness, problem: Problem, picks) -> float:
    """Predicted per-device memory of a plan, resharded copies included."""
    args, full = _profile(live, problem, picks)
    return args + float(full.max(initial=0.0))


def _within(
    mp: MeshPlan, budget: float, request: SolverRequest | None = None, deadline=None, over=None
):
    """(result, picks, request) of the cheapest plan within budget, by cutting planes:
    memory rows at the steps where the last plan went over, first those of mp's memory
    screen and where `over` (the plan without rows) went over. The rows count
    resharded copies (`Liveness.row`); when something they do not see (half-precision
    copies) pushes a plan over, the rows aim lower (never below what the rows of mp's
    memory screen allow any plan). With a cutoff, a round that finds no plan in
    MEMORY_ROUND_TIME_TO_BEAT seconds ends the search (status "cutoff", objective nan).
    With a deadline (time.perf_counter() seconds), no round starts after it."""
    problem, live = mp.problem, mp.liveness
    request = mp.request if request is None else request
    node_of_root = mp.node_of_root
    replicated = decode(problem, [0] * len(problem.roots))
    points = list(mp.memory_points)
    if over is not None:  # where the plan without rows went over
        points += _over_at(live, problem, over, points, budget)
    if not points:  # or else where the replicated plan goes over
        points = _over_at(live, problem, replicated, [], budget)
    floor = mp.rows_floor if mp.memory_points else 0.0  # no plan's rows go below
    target, low, high = budget, None, None  # low: a target found infeasible
    for _ in range(MEMORY_ROUNDS):
        rows = tuple(live.row(t, node_of_root) for t in points)
        per_round = MEMORY_ROUND_TIME if request.cutoff is None else MEMORY_ROUND_TIME_TO_BEAT
        limit = min(request.time_limit, per_round)
        req = replace(request, memory=rows, memory_budget=target, time_limit=limit)
        if deadline is not None:
            left = deadline - time.perf_counter()
            if left <= 0:
                none = SolverResult((0,) * len(problem.roots), np.inf, "timed_out", 0.0, 0, 0)
                return none, replicated, req
            req = replace(req, time_limit=max(1.0, min(req.time_limit, left)))
        result = mp.solve(req)
        picks = decode(problem, result.choice)
        if result.status == "cutoff":  # no plan within these rows beats the cutoff
            return result, replicated, req
        if result.status == "fallback":  # the time limit came before any feasible plan
            found = _least_memory_fallback(mp, req, result, budget)
            cut = request.cutoff
            if cut is not None and not found[0].objective < cut:  # nothing that beats it
                return replace(result, objective=np.nan, status="cutoff"), replicated, req
            return found
        if result.status == "infeasible":
            if high is None:
                break  # infeasible at the budget itself
            low, target = target, (target + high) / 2
            if high - low <= MEMORY_TARGET_GAP * budget:
                break  # rows that fit are not tighter than this for any plan
            continue
        args, full = _profile(live, problem, picks)
        if args + full.max() <= budget * (1 + FIT_TOLERANCE):
            return result, picks, req
        new = _new_points(full, points, args, target)
        if not new:
            high, lower = target, target - (args + full.max() - budget)
            if low is None and lower < floor:
                low = floor * (1 - FIT_TOLERANCE)  # rows below it fit no plan
            if low is not None and high - low <= MEMORY_TARGET_GAP * budget:
                break
            target = lower if low is None else (low + target) / 2
            new = _new_points(full, points, args, budget)
        points += new
    return replace(result, status="infeasible"), replicated, req


def _least_memory_fallback(mp: MeshPlan, req: SolverRequest, result: SolverResult, budget):
    """When the solver found nothing within its time limit: every ILP node takes its
    least-memory strategy (the cheapest among equals), which shards parameters, optimizer
    state and activations as far as they go (FSDP over every axis), or the
    least-memory plan of the mesh's memory cutting planes (`excluded_by_memory`) when
    one was kept: the cheaper of those that keep state ties and fit the budget;
    otherwise the result says "timed_out"."""
    problem = mp.problem
    mem = [np.zeros(len(c)) for c in req.node_costs]
    for row in req.memory:
        for n, b in row.terms:
            mem[n] = mem[n] + b
    choice = tuple(
        int(np.lexsort((np.asarray(c, float), m))[0])
        for c, m in zip(req.node_costs, mem, strict=True)
    )
    fits = []  # (objective, choice per root, picks) of the candidates that fit
    for ch in (choice, mp.least) if mp.least is not None else (choice,):
        obj, bad = evaluate(replace(req, memory=()), ch)
        full = mp.expand(ch)
        picks = decode(problem, full)
        if not bad and _peak(mp.liveness, problem, picks) <= budget * (1 + FIT_TOLERANCE):
            fits.append((obj, full, picks))
    if fits:
        obj, ch, picks = min(fits, key=lambda f: f[0])
        return replace(result, choice=ch, objective=obj, status="fallback"), picks, req
    return replace(result, status="timed_out"), decode(problem, mp.expand(choice)), req


def excluded_by_memory(mp: MeshPlan, budget: float, time_limit: float):
    """(floor, choice, points, bound): floor, a lower bound on the per-device memory
    of every plan on mp's mesh when it exceeds the budget, else None; choice, the
    least-memory plan found (per ILP node; None when the replicated plan fits);
    points, the steps of the last round's memory rows, and bound, the least largest
    row any plan has there (cutting planes that start from these rows need not aim
    below it). Cutting planes on memory alone: the
    least, over the choices, of the largest memory row (a small ILP without costs or
    edges), with rows first at the replicated plan's highest steps, then at the steps
    where the last least-memory plan went over. It stops when the floor exceeds the
    budget (no plan fits: the mesh's full ILP need not be solved), when a least-memory
    plan fits (one does), or after MEMORY_ROUNDS rounds or time_limit seconds."""
    problem, live = mp.problem, mp.liveness
    picks = decode(problem, [0] * len(problem.roots))
    args, prof = live.profile(value_specs(problem, picks))
    if args + prof.max(initial=0.0) <= budget * (1 + FIT_TOLERANCE):
        return None, None, (), 0.0
    node_of_root = mp.node_of_root
    points = _new_points(prof, [], args, budget)
    deadline = time.perf_counter() + time_limit
    best, high = None, np.inf
    rounds = ((), 0.0)  # the last round's points and their bound
    for _ in range(MEMORY_ROUNDS):
        rows = tuple(live.row(t, node_of_root) for t in points)
        left = max(0.5, deadline - time.perf_counter())
        req = replace(mp.request, memory=rows, memory_budget=None, time_limit=left)
        choice, _, floor = min_memory_bound(req)
        picks = decode(problem, mp.expand(choice))
        peak = _peak(live, problem, picks)
        if peak < high:
            best, high = choice, peak
        if floor > budget * (1 + FIT_TOLERANCE):
            return floor, best, tuple(points), floor
        if peak <= budget * (1 + FIT_TOLERANCE) or time.perf_counter() >= deadline:
            return None, best, tuple(points), floor
        new = _over_at(live, problem, picks, points, budget)
        if not new:  # over only by what rows do not see (half-precision copies)
            return None, best, tuple(points), floor
        rounds = (tuple(points), floor)
        points += new
    return None, best, *rounds


def least_memory(mp: MeshPlan) -> tuple[float, list[tuple[float, str, str]]]:
    """About the least per-device memory a plan on mp's mesh reaches, and what is
    alive at its peak: (bytes, kind, what), largest first. A lower bound comes from
    the memory rows alone; plans found under budgets stepped down from the best plan
    known narrow it down."""
    problem, live = mp.problem, mp.liveness
    node_of_root = mp.node_of_root
    points = _over_at(live, problem, mp.picks, [], 0.0)
    free = replace(mp.request, memory=(), memory_budget=None)
    for _ in range(MEMORY_ROUNDS):
        rows = tuple(live.row(t, node_of_root) for t in points)
        req = replace(free, memory=rows)
        choice, bound = min_memory(req)
        choice = mp.expand(choice)
        picks = decode(problem, choice)
        new = _over_at(live, problem, picks, points, bound)
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
