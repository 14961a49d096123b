"""The planning policy: a ``Plan`` from a ``Report`` (which pairs get offsets, which funnels are non-centred).

For every additive pair (A, B) with B of real support, B gets an offset from A whose analytic
``xi`` is B's response to a shift of A (``Curvature.response``); a funnel site of a loc-scale
family is non-centred when one of its elements has a centredness below ``CENTRED_ENOUGH`` (a
(low-rank) ``MultivariateNormal`` funnel fully, by its Cholesky factor, when the median centredness
of its elements is below ``MVN_CENTRED_ENOUGH``); the
conditioning guard (``conditioning.check_plan_sites``) then drops what makes the geometry worse.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .conditioning import check_plan_sites, linear_predictors
from .curvature import Curvature
from .errors import InputError
from .notes import Note, NoteKind
from .plan import MVN_FAMILIES, Offset, Plan, SitePlan, SparseMap
from .report import Report
from .trace import LOC_SCALE_FAMILIES, ModelTrace, data_evaluated_eagerly, isolated_from_handlers

__all__ = ["build_plan", "plan_with_notes", "existing_conflicts", "ANALYTIC_XI_STEP", "CENTRED_ENOUGH",
           "MVN_CENTRED_ENOUGH"]


# Measured on the tensor model (benchmarks/): learning xi at Adam's full rate from the analytic
# start loses ELBO to gradient noise; a step of 0.02 keeps the start and still refines it.
ANALYTIC_XI_STEP = 0.02
# A funnel site whose every element has an analytic centredness above this is left centred; one
# element below it (a county with one house among counties with a hundred) non-centres the site,
# each element at its own centredness, so the well-informed elements stay (nearly) centred.
CENTRED_ENOUGH = 0.9
# An MVN funnel is non-centred fully or not at all (there is no partial Cholesky non-centring):
# fully unless the median analytic centredness of its elements reaches this, then it stays centred
# (and may take offsets). Above 0.5 the data dominate, but a funnel punishes the centred form more
# than a well-informed site punishes the non-centred one, so the line leans to non-centring. On
# benchmarks.geometry's lkj_gaussian (median 0.90) centred with offsets gave 57.5 min-ESS per 1k
# gradients, non-centred 7.7 (the original: 8.5).
MVN_CENTRED_ENOUGH = 0.8


# -- building a plan from a report ----------------------------------------------------------------
def build_plan(report: Report, model_trace: ModelTrace, init: str = "analytic", noncentre: Any = "auto",
               at: dict | None = None, guard: bool = True) -> Plan:
    """Derive a plan from a report: offsets along every additive pair, non-centring of funnels.

    ``model_trace`` is the trace the report was measured on (``analysis.analyze_model``): the
    analytic xi and centredness come from the model's curvature, which runs the model through it.
    With ``guard`` (the default) and the analytic init, an offset or non-centring that makes the
    log joint worse conditioned at the curvature point is dropped, with a note in ``plan.notes``.
    """
    return plan_with_notes(report, model_trace, init, noncentre, at, guard)[0]


def plan_with_notes(report: Report, model_trace: ModelTrace, init: str = "analytic", noncentre: Any = "auto",
                    at: dict | None = None, guard: bool = True) -> tuple[Plan, list[Note]]:
    """``build_plan``, and the notes for the report: what the planning left out and why."""
    if init not in ("analytic", "zero"):
        raise InputError(f"init must be 'analytic' or 'zero', got {init!r}")
    if noncentre not in ("auto", True, False, None):
        raise InputError(f"noncentre must be 'auto', True or False, got {noncentre!r}")
    with isolated_from_handlers(), data_evaluated_eagerly():
        plan, notes = _build_plan(report, model_trace, init, noncentre, at, guard)
    return plan, notes + existing_conflicts(plan, report.existing)


def existing_conflicts(plan: Plan, existing) -> list[Note]:
    """Warnings where the model's own reparameterization (``Report.existing``) and the plan disagree.

    A site the model already non-centres (``x_decentered``, or ``a_raw`` by hand) that the plan
    reparameterizes again: the two stack. A site that a stripped wrapper (``unwrap=True``)
    non-centred and the plan keeps centred or gives offsets: putting the wrapper back would undo the plan.
    """
    notes = []
    for e in existing:
        if e.unwrapped:
            if not e.site or e.site not in plan.names and not e.noncentred:
                continue
            planned = plan[e.site] if e.site in plan.names else None
            if e.noncentred and (planned is None or not planned.noncentred):
                why = "gives it offsets and keeps it centred" if planned is not None else "keeps it centred"
                notes.append(Note(f"the stripped wrapper non-centred '{e.site}' ({e.reparam}), but the plan {why}: "
                                  "use reparameterize(model, unwrap=True) (the wrapper dropped), not the plan on top "
                                  "of the wrapper", NoteKind.FIGHTS_EXISTING, site=e.site))
            continue
        latent = f"{e.site}_decentered" if e.how in ("decentered", "wrapper") else e.site
        if latent in plan.names:
            what = "non-centres" if plan[latent].noncentred else "gives offsets to"
            advice = ("write the model centred" if e.how == "by hand" else
                      "analyse the model underneath (unwrap=True, --unwrap)" if e.how == "wrapper" else
                      "write the model centred (or unwrap its reparam handler)")
            notes.append(Note(f"the plan {what} '{latent}', which the model already non-centres ({e.how}): the two "
                              f"stack; {advice}, or drop it (plan.without_site('{latent}'))",
                              NoteKind.FIGHTS_EXISTING, site=latent))
    return notes


def _build_plan(report, mt, init, noncentre, at, guard=True) -> tuple[Plan, list[Note]]:
    sites = report.sites
    report_notes: list[Note] = []
    latent = [n for n, s in sites.items() if s.type == "latent"]
    eligible = {n for n in latent if sites[n].support in ("real", "real_vector") and not sites[n].is_discrete}

    pairs: dict[tuple[str, str], Any] = {}
    for inv in report.additive():
        a, b = inv.sites
        if b in eligible and (b, a) not in pairs:
            pairs[(b, a)] = inv
    for name in latent:
        if name not in eligible and any(b == name for b, _ in pairs):
            report_notes.append(Note(f"site '{name}' has support {sites[name].support}; it gets no offsets",
                                     NoteKind.NO_REAL_SUPPORT, name))

    for w in report.within:
        report_notes.append(Note(
            f"site '{w.site}' has {w.dim} direction{'s' if w.dim > 1 else ''} inside it that '{w.observed}' does not "
            f"see; the plan leaves {'them' if w.dim > 1 else 'it'} to the prior: an offset moves one site along an "
            f"earlier one, and a direction inside '{w.site}' would need a rotation of its own coordinates",
            NoteKind.WITHIN_SITE, w.site))

    xi: dict[tuple[str, str], np.ndarray] = {}
    centredness: dict[str, np.ndarray] = {}
    anchors: dict[str, tuple[float, ...]] = {}
    curv = None
    funnel_sites = [f.site for f in report.funnels if f.site in eligible] if noncentre else []
    families = {f.__name__ for f in LOC_SCALE_FAMILIES}
    # An MVN funnel is non-centred by its Cholesky factor, fully, unless its analytic centredness
    # (coordinate by coordinate) says the data dominate (MVN_CENTRED_ENOUGH); the conditioning guard
    # measures loc-scale sites only, so it is not guarded.
    mvn_funnels = [n for n in funnel_sites if sites[n].distribution in MVN_FAMILIES]
    funnel_sites = [n for n in funnel_sites if n not in mvn_funnels]
    for name in [n for n in funnel_sites if sites[n].distribution not in families]:
        funnel_sites.remove(name)
        report_notes.append(Note(f"site '{name}' is {sites[name].distribution}, which autoreparam cannot "
                                 f"non-centre (it can: {', '.join(sorted(families))}); it is left centred",
                                 NoteKind.CANNOT_NONCENTRE, name))
    if init == "analytic" and (pairs or funnel_sites or mvn_funnels):
        # each site's prior parents: the MAP draws prior medians only where it keeps them
        curv = Curvature(mt, at, report.hyperparameters, report.prior_parents())
        for (b, a), inv in pairs.items():
            xi[(b, a)] = curv.response(b, a, inv, pairs)
        for name in funnel_sites + mvn_funnels:
            centredness[name] = curv.centredness(name)
        for _, a in pairs:
            anchors[a] = tuple(float(v) for v in np.ravel(np.asarray(curv.point[a])))
    candidates = []
    for (b, a), inv in pairs.items():
        site = sites[b]
        n_batch = int(np.prod(site.batch_shape, dtype=np.int64))
        init_xi = xi.get((b, a), np.zeros(n_batch))
        candidates.append((b, Offset(a, SparseMap.from_scipy(inv.absorption.E), SparseMap.from_scipy(inv.absorption.M),
                                     tuple(float(v) for v in np.ravel(init_xi)), inv.structure)))
    order = tuple(latent)
    candidates.sort(key=lambda co: (order.index(co[0]), order.index(co[1].parent)))

    # Leading dims that sample_shape= adds before the batch (the rest after the batch are event dims).
    sample_ndims = {n: len(sites[n].shape) - len(sites[n].event_shape) - len(sites[n].batch_shape) for n in latent}
    plan_sites, mvn_sites = [], []
    for name in latent:
        offs = tuple(o for c, o in candidates if c == name)
        site = sites[name]
        n_batch = int(np.prod(site.batch_shape, dtype=np.int64))
        cen = None
        if name in funnel_sites:
            # Analytic centredness near 1 means the data dominate: the centred form is right.
            c = np.ravel(centredness.get(name, np.full(n_batch, 0.5)))
            if c.min() < CENTRED_ENOUGH:
                cen = tuple(float(v) for v in c)
        if name in mvn_funnels and not np.median(centredness.get(name, 0.0)) >= MVN_CENTRED_ENOUGH:
            # value = loc + scale_tril @ z: the offsets cancel, so none are planned.
            mvn_sites.append(SitePlan(name, tuple(site.shape), tuple(site.batch_shape), (), (0.0,) * n_batch,
                                      learn_centredness=False, cholesky=True, sample_ndim=sample_ndims[name]))
        elif offs or cen is not None:
            plan_sites.append(SitePlan(name, tuple(site.shape), tuple(site.batch_shape), offs, cen,
                                       sample_ndim=sample_ndims[name]))
    notes: list[Note] = []
    if curv is not None and plan_sites and guard:
        # Never make the geometry worse: drop what worsens the conditioning at the curvature point.
        try:
            plan_sites, dropped, _ = check_plan_sites(
                curv, plan_sites, anchors, report.hyperparameters, report.funnels,
                linear_predictors(report.terms, report.parents, set(latent)))
            notes = [Note(text, NoteKind.GUARD_DROPPED) for text in dropped]
        except Exception as exc:  # the check is a safety net: an unchecked plan beats no plan
            notes = [Note(f"the conditioning check could not run ({type(exc).__name__}); the plan is unchecked",
                          NoteKind.GUARD_FAILED)]
        report_notes.extend(notes)
    if mvn_sites:
        plan_sites = sorted(plan_sites + mvn_sites, key=lambda s: order.index(s.name))
    shapes = tuple((n, tuple(sites[n].shape), tuple(sites[n].batch_shape)) for n in latent)
    return Plan(report.model_name, tuple(plan_sites), tuple(candidates), shapes, init,
                tuple(sorted(anchors.items(), key=lambda kv: order.index(kv[0]))),
                ANALYTIC_XI_STEP if init == "analytic" else 1.0, notes=tuple(notes),
                sample_ndims=tuple((n, k) for n, k in sample_ndims.items() if k)), report_notes
