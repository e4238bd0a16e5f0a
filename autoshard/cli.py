"""The `autoshard` command: plan a step from a factory, explain and compare saved plans.

    autoshard plan autoshard.models.gpt:demo_factory --mesh 2,4 --hardware h100-nvlink
    autoshard explain plan.json
    autoshard diff a.json b.json

A factory is a function of no arguments returning `(step, example_args)`: the step as
written for one device and a tuple of its arguments (arrays or ShapeDtypeStructs).
Without a GPU or TPU, jax's CPU platform is given `--cpu-devices` (default 8)
emulated devices, unless XLA_FLAGS already sets a count.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import os
import sys


def _cpu_devices(n: int) -> None:
    """Emulate n CPU devices (before jax's backend starts), unless XLA_FLAGS says otherwise."""
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return
    import jax

    jax.config.update("jax_num_cpu_devices", n)


def load_factory(spec: str):
    """'pkg.module:name' or 'path/to/file.py:name' -> the named function.

    Example:
      >>> load_factory("autoshard.models.gpt:demo_factory").__name__
      'demo_factory'
    """
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(
            f"autoshard: factory {spec!r} must look like 'pkg.module:function' or "
            "'file.py:function'"
        )
    if module_name.endswith(".py"):
        loader = importlib.util.spec_from_file_location("_autoshard_factory", module_name)
        if loader is None or not os.path.exists(module_name):
            raise SystemExit(f"autoshard: no file {module_name!r}")
        module = importlib.util.module_from_spec(loader)
        loader.loader.exec_module(module)
    else:
        sys.path.insert(0, os.getcwd())
        module = importlib.import_module(module_name)
    if not hasattr(module, attr):
        raise SystemExit(f"autoshard: module {module_name!r} has no {attr!r}")
    return getattr(module, attr)


def _mesh(text: str | None):
    if text in (None, "auto"):
        return None
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        msg = f"autoshard: --mesh {text!r}: give axis sizes like 2,4 or 'auto'"
        raise SystemExit(msg) from None


def cmd_plan(args) -> int:
    _cpu_devices(args.cpu_devices)
    import autoshard

    hardware = None
    if args.hardware:
        if args.hardware not in autoshard.PRESETS:
            names = ", ".join(sorted(autoshard.PRESETS))
            raise SystemExit(f"autoshard: unknown --hardware {args.hardware!r}; presets: {names}")
        hardware = autoshard.PRESETS[args.hardware]
    made = load_factory(args.factory)()
    if not (isinstance(made, tuple) and len(made) == 2 and isinstance(made[1], tuple | list)):
        raise SystemExit(
            f"autoshard: {args.factory} must return (step, example_args) with example_args a "
            f"tuple of the step's arguments; it returned {type(made).__name__}"
        )
    step, example = made
    wrapped = autoshard.parallelize(
        step,
        mesh=_mesh(args.mesh),
        hardware=hardware,
        time_limit=args.time_limit,
        memory_budget=args.memory_budget,
    )
    plan = wrapped.plan(*example)
    print(plan.summary())
    print()
    print(autoshard.report.explain(plan))
    plan.save(args.json)
    written = [args.json]
    if args.png:
        plan.plot().savefig(args.png, dpi=100, bbox_inches="tight")
        written.append(args.png)
    print(f"\nwrote {', '.join(written)}")
    return 0


def _load(paths):
    """Saved plans, on enough emulated CPU devices for the largest mesh among them."""
    docs = []
    for p in paths:
        try:
            with open(p) as f:
                docs.append(json.load(f))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"autoshard: cannot read plan {p!r}: {e}") from None
    _cpu_devices(max(math.prod(d["mesh"]["shape"]) for d in docs))
    import jax

    import autoshard

    need = max(math.prod(d["mesh"]["shape"]) for d in docs)
    if len(jax.devices()) < need:
        raise SystemExit(
            f"autoshard: the plan's mesh needs {need} devices and jax sees {len(jax.devices())}; "
            "unset XLA_FLAGS or raise its xla_force_host_platform_device_count"
        )
    return [autoshard.Plan.load(p) for p in paths]


def cmd_explain(args) -> int:
    (plan,) = _load([args.plan])
    import autoshard

    print(plan.summary())
    print()
    print(autoshard.report.explain(plan))
    return 0


def cmd_diff(args) -> int:
    a, b = _load([args.a, args.b])
    print(a.diff(b))
    return 0


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="autoshard", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="plan a step from a factory; print it, write JSON and PNG")
    p.add_argument("factory", help="pkg.module:function or file.py:function -> (step, args)")
    p.add_argument("--mesh", default="auto", help="'auto' or axis sizes such as 2,4")
    p.add_argument("--hardware", default=None, help="a preset: cpu, h100-nvlink, tpu-v4, ...")
    p.add_argument("--time-limit", type=float, default=60.0, help="ILP seconds per mesh")
    p.add_argument("--memory-budget", type=float, default=None, help="bytes per device")
    p.add_argument("--json", default="plan.json", help="where to write the plan")
    p.add_argument("--png", default="plan.png", help="where to draw it ('' for no picture)")
    p.add_argument("--cpu-devices", type=int, default=8, help="emulated devices on CPU")
    p.set_defaults(run=cmd_plan)
    e = sub.add_parser("explain", help="summarise and explain a saved plan")
    e.add_argument("plan")
    e.set_defaults(run=cmd_explain)
    d = sub.add_parser("diff", help="what changes from plan a to plan b, and what it costs")
    d.add_argument("a")
    d.add_argument("b")
    d.set_defaults(run=cmd_diff)
    return ap


def main(argv=None) -> int:
    """Run the command line.

    Args:
      argv: the arguments (default: sys.argv[1:]).

    Returns:
      The exit status.

    Example:
      >>> main(["explain", "plan.json"])                # doctest: +SKIP
    """
    args = parser().parse_args(argv)
    return args.run(args)
