"""Pictures of the site graph (DOT text, or PNG/SVG through matplotlib) and of a comparison."""

from __future__ import annotations

from pathlib import Path

import networkx as nx

from .errors import InputError
from .files import write_atomic
from .report import Report

__all__ = ["graph_to_dot", "draw_graph"]


def _label(g: nx.DiGraph, name: str) -> str:
    plates = g.nodes[name].get("plates") or {}
    return name + (f"\n[{', '.join(plates)}]" if plates else "")


def graph_to_dot(report: Report) -> str:
    """The site graph as Graphviz DOT: dependencies as arrows, invariant pairs as red dashed edges,
    the sites of the Gaussian block filled blue."""
    g = report.graph
    block = _block_names(report)
    lines = [f'digraph "{report.model_name}" {{', "  rankdir=TB;", '  node [shape=ellipse, fontname="Helvetica"];']
    for name, data in g.nodes(data=True):
        label = _label(g, name).replace("\n", "\\n")
        style = {"observed": ', style=filled, fillcolor="gray80"', "deterministic": ", shape=box",
                 "param": ", shape=note"}.get(data["type"], "")
        if name in block:
            style = f', style=filled, fillcolor="{BLOCK_COLOR}"'
        lines.append(f'  "{name}" [label="{label}"{style}];')
    for a, b, data in g.edges(data=True):
        if data["dependency"]:
            lines.append(f'  "{a}" -> "{b}";')
        additive = [i for i in data["invariances"] if i["kind"] == "additive"]
        if additive:
            dims = ", ".join(f"{i['dim']}" for i in additive)
            lines.append(f'  "{a}" -> "{b}" [dir=none, style=dashed, color=red, fontcolor=red, '
                         f'label="dim {dims}", constraint=false];')
    lines.append("}")
    return "\n".join(lines) + "\n"


BLOCK_COLOR = "#cfe2ff"  # sites of the conditionally Gaussian block


def _block_names(report: Report) -> set[str]:
    block = getattr(report, "block", None)
    return set(block.names) if block is not None else set()


def _layers(g: nx.DiGraph) -> dict[str, int]:
    """Depth of each site along dependency edges (roots at 0)."""
    dep = nx.DiGraph([(a, b) for a, b, d in g.edges(data=True) if d["dependency"]])
    dep.add_nodes_from(g.nodes)
    depth = {}
    for n in nx.topological_sort(dep):
        preds = list(dep.predecessors(n))
        depth[n] = 1 + max(depth[p] for p in preds) if preds else 0
    return depth


def draw_graph(report: Report, path: str | Path) -> Path:
    """Write the site graph to ``path``: ``.dot`` as text, ``.png``/``.svg`` with matplotlib."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".dot":
        write_atomic(path, graph_to_dot(report))
        return path
    if suffix not in (".png", ".svg"):
        raise InputError(f"--graph {path}: expected a file ending in .png, .svg or .dot")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = report.graph
    depth = _layers(g)
    rows: dict[int, list[str]] = {}
    for n in sorted(g.nodes, key=lambda n: g.nodes[n]["order"]):
        rows.setdefault(depth[n], []).append(n)
    pos = {}
    for d, names in rows.items():
        for i, n in enumerate(names):
            pos[n] = (i - (len(names) - 1) / 2, -d)
    width = max(len(v) for v in rows.values())
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * width), max(4, 1.6 * len(rows))))
    dep_edges = [(a, b) for a, b, d in g.edges(data=True) if d["dependency"]]
    inv_edges = [(a, b) for a, b, d in g.edges(data=True)
                 if any(i["kind"] == "additive" for i in d["invariances"])]
    block = _block_names(report)
    colors = ["#bbbbbb" if g.nodes[n]["type"] == "observed" else BLOCK_COLOR if n in block else "#ffffff"
              for n in g.nodes]
    nx.draw_networkx_nodes(g, pos, ax=ax, node_color=colors, edgecolors="black", node_size=1800)
    nx.draw_networkx_labels(g, pos, ax=ax, labels={n: _label(g, n) for n in g.nodes}, font_size=8)
    nx.draw_networkx_edges(g, pos, ax=ax, edgelist=dep_edges, arrows=True, node_size=1800,
                           arrowstyle="-|>", edge_color="#444444")
    nx.draw_networkx_edges(g, pos, ax=ax, edgelist=inv_edges, arrows=True, arrowstyle="-", style="dashed",
                           edge_color="red", width=1.5, connectionstyle="arc3,rad=0.25", node_size=1800)
    labels = {(a, b): "dim " + ",".join(str(i["dim"]) for i in g.edges[a, b]["invariances"]
                                        if i["kind"] == "additive") for a, b in inv_edges}
    nx.draw_networkx_edge_labels(g, pos, ax=ax, edge_labels=labels, font_color="red", font_size=7,
                                 connectionstyle="arc3,rad=0.25")
    ax.set_title(f"{report.model_name}: dependencies (arrows), invariant pairs (red, dashed)"
                 + (", Gaussian block (blue)" if block else ""), fontsize=10)
    ax.axis("off")
    fig.tight_layout()
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format=suffix[1:]))
    finally:
        plt.close(fig)
    return path
