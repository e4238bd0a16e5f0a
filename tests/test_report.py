"""Readable plans: summaries grouped by parameter, diffs, figures."""

import pytest
from jax.sharding import PartitionSpec as P

import autoshard
from autoshard import report
from autoshard.models import gpt
from autoshard.plan import Entry


@pytest.fixture(scope="module")
def demo_plans():
    step, args = gpt.demo_factory(batch_size=16)
    a = autoshard.parallelize(step, mesh=(2, 4)).plan(*args)
    b = autoshard.parallelize(step, mesh=(8,)).plan(*args)
    return a, b


def test_summary_folds_moments_and_layers(demo_plans):
    plan = demo_plans[0]
    kernel = next(e for e in plan.inputs if "['blocks'][0]['mlp']['w1']['kernel']" in e.path)
    assert kernel.spec != P(), "the demo plan should split the MLP on (2, 4)"
    for rich in (True, False):
        text = plan.summary(rich=rich)
        lines = text.splitlines()
        assert len(lines) < 40 < len(plan.inputs), text  # 117 input leaves
        assert "opt_state[0].mu" not in text and "opt_state[0].nu" not in text
        row = next(ln for ln in lines if "blocks.{0,1}.mlp.w1.kernel" in ln)
        assert report.spec_text(kernel.spec) in row and "mu, nu: same" in row
        assert "state.opt_state[0].count" in text and "batch['tokens']" in text
        assert "76 optimizer-state leaves folded" in text and "ILP:" in text


def test_moments_with_their_own_layout_are_shown():
    entries = (
        Entry("state.params['w'].value", (8, 4), "float32", P()),
        Entry("state.opt_state[0].mu['w'].value", (8, 4), "float32", P("x")),
        Entry("state.opt_state[0].nu['w'].value", (8, 4), "float32", P()),
        Entry("batch['w']", (3,), "float32", P()),  # same key, other shape: its own row
    )
    rs = report.rows(entries)
    assert [r.name for r in rs] == ["w", "batch['w']"]
    assert rs[0].moment_text() == "mu P('x'), nu P()"


def test_diff_names_changed_tensors_and_costs(demo_plans):
    a, b = demo_plans
    d = a.diff(b)
    spec = {e.path: e.spec for e in a.inputs}, {e.path: e.spec for e in b.inputs}
    path = "state.params['blocks'][0]['mlp']['w1']['kernel'].value"
    assert spec[0][path] != spec[1][path]
    change = next(c for c in d.changed if c.name == "blocks.0.mlp.w1.kernel")
    assert (change.before, change.after) == tuple(report.spec_text(s[path]) for s in spec)
    unchanged = [p for p in spec[0] if spec[0][p] == spec[1][p] and "params" in p]
    assert all(c.name not in unchanged[0] for c in d.changed)
    assert d.time == (a.cost.time, b.cost.time)
    assert d.memory == (a.cost.memory["total"], b.cost.memory["total"])
    text = str(d)
    assert "blocks.0.mlp.w1.kernel" in text and "predicted step:" in text and "->" in text
    assert a.diff(a).changed == () and "every tensor keeps its layout" in str(a.diff(a))


def test_figure_shows_layout_and_time_breakdown(demo_plans, tmp_path):
    plan = demo_plans[0]
    fig = plan.plot()
    layout, times = fig.axes
    assert [t.get_text() for t in layout.get_xticklabels()] == ["x=2", "y=4"]
    names = [t.get_text() for t in layout.get_yticklabels()]
    assert names == [r.name for r in report.fold_layers(report.rows(plan.inputs))]
    cells = [t.get_text() for t in layout.texts]
    assert cells.count("-") < len(cells) and "dim 1" in cells
    labels = [t.get_text().split()[0] for t in times.get_legend().get_texts()]
    assert labels == ["compute", *sorted(plan.cost.comm_time_by_kind)]
    widths = sum(p.get_width() for p in times.patches)
    assert widths == pytest.approx(plan.cost.time * 1e3, rel=1e-6)
    fig.savefig(tmp_path / "plan.png")
    assert (tmp_path / "plan.png").stat().st_size > 10_000
