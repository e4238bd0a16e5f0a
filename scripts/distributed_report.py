"""The 2-process job of tests/test_distributed.py, once: its wall time, and per case and
process the time to plan, run two steps and fetch, the solver runs, and the largest
difference of the fetched state and losses from the single-device step.

    .venv/bin/python scripts/distributed_report.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
jax.config.update("jax_default_matmul_precision", "highest")

import distributed_worker  # noqa: E402
import test_distributed  # noqa: E402


def main() -> None:
    out = Path(tempfile.mkdtemp(prefix="autoshard-mp-"))
    reports, seconds = test_distributed._run_job(out)
    per = ", ".join(f"{r['total_s']:.1f} s" for r in reports)
    print(f"2 processes x 4 CPU devices: job {seconds:.1f} s (processes: {per})")
    for case in distributed_worker.CASES:
        ref = jax.tree.leaves(test_distributed._reference(case))
        same = reports[0][case]["plan"] == reports[1][case]["plan"]
        print(f"{case}: same plan on both processes: {same}; split: {reports[0][case]['split']}")
        for i, r in enumerate(reports):
            with np.load(out / f"process{i}_{case}.npz") as got:
                diff = max(
                    float(np.max(np.abs(got[f"leaf{k}"] - np.asarray(x))))
                    for k, x in enumerate(ref)
                )
            c = r[case]
            print(
                f"  process {i}: plan + 2 steps + fetch {c['run_s']:.2f} s, solver runs "
                f"{c['solve_count']}, max |fetched - single device| {diff:.1e}"
            )
    ref = jax.tree.leaves(test_distributed._nnx_reference())
    same = reports[0]["nnx"]["plan"] == reports[1]["nnx"]["plan"]
    print(f"nnx (model and optimizer objects): same plan on both processes: {same}")
    for i, r in enumerate(reports):
        with np.load(out / f"process{i}_nnx.npz") as got:
            diff = max(
                float(np.max(np.abs(got[f"leaf{k}"] - np.asarray(x)))) for k, x in enumerate(ref)
            )
        print(
            f"  process {i}: solver runs {r['nnx']['solve_count']}, "
            f"max |fetched - nnx.jit| {diff:.1e}"
        )


if __name__ == "__main__":
    main()
