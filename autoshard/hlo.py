"""Read the collectives out of the HLO text that XLA compiled.

``compiled.as_text()`` is the program after SPMD partitioning: shapes are per device, and every
cross-device transfer is one of five collective instructions. This module finds them, sizes
them, and expands their replica groups from any of XLA's printed syntaxes:

- explicit lists ``replica_groups={{0,1,2,3},{4,5,6,7}}`` (``{}`` means all devices),
- iota ``replica_groups=[2,4]<=[8]`` or ``[4,2]<=[2,4]T(1,0)``,
- mesh axes ``replica_groups=mesh['a'=2,'b'=4] {'b'}``, optionally with
  ``device_ids=([2,4]T(1,0))`` and sub-axes ``{'b':(1)2}``,
- ``source_target_pairs={{0,1},{1,0}}`` for collective-permute.

Asynchronous pairs (``all-reduce-start`` / ``all-reduce-done``) count once, as the start.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ASYNC = ("all-reduce", "all-gather", "collective-permute")  # the kinds with -start/-done pairs

_INSTR = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_OPCODE = re.compile(r"\s*([a-z][\w\-]*)\(")
_SHAPE = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_ITEM_BITS = re.compile(r"[a-z]+?(\d+)")
_IOTA = re.compile(r"\[([\d,\s]+)\]<=\[([\d,\s]+)\](?:T\(([\d,\s]+)\))?")
_DEVICE_IOTA = re.compile(r"\[([\d,\s]+)\](?:T\(([\d,\s]+)\))?")
_MESH_AXIS = re.compile(r"'?([^'=,\s]+)'?\s*=\s*(\d+)")
_AXIS_REF = re.compile(r"'?([^',:\s]+)'?(?::\((\d+)\)(\d+))?")


@dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled (SPMD-partitioned) HLO module.

    ``bytes`` is what one device moves, by kind: the result for all-reduce, all-gather,
    all-to-all and collective-permute; the operand for reduce-scatter. Tuple shapes sum.
    ``group_size`` is 0 (and ``groups`` empty) where it cannot be told: ``replica_groups={}``
    means all devices but the module header names no ``num_partitions``, or the groups are
    in a syntax this reader does not know. ``computation`` tells loop bodies from the entry.
    """

    kind: str
    bytes: int
    group_size: int
    groups: tuple[tuple[int, ...], ...]
    name: str
    computation: str


@dataclass(frozen=True)
class _Instr:
    computation: str
    name: str
    type: str
    opcode: str
    operands: str
    attrs: str


# ---------------------------------------------------------------------------- text scanning


def _close(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    return len(text)


def _split_top(text: str) -> list[str]:
    """Split on the commas that are outside every bracket."""
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append(text[last:i].strip())
            last = i + 1
    parts.append(text[last:].strip())
    return [p for p in parts if p]


def _parse_instr(line: str, computation: str) -> _Instr | None:
    """``%n = f32[8]{0} op(%a, %b), attrs`` -> its parts; None for any other line."""
    m = _INSTR.match(line)
    if not m:
        return None
    pos = m.end()
    if line.startswith("(", pos):  # a tuple type holds spaces: skip it as one bracket
        type_end = _close(line, pos)
    else:
        type_end = len(line) if (sp := line.find(" ", pos)) < 0 else sp
    op = _OPCODE.match(line, type_end)
    if not op:
        return None
    end = _close(line, op.end() - 1)
    return _Instr(
        computation,
        m.group(1),
        line[pos:type_end],
        op.group(1),
        line[op.end() : end - 1],
        line[end:],
    )


def _instructions(hlo_text: str) -> list[_Instr]:
    """Every instruction, tagged with the computation it sits in."""
    out, computation = [], ""
    for line in hlo_text.splitlines():
        if line and not line[0].isspace():  # computation headers and closing braces
            if line.rstrip().endswith("{") and not line.startswith("HloModule"):
                computation = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)", line).group(1)
            continue
        if (instr := _parse_instr(line, computation)) is not None:
            out.append(instr)
    return out


def _num_devices(hlo_text: str) -> int:
    m = re.search(r"^HloModule\b.*?\bnum_partitions=(\d+)", hlo_text, re.MULTILINE)
    return int(m.group(1)) if m else 0


# ---------------------------------------------------------------------------- sizes


def _type_bytes(hlo_type: str) -> int:
    """Bytes of an HLO type, tuples summed: ``(f32[8,16]{1,0}, bf16[])`` -> 514.

    >>> _type_bytes("(f32[8,16]{1,0}, bf16[])")
    514
    """
    total = 0
    for dtype, dims in _SHAPE.findall(hlo_type):
        if dtype == "pred":
            bits = 8
        elif m := _ITEM_BITS.match(dtype):
            bits = int(m.group(1))
        else:  # token[], opaque: no data
            continue
        total += -(-math.prod(int(d) for d in re.findall(r"\d+", dims)) * bits // 8)
    return total


def _operand_bytes(instr: _Instr, types: dict[tuple[str, str], str]) -> int | None:
    """Summed operand bytes, from printed operand types or the defining instructions."""
    total = 0
    for operand in _split_top(instr.operands):
        typed, _, name = operand.rpartition(" ")
        hlo_type = typed or types.get((instr.computation, name.lstrip("%")))
        if hlo_type is None:
            return None
        total += _type_bytes(hlo_type)
    return total


def _start_data_type(instr: _Instr) -> str:
    """The result part of an async start's type, used only when its -done is missing."""
    if instr.opcode == "all-reduce-start" or not instr.type.startswith("("):
        return instr.type
    parts = _split_top(instr.type[1:-1])  # (operands, results, contexts...)
    return parts[1] if len(parts) > 1 else instr.type


# Bytes rule per kind: (instr, data type, operand types, group size) -> bytes.
_Rule = Callable[[_Instr, str, dict[tuple[str, str], str], int], int]
_result_rule: _Rule = lambda instr, data, types, n: _type_bytes(data)


def _scatter_rule(instr: _Instr, data: str, types: dict[tuple[str, str], str], n: int) -> int:
    found = _operand_bytes(instr, types)
    return found if found is not None else _type_bytes(data) * n


BYTES_RULES: dict[str, _Rule] = {kind: _result_rule for kind in KINDS}
BYTES_RULES["reduce-scatter"] = _scatter_rule


# ---------------------------------------------------------------------------- replica groups


def _ints(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


def _iota(dims: list[int], reshape: list[int], perm: list[int] | None) -> np.ndarray:
    """``[dims]<=[reshape]T(perm)``: iota over ``reshape``, transposed, reshaped to ``dims``."""
    ids = np.arange(math.prod(reshape)).reshape(reshape)
    return ids.transpose(perm or range(len(reshape))).reshape(dims)


def _explicit_groups(text: str) -> list[list[int]]:
    """``{{0,1},{2,3}}`` -> [[0, 1], [2, 3]]; ``{}`` -> []."""
    inner = text.strip()[1:-1]
    return [_ints(g) for g in re.findall(r"\{([^{}]*)\}", inner)]


def _iota_groups(text: str) -> list[list[int]]:
    """``[2,4]<=[8]`` -> [[0, 1, 2, 3], [4, 5, 6, 7]]."""
    m = _IOTA.match(text)
    perm = _ints(m.group(3)) if m.group(3) else None
    return _iota(_ints(m.group(1)), _ints(m.group(2)), perm).tolist()


def _mesh_device_ids(text: str, sizes: list[int]) -> np.ndarray:
    """``device_ids=(...)`` of a mesh: an iota ``[2,4]T(1,0)`` or a list of ids."""
    if not text:
        return np.arange(math.prod(sizes)).reshape(sizes)
    if m := _DEVICE_IOTA.fullmatch(text.strip()):
        perm = _ints(m.group(2)) if m.group(2) else None
        return _iota(sizes, _ints(m.group(1)), perm)
    ids = _ints(text)
    return np.array(ids[len(ids) - math.prod(sizes) :]).reshape(sizes)  # drop any dims prefix


def _parse_mesh(text: str) -> tuple[np.ndarray, list[tuple[int, int, int | None]]]:
    """``mesh[...], device_ids=(...) {refs}`` -> (device array, [(axis, pre, size or None)])."""
    mesh_end = _close(text, text.index("["))
    axes = _MESH_AXIS.findall(text[5 : mesh_end - 1])
    names, sizes = [a for a, _ in axes], [int(s) for _, s in axes]
    rest, device_text = text[mesh_end:], ""
    if (at := rest.find("device_ids=(")) >= 0:
        start = at + len("device_ids=")
        device_text = rest[start + 1 : _close(rest, start) - 1]
        rest = rest[_close(rest, start) :]
    refs_text = rest[rest.index("{") + 1 : _close(rest, rest.index("{")) - 1]
    refs = [
        (names.index(n), int(p or 1), int(s) if s else None)
        for n, p, s in _AXIS_REF.findall(refs_text)
    ]
    return _mesh_device_ids(device_text, sizes), refs


def _mesh_groups(text: str) -> list[list[int]]:
    """``mesh['a'=2,'b'=4] {'b'}`` -> [[0, 1, 2, 3], [4, 5, 6, 7]].

    XLA's rule: split each mesh axis at its sub-axis boundaries (``'b':(pre)size`` covers
    the factors from ``pre`` to ``pre*size`` of axis b, major first), move the grouped
    factors last in the order listed, and cut the device array into rows.
    """
    ids, refs = _parse_mesh(text)
    cuts = [{1, size} for size in ids.shape]
    for axis, pre, size in refs:
        if size is not None:
            cuts[axis] |= {pre, pre * size}
    shape, dim_of = [], {}
    for axis, axis_cuts in enumerate(cuts):
        bounds = sorted(axis_cuts) if len(axis_cuts) > 1 else [1, 1]
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            dim_of[axis, lo] = len(shape)
            shape.append(hi // lo)
    grouped = [dim_of[axis, pre] for axis, pre, _ in refs]
    order = [d for d in range(len(shape)) if d not in grouped] + grouped
    ids = ids.reshape(shape).transpose(order)
    return ids.reshape(-1, math.prod(shape[d] for d in grouped)).tolist()


_GROUP_SYNTAXES = (("mesh[", _mesh_groups), ("[", _iota_groups), ("", _explicit_groups))


def _attr(attrs: str, key: str) -> str | None:
    """The text of ``key=...`` up to the next top-level comma; None if absent."""
    m = re.search(rf"(?:^|[\s,]){key}=", attrs)
    if not m:
        return None
    depth = 0
    for i in range(m.end(), len(attrs)):
        ch = attrs[i]
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:  # a mesh's ", device_ids=" is not the end of it
            if not attrs.startswith(" device_ids=", i + 1):
                return attrs[m.end() : i]
    return attrs[m.end() :]


def _groups(instr: _Instr, kind: str, num_devices: int) -> tuple[list[list[int]], int]:
    """Expanded replica groups and devices per group.

    The size is 0 where it cannot be told: ``{}`` without ``num_partitions`` in the module
    header, or a replica-group syntax that this reader does not know.
    """
    if kind == "collective-permute":
        pairs = _explicit_groups(_attr(instr.attrs, "source_target_pairs") or "{}")
        return pairs, 2 if pairs else 1
    text = (_attr(instr.attrs, "replica_groups") or "{}").strip()
    syntax = next(parse for prefix, parse in _GROUP_SYNTAXES if text.startswith(prefix))
    try:
        groups = syntax(text)
    except (AttributeError, IndexError, KeyError, ValueError):  # a syntax this reader lacks
        return [], 0
    if groups:
        return groups, len(groups[0])
    return ([list(range(num_devices))] if num_devices else []), num_devices


# ---------------------------------------------------------------------------- public API


def _kind(opcode: str) -> str | None:
    """Collective kind of an opcode; None for -done halves and everything else."""
    if opcode in KINDS:
        return opcode
    base = opcode.removesuffix("-start")
    return base if base != opcode and base in _ASYNC else None


def parse_collectives(hlo_text: str) -> list[Collective]:
    """Every collective in an HLO module's text, in the order the text prints them.

    Args:
      hlo_text: ``compiled.as_text()`` or any HLO module text.

    Returns:
      One :class:`Collective` per instruction; an async start/done pair is one, named
      after its start. Reduction computations (``to_apply=``) are skipped.

    >>> text = '''HloModule m, num_partitions=4
    ... ENTRY %main (p: f32[8,16]) -> f32[8,16] {
    ...   %p = f32[8,16]{1,0} parameter(0)
    ...   ROOT %ar = f32[8,16]{1,0} all-reduce(%p), replica_groups=[2,2]<=[4], to_apply=%add
    ... }'''
    >>> parse_collectives(text)[0]
    Collective(kind='all-reduce', bytes=512, group_size=2, groups=((0, 1), (2, 3)), \
name='ar', computation='main')
    """
    instrs = _instructions(hlo_text)
    reducers = set(re.findall(r"to_apply=%?([\w.\-]+)", hlo_text))
    types = {(i.computation, i.name): i.type for i in instrs}
    done_types = {
        (i.computation, i.operands.strip().split(" ")[-1].lstrip("%")): i.type
        for i in instrs
        if i.opcode.endswith("-done")
    }
    num_devices = _num_devices(hlo_text)
    out = []
    for instr in instrs:
        kind = _kind(instr.opcode)
        if kind is None or instr.computation in reducers:
            continue
        data = instr.type
        if instr.opcode.endswith("-start"):
            data = done_types.get((instr.computation, instr.name)) or _start_data_type(instr)
        groups, size = _groups(instr, kind, num_devices)
        out.append(
            Collective(
                kind,
                BYTES_RULES[kind](instr, data, types, size),
                size,
                tuple(tuple(g) for g in groups),
                instr.name,
                instr.computation,
            )
        )
    return out


def collectives(compiled) -> dict[str, tuple[int, int]]:
    """``{kind: (count, total_bytes)}`` over the collectives of a compiled program.

    Args:
      compiled: a ``jax.stages.Compiled`` (anything with ``.as_text()``) or HLO text.

    Returns:
      Only the kinds that occur. A collective in a loop body counts once, as it is printed.

    >>> collectives('''HloModule m, num_partitions=2
    ... ENTRY %main (p: f32[4]) -> f32[8] {
    ...   %p = f32[4]{0} parameter(0)
    ...   ROOT %ag = f32[8]{0} all-gather(%p), replica_groups={{0,1}}, dimensions={0}
    ... }''')
    {'all-gather': (1, 32)}
    """
    text = compiled if isinstance(compiled, str) else compiled.as_text()
    out: dict[str, tuple[int, int]] = {}
    for c in parse_collectives(text):
        count, total = out.get(c.kind, (0, 0))
        out[c.kind] = (count + 1, total + c.bytes)
    return out


def compiled_memory(compiled) -> int:
    """Per-device bytes a compiled program needs, from ``memory_analysis()``: arguments,
    outputs that do not reuse a donated argument's buffer, and temporaries. This is the
    figure ``plan.cost.memory["total"]`` predicts.

    Args:
      compiled: a ``jax.stages.Compiled``.

    Example:
      >>> autoshard.compiled_memory(step.lower(state, batch).compile())  # doctest: +SKIP
    """
    m = compiled.memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )
