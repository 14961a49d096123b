"""The site graph: prior dependencies and likelihood-invariant pairs (the only networkx code)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from .trace import Site

if TYPE_CHECKING:
    import networkx as nx

__all__ = ["build_graph", "dependency_edges", "invariance_edges"]


def build_graph(sites: dict[str, Site], parents: dict[str, set[str]], invariances: Iterable = ()) -> nx.DiGraph:
    """A DiGraph with one node per site and two kinds of edges.

    ``G.edges[a, b]["dependency"]`` is True when b's distribution (or value, for a deterministic
    site) reads a; ``G.edges[a, b]["invariances"]`` lists the observed sites in which the pair
    {a, b} has an invariant direction, as dicts with ``observed``, ``kind`` and ``dim``.
    """
    import networkx as nx  # here: its import is a tenth of a second of every cold analyze, which needs no graph

    g = nx.DiGraph()
    for name, s in sites.items():
        g.add_node(
            name,
            type=s.type,
            order=s.order,
            distribution=s.distribution,
            shape=s.shape,
            support=s.support,
            plates={p.name: {"size": p.size, "dim": p.dim} for p in s.plates},
        )
    for child, ps in parents.items():
        for p in sorted(ps, key=lambda n: sites[n].order if n in sites else -1):
            if p in sites and child in sites:
                g.add_edge(p, child, dependency=True, invariances=[])
    for inv in invariances:
        a, b = inv.sites
        if not g.has_edge(a, b):
            g.add_edge(a, b, dependency=False, invariances=[])
        g.edges[a, b]["invariances"].append({"observed": inv.observed, "kind": inv.kind, "dim": inv.dim})
    return g


def dependency_edges(g: nx.DiGraph) -> list[tuple[str, str]]:
    return [(a, b) for a, b, d in g.edges(data=True) if d["dependency"]]


def invariance_edges(g: nx.DiGraph) -> list[tuple[str, str]]:
    return [(a, b) for a, b, d in g.edges(data=True) if d["invariances"]]
