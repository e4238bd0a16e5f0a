"""Per-device memory of a plan over the step, and its linear form for the ILP.

The step's operations are ordered depth-first from its outputs (each result made
right before its first reader, as XLA's memory-minimising scheduler does), and only
values XLA keeps in memory count (see `materialized`). At each operation the live
bytes are the arguments, the live intermediates, the resharded copies, and the step's
outputs that do not reuse a donated argument's buffer (all of them from the first
operation: XLA allocates outputs apart from the temporaries, for the whole step).
All of these are sums of per-value bytes, and
a value's bytes are fixed by its root unit's strategy: so each point's bytes are a
linear function of the ILP's choices (a `MemoryRow`).
"""

from __future__ import annotations

import numpy as np

from autoshard.cost_model.ilp import Copy, MemoryRow, merge_copies, witness_key
from autoshard.cost_model.memory import dfs_order, live_intervals
from autoshard.cost_model.resharding import per_device_bytes
from autoshard.passes.graph import LOOP_SLICE, LOOP_STACK, Lit, OpGraph
from autoshard.passes.rules.families import CONTRACTIONS, ELEMENTWISE, FUSIBLE, FUSION_CONSUMERS
from autoshard.passes.simplify import Problem

# Cheap producers XLA recomputes inside every fusion that reads them.
_DUPLICATED = frozenset(
    {"broadcast_in_dim", "iota", "reshape", "squeeze", "expand_dims", "convert_element_type"}
)


def materialized(graph: OpGraph) -> set[int]:
    """Values XLA keeps in memory: results of non-fusible operations (matmuls,
    gathers, collectives, ...), values read by one or by several operations, and step
    outputs. A fusible operation's result read once by a fusible operation or a
    reduction is fused away, as is a cheap broadcast or reshape however often read."""
    consumers = graph.consumers()
    keep = {r for r in graph.outputs if not isinstance(r, Lit)}
    for n in graph.nodes:
        for v in n.outputs:
            readers = [graph.nodes[c].name for c, _ in consumers.get(v, ())]
            shared = len(readers) > 1 and n.name not in _DUPLICATED
            if n.name not in FUSIBLE or not set(readers) <= FUSION_CONSUMERS or shared:
                keep.add(v)
    # a scan's stacked results are buffers of [L, ...] the loop writes into, never fused
    keep |= {v for n in graph.nodes if n.primitive is LOOP_STACK for v in n.outputs}
    return keep


# Operations XLA may run in place on their first operand (a scatter updates its
# operand's buffer); elementwise ones on any operand of the result's shape.
_IN_PLACE = frozenset({"scatter", "scatter-add", "scatter_add", "dynamic_update_slice"})


def in_place_operands(graph: OpGraph, keep: set[int]) -> list[int | None]:
    """Per node, the materialized operand whose buffer its result can take over (same
    shape and dtype; an elementwise operation or a scatter), or None. Step arguments
    are not reused here: donation is counted apart."""
    args = set(graph.inputs)
    out: list[int | None] = []
    for n in graph.nodes:
        if n.name in _IN_PLACE:
            cands = n.inputs[:1]
        elif n.name in ELEMENTWISE:
            cands = n.inputs
        else:
            cands = ()
        res = graph.values[n.outputs[0]] if n.outputs else None
        pick = None
        for r in cands:
            if isinstance(r, Lit) or r in args or r not in keep or res is None:
                continue
            v = graph.values[r]
            if (v.shape, v.dtype) == (res.shape, res.dtype):
                pick = r
                break
        out.append(pick)
    return out


def loop_spans(graph: OpGraph, order) -> dict[int, tuple[int, int]]:
    """Per scan, the first and last step (positions in order) of its boundary and
    body operations, nested loops included."""
    parent = {lp.id: lp.region for lp in graph.loops}
    spans: dict[int, tuple[int, int]] = {}
    for step, op in enumerate(order):
        n = graph.nodes[op]
        lid = n.boundary if n.boundary >= 0 else n.region
        while lid >= 0:
            s, e = spans.get(lid, (step, step))
            spans[lid] = (min(s, step), max(e, step))
            lid = parent[lid]
    return spans


def hold_loop_buffers(graph: OpGraph, order, produced, consumed) -> None:
    """Make scans' buffers live as XLA's while loops hold them (produced and consumed
    are per step of order, changed in place): a stacked result [L, ...] exists from
    the loop's first step (each iteration writes one slice), and a stacked operand
    stays until the loop's last step (each iteration reads one slice). So the
    residuals a forward scan saves for the backward one are alive, all layers of
    them, while the backward loop runs."""
    spans = loop_spans(graph, order)
    for step, op in enumerate(order):
        n = graph.nodes[op]
        if n.primitive is LOOP_STACK:
            start = spans[n.boundary][0]
            produced[step] = [v for v in produced[step] if v not in n.outputs]
            produced[start] = [*produced[start], *n.outputs]
        elif n.primitive is LOOP_SLICE:
            end = spans[n.boundary][1]
            consumed[end] = [*consumed[end], *[r for r in n.inputs if not isinstance(r, Lit)]]


# The step's order and live sets depend on the graph alone, not on the mesh: kept for
# the last few graphs, so every candidate mesh shares them.
_STRUCTURES: list = []
_KEEP_STRUCTURES = 4


def structure(g: OpGraph, donated: frozenset[int]):
    """(outputs that are not donated, operation order, per value the first and last
    step it is alive, -1 and -2 for a value never alive in between). The outputs are
    alive from the first step: XLA gives each its own buffer, apart from the
    temporaries, for the whole step."""
    for graph, don, found in _STRUCTURES:
        if graph is g and don == donated:
            return found
    aliased = {g.outputs[o] for i, o in g.ties if i in donated}
    outs = {r for r in g.outputs if not isinstance(r, Lit)} - aliased - set(g.inputs)
    keep = materialized(g) - aliased
    produced = [n.outputs for n in g.nodes]
    consumed = [[r for r in n.inputs if not isinstance(r, Lit)] for n in g.nodes]
    order = dfs_order(produced, consumed, [r for r in g.outputs if not isinstance(r, Lit)])
    made, read = [list(produced[i]) for i in order], [list(consumed[i]) for i in order]
    hold_loop_buffers(g, order, made, read)
    reuse = in_place_operands(g, keep)
    spans = live_intervals(made, read, outs, keep, [reuse[i] for i in order], outs)
    first = np.full(len(g.values), -1, dtype=np.int64)
    last = np.full(len(g.values), -2, dtype=np.int64)
    if spans:
        vs = np.fromiter(spans, dtype=np.int64, count=len(spans))
        ends = np.array(list(spans.values()), dtype=np.int64)
        first[vs], last[vs] = ends[:, 0], ends[:, 1]
    found = (frozenset(outs), tuple(order), (first, last))
    _STRUCTURES[:] = [(g, donated, found), *_STRUCTURES[: _KEEP_STRUCTURES - 1]]
    return found


_HALF = frozenset({"bfloat16", "float16"})


def _ways(spec, mesh) -> int:
    """Devices a value laid out as spec is split over (`per_device_bytes`' divisor)."""
    return mesh.group([a for axes in spec for a in axes])


def held_scale(graph: OpGraph, half_as_f32: bool) -> np.ndarray:
    """Per value, the factor from its dtype's bytes to the bytes it occupies: 2 for a
    bfloat16/float16 intermediate when the compiler keeps those as float32 (XLA's
    CPU compiler computes them in f32), else 1. Arguments and step outputs keep
    their dtype."""
    scale = np.ones(len(graph.values))
    if half_as_f32:
        ends = set(graph.inputs) | {r for r in graph.outputs if not isinstance(r, Lit)}
        for v, info in enumerate(graph.values):
            if str(info.dtype) in _HALF and v not in ends:
                scale[v] = 2.0
    return scale


def live_bytes(first: np.ndarray, last: np.ndarray, b: np.ndarray, steps: int) -> np.ndarray:
    """Bytes alive after each of steps steps when value v (bytes b[v]) lives from step
    first[v] to step last[v] (first > last: never alive)."""
    on, n = first <= last, max(steps, 1)
    delta = np.bincount(first[on], b[on], minlength=n + 1)
    delta -= np.bincount(last[on] + 1, b[on], minlength=n + 1)
    return np.cumsum(delta)[:n]


def _witnesses(w, first, last, producer) -> tuple:
    """Linear forms that are 1 when a reader in first (node, wanted spec per strategy;
    node None: always) and one in last want layout w and the producer (its node, and
    minus 1 for each strategy that makes w) does not make it."""
    out = {}
    for na, wa in first:
        ia = None if na is None else np.array([x == w for x in wa], float)
        for nb, wb in last:
            ib = np.array([x == w for x in wb], float)
            if not (ib.any() and (ia is None or ia.any())):
                continue
            pairs = [(nb, ib), producer] + ([] if na is None else [(na, ia)])
            terms: dict[int, np.ndarray] = {}
            for n, c in pairs:
                terms[n] = terms[n] + c if n in terms else c
            form = (tuple(sorted(terms.items())), 0.0 if na is None else -1.0)
            out.setdefault(witness_key(*form), form)
    return tuple(out.values())


class Liveness:
    """Which values are alive at each point of the step, for one problem.

    Args:
      problem: the merged strategy problem (gives each value's bytes per choice).
      donated: flat indices of donated step arguments; outputs tied to them reuse
        their buffers.
    """

    def __init__(self, problem: Problem, donated: frozenset[int] = frozenset()):
        self.problem = problem
        self._cache: dict[int, np.ndarray] = {}
        self._reads = None  # readers of every value read (`_readers`)
        self._rows: dict = {}  # (step, ILP node per root) -> MemoryRow
        self._copy_cache: dict = {}  # (value, readers before / after, nodes) -> copies
        self._wants: dict[tuple[int, int], list] = {}
        self.args = tuple(problem.graph.inputs)
        self.outputs, self.order, (self.first, self.last) = structure(problem.graph, donated)
        self.steps = len(self.order)
        # the first step each resharded copy can be made: XLA's scheduler runs a
        # collective on a step argument at the start of the step (`transients`)
        self.made = np.full(len(problem.graph.values), -1, dtype=np.int64)
        self.made[list(self.args)] = 0
        self.scale = held_scale(problem.graph, problem.hw.half_as_f32)
        # half-precision arguments, which such a compiler converts for its matmuls
        self._half_args = {
            v
            for v in self.args
            if problem.hw.half_as_f32 and str(problem.graph.values[v].dtype) in _HALF
        }

    def value_bytes(self, specs) -> np.ndarray:
        """Per-device bytes of every value under specs (one per value)."""
        g, mesh = self.problem.graph, self.problem.mesh
        ways: dict = {}  # per spec, the devices it splits over (copies repeat specs)
        nbytes = [
            v.nbytes
            if s is None
            else v.nbytes / (ways.get(s) or ways.setdefault(s, _ways(s, mesh)))
            for v, s in zip(g.values, specs, strict=True)
        ]
        return np.array(nbytes) * self.scale

    def profile(self, specs, operand_specs=None) -> tuple[float, np.ndarray]:
        """(argument bytes, live intermediate bytes after each step). With the
        operations' operand specs, an operand resharded for its reader adds the
        resharded copy at that reader's step (a gathered parameter, say)."""
        b = self.value_bytes(specs)
        live = self.live_bytes(b)
        if operand_specs is not None:
            live = live + self.transients(specs, operand_specs)
        return float(b[list(self.args)].sum()), live

    def live_bytes(self, b: np.ndarray) -> np.ndarray:
        """Bytes of the live intermediates after each step, given every value's bytes."""
        return live_bytes(self.first, self.last, b, self.steps)

    def live_at(self, step: int) -> np.ndarray:
        """Ids of the intermediates alive after step, in increasing order."""
        return np.flatnonzero((self.first <= step) & (self.last >= step))

    def alive_at(self, step: int, specs) -> list[tuple[float, str, str]]:
        """What occupies memory after step: (per-device bytes, kind, what), largest
        first. Kinds: "parameters", "optimizer state", "other arguments" (named by
        path) and "intermediates" (named by the operation that makes them)."""
        g = self.problem.graph
        b = self.value_bytes(specs)
        live = self.live_at(step)
        producer = g.producer()
        out = []
        for v in [*self.args, *live.tolist()]:
            info = g.values[v]
            if v in producer:
                kind = "intermediates"
                what = f"{g.nodes[producer[v]].name} {list(info.shape)} {info.dtype}"
            else:
                kind = (
                    "optimizer state"
                    if "opt_state" in info.name
                    else "parameters"
                    if "params" in info.name
                    else "other arguments"
                )
                what = info.name
            out.append((float(b[v]), kind, what))
        return sorted(out, key=lambda x: -x[0])

    def transients(self, specs, operand_specs) -> np.ndarray:
        """Bytes of resharded copies alive after each step. XLA reshards a value once
        per target layout and reuses the copy, so a copy lives from its first reader to
        its last (a parameter gathered for the forward matmul stays for the backward).
        A copy of a step argument is made at the start of the step: XLA's scheduler
        runs a collective whose operand is a parameter first (on the CPU backend a
        breadth-first order), so a parameter gathered only for the backward matmul is
        alive through the forward pass. Where the compiler computes half-precision
        matmuls in f32 (`half_as_f32`), a bf16/f16 argument a matmul reads is converted
        once, and its f32 copy lives the same way."""
        g, mesh = self.problem.graph, self.problem.mesh
        span: dict[tuple, list[int]] = {}
        for step, op in enumerate(self.order):
            node = g.nodes[op]
            for r, want in zip(node.inputs, operand_specs[op], strict=True):
                if isinstance(r, Lit):
                    continue
                if want is not None and want != specs[r]:
                    span.setdefault((r, want, 1.0), []).append(step)
                if node.name in CONTRACTIONS and r in self._half_args:
                    span.setdefault((r, want or specs[r], 2.0), []).append(step)
        delta = np.zeros(len(self.order) + 1)
        for (r, want, factor), steps in span.items():
            nbytes = factor * per_device_bytes(g.values[r].nbytes, want, mesh)
            start = min(steps) if self.made[r] < 0 else min(steps[0], int(self.made[r]))
            delta[start] += nbytes
            delta[max(steps) + 1] -= nbytes
        return np.cumsum(delta)[: len(self.order)]

    def report(self, specs, operand_specs=None) -> dict[str, float]:
        b = self.value_bytes(specs)
        args, live = float(b[list(self.args)].sum()), self.live_bytes(b)
        if operand_specs is not None:
            live = live + self.transients(specs, operand_specs)
        peak = float(live.max(initial=0.0))
        outs = float(b[list(self.outputs)].sum()) if self.outputs else 0.0
        return {"arguments": args, "outputs": outs, "activations_peak": peak, "total": args + peak}

    def row(self, step: int, node_of_root: dict[int, int]) -> MemoryRow:
        """The bytes alive at step (arguments included) as a function of the choices,
        resharded copies included (`copies_at`)."""
        key = (step, tuple(node_of_root.values()))
        if key not in self._rows:
            p = self.problem
            live = self.live_at(step)
            terms: dict[int, np.ndarray] = {}
            for v in [*self.args, *live.tolist()]:
                root = p.root_of[p.value_src[v][0]]
                n = node_of_root[root]
                terms[n] = terms.get(n, 0.0) + self._bytes_per_choice(v, root)
            copies = merge_copies(self.copies_at(step, node_of_root))
            self._rows[key] = MemoryRow(tuple(sorted(terms.items())), copies=copies)
        return self._rows[key]

    def copies_at(self, step: int, node_of_root: dict[int, int]) -> list[Copy]:
        """The resharded copies that may be alive after step, as functions of the
        choices (`transients` gives their bytes for one plan). A copy of value r in
        layout w exists from its first reader that wants w (from the step's start if r
        is a step argument) to its last one, unless r is made in w: so it is alive at
        step when a reader at or before step (or none, for an argument) and one at or
        after it both want w and r's producer does not make w."""
        reads, values, steps = self._readers()
        nodes = tuple(node_of_root.values())
        out = []
        for i in np.flatnonzero((steps[:, 0] <= step) & (steps[:, 1] >= step)).tolist():
            r, at = int(values[i]), reads[int(values[i])][0]
            # the readers at or before step (none counted for an argument), and the
            # first one at or after it
            before = int(np.searchsorted(at, step, "right")) if self.made[r] < 0 else -1
            split = (r, before, int(np.searchsorted(at, step)))
            key = (split, nodes)
            if key not in self._copy_cache:
                self._copy_cache[key] = self._copies(*split, node_of_root)
            out += self._copy_cache[key]
        return out

    def _copies(self, r: int, before: int, after: int, node_of_root) -> list[Copy]:
        """Copies of value r alive between its readers [:before] (before < 0: from the
        step's start) and [after:]."""
        p = self.problem
        if r not in p.value_src:
            return []
        _, readers = self._reads[0][r]
        root = p.root_of[p.value_src[r][0]]
        made = [p.spec_of(r, i) for i in range(len(p.units[root]))]
        node = node_of_root[root]

        def wants(rs):  # (node, wanted spec per strategy), once per distinct reader
            out = {}
            for op, pos in rs:
                u = p.node_unit(op)
                w = self._want(u, pos)
                out[node_of_root[p.root_of[u]], id(w)] = (node_of_root[p.root_of[u]], w)
            return list(out.values())

        last = wants(readers[after:])
        wanted = {w for _, ws in last for w in ws if w is not None}
        # from the start: one reader that wants every layout, always
        first = wants(readers[:before]) if before >= 0 else [(None, None)]
        if before >= 0:
            wanted &= {w for _, ws in first for w in ws if w is not None}
        out = []
        for w in wanted:
            has = np.array([s == w for s in made], float)
            if has.all():
                continue
            witnesses = _witnesses(w, first, last, (node, -has))
            if witnesses:
                nbytes = per_device_bytes(p.graph.values[r].nbytes, w, p.mesh)
                out.append(Copy(nbytes, witnesses))
        return out

    def _bytes_per_choice(self, v: int, root: int) -> np.ndarray:
        if v not in self._cache:
            p = self.problem
            self._cache[v] = self.scale[v] * np.array(
                [
                    per_device_bytes(p.graph.values[v].nbytes, p.spec_of(v, j), p.mesh)
                    for j in range(len(p.units[root]))
                ]
            )
        return self._cache[v]

    def _want(self, unit: int, pos: int) -> list:
        """Operand pos's spec of the operation of unit, per strategy of its root."""
        if (unit, pos) not in self._wants:
            p = self.problem
            strategies = p.units[unit]
            self._wants[unit, pos] = [strategies[k].in_specs[pos] for k in p.follow[unit]]
        return self._wants[unit, pos]

    def _readers(self):
        """(per value an operation reads: its readers' steps, and its readers as
        (operation, operand position), in step order; those values; the step each is
        made (its first reader's, if earlier) and its last reader's step)."""
        if self._reads is None:
            g = self.problem.graph
            reads: dict[int, list] = {}
            for step, op in enumerate(self.order):
                for pos, r in enumerate(g.nodes[op].inputs):
                    if not isinstance(r, Lit):
                        reads.setdefault(r, []).append((step, op, pos))
            values = np.fromiter(reads, dtype=np.int64, count=len(reads))
            steps = np.array(
                [
                    (rs[0][0] if self.made[r] < 0 else min(rs[0][0], int(self.made[r])), rs[-1][0])
                    for r, rs in reads.items()
                ],
                dtype=np.int64,
            )
            table = {
                r: (np.array([s for s, _, _ in rs]), [(op, pos) for _, op, pos in rs])
                for r, rs in reads.items()
            }
            self._reads = (table, values, steps.reshape(-1, 2))
        return self._reads
