"""Rematerialise layer stacks: a jaxpr-to-jaxpr rewrite of the step after AD.

A layer stack written as `lax.scan` (or `nnx.scan`) shows up in the traced step
as a forward scan that saves its residuals stacked over the layers ([L, ...] per
residual) and a later scan (the backward pass) that reads them one layer at a
time. The rewrite makes the forward scan save less and the backward scan
recompute the rest from what was saved, as `jax.checkpoint` on the layer would:

- policy NOTHING ("nothing_saveable"): the forward scan saves each layer's carry
  in (the residual stream); the backward body reruns the layer's forward body.
- policy DOTS ("dots_saveable"): it also saves the forward body's matmul results
  (`dot_general`), so the backward body recomputes only the cheap operations
  between them.

Only what the dropped residuals need is recomputed. Numerics are those of the
step without the rewrite (the same operations on the same values). A residual
stack read by anything but the backward scan is kept as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax

from autoshard.passes import jax_core

NOTHING, DOTS = "nothing_saveable", "dots_saveable"
POLICIES = (DOTS, NOTHING)  # cheapest recompute first

# Call-like equations inlined before pairing, so scans inside a jit sit side by side.
_FLATTEN = ("jit", "pjit", "closed_call", "core_call")


@dataclass(frozen=True)
class Pair:
    """A forward layer scan whose stacked residuals only a later scan reads.

    forward, backward: equation indices in the (flattened) step jaxpr.
    dropped: indices among the forward scan's stacked results (after its carries)
      that the rewrite stops saving.
    """

    forward: int
    backward: int
    dropped: tuple[int, ...]


@dataclass(frozen=True)
class RematInfo:
    """What a rewrite did: the policy, and per rematerialised stack its layers and
    the bytes saved per layer before and after (whole arrays, before sharding)."""

    policy: str
    layers: tuple[int, ...]
    saved_before: int
    saved_after: int


def _nbytes(aval) -> int:
    return int(aval.size) * aval.dtype.itemsize


def flatten(closed):
    """The step's jaxpr with its top-level jit/call equations inlined (recursively)."""

    def run(*args):
        return _eval(closed.jaxpr, closed.consts, args, {})

    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    return jax.make_jaxpr(run)(*avals)


def _eval(jaxpr, consts, args, rewrite) -> list:
    """Evaluate jaxpr; call-like equations inlined; rewrite: eqn index -> function
    (eqn, env) -> outputs, for the equations the rewrite replaces."""
    env: dict = {}
    read = lambda a: a.val if jax_core.is_literal(a) else env[a]
    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for i, e in enumerate(jaxpr.eqns):
        if i in rewrite:
            outs = rewrite[i](e, env)
        elif e.primitive.name in _FLATTEN and not rewrite:
            sub = e.params[jax_core.INLINE_BODY_PARAM[e.primitive.name]]
            inner, cs = jax_core.split_closed(sub)
            outs = _eval(inner, cs, [read(v) for v in e.invars], {})
        else:
            outs = jax_core.bind(e.primitive, [read(v) for v in e.invars], e.params)
        for v, o in zip(e.outvars, outs, strict=True):
            if not jax_core.is_dropvar(v) and o is not None:
                env[v] = o
    return [read(v) for v in jaxpr.outvars]


def _has_scan(jaxpr) -> bool:
    """A scan at the top level or inside the call-like equations flatten inlines."""
    for e in jaxpr.eqns:
        if e.primitive.name == "scan":
            return True
        if e.primitive.name in _FLATTEN:
            sub = e.params[jax_core.INLINE_BODY_PARAM[e.primitive.name]]
            if _has_scan(jax_core.split_closed(sub)[0]):
                return True
    return False


def find_pairs(closed) -> tuple[Pair, ...]:
    """The forward/backward layer-scan pairs of a flattened step jaxpr.

    Example:
      >>> pairs = find_pairs(flatten(traced.jaxpr))          # doctest: +SKIP
    """
    jaxpr = closed.jaxpr
    readers: dict = {}
    for i, e in enumerate(jaxpr.eqns):
        for k, v in enumerate(e.invars):
            if not jax_core.is_literal(v):
                readers.setdefault(v, []).append((i, k))
    outs = {v for v in jaxpr.outvars if not jax_core.is_literal(v)}
    pairs = []
    for i, e in enumerate(jaxpr.eqns):
        if e.primitive.name != "scan":
            continue
        nk = e.params["num_carry"]
        by_reader: dict[int, list[int]] = {}
        for j, v in enumerate(e.outvars[nk:]):
            rs = readers.get(v, [])
            if v in outs or not rs or len({r for r, _ in rs}) != 1:
                continue
            b = rs[0][0]
            be = jaxpr.eqns[b]
            if be.primitive.name != "scan" or be.params["length"] != e.params["length"]:
                continue
            first_x = be.params["num_consts"] + be.params["num_carry"]
            if all(k >= first_x for _, k in rs):
                by_reader.setdefault(b, []).append(j)
        if by_reader:
            b, dropped = max(by_reader.items(), key=lambda kv: len(kv[1]))
            pairs.append(Pair(i, b, tuple(dropped)))
    return tuple(pairs)


def _needed(jaxpr, wanted, preset) -> set[int]:
    """Indices of the equations that compute wanted outvars, given preset values."""
    want = {v for v in wanted if not jax_core.is_literal(v)} - set(preset)
    keep = set()
    for i in range(len(jaxpr.eqns) - 1, -1, -1):
        e = jaxpr.eqns[i]
        if any(v in want for v in e.outvars):
            keep.add(i)
            want |= {v for v in e.invars if not jax_core.is_literal(v)} - set(preset)
    return keep


def _run_some(jaxpr, consts, args, keep, preset) -> dict:
    env = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    env.update(preset)
    read = lambda a: a.val if jax_core.is_literal(a) else env[a]
    for i in sorted(keep):
        e = jaxpr.eqns[i]
        outs = jax_core.bind(e.primitive, [read(v) for v in e.invars], e.params)
        env.update((v, o) for v, o in zip(e.outvars, outs, strict=True))
    return env


def _saved_vars(body, policy: str, dropped) -> list:
    """The forward body's values the policy saves besides the carry in: under DOTS,
    the matmul results that recomputing the dropped residuals would read."""
    if policy == NOTHING:
        return []
    dots = {v for e in body.eqns if e.primitive.name == "dot_general" for v in e.outvars}
    want = {v for v in dropped if not jax_core.is_literal(v)}
    reached = []
    for i in range(len(body.eqns) - 1, -1, -1):
        e = body.eqns[i]
        if not any(v in want for v in e.outvars):
            continue
        if e.primitive.name == "dot_general":
            reached += [v for v in e.outvars if v in want and v in dots]
            continue
        want |= {v for v in e.invars if not jax_core.is_literal(v)}
    order = {v: k for k, v in enumerate(v for e in body.eqns for v in e.outvars)}
    return sorted(set(reached), key=order.__getitem__)


def _dropped_vars(body, eqn, pair: Pair) -> list:
    nk = eqn.params["num_carry"]
    return [body.outvars[nk + j] for j in pair.dropped]


def _scan(e, consts, carry, xs, f):
    p = e.params
    return jax.lax.scan(
        f, list(carry), list(xs), length=p["length"], reverse=p["reverse"], unroll=p["unroll"]
    )


def _forward(pair: Pair, policy: str, store: dict):
    """The forward scan's replacement: saves carry in (and the policy's values)."""

    def run(e, env):
        p = e.params
        nc, nk = p["num_consts"], p["num_carry"]
        ins = [a.val if jax_core.is_literal(a) else env[a] for a in e.invars]
        body, bconsts = jax_core.split_closed(p["jaxpr"])
        extra = _saved_vars(body, policy, _dropped_vars(body, e, pair))

        def f(c, x):
            res = _run_some(body, bconsts, [*ins[:nc], *c, *x], range(len(body.eqns)), {})
            out = [res[v] if not jax_core.is_literal(v) else v.val for v in body.outvars]
            ys = [y for j, y in enumerate(out[nk:]) if j not in pair.dropped]
            return out[:nk], (ys, list(c), [res[v] for v in extra])

        fin, (ys, cin, saved) = _scan(e, ins[:nc], ins[nc : nc + nk], ins[nc + nk :], f)
        store[pair.forward] = (ins[:nc], ins[nc + nk :], cin, saved)
        it = iter(ys)
        stacked = [None if j in pair.dropped else next(it) for j in range(len(e.outvars) - nk)]
        return [*fin, *stacked]

    return run


def _backward(pair: Pair, fwd, policy: str, store: dict):
    """The backward scan's replacement: recomputes the dropped residuals per layer."""
    fp = fwd.params
    fbody, fconsts = jax_core.split_closed(fp["jaxpr"])
    fnk = fp["num_carry"]
    extra = _saved_vars(fbody, policy, _dropped_vars(fbody, fwd, pair))
    res_vars = [fbody.outvars[fnk + j] for j in pair.dropped]
    res_of = {fwd.outvars[fnk + j]: r for j, r in zip(pair.dropped, res_vars, strict=True)}
    keep = _needed(fbody, res_vars, extra)

    def run(e, env):
        p = e.params
        nc, nk = p["num_consts"], p["num_carry"]
        fc, fx, cin, saved = store[pair.forward]
        xs_vars = e.invars[nc + nk :]
        kept = [(k, v) for k, v in enumerate(xs_vars) if v not in res_of]
        read = lambda a: a.val if jax_core.is_literal(a) else env[a]
        ins = [read(v) for v in e.invars[: nc + nk]]

        def f(c, x):
            a, b = len(kept), len(kept) + len(fx)
            xk, xf, xc, xsaved = x[:a], x[a:b], x[b : b + fnk], x[b + fnk :]
            preset = dict(zip(extra, xsaved, strict=True))
            fenv = _run_some(fbody, fconsts, [*fc, *xc, *xf], keep, preset)
            slices = dict(zip((k for k, _ in kept), xk, strict=True))
            x_in = [
                slices[k] if k in slices else _read_res(fenv, res_of[v])
                for k, v in enumerate(xs_vars)
            ]
            out = jax_core.eval_jaxpr(p["jaxpr"], *ins[:nc], *c, *x_in)
            return out[:nk], out[nk:]

        xs = [read(v) for _, v in kept] + list(fx) + list(cin) + list(saved)
        fin, ys = _scan(e, ins[:nc], ins[nc:], xs, f)
        return [*fin, *ys]

    return run


def _read_res(env, v):
    return v.val if jax_core.is_literal(v) else env[v]


def rematerialize(closed, policy: str = NOTHING):
    """The step's jaxpr with every layer-stack pair rematerialised under policy.

    Args:
      closed: the traced step's ClosedJaxpr (after AD).
      policy: NOTHING ("nothing_saveable") or DOTS ("dots_saveable").

    Returns:
      (ClosedJaxpr, RematInfo), or None when the step has no such stack or the
      policy saves no less than the step already does.

    Example:
      >>> new, info = rematerialize(traced.jaxpr, NOTHING)     # doctest: +SKIP
    """
    if policy not in POLICIES:
        raise ValueError(f"autoshard: remat policy {policy!r}: use one of {POLICIES}.")
    if not _has_scan(closed.jaxpr):
        return None
    flat = flatten(closed)
    pairs = find_pairs(flat)
    if not pairs:
        return None
    eqns = flat.jaxpr.eqns
    before = after = 0
    for pr in pairs:
        f = eqns[pr.forward]
        nk = f.params["num_carry"]
        body, _ = jax_core.split_closed(f.params["jaxpr"])
        before += sum(_nbytes(f.outvars[nk + j].aval) for j in pr.dropped)
        saved = _saved_vars(body, policy, _dropped_vars(body, f, pr))
        per_layer = f.invars[f.params["num_consts"] :][:nk] + saved
        after += f.params["length"] * sum(_nbytes(v.aval) for v in per_layer)
    if after >= before:
        return None
    store: dict = {}
    rewrite = {}
    for pr in pairs:
        rewrite[pr.forward] = _forward(pr, policy, store)
        rewrite[pr.backward] = _backward(pr, eqns[pr.forward], policy, store)

    def run(*args):
        return _eval(flat.jaxpr, flat.consts, args, rewrite)

    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in flat.jaxpr.invars]
    new = jax.make_jaxpr(run)(*avals)
    layers = tuple(eqns[pr.forward].params["length"] for pr in pairs)
    return new, RematInfo(policy, layers, before, after)
