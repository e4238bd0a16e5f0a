"""What one compiled step costs, read from the compiled program (never from a plan).

The SPMD-partitioned HLO (``compiled.as_text()``) is per device. A ``lax.scan`` layer
stack is a ``while`` loop whose body is printed once, and ``compiled.cost_analysis()``
counts a loop body once too, so this module weights every computation by how often it
runs: the product of the known trip counts of the loops around it (XLA prints them as
``known_trip_count`` in the loop's backend config). From that:

- flops: ``2 * (result elements) * (contracted elements)`` of every ``dot`` (matmul
  flops, which dominate a transformer step), times its computation's count;
- collectives: ``autoshard.parse_collectives`` (kind, bytes per device, replica
  groups), times their computation's count. XLA's CPU backend never forms a
  reduce-scatter: it all-reduces and then slices out each device's shard, where the
  GPU and TPU compilers turn that pair into a reduce-scatter. An all-reduce whose every
  user is a dynamic-slice (or a fusion holding one) that keeps ``1/n`` of it is priced
  as the reduce-scatter those compilers would emit, for every plan alike. Likewise
  the CPU backend combines all-reduces but not reduce-scatters or all-gathers, which
  the GPU compiler's combiners merge when they do not depend on each other (up to
  30 MiB each, XLA's kDefault*CombineThreshold in xla/service/collective_utils.h):
  collectives of one kind over the same groups in one computation, none reading
  another's result, share one latency here, up to that size; bytes are unchanged;
- memory: ``autoshard.compiled_memory(compiled)`` (arguments + outputs - aliased +
  temporaries), per device.

The estimated step prices them on one ``autoshard.Hardware``:

    flops / peak  +  sum over collectives of (latency + ring factor * bytes / bandwidth)

with ring factors all-reduce 2(n-1)/n; all-gather, reduce-scatter, all-to-all (n-1)/n;
collective-permute 1, for a group of n devices; the bandwidth and latency are those of
the innermost interconnect level whose domain holds every group (the hardware's axis-0
figures when it has no levels).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import autoshard
from autoshard.hlo import _instructions, _split_top

_RING = {"all-reduce": 2.0, "all-gather": 1.0, "reduce-scatter": 1.0, "all-to-all": 1.0}
_TRIP = re.compile(r'known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"')
_CALLEE = re.compile(
    r"\b(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)"
)
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([\d,]*)\]")
_CONTRACT = re.compile(r"lhs_contracting_dims=\{([\d,]*)\}")


COMBINE_BYTES = 30 * 1024 * 1024 + 7


@dataclass(frozen=True)
class KindStats:
    """The collectives of one kind: executions per step, bytes per device per step,
    group sizes seen, and launches per step once combined (latencies paid)."""

    count: int
    nbytes: int
    group_sizes: tuple[int, ...]
    launches: int = 0


@dataclass(frozen=True)
class Measurement:
    """Per-device numbers of one compiled step (seconds, bytes, flops per step)."""

    collectives: dict[str, KindStats]
    flops: float
    memory: float
    compute_time: float
    comm_time: float
    compile_time: float
    loops_known: bool

    @property
    def est_time(self) -> float:
        """Estimated step time on the reference hardware."""
        return self.compute_time + self.comm_time


def ring_factor(kind: str, n: int) -> float:
    """Fraction of the buffer one device sends in a ring collective over n devices.

    >>> ring_factor("all-reduce", 8), ring_factor("collective-permute", 2)
    (1.75, 1.0)
    """
    if kind == "collective-permute":
        return 1.0
    return _RING[kind] * (n - 1) / n


def level_of(groups, hw: autoshard.Hardware) -> tuple[float, float]:
    """(bandwidth, latency) of the innermost level whose domains hold every group.

    >>> hw = autoshard.PRESETS["h100"]
    >>> level_of(((0, 8),), hw)[0] == hw.levels[-1].bandwidth
    True
    """
    if not hw.levels:
        return hw.axis_bandwidth(0), hw.axis_latency(0)
    for lv in hw.levels:
        if lv.devices is None or all(len({d // lv.devices for d in g}) == 1 for g in groups):
            return lv.bandwidth, lv.latency
    return hw.levels[-1].bandwidth, hw.levels[-1].latency


def collective_time(
    c: autoshard.Collective, hw: autoshard.Hardware, num_devices: int, latency: bool = True
) -> float:
    """Latency (unless combined into another launch) + ring factor * bytes / bandwidth;
    0 for a group of one device."""
    n = c.group_size or num_devices  # 0: the group could not be read, assume all devices
    if n <= 1:
        return 0.0
    groups = c.groups or (tuple(range(num_devices)),)
    bw, lat = level_of(groups, hw)
    return lat * latency + ring_factor(c.kind, n) * c.bytes / bw


def launches(colls, instrs) -> list[bool]:
    """Per collective, whether it starts a launch of its own (pays a latency) after
    combining independent collectives of one kind and groups in one computation, up
    to ``COMBINE_BYTES`` per launch."""
    names = {(c.computation, c.name) for c in colls}
    upstream: dict[tuple[str, str], frozenset] = {}
    for i in instrs:  # text order is a topological order within a computation
        seen: set = set()
        for op in set(re.findall(r"%([\w.\-]+)", i.operands)):
            key = (i.computation, op)
            seen |= upstream.get(key, frozenset())
            if key in names:
                seen.add(key)
        upstream[(i.computation, i.name)] = frozenset(seen)
    open_groups: dict[tuple, list[tuple[set, int]]] = {}
    out = []
    for c in colls:
        key = (c.computation, c.kind, c.groups)
        mine = upstream.get((c.computation, c.name), frozenset())
        for members, size in open_groups.setdefault(key, []):
            if size + c.bytes <= COMBINE_BYTES and not members & mine:
                members.add((c.computation, c.name))
                open_groups[key].remove((members, size))
                open_groups[key].append((members, size + c.bytes))
                out.append(False)
                break
        else:
            open_groups[key].append(({(c.computation, c.name)}, c.bytes))
            out.append(True)
    return out


def multiplicities(instrs) -> tuple[dict[str, int], bool]:
    """How many times each computation runs per step, and whether every loop's trip
    count was known (an unknown one counts once)."""
    calls: dict[str, list[tuple[str, int]]] = {}
    order: list[str] = []
    known = True
    for i in instrs:
        if i.computation not in calls:
            calls[i.computation] = []
            order.append(i.computation)
        trip = 1
        if i.opcode == "while":
            m = _TRIP.search(i.attrs)
            known &= m is not None
            trip = int(m.group(1)) if m else 1
        callees = [c for _, c in _CALLEE.findall(i.attrs)]
        for m in _BRANCHES.finditer(i.attrs):
            callees += [c.strip().lstrip("%") for c in m.group(1).split(",")]
        calls[i.computation] += [(c, trip) for c in callees]
    # HLO text prints a computation before its callers: walk callers first.
    count = dict.fromkeys(order, 0)
    if order:
        count[order[-1]] = 1  # ENTRY is printed last
    for comp in reversed(order):
        for callee, trip in calls[comp]:
            if callee in count:
                count[callee] += count[comp] * trip
    return count, known


def _dims(type_text: str) -> list[int]:
    m = _SHAPE.search(type_text)
    return [int(d) for d in m.group(2).split(",") if d] if m else []


def as_reduce_scatters(colls, instrs) -> list:
    """``colls`` with each all-reduce that only feeds ``1/n`` slices of itself turned
    into a reduce-scatter of the same operand (see the module docstring)."""
    import dataclasses

    by_name = {(i.computation, i.name): i for i in instrs}
    opcodes: dict[str, set[str]] = {}
    users: dict[tuple[str, str], list] = {}
    for i in instrs:
        opcodes.setdefault(i.computation, set()).add(i.opcode)
        for name in set(re.findall(r"%([\w.\-]+)", i.operands)):
            users.setdefault((i.computation, name), []).append(i)

    def slices(u, shard: int) -> bool:
        if math.prod(_dims(u.type)) != shard or u.type.startswith("("):
            return False
        if u.opcode == "dynamic-slice":
            return True
        callee = _CALLEE.search(u.attrs)
        fused = opcodes.get(callee.group(2), ()) if callee else ()
        return u.opcode == "fusion" and "dynamic-slice" in fused

    out = []
    for c in colls:
        ar = by_name.get((c.computation, c.name))
        if c.kind == "all-reduce" and ar is not None and c.group_size > 1:
            whole = math.prod(_dims(ar.type)) if not ar.type.startswith("(") else 0
            us = users.get((c.computation, c.name), [])
            if whole and whole % c.group_size == 0 and us:
                if all(slices(u, whole // c.group_size) for u in us):
                    c = dataclasses.replace(c, kind="reduce-scatter")
        out.append(c)
    return out


def dot_flops(instrs, count: dict[str, int]) -> float:
    """Matmul flops per step: ``2 * result elements * contracted elements`` per dot."""
    types = {(i.computation, i.name): i.type for i in instrs}
    total = 0.0
    for i in instrs:
        if i.opcode != "dot" or not count.get(i.computation):
            continue
        lhs = _split_top(i.operands)[0]
        lhs_type = lhs if _SHAPE.match(lhs) else types.get((i.computation, lhs.lstrip("%")), "")
        contract = _CONTRACT.search(i.attrs)
        dims = _dims(lhs_type)
        k = [int(d) for d in contract.group(1).split(",") if d] if contract else []
        per_run = 2.0 * math.prod(_dims(i.type)) * math.prod(dims[d] for d in k)
        total += per_run * count[i.computation]
    return total


def by_kind(colls, count: dict[str, int], own: list[bool]) -> dict[str, KindStats]:
    """Collectives grouped by kind, each weighted by its computation's run count."""
    out: dict[str, KindStats] = {}
    for c, launch in zip(colls, own, strict=True):
        k = count.get(c.computation, 1)
        prev = out.get(c.kind, KindStats(0, 0, ()))
        sizes = tuple(sorted(set(prev.group_sizes) | {c.group_size}))
        out[c.kind] = KindStats(
            prev.count + k, prev.nbytes + k * c.bytes, sizes, prev.launches + k * launch
        )
    return out


def analyse(compiled, hw: autoshard.Hardware, compile_time: float = 0.0) -> Measurement:
    """Score one compiled program on ``hw`` (see the module docstring)."""
    text = compiled.as_text()
    instrs = _instructions(text)
    count, known = multiplicities(instrs)
    colls = as_reduce_scatters(autoshard.parse_collectives(text), instrs)
    n = int(re.search(r"num_partitions=(\d+)", text).group(1)) if "num_partitions=" in text else 1
    flops = dot_flops(instrs, count)
    own = launches(colls, instrs)
    comm = sum(
        collective_time(c, hw, n, launch) * count.get(c.computation, 1)
        for c, launch in zip(colls, own, strict=True)
    )
    return Measurement(
        collectives=by_kind(colls, count, own),
        flops=flops,
        memory=float(autoshard.compiled_memory(compiled)),
        compute_time=flops / hw.flops,
        comm_time=comm,
        compile_time=compile_time,
        loops_known=known,
    )


def measure(lowerable, args, hw: autoshard.Hardware) -> Measurement:
    """Lower and compile ``lowerable(*args)`` (never run it) and score the program."""
    t0 = time.perf_counter()
    compiled = lowerable.lower(*args).compile()
    return analyse(compiled, hw, time.perf_counter() - t0)
