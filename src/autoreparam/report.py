"""The result of ``analyze``: plain data with a readable ``str`` and a JSON form."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from .errors import InputError
from .graph import build_graph
from .linear_maps import LinearMap, SharedSubspace
from .notes import Note
from .trace import Site

if TYPE_CHECKING:
    import networkx as nx

    from .block import GaussianBlock

__all__ = ["Term", "Invariance", "WithinSite", "Funnel", "Existing", "Report"]

# (init, noncentre, at, guard) -> (the plan, notes for the report); see ``Report.attach_planner``.
Planner = Callable[..., tuple[Any, list[Note]]]


@dataclass(frozen=True)
class Term:
    """Latent ``site`` enters ``observed``'s distribution ``params`` through a constant linear map.

    ``structure`` is ``"gather"`` (indexing, broadcasting, covariate scaling: one element of the
    site per predictor entry), ``"dense"`` (a small site such as ``X @ beta``) or
    ``"unstructured"`` (additive, but too large and too mixed to analyse without a dense Jacobian).
    """

    observed: str
    site: str
    params: tuple[str, ...]
    structure: str
    linear_map: LinearMap | None = field(default=None, repr=False, compare=False)
    # {param: (start, stop)}: the rows of each of ``params`` among the map's outputs (the observed
    # site's parameters flattened in the analysis's order)
    rows: dict[str, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict:
        return {"site": self.site, "params": list(self.params), "structure": self.structure}


@dataclass(frozen=True)
class Invariance:
    """A direction in (A, B) that leaves ``observed``'s distribution unchanged.

    ``sites`` is (A, B) with A first in program order. For ``kind == "additive"``,
    ``absorption`` holds the map G from A into B's coordinates (``absorption.absorb(a)``)
    and bases of the ``dim``-dimensional shared subspace; ``residual`` is the relative change
    of the observed site's parameters measured with a JVP along a random invariant direction.
    ``kind == "local"`` marks a non-additive direction, one that exists only at a point (the scale
    trade-off of ``u_i * v_j``); it has no absorption map and is never planned.
    """

    observed: str
    sites: tuple[str, str]
    kind: str
    dim: int
    residual: float
    structure: str = "linear"
    absorption: SharedSubspace | None = field(default=None, repr=False, compare=False)

    def to_json(self) -> dict:
        out = {
            "observed": self.observed,
            "sites": list(self.sites),
            "kind": self.kind,
            "dim": self.dim,
            "residual": float(self.residual),
            "structure": self.structure,
        }
        if self.absorption is not None:
            out["absorption"] = {
                "shape": [self.absorption.E.shape[0], self.absorption.M.shape[1]],
                "rank": self.absorption.dim,
                "nnz": int(self.absorption.E.nnz + self.absorption.M.nnz),
            }
        return out

    def describe(self) -> str:
        a, b = self.sites
        if self.kind != "additive":
            return f"{a} <-> {b}: local trade-off (not planned)"
        how = {
            "broadcast": f"{b} absorbs {a} (broadcast)",
            "gather": f"{b} absorbs {a} (each level of {b} sits in one level of {a})",
            "mean": f"{b} absorbs the mean of {a}",
            "covariate": f"{b} absorbs {a} times a covariate constant within levels of {b}",
            "linear": f"{b} absorbs a linear function of {a}",
        }[self.structure]
        if self.structure == "covariate":
            factor = self._constant_factor()
            if factor is not None:  # a fixed coefficient (``2 * a[g]``), not a covariate
                scaled = f"{factor:.4g} x {a}"
                n_a = self.absorption.U.shape[0]
                per_column = np.diff(self.absorption.U.tocsc().indptr)
                how = (f"{b} absorbs {scaled} (broadcast)" if n_a == 1 else
                       f"{b} absorbs {scaled} (each level of {b} sits in one level of {a})" if np.all(per_column == 1)
                       else f"{b} absorbs {factor:.4g} x the mean of {a}")
        return how

    def _constant_factor(self) -> float | None:
        """The one ratio between B's and A's moves along the shared directions, if there is one.

        Every shared direction moves A's levels by one value u and B's by one value e, with the same
        e / u for all directions: then the pair differs from a plain broadcast or gather by a fixed
        coefficient, and no covariate is involved.
        """
        sub = self.absorption
        if sub is None or sub.dim == 0:
            return None
        ratios = []
        for k in range(sub.dim):
            u = sub.U[:, k].toarray().ravel()
            e = sub.E[:, k].toarray().ravel()
            u, e = u[u != 0], e[e != 0]
            if not (u.size and e.size) or np.ptp(u) > 1e-6 * np.abs(u).max() or np.ptp(e) > 1e-6 * np.abs(e).max():
                return None
            ratios.append(e[0] / u[0])
        ratios = np.asarray(ratios)
        if np.ptp(ratios) > 1e-6 * np.abs(ratios).max():
            return None
        return float(ratios[0])


@dataclass(frozen=True)
class WithinSite:
    """Directions inside one latent ``site`` that ``observed`` does not see (``null(J)`` of its term).

    Collinear columns of a design (``X @ beta`` with one-hot groups and an intercept), or a giver and a
    receiver read as a sum (``gr[:, 0] + gr[:, 1]``). ``basis`` (values x ``dim``, in reduced row echelon
    form) spans them; ``n_read`` values of the site are read through a map of rank ``n_read - dim``.
    ``residual`` is the relative change of the observed site's parameters along a random one of them.
    """

    observed: str
    site: str
    shape: tuple[int, ...]
    dim: int
    n_read: int
    residual: float
    basis: np.ndarray = field(repr=False, compare=False)
    unconstrained: bool = False  # a site of constrained support: the basis is in its unconstrained values

    def to_json(self) -> dict:
        return {"observed": self.observed, "site": self.site, "dim": self.dim, "values_read": self.n_read,
                "rank": self.n_read - self.dim, "residual": float(self.residual),
                "directions": [self.direction(k) for k in range(min(self.dim, MAX_DIRECTIONS_SHOWN))]}

    def direction(self, k: int) -> str:
        """Direction ``k`` written out: ``gr[0, 0] - gr[0, 1]`` (unit pivot, coefficients to 3 digits)."""
        v = self.basis[:, k]
        parts = []
        for i in np.flatnonzero(v):
            index = np.unravel_index(i, self.shape) if self.shape else ()
            site = f"unconstrained({self.site})" if self.unconstrained else self.site
            name = f"{site}[{', '.join(str(int(j)) for j in index)}]" if index else site
            c = float(v[i])
            mag = "" if abs(abs(c) - 1) < 1e-6 else f"{abs(c):.3g} "
            parts.append(("- " if c < 0 else "+ ") + mag + name)
        text = " ".join(parts)
        return text[2:] if text.startswith("+ ") else "-" + text[1:]

    def describe(self) -> str:
        shown = [self.direction(k) for k in range(min(self.dim, MAX_DIRECTIONS_SHOWN))]
        shown = [d for d in shown if d.count(" ") <= 2 * MAX_TERMS_SHOWN]
        more = "" if len(shown) == self.dim else ", ..."
        example = f"; {', '.join(shown)}{more}" if shown else ""
        return f"reads {self.n_read} values of {self.site} through a rank-{self.n_read - self.dim} map{example}"


MAX_DIRECTIONS_SHOWN = 3
MAX_TERMS_SHOWN = 6


@dataclass(frozen=True)
class Funnel:
    """A latent loc-scale site with real support whose scale depends on other latent sites (for a
    ``MultivariateNormal``: its Cholesky factor, however given)."""

    site: str
    distribution: str
    scale_parents: tuple[str, ...]
    loc_parents: tuple[str, ...]

    def to_json(self) -> dict:
        return {
            "site": self.site,
            "distribution": self.distribution,
            "scale_parents": list(self.scale_parents),
            "loc_parents": list(self.loc_parents),
        }


@dataclass(frozen=True)
class Existing:
    """A reparameterization the model already has.

    ``how`` is ``"wrapper"`` (a ``handlers.reparam`` or ``@autoreparam.auto`` wrapper around the
    model; ``unwrapped`` when ``analyze(..., unwrap=True)`` stripped it), ``"decentered"`` (a latent
    ``{site}_decentered`` with a deterministic ``site``, as ``LocScaleReparam`` and emitted code write
    it) or ``"by hand"`` (a latent with fixed Normal parameters that enters a likelihood multiplied by
    a positive latent: ``a = mu + tau * a_raw``). ``reparam`` names the NumPyro reparameterizer of a
    wrapper's config entry (``LocScaleReparam(centered=0)``), else ""; ``noncentred`` says that entry
    non-centres its site (``centered=0``).
    """

    site: str
    how: str
    detail: str
    reparam: str = ""
    unwrapped: bool = False
    noncentred: bool = False

    def to_json(self) -> dict:
        return {"site": self.site, "how": self.how, "detail": self.detail, "reparam": self.reparam,
                "unwrapped": self.unwrapped, "noncentred": self.noncentred}


@dataclass
class Report:
    """What ``analyze`` found, as plain data. See ``autoreparam.analyze`` for an example.

    ``plan`` is the default plan, made on first access and then kept (``report.plan is
    report.plan``); ``make_plan`` makes one with other options. Both need the model's curvature,
    which this data does not hold: the entry point that made the report (``autoreparam.analyze``)
    gives it a planner. The planning's notes (a site it left out and why) join ``notes``.
    """

    model_name: str
    sites: dict[str, Site]
    parents: dict[str, set[str]]  # site -> the sites its distribution (or value) reads
    terms: dict[str, list[Term]]
    invariances: list[Invariance]
    funnels: list[Funnel]
    notes: list[Note] = field(default_factory=list)  # str with a kind and a site (see notes.Note)
    hyperparameters: tuple[str, ...] = ()  # latent sites that scale other latent sites' priors
    block: GaussianBlock | None = None  # the conditionally Gaussian block (see autoreparam.block)
    existing: list[Existing] = field(default_factory=list)  # what the model already reparameterizes
    within: list[WithinSite] = field(default_factory=list)  # directions inside one site

    def __post_init__(self):
        self.notes = [note if isinstance(note, Note) else Note(note) for note in self.notes]
        self._planner: Planner | None = None
        self._plan = None

    @functools.cached_property
    def graph(self) -> nx.DiGraph:
        """The site graph (``autoreparam.graph.build_graph``): the dependencies and the invariant pairs."""
        return build_graph(self.sites, self.parents, self.invariances)

    def prior_parents(self) -> dict[str, set[str]]:
        """Each site's parents among the sites (the graph's dependency edges into it)."""
        return {n: {p for p in self.parents.get(n, ()) if p in self.sites} for n in self.sites}

    def attach_planner(self, planner: Planner) -> "Report":
        """Plan this report with ``planner`` (called by the entry point that made it); returns self."""
        self._planner, self._plan = planner, None
        return self

    @property
    def plan(self):
        """The default plan: offsets along every additive pair, analytic xi, non-centred funnels."""
        if self._plan is None:
            self._plan = self.make_plan()
        return self._plan

    def make_plan(self, init: str = "analytic", noncentre: Any = "auto", at: dict | None = None,
                  guard: bool = True):
        """A plan with chosen options (see ``autoreparam.reparameterize`` for their meaning).

        ``guard=False`` skips the conditioning check (``autoreparam.planning.build_plan``).
        """
        if self._planner is None:
            raise InputError(f"the report of {self.model_name} has no planner: make it with "
                             "autoreparam.analyze(model, ...), or plan it with "
                             "autoreparam.planning.build_plan(report, model_trace)")
        plan, notes = self._planner(init=init, noncentre=noncentre, at=at, guard=guard)
        self.notes.extend(note for note in notes if note not in self.notes)
        return plan

    def describe_existing(self) -> list[str]:
        """Lines saying what the model already reparameterizes (and what ``unwrap`` stripped)."""
        return _describe_existing(self.existing)

    def additive(self) -> list[Invariance]:
        return [inv for inv in self.invariances if inv.kind == "additive"]

    def grouped_pairs(self) -> list[list[Invariance]]:
        """The additive pairs, those that are one direction in several observed sites together.

        Two invariances are grouped when they pair the same sites with the same dim, structure and
        absorption map: the same direction, shared by two likelihoods.
        """
        groups: list[list[Invariance]] = []
        for inv in self.additive():
            for group in groups:
                if _same_direction(group[0], inv):
                    group.append(inv)
                    break
            else:
                groups.append([inv])
        return groups

    def pairs(self, kind: str = "additive") -> dict[tuple[str, str, str], int]:
        """``{(observed, A, B): dim}`` for the invariances of one kind, handy in tests."""
        return {(i.observed, *i.sites): i.dim for i in self.invariances if i.kind == kind}

    def to_json(self) -> dict:
        return {
            "model": self.model_name,
            "sites": [s.to_json() for s in self.sites.values()],
            "terms": {obs: [t.to_json() for t in terms] for obs, terms in self.terms.items()},
            "invariances": [i.to_json() for i in self.invariances],
            "funnels": [f.to_json() for f in self.funnels],
            "notes": [str(note) for note in self.notes],
            "block": self.block.to_json() if self.block is not None else None,
            "existing": [e.to_json() for e in self.existing],
            "within": [w.to_json() for w in self.within],
        }

    def __str__(self) -> str:
        lines = [f"autoreparam analysis of {self.model_name}", ""]
        latent = [s for s in self.sites.values() if s.type == "latent"]
        observed = [s for s in self.sites.values() if s.type == "observed"]
        lines.append(f"sites: {len(latent)} latent ({_count(latent)} values), "
                     f"{len(observed)} observed ({_count(observed)} values)")
        width = max(len(s.name) for s in self.sites.values())
        for s in self.sites.values():
            if s.type == "param":
                desc = f"param        {_shape(s.shape)}"
            elif s.type == "deterministic":
                desc = f"deterministic {_shape(s.shape)}"
            else:
                plates = ", ".join(p.name for p in s.plates)
                desc = (f"{s.type:<9}{s.distribution} {_shape(s.shape)}"
                        + (f"  plates: {plates}" if plates else "")
                        + ("  [discrete: left out]" if s.is_discrete and s.type == "latent" else ""))
            lines.append(f"  {s.name:<{width}}  {desc}")
        if self.terms:
            lines.append("")
        for obs, terms in self.terms.items():
            if terms:
                lines.append(f"additive terms of {obs}: " + " + ".join(
                    t.site + ("" if t.structure != "unstructured" else " (unstructured)") for t in terms))
            else:
                lines.append(f"additive terms of {obs}: none")
        additive = self.additive()
        lines.append("")
        if additive:
            groups = self.grouped_pairs()
            lines.append(f"likelihood-invariant pairs ({len(groups)}):")
            pw = max(len(f"{a}, {b}") for a, b in (i.sites for i in additive))
            for group in groups:
                inv = group[0]
                pair = f"{inv.sites[0]}, {inv.sites[1]}"
                observed = ", ".join(i.observed for i in group)
                residual = max(i.residual for i in group)
                lines.append(f"  {{{pair}}}{'':<{pw - len(pair)}}  dim {inv.dim:<4} in {observed}: "
                             f"{inv.describe()}   residual {residual:.0e}")
        else:
            lines.append("likelihood-invariant pairs: none")
        if self.within:
            lines.append(f"directions inside one site ({len(self.within)}):")
            sw = max(len(w.site) for w in self.within)
            for w in self.within:
                lines.append(f"  {{{w.site}}}{'':<{sw - len(w.site)}}  dim {w.dim:<4} in {w.observed}: "
                             f"{w.describe()}   residual {w.residual:.0e}")
        local = [i for i in self.invariances if i.kind != "additive"]
        if local:
            lines.append("local (non-additive) trade-offs, not planned:")
            for inv in local:
                lines.append(f"  {{{inv.sites[0]}, {inv.sites[1]}}}  dim {inv.dim} in {inv.observed}")
        lines.append("")
        if self.funnels:
            lines.append("funnels (candidates for non-centring):")
            for f in self.funnels:
                scale = "Cholesky factor" if f.distribution == "MultivariateNormal" else "scale"
                lines.append(f"  {f.site} ~ {f.distribution}: {scale} depends on {', '.join(f.scale_parents)}")
        else:
            lines.append("funnels: none")
        if self.existing:
            lines += [""] + self.describe_existing()
        lines.append("")
        lines.extend(self.block.describe() if self.block is not None else ["Gaussian block: none (see the note)"])
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)


def _same_direction(a: Invariance, b: Invariance) -> bool:
    if (a.sites, a.dim, a.structure, a.kind) != (b.sites, b.dim, b.structure, b.kind):
        return False
    if a.absorption is None or b.absorption is None:
        return False
    ga = a.absorption.E @ a.absorption.M
    gb = b.absorption.E @ b.absorption.M
    if ga.shape != gb.shape:
        return False
    scale = max(abs(ga).max(), abs(gb).max(), 1e-30)
    return abs(ga - gb).max() <= 1e-6 * scale


def _describe_existing(existing: list[Existing]) -> list[str]:
    unwrapped = [e for e in existing if e.unwrapped]
    kept = [e for e in existing if not e.unwrapped]
    lines = []
    if unwrapped:
        lines.append("unwrapped (analysed without it, as asked):")
        lines += [f"  {e.detail}" for e in unwrapped]
    if kept:
        lines.append("already reparameterized in the model:")
        lines += [f"  {e.detail}" for e in kept]
        if any(e.how == "wrapper" for e in kept):
            lines.append("  (analyse the model underneath with analyze(..., unwrap=True) or --unwrap)")
    return lines


def _count(sites) -> int:
    return int(sum(np.prod(s.shape, dtype=np.int64) for s in sites))


def _shape(shape) -> str:
    return "scalar" if not shape else "(" + ", ".join(str(d) for d in shape) + ")"
