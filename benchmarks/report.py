"""The results as markdown tables and a chart of the ratios."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace

from baselines import AUTOSHARD, HAND
from measure import KindStats, Measurement

import autoshard

_SHORT = {
    "all-reduce": "AR",
    "all-gather": "AG",
    "reduce-scatter": "RS",
    "all-to-all": "A2A",
    "collective-permute": "CP",
}
GB = 1e9


@dataclass(frozen=True)
class Row:
    """One (workload, target, mesh, method) result.

    ``target`` is ``"8"`` (compiled on 8 local devices, scored from the program) or a
    label such as ``"64 x h100"`` (abstract devices, scored by the cost model). ``est``
    is the estimated step (seconds), ``memory`` per-device bytes against ``capacity``;
    ``predicted``: autoshard's own prediction of the step, where it planned it.
    """

    workload: str
    target: str
    mesh: str
    method: str
    remat: str = ""
    est: float = math.nan
    memory: float = math.nan
    capacity: float = math.nan
    flops: float = math.nan
    collectives: str = ""
    seconds: float = math.nan
    chosen: str = ""
    predicted: float | None = None
    predicted_memory: float | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and not math.isnan(self.est)

    @property
    def fits(self) -> bool:
        return self.ok and self.memory <= self.capacity

    @property
    def hand(self) -> bool:
        return self.method in HAND

    def failed(self, error: str) -> Row:
        return replace(self, error=error)

    def scored(self, m: Measurement, hw: autoshard.Hardware, **kw) -> Row:
        """This row with a compiled program's numbers."""
        return replace(
            self,
            est=m.est_time,
            memory=m.memory,
            capacity=hw.memory,
            flops=m.flops,
            collectives=fmt_collectives(m.collectives),
            **kw,
        )


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def fmt_collectives(colls: dict[str, KindStats]) -> str:
    """``AR 24x (12) 1.2 GiB n=8; AG ...``: executions, launches once combined, bytes
    per device, per step."""
    parts = []
    for kind, k in sorted(colls.items()):
        sizes = ",".join(str(s) for s in k.group_sizes)
        short = _SHORT.get(kind, kind)
        parts.append(f"{short} {k.count}x ({k.launches}) {fmt_bytes(k.nbytes)} n={sizes}")
    return "; ".join(parts) or "none"


def fit_text(r: Row) -> str:
    """``fits`` or ``does not fit: 96 GB > 80 GB``."""
    if not r.ok:
        return "-"
    if r.fits:
        return "fits"
    return f"does not fit: {r.memory / GB:.0f} GB > {r.capacity / GB:.0f} GB"


def best_hand(rows: list[Row]) -> dict[tuple[str, str], Row]:
    """Per (workload, target), the hand plan with the lowest estimate among those that
    fit device memory; a plan that does not fit never counts."""
    best: dict[tuple[str, str], Row] = {}
    for r in rows:
        if not (r.hand and r.fits):
            continue
        key = (r.workload, r.target)
        if key not in best or r.est < best[key].est:
            best[key] = r
    return best


def ratio(r: Row, best: dict[tuple[str, str], Row]) -> float:
    """``r.est`` / the best hand plan that fits (nan without one)."""
    b = best.get((r.workload, r.target))
    if not r.ok or b is None:
        return math.nan
    return r.est / b.est


def _fmt_ratio(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.2f}"


def _ms(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x * 1e3:.2f}"


def _auto_rows(rows: list[Row], w: str, target: str) -> tuple[Row | None, Row | None]:
    """autoshard's own-mesh row, and its best fixed-mesh row that fits."""
    mine = [r for r in rows if r.workload == w and r.target == target and r.method == AUTOSHARD]
    auto = next((r for r in mine if r.mesh == "auto"), None)
    fixed = [r for r in mine if r.mesh != "auto" and r.fits]
    return auto, min(fixed, key=lambda r: r.est) if fixed else None


def summary_table(rows: list[Row]) -> str:
    """Per workload and target: the best hand plan that fits, autoshard's ratio to it."""
    best = best_hand(rows)
    head = (
        "| workload | devices | best hand plan that fits | est. step (ms) | "
        "autoshard, own mesh | autoshard, best fixed mesh |"
    )
    lines = [head, "|---|---|---|---|---|---|"]
    for w, target in dict.fromkeys((r.workload, r.target) for r in rows):
        b = best.get((w, target))
        auto, fixed = _auto_rows(rows, w, target)
        if b is None:
            hand = "none fits"
        else:
            hand = f"{b.method} {b.mesh}" + (f" + remat {b.remat}" if b.remat else "")
        cells = [w, target, hand, _ms(b.est) if b else "-"]
        for r in (auto, fixed):
            if r is None:
                cells.append("-")
                continue
            mesh = r.chosen or r.mesh
            extra = "" if r.fits else f", {fit_text(r)}"
            extra += f", remat {r.remat}" if r.remat else ""
            val = _fmt_ratio(ratio(r, best)) if b else f"{_ms(r.est)} ms"
            cells.append(f"{val} on {mesh}{extra}" if r.ok else f"error: {r.error[:80]}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def detail_table(rows: list[Row], target: str) -> str:
    """Every run of one target."""
    best = best_hand(rows)
    compiled = target == "8"
    head = [
        "workload",
        "mesh",
        "method",
        "remat",
        "est. step (ms)",
        "/ best hand that fits",
        "memory/dev (GB)",
        "fit",
        "matmul TFLOP/dev" if compiled else "autoshard predicted (ms)",
        "collectives (compiled, per step)" if compiled else "-",
        "autoshard predicted (ms)" if compiled else "-",
        "plan + compile (s)" if compiled else "plan (s)",
    ]
    if not compiled:
        head = [h for h in head if h != "-"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.target != target:
            continue
        mesh = f"auto -> {r.chosen}" if r.chosen else r.mesh
        if not r.ok:
            cells = [r.workload, mesh, r.method, r.remat or "-", "ERROR: " + r.error]
            cells += ["-"] * (len(head) - len(cells))
        else:
            cells = [
                r.workload,
                mesh,
                r.method,
                r.remat or "-",
                _ms(r.est),
                _fmt_ratio(ratio(r, best)),
                f"{r.memory / GB:.1f}",
                fit_text(r),
            ]
            if compiled:
                cells += [f"{r.flops / 1e12:.1f}", r.collectives, _ms(r.predicted)]
            else:
                cells += [_ms(r.predicted)]
            cells.append(f"{r.seconds:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hardware_line(hw: autoshard.Hardware) -> str:
    """The reference hardware the compiled programs are priced on."""
    lv = hw.levels[0] if hw.levels else None
    link = f"{lv.name} {lv.bandwidth / GB:.0f} GB/s, {lv.latency * 1e6:.0f} us" if lv else ""
    return (
        f"Reference hardware for the compiled programs: preset `{hw.name}`, "
        f"{hw.flops / 1e12:.0f} TFLOP/s peak, {hw.memory / GB:.0f} GB per device, {link} "
        "per collective (all 8 devices inside one NVLink domain)."
    )


def render(rows: list[Row], hw: autoshard.Hardware, opts, elapsed: float) -> str:
    """The whole results.md."""
    from measure import __doc__ as measure_doc

    targets = list(dict.fromkeys(r.target for r in rows))
    parts = [
        "# autoshard against hand-written sharding, real model sizes",
        "",
        "Ratio = estimated step / the best hand plan that fits device memory "
        "(below 1.00: autoshard is faster). A plan that does not fit is marked and never "
        "counts as the best hand plan.",
        "",
        summary_table(rows),
        "",
        hardware_line(hw),
        "",
    ]
    for target in targets:
        if target == "8":
            parts += ["## 8 devices, compiled (never run), scored from the compiled program", ""]
        else:
            parts += [f"## {target} abstract devices, scored by the cost model", ""]
        parts += [detail_table(rows, target), ""]
    parts += ["## How the numbers are made", "", measure_doc.strip(), ""]
    parts += [f"- {n}" for n in notes(rows, opts, elapsed)]
    return "\n".join(parts) + "\n"


def notes(rows: list[Row], opts, elapsed: float) -> list[str]:
    """Caveats printed under the tables."""
    import os

    import jax

    out = [
        "Workloads: GPT-2 small (12 layers, d 768, 12 heads, ff 3072, vocab 50304, seq "
        "1024, batch 16), GPT-2 medium (24 layers, d 1024, 16 heads, ff 4096, batch 16), "
        "a 1.3B GPT (24 layers, d 2048, 16 heads, ff 8192, seq 2048, batch 16), a "
        "Llama-7B shape (32 layers, d 4096, 32 query / 8 KV heads, ff 11008, vocab 32000, "
        "batch 8 x 2048); float32 parameters and adamw state, layers under nnx.scan, "
        "state donated. Pods scale the batch with the device count.",
        "Hand plans: data parallel, FSDP (each leaf split on its largest dimension that "
        "divides) and Megatron (column/row-parallel attention by whole heads, MLP, "
        "vocabulary) use all 8 devices as one axis; DP x TP puts the batch on the first "
        "axis and Megatron on the second; MaxText rules: base.yml's logical_axis_rules on "
        "an (fsdp, tensor) mesh (embed -> fsdp; mlp, heads, kv_heads, vocab, norm -> "
        "tensor; batch -> fsdp). Inputs and outputs are laid out with jax.jit "
        "in_shardings/out_shardings, and the residual stream at each layer's input is "
        "constrained to the plan's batch axis (with_sharding_constraint, as MaxText "
        "constrains its decoder layers); other activations follow XLA's propagation.",
        "remat full: every layer under jax.checkpoint with nothing saved (MaxText's "
        "default remat_policy). A hand plan that does not fit is scored again with it; "
        "the Llama-7B shape's hand plans are scored with it only (on 8 x 80 GB none fits "
        "without it). autoshard chooses its own remat (remat='auto') when its "
        "memory budget (the device's memory less 10%) binds.",
        "autoshard plans with hardware=h100, donate_argnums=0, time_limit="
        f"{opts.time_limit:g} s per mesh; 'predicted' is its cost model's step time.",
    ]
    bad = [r for r in rows if r.error]
    out += [f"{r.workload}, {r.target}, {r.mesh}, {r.method}: {r.error}" for r in bad]
    out.append(
        f"Run: {elapsed:.0f} s on {os.cpu_count()} CPU cores, jax {jax.__version__}, "
        f"{jax.device_count()} emulated CPU devices."
    )
    return out


def _best_ratio(rows: list[Row], w: str, target: str, method: str, best) -> tuple[float, bool]:
    """Lowest ratio of a method over its meshes (those that fit first), and if it fits."""
    sel = [r for r in rows if (r.workload, r.target, r.method) == (w, target, method) and r.ok]
    if method == AUTOSHARD:
        sel = [r for r in sel if r.mesh == "auto"] or sel
    fit = [r for r in sel if r.fits]
    pool = fit or sel
    vals = [ratio(r, best) for r in pool]
    vals = [v for v in vals if not math.isnan(v)]
    return (min(vals) if vals else math.nan), bool(fit)


def plot(rows: list[Row], path: str) -> None:
    """Bars of each method's ratio to the best hand plan that fits, per workload, one
    panel per target; hatched bars do not fit device memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_hand(rows)
    targets = list(dict.fromkeys(r.target for r in rows))
    methods = [*HAND, AUTOSHARD]
    fig, axes = plt.subplots(1, len(targets), figsize=(6 * len(targets), 4.5), squeeze=False)
    for ax, target in zip(axes[0], targets, strict=True):
        workloads = list(dict.fromkeys(r.workload for r in rows if r.target == target))
        width = 0.8 / len(methods)
        for i, method in enumerate(methods):
            xs, vals, hatches = [], [], []
            for j, w in enumerate(workloads):
                v, fits = _best_ratio(rows, w, target, method, best)
                xs.append(j + (i - (len(methods) - 1) / 2) * width)
                vals.append(v)
                hatches.append("" if fits else "//")
            bars = ax.bar(xs, vals, width, label=method)
            for bar, h in zip(bars, hatches, strict=True):
                bar.set_hatch(h)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(workloads)), workloads, fontsize=8)
        ax.set_yscale("log")
        ax.set_title("8 devices, compiled" if target == "8" else f"{target}, modelled")
        ax.set_ylabel("est. step / best hand plan that fits")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Ratio to the best hand plan that fits (hatched: does not fit)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress(r: Row) -> None:
    """One line on stderr for a finished run (the benchmark's progress)."""
    if r.error:
        what = "ERROR " + r.error
    else:
        what = f"est {r.est * 1e3:9.3f} ms  mem {r.memory / 1e9:6.1f} GB  {r.seconds:6.1f} s"
    remat = f" +remat {r.remat}" if r.remat else ""
    print(f"  {r.mesh:<9} {r.method + remat:<22} {what}", file=sys.stderr, flush=True)
