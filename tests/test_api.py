"""The entry points and the shape of the pipeline: one way, plain data between the stages."""

import ast
import dataclasses
import pathlib
import re
import warnings

import jax.numpy as jnp
import numpy as np
import networkx as nx
import numpyro
import numpyro.distributions as dist
import pytest

import autoreparam
from autoreparam.analysis import analyze_model
from autoreparam.api import ReparameterizedModel
from autoreparam.notes import Note, NoteKind
from autoreparam.planning import plan_with_notes
from autoreparam.report import Report

SRC = pathlib.Path(autoreparam.__file__).parent
GROUP = jnp.array([0, 1, 2, 0, 1, 2])
Y = jnp.array([0.5, 1.0, -0.3, 0.2, 0.8, -0.1])


def model(group, y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 10))
    k = numpyro.sample("k", dist.Poisson(2.0))  # discrete: held fixed, with a note
    with numpyro.plate("groups", 3):
        a = numpyro.sample("a", dist.Normal(0, 1))
    with numpyro.plate("data", len(group)):
        numpyro.sample("y", dist.Normal(mu + a[group] + 0.0 * k, 0.5), obs=y)


def _imports(path: pathlib.Path) -> set[str]:
    """The package modules ``path`` imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("autoreparam."):
            out.add(node.module.split(".")[1])
    return out - {path.stem}


def test_the_package_has_no_import_cycles():
    graph = nx.DiGraph()
    for path in SRC.glob("*.py"):
        graph.add_node(path.stem)
        graph.add_edges_from((path.stem, m) for m in _imports(path))
    assert list(nx.simple_cycles(graph)) == []


def _layout_order() -> list[str]:
    """The modules the README's Layout section lists, in its order (not those named in parentheses)."""
    text = (SRC.parent.parent / "README.md").read_text().split("\n## Layout\n")[1].split("\n## ")[0]
    order: list[str] = []
    for bullet in (b.split("\n\n")[0] for b in text.split("\n- ")[1:]):
        removed = 1
        while removed:  # innermost parentheses first
            bullet, removed = re.subn(r"\([^()]*\)", "", bullet)
        order += [name for name in re.findall(r"`(\w+)`", bullet) if (SRC / f"{name}.py").exists()]
    return order


def test_the_readme_lists_every_module_in_import_order():
    order = _layout_order()
    assert sorted(order) == sorted(p.stem for p in SRC.glob("*.py") if p.stem != "__init__")  # each once
    later = {(m, i) for m in order for i in _imports(SRC / f"{m}.py")
             if i in order and order.index(i) > order.index(m)}
    assert later == set()


@pytest.mark.parametrize("stage, later", [
    ("trace", {"analysis", "report", "planning", "plan", "reparam", "emit", "api", "cli"}),
    ("analysis", {"planning", "plan", "reparam", "emit", "api", "cli"}),
    ("report", {"analysis", "planning", "plan", "curvature", "reparam", "emit", "api", "cli"}),
    ("plan", {"planning", "curvature", "reparam", "emit", "api", "cli"}),
    ("reparam", {"analysis", "planning", "emit", "api", "cli"}),
    ("emit", {"analysis", "planning", "reparam", "api", "cli"}),
])
def test_a_stage_imports_no_later_stage(stage, later):
    assert not _imports(SRC / f"{stage}.py") & later


def test_one_spelling_for_centring():
    """British spellings (non-centred, centredness); NumPyro's ``centered`` only where it is NumPyro's name."""
    texts = [p.read_text() for p in SRC.glob("*.py")] + [(SRC.parent.parent / f).read_text()
                                                          for f in ("README.md", "docs/method.md")]
    other = re.compile(r"centering|centeredness|non[-_]?centered|\.centers\b", re.IGNORECASE)
    assert [m.group() for text in texts for m in other.finditer(text)] == []


@pytest.mark.parametrize("module", ["curvature", "conditioning", "planning"])
def test_only_trace_runs_the_model(module):
    """The curvature and the guard re-run the model through trace.py, not with handlers of their own."""
    text = (SRC / f"{module}.py").read_text()
    assert "handlers." not in text and "log_density" not in text


@pytest.fixture(scope="module")
def report():
    return autoreparam.analyze(model, GROUP, y=Y)


def test_report_is_plain_data_and_its_plan_is_made_once(report):
    assert "model_trace" not in {f.name for f in dataclasses.fields(Report)}
    plan = report.plan
    assert report.plan is plan and plan.names == ("a",)
    other = report.make_plan(init="zero")  # other options: another plan
    assert other.init == "zero" and other != plan and report.plan is plan


def test_notes_are_typed_and_the_planning_writes_none_into_the_report():
    report, model_trace = analyze_model(model, (GROUP,), {"y": Y})
    assert [(n.kind, n.site) for n in report.notes] == [(NoteKind.DISCRETE_SITE, "k")]
    assert [type(n) for n in report.to_json()["notes"]] == [str]  # plain text in JSON


def _asymmetric_funnel(g, y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 1.5))
    s = numpyro.sample("s", dist.Exponential(1))
    with numpyro.plate("groups", 6):
        a = numpyro.sample("a", dist.AsymmetricLaplace(mu, s, 1.5))
    numpyro.sample("y", dist.Normal(a[g], 5.0), obs=y)


def test_the_planning_returns_its_notes_and_writes_none_into_the_report():
    report, model_trace = analyze_model(_asymmetric_funnel, (np.repeat(np.arange(6), 2),), {"y": np.zeros(12)})
    before = list(report.notes)
    plan, notes = plan_with_notes(report, model_trace)
    assert [(n.kind, n.site) for n in notes] == [(NoteKind.CANNOT_NONCENTRE, "a")] and "a" not in plan.names
    assert report.notes == before and not any(n.kind is NoteKind.CANNOT_NONCENTRE for n in report.notes)


def test_a_report_without_a_planner_says_how_to_plan_it():
    report, _ = analyze_model(model, (GROUP,), {"y": Y})
    plain = Report(report.model_name, report.sites, report.parents, report.terms, report.invariances,
                   report.funnels, list(report.notes))
    with pytest.raises(autoreparam.InputError, match="build_plan"):
        plain.plan


def test_reparameterize_warns_by_note_kind_and_is_a_declared_class(report):
    rmodel = autoreparam.reparameterize(model)
    assert isinstance(rmodel, ReparameterizedModel) and rmodel.model is model and rmodel.__name__ == "model"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = rmodel.plan_for(GROUP, y=Y)
    assert plan == report.plan
    assert [str(w.message) for w in caught] == [f"autoreparam: {report.notes[0]}"]


def test_a_note_is_its_text():
    note = Note("site 'k' is discrete", NoteKind.DISCRETE_SITE, "k")
    assert note == "site 'k' is discrete" and f"note: {note}" == "note: site 'k' is discrete"
    assert not Note("other").kind.warns
