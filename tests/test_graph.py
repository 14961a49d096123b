"""Unit tests of autoreparam.graph, directly and on graphs that analyze() builds."""

import jax.numpy as jnp
import networkx as nx
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from autoreparam import Invariance, Plate, Site, analyze
from autoreparam.graph import build_graph, dependency_edges, invariance_edges


def make_sites():
    return {
        "tau": Site("tau", "latent", 0, (), "HalfNormal", support="positive"),
        "mu": Site("mu", "latent", 1, (), "Normal", support="real"),
        "a": Site("a", "latent", 2, (3,), "Normal", batch_shape=(3,), support="real",
                  plates=(Plate("groups", 3, -1, 3),)),
        "eta": Site("eta", "deterministic", 3, (6,)),
        "y": Site("y", "observed", 4, (6,), "Normal", batch_shape=(6,), support="real",
                  plates=(Plate("n", 6, -1, 6),)),
    }


def test_nodes_carry_site_attributes():
    g = build_graph(make_sites(), {})
    assert isinstance(g, nx.DiGraph)
    assert list(g.nodes) == ["tau", "mu", "a", "eta", "y"]
    assert g.nodes["a"] == {"type": "latent", "order": 2, "distribution": "Normal", "shape": (3,),
                            "support": "real", "plates": {"groups": {"size": 3, "dim": -1}}}
    assert g.nodes["eta"]["type"] == "deterministic" and g.nodes["eta"]["distribution"] is None
    assert g.number_of_edges() == 0


def test_dependency_edges_including_through_a_deterministic_site():
    parents = {"tau": set(), "mu": set(), "a": {"tau"}, "eta": {"mu", "a"}, "y": {"eta", "tau"}}
    g = build_graph(make_sites(), parents)
    assert set(dependency_edges(g)) == {("tau", "a"), ("mu", "eta"), ("a", "eta"),
                                        ("eta", "y"), ("tau", "y")}
    assert not g.has_edge("mu", "y")  # y reads mu only through eta
    for _, _, d in g.edges(data=True):
        assert d == {"dependency": True, "invariances": []}
    assert invariance_edges(g) == []


def test_unknown_parents_are_ignored():
    g = build_graph(make_sites(), {"a": {"tau", "not_a_site"}, "ghost": {"mu"}})
    assert dependency_edges(g) == [("tau", "a")]
    assert "ghost" not in g and "not_a_site" not in g


def test_invariance_edges_and_attributes():
    parents = {"a": {"tau"}, "y": {"mu", "a"}}
    invs = [
        Invariance("y", ("mu", "a"), "additive", 1, 0.0, "broadcast"),
        Invariance("y", ("tau", "a"), "local", 1, 1e-8, "local"),
        Invariance("y2", ("mu", "a"), "additive", 2, 0.0, "linear"),
    ]
    g = build_graph(make_sites(), parents, invs)
    # A pair without a dependency gets an edge marked dependency=False.
    assert g.edges["mu", "a"] == {
        "dependency": False,
        "invariances": [{"observed": "y", "kind": "additive", "dim": 1},
                        {"observed": "y2", "kind": "additive", "dim": 2}],
    }
    # A pair that also has a dependency keeps it and gains the invariance.
    assert g.edges["tau", "a"] == {
        "dependency": True,
        "invariances": [{"observed": "y", "kind": "local", "dim": 1}],
    }
    assert set(dependency_edges(g)) == {("tau", "a"), ("mu", "y"), ("a", "y")}
    assert set(invariance_edges(g)) == {("mu", "a"), ("tau", "a")}


def test_edge_attribute_lists_are_not_shared():
    g = build_graph(make_sites(), {"a": {"tau"}, "y": {"a"}},
                    [Invariance("y", ("tau", "a"), "additive", 1, 0.0)])
    assert g.edges["a", "y"]["invariances"] == []


# -- graphs built by analyze -------------------------------------------------------------------

X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0], [1.0, 3.0], [0.0, 2.0]],
             dtype=np.float32)
G = np.array([0, 1, 2, 0, 1, 2])


def regression_model(X, g, y=None):
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with numpyro.plate("groups", 3):
        a = numpyro.sample("a", dist.Normal(0.0, tau))
    eta = numpyro.deterministic("eta", mu + X @ beta)
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("n", 6):
        numpyro.sample("y", dist.Normal(eta + a[g], sigma), obs=y)


@pytest.fixture(scope="module")
def report():
    return analyze(regression_model, X, G, y=jnp.zeros(6))


def test_analyze_graph_dependencies(report):
    g = report.graph
    assert set(g.nodes) == {"tau", "mu", "beta", "a", "eta", "sigma", "y"}
    assert set(dependency_edges(g)) == {("tau", "a"), ("mu", "eta"), ("beta", "eta"),
                                        ("eta", "y"), ("a", "y"), ("sigma", "y")}
    assert not g.has_edge("mu", "y") and not g.has_edge("beta", "y")


def test_analyze_graph_invariances(report):
    g = report.graph
    assert report.pairs() == {("y", "mu", "a"): 1}
    assert invariance_edges(g) == [("mu", "a")]
    assert g.edges["mu", "a"] == {"dependency": False,
                                  "invariances": [{"observed": "y", "kind": "additive", "dim": 1}]}


def test_analyze_graph_local_invariance():
    def model(y=None):
        u = numpyro.sample("u", dist.Normal(0.0, 1.0))
        v = numpyro.sample("v", dist.Normal(0.0, 1.0))
        with numpyro.plate("n", 4):
            numpyro.sample("y", dist.Normal(u * v, 1.0), obs=y)

    g = analyze(model, y=jnp.zeros(4)).graph
    assert set(dependency_edges(g)) == {("u", "y"), ("v", "y")}
    assert g.edges["u", "v"] == {"dependency": False,
                                 "invariances": [{"observed": "y", "kind": "local", "dim": 1}]}
