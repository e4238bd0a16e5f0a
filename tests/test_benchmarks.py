"""benchmarks/compare.py --quick runs end to end and writes a table (no timings asserted)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("data parallel", "Megatron TP", "autoshard")


def _rows(table: str) -> list[list[str]]:
    """Cells of the per-run table's body lines (those with a mesh and a method)."""
    out = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) > 3 and cells[1].startswith("("):
            out.append(cells)
    return out


def test_quick_comparison_writes_a_row_per_method(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "compare.py"),
            "--quick",
            "--out",
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "results.md").read_text()
    rows = _rows(table)
    for mesh in ("(8,)", "(2, 4)"):
        methods = {r[2] for r in rows if r[1] == mesh}
        assert methods == set(METHODS), (mesh, methods)
    assert all(r[-1] == "ok" for r in rows), [r for r in rows if r[-1] != "ok"]
    assert (tmp_path / "estimated_step_time.png").stat().st_size > 0
    assert "Reference hardware" in proc.stdout
