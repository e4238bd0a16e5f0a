"""The 1F1B pipeline schedule: forward, loss head and backward in one loop of ticks.

PipeDream-Flush (Narayanan et al. 2021): stage s runs p - s - 1 forward
microbatches, then alternates one forward with one backward, then drains the
remaining backwards. A microbatch's residuals live on a stage from its forward to
its backward only, so a stage holds at most p of them (GPipe holds all m).

The forward loop, the loss head (`passes.head`, run per microbatch on the last
stage) and the backward loop run as one `shard_map` over the pipeline axis: each
tick every stage runs a forward, a backward or nothing (`lax.switch` on a table
computed here), then activations move one stage down and cotangents one stage up
(`ppermute`). The schedule table is simulated in Python: every operation runs at
the first tick its inputs have arrived.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from autoshard.passes import jax_core
from autoshard.passes.graph import Lit, OpGraph
from autoshard.passes.head import CARRY, OUTER, RESID, Head
from autoshard.pipeline import _body_fn, _collect, _merge, _put, _split, _take

IDLE, FWD, BWD = 0, 1, 2


def _order(p: int, m: int, s: int) -> list[tuple[int, int]]:
    """Stage s's operations in 1F1B order: (FWD or BWD, microbatch)."""
    w = min(p - 1 - s, m)
    seq = [(FWD, i) for i in range(w)]
    for i in range(w, m):
        seq += [(FWD, i), (BWD, i - w)]
    return seq + [(BWD, i) for i in range(m - w, m)]


def schedule(p: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(ops, microbatches), each [ticks, p]: what each stage runs at each tick.

    A forward runs once the previous stage's forward of the same microbatch ran at an
    earlier tick; a backward once the next stage's backward (or, on the last stage,
    the forward and the loss head) ran at an earlier tick.

    Example:
      >>> ops, mbs = schedule(2, 2)
      >>> ops.tolist()
      [[1, 0], [1, 1], [0, 2], [2, 1], [0, 2], [2, 0]]
    """
    seqs = [_order(p, m, s) for s in range(p)]
    done: dict[tuple[int, int, int], int] = {}
    pos, ops, mbs, t = [0] * p, [], [], 0
    while any(pos[s] < len(seqs[s]) for s in range(p)):
        row = []
        for s in range(p):
            if pos[s] == len(seqs[s]):
                row.append((IDLE, 0))
                continue
            op, i = seqs[s][pos[s]]
            if op == FWD:
                ready = s == 0 or done.get((FWD, i, s - 1), t) < t
            else:
                ready = done.get((FWD, i, s), t) < t and (
                    s == p - 1 or done.get((BWD, i, s + 1), t) < t
                )
            row.append((op, i) if ready else (IDLE, 0))
        for s, (op, i) in enumerate(row):
            if op != IDLE:
                done[(op, i, s)] = t
                pos[s] += 1
        ops.append([r[0] for r in row])
        mbs.append([r[1] for r in row])
        t += 1
    return np.array(ops, np.int32), np.array(mbs, np.int32)


def _slots(spans: list[tuple[int, int, int]], m: int) -> int:
    """Fewest ring slots (microbatch i in slot i % k) such that no value is
    overwritten before it is read. spans: (microbatch, written at, read at)."""
    for k in range(1, m + 1):
        by = {i: (w, r) for i, w, r in spans}
        if all(i + k not in by or by[i + k][0] >= r for i, (_, r) in by.items()):
            return k
    return m


def buffers(p: int, m: int) -> tuple[int, int, int]:
    """Ring slots each stage needs for (residuals, incoming activations, incoming
    cotangents) under `schedule(p, m)`.

    Example:
      >>> buffers(4, 8)[0]
      4
    """
    ops, mbs = schedule(p, m)
    at = {(int(ops[t, s]), int(mbs[t, s]), s): t for t in range(len(ops)) for s in range(p)}
    res = max(_slots([(i, at[FWD, i, s], at[BWD, i, s]) for i in range(m)], m) for s in range(p))
    act = max(
        [_slots([(i, at[FWD, i, s - 1], at[FWD, i, s]) for i in range(m)], m) for s in range(1, p)],
        default=1,
    )
    cot = max(
        _slots(
            [
                (i, at[FWD if s == p - 1 else BWD, i, min(s + 1, p - 1)], at[BWD, i, s])
                for i in range(m)
            ],
            m,
        )
        for s in range(p)
    )
    return res, act, cot


def _eval_head(graph: OpGraph, micro: OpGraph, head: Head, env: dict) -> list:
    """The head on one microbatch: the micro trace's operations (shapes) with the
    whole-batch trace's literals (constants such as a mean's 1/B)."""
    env = dict(env)
    for nid in head.nodes:
        full, mn = graph.nodes[nid], micro.nodes[nid]
        ins = [r.value if isinstance(r, Lit) else env[r] for r in full.inputs]
        # a user's layout pin is planned for the whole batch; a microbatch runs without
        outs = (
            ins if mn.name == "sharding_constraint" else jax_core.bind(mn.primitive, ins, mn.params)
        )
        for v, x in zip(mn.outputs, outs, strict=True):
            env[v] = x
    return [
        jnp.full(micro_shape, t.value, graph.values[v].dtype) if isinstance(t, Lit) else env[t]
        for t, v, micro_shape in _targets(graph, micro, head)
    ]


def _targets(graph, micro, head):
    blp = graph.loops[head.bwd.loop]
    nc, nk = blp.num_consts, blp.num_carry
    body_in = [graph.nodes[i].outputs[0] for i in blp.enter[nc : nc + nk]]
    return [(t, v, micro.values[v].shape) for t, v in zip(head.targets, body_in, strict=True)]


def _tables(p: int, m: int) -> jax.Array:
    """[ticks, p, 4]: per tick and stage the operation, its microbatch, and the
    microbatch arriving from the previous stage (forward) and from the next stage
    (cotangent), -1 for none."""
    ops, mbs = schedule(p, m)
    recv_f = np.full_like(mbs, -1)
    recv_b = np.full_like(mbs, -1)
    recv_f[:, 1:] = np.where(ops[:, :-1] == FWD, mbs[:, :-1], -1)
    recv_b[:, :-1] = np.where(ops[:, 1:] == BWD, mbs[:, 1:], -1)
    return jnp.asarray(np.stack([ops, mbs, recv_f, recv_b], -1))


def _zeros(shape, dtype, n, dim=0):
    """Zeros of shape with a dimension of n slots inserted at dim."""
    return jnp.zeros((*shape[:dim], n, *shape[dim:]), dtype)


def _none(shapes):
    return lambda *_: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)


class _Program:
    """The per-device program: (fwd consts, fwd carries, fwd scanned, bwd outer
    operands, head inputs) -> (fwd final carries, bwd final carries, bwd stacked).
    Loop state: (incoming activations, incoming cotangents, residuals, fwd final
    carries, bwd final carries, bwd stacked results)."""

    def __init__(self, graph: OpGraph, micro: OpGraph, head: Head, axis: str, p: int, m: int):
        self.graph, self.micro, self.head, self.axis, self.p, self.m = (
            graph,
            micro,
            head,
            axis,
            p,
            m,
        )
        f, b = head.fwd, head.bwd
        self.fnc, self.fnk = f.micro["num_consts"], f.micro["num_carry"]
        self.bnc, self.bnk = b.micro["num_consts"], b.micro["num_carry"]
        self.fbody = _body_fn(f.micro, self.fnc, self.fnk)
        self.bbody = _body_fn(b.micro, self.bnc, self.bnk)
        self.fouts = [v.aval for v in f.micro["jaxpr"].jaxpr.outvars]
        self.bouts = [v.aval for v in b.micro["jaxpr"].jaxpr.outvars]
        self.kr, self.ka, self.kc = buffers(p, m)
        self.table = _tables(p, m)
        self.carry_of = {v: k for k, v in enumerate(_fcarry(graph, f))}

    def forward(self, a, cin, i):
        """One microbatch through this stage's layers (and the head on the last)."""
        f, nc, nk = self.head.fwd, self.fnc, self.fnk
        cs = [_take(c, d, i) for c, d in zip(a["fc"], f.in_dims[:nc], strict=True)]
        xl = [_take(x, d, i) for x, d in zip(a["fx"], f.in_dims[nc + nk :], strict=True)]
        cout, yl = jax.lax.scan(lambda c, x: self.fbody(cs, c, x), cin, xl)

        def run_head():
            h = self.head
            env = {v: cout[self.carry_of[v]] for v in h.carries}
            ins = zip(h.inputs, a["hx"], h.input_dims, strict=True)
            env.update({v: _take(x, d, i) for v, x, d in ins})
            return _eval_head(self.graph, self.micro, h, env)

        bcarry = self.bouts[: self.bnk]
        none = [jnp.zeros(x.shape, x.dtype) for x in bcarry]
        cts = jax.lax.cond(a["s"] == self.p - 1, run_head, lambda: none)
        return list(cout), list(yl), cts

    def backward(self, operands, i):
        """One microbatch's cotangents back through this stage's layers."""
        b, nc, nk = self.head.bwd, self.bnc, self.bnk
        full = [
            _take(x, b.in_dims[pos], i) if kind == OUTER else x
            for pos, ((kind, _), x) in enumerate(zip(self.head.sources, operands, strict=True))
        ]
        cs, cin, xl = full[:nc], full[nc : nc + nk], full[nc + nk :]
        cout, yl = jax.lax.scan(lambda c, x: self.bbody(cs, c, x), cin, xl, reverse=True)
        return list(cout), list(yl)

    def _bwd_operands(self, a, inbox_b, res, i):
        it = iter(a["bo"])
        return [
            inbox_b[ref][i % self.kc]
            if kind == CARRY
            else res[ref][i % self.kr]
            if kind == RESID
            else next(it)
            for kind, ref in self.head.sources
        ]

    def tick(self, a, st, row):
        """One tick on this stage: a forward, a backward or nothing, then the hand-offs."""
        inbox_f, inbox_b, res, fo, bk, bys = st
        s, f, b, p = a["s"], self.head.fwd, self.head.bwd, self.p
        op, i, rf, rb = row[s, 0], row[s, 1], row[s, 2], row[s, 3]
        isf, isb, last = op == FWD, op == BWD, s == p - 1
        kdims = f.in_dims[self.fnc : self.fnc + self.fnk]
        first = [_take(c, d, i) for c, d in zip(a["fk"], kdims, strict=True)]
        cin = [jnp.where(s == 0, x, q[i % self.ka]) for x, q in zip(first, inbox_f, strict=True)]
        fshape = jax.eval_shape(self.forward, a, cin, i)
        cout_f, yl_f, cts = jax.lax.cond(isf, self.forward, _none(fshape), a, cin, i)
        res = [_put(r, 0, i % self.kr, y, isf) for r, y in zip(res, yl_f, strict=True)]
        fo = [_put(o, d, i, c, isf & last) for o, c, d in zip(fo, cout_f, f.out_dims, strict=False)]
        inbox_b = [
            _put(q, 0, i % self.kc, c, isf & last) for q, c in zip(inbox_b, cts, strict=True)
        ]
        ops_b = self._bwd_operands(a, inbox_b, res, i)
        cout_b, yl_b = jax.lax.cond(
            isb, self.backward, _none(jax.eval_shape(self.backward, ops_b, i)), ops_b, i
        )
        ys = zip(bys, yl_b, b.out_dims[self.bnk :], b.out_kinds[self.bnk :], strict=True)
        bys = [_collect(acc, y, d, k, i, isb) for acc, y, d, k in ys]
        bk = [
            _put(o, d, i, c, isb & (s == 0))
            for o, c, d in zip(bk, cout_b, b.out_dims, strict=False)
        ]
        inbox_f = self._receive(inbox_f, cout_f, rf, self.ka, [(j, j + 1) for j in range(p - 1)])
        inbox_b = self._receive(inbox_b, cout_b, rb, self.kc, [(j + 1, j) for j in range(p - 1)])
        return (inbox_f, inbox_b, res, fo, bk, bys), None

    def _receive(self, inbox, sent, mb, k, perm):
        """Pass `sent` along perm; store what arrives (microbatch mb, -1: none)."""
        got = [jax.lax.ppermute(x, self.axis, perm) for x in sent]
        slot = jnp.maximum(mb, 0) % k
        return [_put(q, 0, slot, g, mb >= 0) for q, g in zip(inbox, got, strict=True)]

    def init(self):
        f, b, m, lp = self.head.fwd, self.head.bwd, self.m, self.head.fwd.length // self.p
        fk, bk = self.fouts[: self.fnk], self.bouts[: self.bnk]
        ys = zip(
            self.bouts[self.bnk :], b.out_dims[self.bnk :], b.out_kinds[self.bnk :], strict=True
        )
        return (
            [_zeros(x.shape, x.dtype, self.ka) for x in fk],
            [_zeros(x.shape, x.dtype, self.kc) for x in bk],
            [_zeros((lp, *x.shape), x.dtype, self.kr) for x in self.fouts[self.fnk :]],
            [_zeros(x.shape, x.dtype, m, d) for x, d in zip(fk, f.out_dims, strict=False)],
            [_zeros(x.shape, x.dtype, m, d) for x, d in zip(bk, b.out_dims, strict=False)],
            [
                _zeros((lp, *x.shape), x.dtype, m, d)
                if k == "batch"
                else jnp.zeros((lp, *x.shape), x.dtype)
                for x, d, k in ys
            ],
        )

    def __call__(self, fc, fk, fx, bo, hx):
        a = {"s": jax.lax.axis_index(self.axis), "fc": fc, "fk": fk, "fx": fx, "bo": bo, "hx": hx}
        st, _ = jax.lax.scan(lambda st, row: self.tick(a, st, row), self.init(), self.table)
        _, _, _, fo, bo_, bys = st
        psum = [jax.lax.psum(o, self.axis) for o in fo], [jax.lax.psum(o, self.axis) for o in bo_]
        return *psum, bys


def _fcarry(graph: OpGraph, f) -> list[int]:
    lp = graph.loops[f.loop]
    return [graph.nodes[i].outputs[0] for i in lp.exit[: lp.num_carry]]


class Fused:
    """Runners for the interpreter: the forward loop's runner runs the whole 1F1B
    loop (forward, head, backward) and returns the forward loop's results (its
    final carries; its residuals, which only the backward loop reads, as zeros);
    the backward loop's runner returns the backward results computed there."""

    def __init__(self, graph: OpGraph, micro: OpGraph, head: Head, mesh, axis: str, m: int):
        self.graph, self.micro, self.head = graph, micro, head
        self.mesh, self.axis, self.m = mesh, axis, m
        self.program = _Program(graph, micro, head, axis, mesh.shape[axis], m)
        self.pending: list = []

    def runners(self) -> dict:
        """{loop id: runner} for `interpreter(..., runners)`."""

        def fwd(outer, env):
            return self.run(outer, env)

        fwd.reads_env = True
        return {self.head.fwd.loop: fwd, self.head.bwd.loop: lambda outer: self.pending.pop()}

    def run(self, outer, env):
        g, h, m, ax = self.graph, self.head, self.m, self.axis
        f, b = h.fwd, h.bwd
        flp = g.loops[f.loop]
        fnc, fnk = flp.num_consts, flp.num_carry
        split = [_split(x, d, m) for x, d in zip(outer, f.in_dims, strict=True)]
        bo, bspec = [], []
        bnc = g.loops[b.loop].num_consts + g.loops[b.loop].num_carry
        for pos, (kind, ref) in enumerate(h.sources):
            if kind != OUTER:
                continue
            v = env[ref] if not isinstance(ref, Lit) else jnp.asarray(ref.value)
            bo.append(_split(v, b.in_dims[pos], m))
            bspec.append(P(ax) if pos >= bnc else P())
        hx = [_split(env[v], d, m) for v, d in zip(h.inputs, h.input_dims, strict=True)]
        rep, stk = P(), P(ax)
        fn = jax.shard_map(
            self.program,
            mesh=self.mesh,
            in_specs=(
                [rep] * fnc,
                [rep] * fnk,
                [stk] * (len(outer) - fnc - fnk),
                bspec,
                [rep] * len(hx),
            ),
            out_specs=(
                [rep] * fnk,
                [rep] * b.micro["num_carry"],
                [stk] * (len(b.out_dims) - b.micro["num_carry"]),
            ),
            axis_names=frozenset({ax}),
            check_vma=False,
        )
        fo, bo_, bys = fn(split[:fnc], split[fnc : fnc + fnk], split[fnc + fnk :], bo, hx)
        bnk = b.micro["num_carry"]
        self.pending.append(
            [
                _merge(x, d)
                for x, d in zip([*bo_, *bys], [*b.out_dims[:bnk], *b.out_dims[bnk:]], strict=True)
            ]
        )
        fys = [g.nodes[i].outputs[0] for i in flp.exit[fnk:]]
        zeros = [jnp.zeros(g.values[v].shape, g.values[v].dtype) for v in fys]
        return [*(_merge(x, d) for x, d in zip(fo, f.out_dims[:fnk], strict=True)), *zeros]


def head_for(ctx, loops, m: int) -> tuple[Head | str, OpGraph | None]:
    """(the loss head between the step's forward and backward layer loops, the step's
    graph traced at batch / m), or (a sentence saying why 1F1B cannot run, None)."""
    from autoshard.passes.graph import build_graph
    from autoshard.passes.head import analyse
    from autoshard.passes.trace import trace
    from autoshard.pipeline import micro_args

    fwd = [s for s in loops if not s.reverse]
    bwd = [s for s in loops if s.reverse]
    if len(fwd) != 1 or len(bwd) != 1:
        return (
            f"the step has {len(fwd)} forward and {len(bwd)} backward layer-stack loops; "
            "1F1B pairs exactly one of each",
            None,
        )
    micro = build_graph(trace(ctx.fn, micro_args(ctx.args, m)))
    return analyse(ctx.graph, micro, fwd[0], bwd[0]), micro


def runners(ctx, loops, mesh, axis: str, m: int) -> dict:
    """{loop id: runner} running the step's layer loops in the 1F1B schedule."""
    head, micro = head_for(ctx, loops, m)
    if isinstance(head, str):
        raise ValueError(f"autoshard: the 1f1b schedule cannot run this step: {head}.")
    return Fused(ctx.graph, micro, head, mesh, axis, m).runners()


def runs(ctx, loops, m: int) -> bool:
    """Whether the step's loss head runs per microbatch, so 1F1B can run it."""
    return not isinstance(head_for(ctx, loops, m)[0], str)


def check(ctx, loops, m: int) -> None:
    """Raise PipelineError naming why a forced 1F1B cannot run this step, if it cannot."""
    from autoshard.pipeline import PipelineError

    head = head_for(ctx, loops, m)[0]
    if isinstance(head, str):
        raise PipelineError(
            f"autoshard: Pipeline(schedule='1f1b') cannot run this step: {head}. Use "
            "schedule='gpipe' (same bubble, all microbatches' residuals live)."
        )
