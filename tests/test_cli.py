"""The command line: plan from a factory, explain and diff saved plans."""

import json
import os
import re
import subprocess
import sys

from autoshard import cli


def test_plan_explain_diff(tmp_path, capsys):
    a, b, png = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "a.png"
    factory = "autoshard.models.gpt:demo_factory"
    assert cli.main(["plan", factory, "--mesh", "2,4", "--json", str(a), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "blocks.{0,1}.mlp.w1.kernel" in out and "mesh: (x=2, y=4)" in out
    assert "- axis x (2 devices) splits" in out and f"wrote {a}, {png}" in out
    assert png.stat().st_size > 10_000
    assert cli.main(["plan", factory, "--mesh", "8", "--json", str(b), "--png", ""]) == 0
    capsys.readouterr()

    specs = [{e["path"]: e["spec"] for e in json.loads(p.read_text())["inputs"]} for p in (a, b)]
    changed = [p for p in specs[0] if specs[0][p] != specs[1][p] and ".params[" in p]
    assert changed, "the two meshes should lay out some parameter differently"
    assert cli.main(["diff", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    name = ".".join(re.findall(r"\['?(\w+)'?\]", changed[0]))  # blocks.0.attn.k.bias
    assert name in out and "predicted step:" in out and "mesh: (x=8)" in out

    # explain in a fresh process: `python -m autoshard` sets up the 8 devices the plan needs
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    run = subprocess.run(
        [sys.executable, "-m", "autoshard", "explain", str(a)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert "The step runs on mesh (x=2, y=4) over 8 devices." in run.stdout
    assert "blocks.{0,1}.mlp.w1.kernel" in run.stdout


def test_bad_factory_and_hardware_are_clear_errors(capsys):
    for argv, message in (
        (["plan", "no_colon"], "must look like 'pkg.module:function'"),
        (["plan", "autoshard.models.gpt:nope"], "has no 'nope'"),
        (["plan", "autoshard.models.gpt:demo", "--hardware", "abacus"], "h100-nvlink, h200"),
    ):
        try:
            cli.main(argv)
        except SystemExit as e:
            assert message in str(e), (argv, e)
        else:
            raise AssertionError(f"{argv} should fail")
