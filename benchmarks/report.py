"""The results as markdown tables and a bar chart."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from baselines import AUTOSHARD, DP, DP_TP, FSDP, MEGATRON, SHARD_BATCH
from measure import KindStats, Measurement

import autoshard

_SHORT = {
    "all-reduce": "AR",
    "all-gather": "AG",
    "reduce-scatter": "RS",
    "all-to-all": "A2A",
    "collective-permute": "CP",
}
AUTO_MESH = "auto"
PLOT_METHODS = (
    DP,
    FSDP,
    MEGATRON,
    DP_TP,
    SHARD_BATCH,
    "autoshard, best fixed mesh",
    "autoshard, auto mesh",
)


@dataclass(frozen=True)
class Row:
    """One (workload, mesh, method) run.

    ``mesh`` is the mesh label, e.g. ``(2, 4)``, or ``auto`` for autoshard with mesh=None
    (``chosen`` then says which mesh it picked). ``check`` is ``ok`` or what went wrong
    (a loss mismatch against the single-device step, or an error); ``m`` is None when
    the run failed.
    """

    workload: str
    mesh: str
    method: str
    m: Measurement | None
    check: str
    plan_time: float | None = None
    chosen: str = ""


def fmt_bytes(n: float) -> str:
    """``1536`` -> ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def fmt_count(x: float) -> str:
    """``25168724`` -> ``25.2M``."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


def fmt_us(seconds: float) -> str:
    """Seconds as microseconds with two decimals: ``5.16e-06`` -> ``5.16``."""
    return f"{seconds * 1e6:.2f}"


def fmt_collectives(colls: dict[str, KindStats]) -> str:
    """``AR 1x 460.0 KiB n=8; AG 4x 1.0 MiB n=2,4``, or ``none``."""
    parts = []
    for kind, k in sorted(colls.items()):
        sizes = ",".join(str(s) for s in k.group_sizes)
        parts.append(f"{_SHORT.get(kind, kind)} {k.count}x {fmt_bytes(k.nbytes)} n={sizes}")
    return "; ".join(parts) or "none"


def _est(r: Row) -> float:
    return r.m.est_time


def _roofline(r: Row) -> float:
    return r.m.roofline_time


def best_baselines(rows: list[Row], key: Callable[[Row], float] = _est) -> dict[str, Row]:
    """Per workload, the baseline row with the lowest ``key`` (numerics ok)."""
    best: dict[str, Row] = {}
    for r in rows:
        if r.method == AUTOSHARD or r.m is None or r.check != "ok":
            continue
        if r.workload not in best or key(r) < key(best[r.workload]):
            best[r.workload] = r
    return best


def _ratio(r: Row | None, best: dict[str, Row], key: Callable[[Row], float] = _est) -> str:
    b = best.get(r.workload) if r is not None else None
    if r is None or r.m is None or b is None or key(b) <= 0:
        return "-"
    return f"{key(r) / key(b):.2f}"


def _mesh_label(r: Row) -> str:
    return f"auto -> {r.chosen}" if r.mesh == AUTO_MESH else r.mesh


def main_table(rows: list[Row]) -> str:
    """One line per run."""
    best = best_baselines(rows)
    head = (
        "| workload | mesh | method | collectives (compiled) | flops/dev | mem/dev | "
        "est. step (us) | x best baseline | est. roofline (us) | plan (s) | compile (s) | "
        "CPU step (ms) | loss check |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        plan = f"{r.plan_time:.2f}" if r.plan_time is not None else "-"
        if r.m is None:
            cells = ["-"] * 6 + [plan, "-", "-"]
        else:
            m = r.m
            cells = [
                fmt_collectives(m.collectives),
                fmt_count(m.flops),
                fmt_bytes(m.memory),
                fmt_us(m.est_time),
                _ratio(r, best),
                fmt_us(m.roofline_time),
                plan,
                f"{m.compile_time:.2f}",
                f"{m.cpu_step * 1e3:.2f}",
            ]
        row = [r.workload, _mesh_label(r), r.method, *cells, r.check]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def _summary_cell(r: Row | None, best: dict[str, Row], best_roof: dict[str, Row]) -> str:
    if r is None:
        return "not run"
    cell = f"{_ratio(r, best)} ({_ratio(r, best_roof, _roofline)})"
    return cell + (f", chose {r.chosen}" if r.mesh == AUTO_MESH and r.chosen else "")


def summary_table(rows: list[Row], meshes: list[str]) -> str:
    """Per workload: the best baseline, and autoshard's estimate / that, per mesh
    (in parentheses the same ratio for the roofline estimate)."""
    best, best_roof = best_baselines(rows), best_baselines(rows, _roofline)
    auto = {(r.workload, r.mesh): r for r in rows if r.method == AUTOSHARD}
    head = ["workload", "best baseline: est. us", *[f"autoshard {m}" for m in meshes]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for w in dict.fromkeys(r.workload for r in rows):
        b = best.get(w)
        cells = [w, f"{b.method} on {b.mesh}: {fmt_us(b.m.est_time)}" if b else "-"]
        cells += [_summary_cell(auto.get((w, m)), best, best_roof) for m in meshes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def hardware_line(hw: autoshard.Hardware) -> str:
    """The reference hardware the estimates are priced on."""
    return (
        f"Reference hardware `{hw.name}` (reduce_scatter={hw.reduce_scatter}), per device: "
        f"{hw.flops / 1e12:.0f} TFLOP/s peak, {hw.axis_bandwidth(0) / 1e9:.0f} GB/s "
        f"interconnect, {hw.axis_latency(0) * 1e6:.0f} us latency per collective, "
        f"{hw.memory_bandwidth / 1e12:.2f} TB/s memory bandwidth. "
        "Estimated step = flops/peak + sum over collectives of (latency + ring factor x "
        "bytes / bandwidth); ring factors all-reduce 2(n-1)/n, all-gather / reduce-scatter / "
        "all-to-all (n-1)/n, collective-permute 1."
    )


def render(rows: list[Row], meshes: list[str], hw: autoshard.Hardware, notes: list[str]) -> str:
    """The whole results.md."""
    legend = (
        "Collectives: AR all-reduce, AG all-gather, RS reduce-scatter, A2A all-to-all, "
        "CP collective-permute; `count x bytes per device n=group sizes`. flops, memory "
        "(XLA's peak) and collectives are per device, read from the compiled program. "
        "`x best baseline` = est. step / the lowest est. step of any baseline on any mesh "
        "for that workload. est. roofline: the same with flops/peak replaced by "
        "max(flops/peak, bytes accessed/memory bandwidth), informational. CPU step: "
        "median on the emulated CPU devices, informational only. "
        "loss check: first-step loss vs the single-device step (abs tol 1e-5)."
    )
    parts = [
        hardware_line(hw),
        "",
        "### autoshard est. step / best baseline (roofline estimate / best baseline)",
        "",
        summary_table(rows, meshes),
        "",
        "### All runs",
        "",
        main_table(rows),
        "",
        legend,
    ]
    parts += ["", *[f"- {n}" for n in notes]] if notes else []
    return "\n".join(parts) + "\n"


def _plot_values(rows: list[Row], workload: str) -> list[float]:
    """Per plot method, the lowest estimated step (us) over meshes; nan if none ran."""
    out = []
    for method in PLOT_METHODS:
        if method.startswith(AUTOSHARD):
            want_auto = method.endswith("auto mesh")
            sel = [r for r in rows if r.method == AUTOSHARD and (r.mesh == AUTO_MESH) == want_auto]
        else:
            sel = [r for r in rows if r.method == method]
        ests = [r.m.est_time * 1e6 for r in sel if r.workload == workload and r.m is not None]
        out.append(min(ests) if ests else math.nan)
    return out


def plot(rows: list[Row], path: str) -> None:
    """Grouped bars: estimated step time per workload, each method at its best mesh."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(dict.fromkeys(r.workload for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 2.4 * len(workloads)), 4.5))
    width = 0.8 / len(PLOT_METHODS)
    for i, method in enumerate(PLOT_METHODS):
        vals = [_plot_values(rows, w)[i] for w in workloads]
        xs = [j + (i - (len(PLOT_METHODS) - 1) / 2) * width for j in range(len(workloads))]
        ax.bar(xs, vals, width, label=method)
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_yscale("log")
    ax.set_ylabel("estimated step time (us, log)")
    ax.set_title("Estimated step time on the reference hardware (best mesh per method)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
