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
        for v, x in zip(mn.outputs, jax_core.bind(mn.primitive, ins, mn.params), strict=True):
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


def _program(graph: OpGraph, micro: OpGraph, head: Head, axis: str, p: int, m: int):
    """The per-device program: (fwd consts, fwd carries, fwd scanned, bwd outer
    operands, head inputs) -> (fwd final carries, bwd final carries, bwd stacked)."""
    f, b = head.fwd, head.bwd
    fpar, bpar = f.micro, b.micro
    fnc, fnk = fpar["num_consts"], fpar["num_carry"]
    bnc, bnk = bpar["num_consts"], bpar["num_carry"]
    fbody, bbody = _body_fn(fpar, fnc, fnk), _body_fn(bpar, bnc, bnk)
    fdims, bdims = f.in_dims, b.in_dims
    fouts = [v.aval for v in fpar["jaxpr"].jaxpr.outvars]
    bouts = [v.aval for v in bpar["jaxpr"].jaxpr.outvars]
    bcarry = bouts[:bnk]
    lp = f.length // p
    kr, ka, kc = buffers(p, m)
    ops, mbs = schedule(p, m)
    recv_f = np.full_like(mbs, -1)
    recv_b = np.full_like(mbs, -1)
    recv_f[:, 1:] = np.where(ops[:, :-1] == FWD, mbs[:, :-1], -1)
    recv_b[:, :-1] = np.where(ops[:, 1:] == BWD, mbs[:, 1:], -1)
    table = jnp.asarray(np.stack([ops, mbs, recv_f, recv_b], -1))
    fwd_perm = [(s, s + 1) for s in range(p - 1)]
    bwd_perm = [(s, s - 1) for s in range(1, p)]
    carry_of = {v: k for k, v in enumerate(_fcarry(graph, f))}

    def zeros(shape, dtype, n, dim=0):
        return jnp.zeros((*shape[:dim], n, *shape[dim:]), dtype)

    def program(fc, fk, fx, bo, hx):
        s = jax.lax.axis_index(axis)
        last = s == p - 1

        def forward(cin, i):
            """One microbatch through this stage's layers (and the head on the last)."""
            cs = [_take(c, d, i) for c, d in zip(fc, fdims[:fnc], strict=True)]
            xl = [_take(x, d, i) for x, d in zip(fx, fdims[fnc + fnk :], strict=True)]
            cout, yl = jax.lax.scan(lambda c, x: fbody(cs, c, x), cin, xl)

            def run_head():
                env = {v: cout[carry_of[v]] for v in head.carries}
                ins = zip(head.inputs, hx, head.input_dims, strict=True)
                env.update({v: _take(x, d, i) for v, x, d in ins})
                return _eval_head(graph, micro, head, env)

            cts = jax.lax.cond(
                last, run_head, lambda: [jnp.zeros(a.shape, a.dtype) for a in bcarry]
            )
            return list(cout), list(yl), cts

        def backward(operands, i):
            """One microbatch's cotangents back through this stage's layers."""
            it = iter(operands)
            full = []
            for pos, (kind, _) in enumerate(head.sources):
                x = next(it)
                full.append(_take(x, bdims[pos], i) if kind == OUTER else x)
            cs, cin, xl = full[:bnc], full[bnc : bnc + bnk], full[bnc + bnk :]
            cout, yl = jax.lax.scan(lambda c, x: bbody(cs, c, x), cin, xl, reverse=True)
            return list(cout), list(yl)

        def none(shapes):
            return lambda *_: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)

        def tick(st, row):
            inbox_f, inbox_b, res, fo, bo_, bys = st
            op, i, rf, rb = row[s, 0], row[s, 1], row[s, 2], row[s, 3]
            isf, isb = op == FWD, op == BWD
            first = [_take(c, d, i) for c, d in zip(fk, fdims[fnc : fnc + fnk], strict=True)]
            cin = [jnp.where(s == 0, a, x[i % ka]) for a, x in zip(first, inbox_f, strict=True)]
            fshape = jax.eval_shape(forward, cin, i)
            cout_f, yl_f, cts = jax.lax.cond(isf, forward, none(fshape), cin, i)
            res = [_put(r, 0, i % kr, y, isf) for r, y in zip(res, yl_f, strict=True)]
            fo = [
                _put(o, d, i, c, isf & last)
                for o, c, d in zip(fo, cout_f, f.out_dims[:fnk], strict=True)
            ]
            inbox_b = [_put(x, 0, i % kc, c, isf & last) for x, c in zip(inbox_b, cts, strict=True)]
            ops_b, it_o = [], iter(bo)
            for kind, ref in head.sources:
                if kind == CARRY:
                    ops_b.append(inbox_b[ref][i % kc])
                elif kind == RESID:
                    ops_b.append(res[ref][i % kr])
                else:
                    ops_b.append(next(it_o))
            bshape = jax.eval_shape(backward, ops_b, i)
            cout_b, yl_b = jax.lax.cond(isb, backward, none(bshape), ops_b, i)
            kinds, ydims = b.out_kinds[bnk:], b.out_dims[bnk:]
            bys = [
                _collect(a, y, d, k, i, isb)
                for a, y, d, k in zip(bys, yl_b, ydims, kinds, strict=True)
            ]
            bo_ = [
                _put(o, d, i, c, isb & (s == 0))
                for o, c, d in zip(bo_, cout_b, b.out_dims[:bnk], strict=True)
            ]
            got_f = [jax.lax.ppermute(x, axis, fwd_perm) for x in cout_f]
            got_b = [jax.lax.ppermute(x, axis, bwd_perm) for x in cout_b]
            jf, jb = jnp.maximum(rf, 0), jnp.maximum(rb, 0)
            inbox_f = [_put(x, 0, jf % ka, g, rf >= 0) for x, g in zip(inbox_f, got_f, strict=True)]
            inbox_b = [_put(x, 0, jb % kc, g, rb >= 0) for x, g in zip(inbox_b, got_b, strict=True)]
            return (inbox_f, inbox_b, res, fo, bo_, bys), None

        init = (
            [zeros(a.shape, a.dtype, ka) for a in fouts[:fnk]],
            [zeros(a.shape, a.dtype, kc) for a in bcarry],
            [zeros((lp, *a.shape), a.dtype, kr) for a in fouts[fnk:]],
            [
                zeros(a.shape, a.dtype, m, d)
                for a, d in zip(fouts[:fnk], f.out_dims[:fnk], strict=True)
            ],
            [zeros(a.shape, a.dtype, m, d) for a, d in zip(bcarry, b.out_dims[:bnk], strict=True)],
            [
                zeros((lp, *a.shape), a.dtype, m, d)
                if k == "batch"
                else jnp.zeros((lp, *a.shape), a.dtype)
                for a, d, k in zip(bouts[bnk:], b.out_dims[bnk:], b.out_kinds[bnk:], strict=True)
            ],
        )
        st, _ = jax.lax.scan(tick, init, table)
        _, _, _, fo, bo_, bys = st
        return [jax.lax.psum(o, axis) for o in fo], [jax.lax.psum(o, axis) for o in bo_], bys

    return program


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
        self.program = _program(graph, micro, head, axis, mesh.shape[axis], m)
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
