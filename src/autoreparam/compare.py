"""SVI on the original and the reparameterized model, side by side (``autoreparam compare``).

The table never presents a failed fit as a result. Each fit is checked (``fit_checks``):

- ELBO still rising: the mean ELBO over the last 10% of the steps exceeds that over the 10% before
  it by more than 3 standard errors (each window's spread over the root of its length) and by more
  than 0.5 nat. Runs shorter than 100 steps are too short to tell. A loss that was not finite at
  some step is reported too.
- A posterior sd larger than 3 times the prior sd (both averaged over the site's elements): a
  converged fit is rarely wider than its prior, so the guide has wandered off.
- Means that disagree between the two fits by more than 3 times the larger posterior sd: both
  models have the same posterior (the reparameterization is an exact change of variables), so at
  least one fit has not converged.

The ELBOs are compared as ``d = ELBO(reparameterized) - ELBO(original)`` with standard error
``se = hypot(se_orig, se_reparam)``: ``d < -2 se`` says the reparameterized fit is worse and
recommends the original model; ``d > 2 se`` recommends the reparameterized one, unless a fit
has not converged (then there is no recommendation yet); anything in between is no clear
difference (keep the original, the simpler model). An empty plan means the two
models are the same, so the model is fitted once and the table says so.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np
import numpyro
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin
from numpyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO, autoguide

from .api import analyze, reparameterize, unwrap_model
from .errors import InputError
from .files import write_atomic
from .threads import one_blas_thread
from .trace import describe_exception

__all__ = ["GUIDES", "compare", "Comparison", "FitSummary", "compare_mcmc", "MCMCComparison", "MCMCSummary",
           "elbo_trend", "fit_checks"]

GUIDES = ("AutoNormal", "AutoDiagonalNormal", "AutoLowRankMultivariateNormal", "hybrid")
HYBRID_PARTICLES = 4

TREND_WINDOW = 0.1  # the last 10% of the steps against the 10% before them
TREND_MIN_STEPS = 100  # shorter runs: windows of fewer than 10 steps say nothing
TREND_SES = 3.0
TREND_MIN_NATS = 0.5
PRIOR_SD_FACTOR = 3.0
MEAN_SDS = 3.0
ELBO_SES = 2.0
RHAT_LIMIT = 1.01  # Vehtari et al. (2021), "Rank-normalization, folding, and localization"
SHORT = {"original": "orig", "reparameterized": "reparam", "hybrid": "hybrid"}


@dataclass
class FitSummary:
    """One SVI run: final ELBO (mean and standard error over batches of particles), time, sites."""

    label: str
    elbo: float
    elbo_se: float
    seconds: float
    losses: np.ndarray = field(repr=False)
    sites: dict[str, tuple[float, float]] = field(default_factory=dict)  # site -> (mean, sd), averaged
    elements: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)  # per element


@dataclass(frozen=True)
class Trend:
    """The ELBO over the last window of a run against the window before it (``elbo_trend``)."""

    gain: float  # mean ELBO of the last window minus that of the window before it
    se: float
    window: int

    @property
    def rising(self) -> bool:
        return self.gain > TREND_SES * self.se and self.gain > TREND_MIN_NATS


def elbo_trend(losses) -> Trend | None:
    """The ELBO's change between the last two windows of 10% of the steps; None below 100 steps.

    >>> elbo_trend(np.linspace(100.0, 10.0, 200)).rising   # the loss still falls: ELBO rising
    True
    >>> elbo_trend(np.r_[np.linspace(100.0, 10.0, 100), np.full(100, 10.0)]).rising
    False
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.size < TREND_MIN_STEPS:
        return None
    window = max(1, int(losses.size * TREND_WINDOW))
    last, before = -losses[-window:], -losses[-2 * window:-window]
    last, before = last[np.isfinite(last)], before[np.isfinite(before)]
    if last.size < 2 or before.size < 2:
        return Trend(float("nan"), float("nan"), window)
    se = math.sqrt(last.var(ddof=1) / last.size + before.var(ddof=1) / before.size)
    return Trend(float(last.mean() - before.mean()), se, window)


def fit_checks(fits: list[FitSummary], prior_sd: dict[str, float]) -> list[str]:
    """One line for every sign that a fit has not converged (see the module docstring)."""
    out = []
    for fit in fits:
        trend = elbo_trend(fit.losses)
        nonfinite = int(np.sum(~np.isfinite(np.asarray(fit.losses, dtype=np.float64))))
        if nonfinite:
            out.append(f"{fit.label}: the loss was not finite at {nonfinite} of {len(fit.losses)} steps")
        if trend is not None and trend.rising:
            out.append(f"{fit.label}: not converged: the ELBO rose by {trend.gain:.3g} +- {trend.se:.2g} between "
                       f"the last two windows of {trend.window} steps; run more --steps")
        for name, (mean, sd) in fit.sites.items():
            limit = prior_sd.get(name, float("nan"))
            if np.isfinite(limit) and limit > 0 and sd > PRIOR_SD_FACTOR * limit:
                out.append(f"{fit.label}: not converged: the sd of {name} ({sd:.3g}) is {sd / limit:.3g} times "
                           f"its prior sd ({limit:.3g})")
    paired = [f for f in fits if f.label in ("original", "reparameterized")]
    if len(paired) == 2:
        a, b = paired
        for name in a.sites:
            if name in b.sites:
                line = _means_disagree(name, a, b)
                if line:
                    out.append(line)
    return out


def _means_disagree(name: str, a: FitSummary, b: FitSummary) -> str | None:
    """A line if the two fits' means of ``name`` are more than 3 posterior sds apart.

    Element by element when both fits have their per-element moments (an average over the
    site's elements can hide opposite errors), else on the site's averaged mean and sd.
    """
    if name in a.elements and name in b.elements and a.elements[name][0].shape == b.elements[name][0].shape:
        (m0, s0), (m1, s1) = a.elements[name], b.elements[name]
    else:
        (m0, s0), (m1, s1) = a.sites[name], b.sites[name]
        m0, s0, m1, s1 = (np.array([x], np.float64) for x in (m0, s0, m1, s1))
    if not (np.all(np.isfinite(m0)) and np.all(np.isfinite(m1))):
        return f"{name}: a mean is not finite in the {a.label if not np.all(np.isfinite(m0)) else b.label} fit"
    spread = np.maximum(s0, s1)
    gap = np.abs(m0 - m1)
    off = gap > MEAN_SDS * spread + 1e-9 * np.maximum(np.abs(m0), 1.0)
    if not off.any():
        return None
    worst = int(np.argmax(gap / np.maximum(spread, 1e-300)))
    where = "" if m0.size == 1 else f" at {int(off.sum())} of its {m0.size} elements (worst: element {worst}"
    sds = gap[worst] / max(spread[worst], 1e-300)
    return (f"{name}: the means disagree{where}{', ' if where else ' ('}{m0[worst]:.4g} against {m1[worst]:.4g}, "
            f"{sds:.3g} posterior sds apart) though both models have the same posterior: at least one fit has "
            "not converged")


def verdict(fits: list[FitSummary], unconverged: set[str], disagree: bool = False) -> str | None:
    """The one-line recommendation from the ELBOs of the original and the reparameterized fit.

    ``unconverged``: the labels of the fits found not converged; ``disagree``: their means disagree.
    """
    by_label = {f.label: f for f in fits}
    if "original" not in by_label or "reparameterized" not in by_label:
        return None
    orig, rep = by_label["original"], by_label["reparameterized"]
    if not (np.isfinite(orig.elbo) and np.isfinite(rep.elbo)):
        return "recommendation: none: an ELBO is not finite"
    d, se = rep.elbo - orig.elbo, math.hypot(orig.elbo_se, rep.elbo_se)
    caveat = ""
    labels = sorted(unconverged)
    which = f"the {' and '.join(labels)} fit{'s have' if len(labels) > 1 else ' has'} not converged"
    if unconverged:
        caveat = f" ({which}: more --steps may change this)"
    elif disagree:
        caveat = " (but the fits' means disagree: see the warnings)"
    if d < -ELBO_SES * se:
        return (f"the reparameterized fit is worse (ELBO {rep.elbo:.2f} against {orig.elbo:.2f}, lower by "
                f"{-d:.3g} +- {se:.2g}): keep the original model{caveat}")
    if d > ELBO_SES * se and unconverged:  # a fit still climbing: the safe choice stays the model as written
        return (f"no recommendation yet: the reparameterized fit is ahead (ELBO higher by {d:.3g} +- {se:.2g}), "
                f"but {which}; run more --steps")
    if d > ELBO_SES * se:
        return f"recommendation: the reparameterized model (ELBO higher by {d:.3g} +- {se:.2g}){caveat}"
    return (f"no clear difference (ELBO difference {d:.3g} +- {se:.2g}): keep the original model, the "
            f"simpler one{caveat}")


def hybrid_verdict(fits: list[FitSummary], unconverged: set[str]) -> str | None:
    """One line on the hybrid fit against the better AutoNormal fit, when its ELBO is exact.

    Both are ELBOs of the same model (the hybrid's q(z | theta) is the exact conditional), so the
    higher one is the closer fit in KL; within two standard errors there is no clear difference.
    """
    by_label = {f.label: f for f in fits}
    hybrid = by_label.get("hybrid")
    others = [f for f in fits if f.label != "hybrid" and np.isfinite(f.elbo)]
    if hybrid is None or not np.isfinite(hybrid.elbo) or not others:
        return None
    best = max(others, key=lambda f: f.elbo)
    d, se = hybrid.elbo - best.elbo, math.hypot(hybrid.elbo_se, best.elbo_se)
    against = f"than the {best.label} fit with AutoNormal"
    if "hybrid" in unconverged:
        return "hybrid: not converged (its ELBO was still rising or not finite); run more --steps"
    if d > ELBO_SES * se:
        return (f"hybrid: the best fit, ELBO higher by {d:.3g} +- {se:.2g} {against}: "
                "fit it with autoreparam.fit_hybrid(model, *args)")
    if d < -ELBO_SES * se:
        return f"hybrid: ELBO lower by {-d:.3g} +- {se:.2g} {against}"
    return f"hybrid: no clear difference in ELBO ({d:.3g} +- {se:.2g}) {against}"


@dataclass
class Comparison:
    """The fits side by side. ``plan_empty``: the plan changes nothing, so the model was fitted once."""

    guide: str
    steps: int
    fits: list[FitSummary]
    prior_sd: dict[str, float] = field(default_factory=dict)
    plan_empty: bool = False

    def checks(self) -> list[str]:
        return fit_checks(self.fits, self.prior_sd)

    def unconverged(self) -> set[str]:
        """Labels of the fits whose ELBO was still rising, whose loss was not finite or whose sd of
        some site is wider than 3 prior sds."""
        out = set()
        for fit in self.fits:
            trend = elbo_trend(fit.losses)
            if (trend is not None and trend.rising) or not np.all(np.isfinite(np.asarray(fit.losses, float))):
                out.add(fit.label)
            if any(sd > PRIOR_SD_FACTOR * self.prior_sd[n] for n, (_, sd) in fit.sites.items()
                   if np.isfinite(self.prior_sd.get(n, np.nan)) and self.prior_sd[n] > 0):
                out.add(fit.label)
        return out

    def table(self) -> str:
        if self.guide == "hybrid":
            lines = [f"SVI, {self.steps} steps, same seed: AutoNormal with Adam on the original and the "
                     f"reparameterized model; AutoHybrid with natural gradient ({HYBRID_PARTICLES} theta draws "
                     "per step):", ""]
        elif self.plan_empty:
            lines = [f"SVI with {self.guide}, Adam, {self.steps} steps:", ""]
        else:
            lines = [f"SVI with {self.guide}, Adam, {self.steps} steps, same seed for both:", ""]
        if self.plan_empty:
            lines[-1:] = ["the plan is empty: the reparameterized model is the original model, so it was "
                          "fitted once", ""]
        unconverged = self.unconverged()
        lines.append(f"{'':<16}{'ELBO':>22}{'time (s)':>11}  ELBO trend")
        for fit in self.fits:
            elbo = f"{fit.elbo:>12.2f} +- {fit.elbo_se:<7.2f}" if np.isfinite(fit.elbo) else f"{'n/a':>12}{'':11}"
            trend = elbo_trend(fit.losses)
            state = "too short" if trend is None else "RISING" if fit.label in unconverged else "flat"
            if fit.label == "hybrid" and not np.isfinite(fit.elbo):
                state = "-"  # its losses are the joint surrogate, not an ELBO
            lines.append(f"{fit.label:<16}{elbo}{fit.seconds:>11.1f}  {state}")
        hybrid = [f for f in self.fits if f.label == "hybrid"]
        if hybrid and not np.isfinite(hybrid[0].elbo):
            lines.append("(hybrid: the block is too large for log det H, so its ELBO is not estimated)")
        lines += ["", "posterior per site (mean and sd averaged over the site's elements):"]
        lines += self._site_rows()
        checks = self.checks()
        if checks:
            lines += ["", "warnings:"] + [f"  {c}" for c in checks]
        verdicts = [verdict(self.fits, unconverged, any("the means disagree" in c for c in checks)),
                    hybrid_verdict(self.fits, unconverged)]
        verdicts = [v for v in verdicts if v]
        if verdicts:
            lines += [""] + verdicts
        return "\n".join(lines)

    def _site_rows(self) -> list[str]:
        names = list(self.fits[0].sites)
        w = max([12] + [len(name) + 2 for name in names])
        columns = [f"mean {SHORT.get(f.label, f.label)}" for f in self.fits] + \
                  [f"sd {SHORT.get(f.label, f.label)}" for f in self.fits]
        ratio = [f.label for f in self.fits][:2] == ["original", "reparameterized"] and len(self.fits) == 2
        if ratio:
            columns.append("sd ratio")
        widths = [max(len(c) + 2, 10) for c in columns]
        rows = [f"{'site':<{w}}" + "".join(f"{c:>{cw}}" for c, cw in zip(columns, widths))]
        for name in names:
            values = [fit.sites.get(name, (np.nan, np.nan)) for fit in self.fits]
            numbers = [m for m, _ in values] + [s for _, s in values]
            if ratio:
                s0, s1 = values[0][1], values[1][1]
                numbers.append(s1 / s0 if s0 > 0 else float("nan"))
            fmt = [".3f"] * (len(numbers) - ratio) + [".2f"] * ratio
            rows.append(f"{name:<{w}}" + "".join(f"{x:>{cw}{f}}" for x, cw, f in zip(numbers, widths, fmt)))
        return rows

    def plot(self, path: str | Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = Path(path)
        if path.suffix.lower() not in (".png", ".svg"):
            raise InputError(f"--plot {path}: expected a file ending in .png or .svg")
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for fit in self.fits:
            if fit.label == "hybrid" and not np.isfinite(fit.elbo):
                continue  # its losses are the joint surrogate, not an ELBO
            elbo = -np.asarray(fit.losses, dtype=float)
            w = max(1, len(elbo) // 50)
            smooth = np.convolve(elbo, np.ones(w) / w, mode="valid")
            ax1.plot(np.arange(len(smooth)) + w, smooth, label=fit.label)
        ax1.set_xlabel("step")
        ax1.set_ylabel("ELBO (moving average)")
        shown = [f for f in self.fits if f.label != "hybrid" or np.isfinite(f.elbo)]
        lo = min(np.percentile(-np.asarray(f.losses), 5) for f in shown)
        hi = max(np.max(-np.asarray(f.losses)) for f in shown)
        ax1.set_ylim(lo, hi + 0.05 * abs(hi - lo))
        ax1.legend()
        names = list(self.fits[0].sites)
        x = np.arange(len(names))
        width = 0.8 / len(self.fits)
        for k, fit in enumerate(self.fits):
            ax2.bar(x + (k - (len(self.fits) - 1) / 2) * width, [fit.sites[n][1] for n in names], width=width,
                    label=fit.label)
        ax2.set_xticks(x, names, rotation=45, ha="right")
        ax2.set_yscale("log")
        ax2.set_ylabel("posterior sd (mean over elements)")
        ax2.legend()
        fig.suptitle(f"{'AutoNormal and hybrid' if self.guide == 'hybrid' else self.guide}, {self.steps} steps")
        fig.tight_layout()
        try:
            write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format=path.suffix[1:].lower()))
        finally:
            plt.close(fig)
        return path


def _fit(label, model, guide_name, args, kwargs, steps, lr, seed, progress, sites) -> FitSummary:
    guide = getattr(autoguide, guide_name)(model)
    svi = SVI(model, guide, numpyro.optim.Adam(lr), Trace_ELBO())
    start = time.perf_counter()
    result = svi.run(jax.random.PRNGKey(seed), steps, *args, progress_bar=progress, **kwargs)
    jax.block_until_ready(result.params)
    seconds = time.perf_counter() - start
    batches, per_batch = 20, 50
    estimator = Trace_ELBO(num_particles=per_batch)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), batches)
    elbos = np.array([-float(estimator.loss(k, result.params, model, guide, *args, **kwargs)) for k in keys])
    draws = Predictive(model, guide=guide, params=result.params, num_samples=1000, return_sites=sites)(
        jax.random.PRNGKey(seed + 2), *args, **kwargs)
    summary = {n: (float(np.mean(draws[n])), float(np.mean(np.std(draws[n], axis=0)))) for n in sites if n in draws}
    return FitSummary(label, float(elbos.mean()), float(elbos.std(ddof=1) / np.sqrt(batches)), seconds,
                      np.asarray(result.losses), summary, _element_moments(draws, sites))


def _element_moments(draws, sites) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for n in sites:
        if n in draws:
            x = np.asarray(draws[n], np.float64)
            out[n] = (np.ravel(np.mean(x, axis=0)), np.ravel(np.std(x, axis=0)))
    return out


def _fit_hybrid(label, model, args, kwargs, steps, seed, progress, sites) -> FitSummary:
    """``fit_hybrid`` (natural gradient); its ELBO from ``HybridELBO`` where the block's marginal is exact."""
    # Here and in compare_mcmc, not at the top: the CLI imports compare for every command (see cli).
    from .fit import fit_hybrid
    from .hybrid import HybridELBO

    fit = fit_hybrid(model, *args, steps=steps, num_particles=HYBRID_PARTICLES, seed=seed, num_samples=1000,
                     progress_bar=progress, **kwargs)
    elbo = elbo_se = float("nan")
    if fit.guide.exact_marginal:
        with jax.enable_x64(True):
            # exact_value=True: on the CG path too, through the sparse precision (not HybridELBO's default there).
            estimator = HybridELBO(num_particles=50, exact_value=True)
            loss = jax.jit(lambda k: estimator.loss(k, fit.params, model, fit.guide, *args, **kwargs))
            batches = 20
            elbos = np.array([-float(loss(k)) for k in jax.random.split(jax.random.PRNGKey(seed + 1), batches)])
        elbo, elbo_se = float(elbos.mean()), float(elbos.std(ddof=1) / np.sqrt(batches))
    summary = {n: (float(np.mean(fit.samples[n])), float(np.mean(np.std(fit.samples[n], axis=0))))
               for n in sites if n in fit.samples}
    return FitSummary(label, elbo, elbo_se, fit.seconds, fit.losses, summary, _element_moments(fit.samples, sites))


@one_blas_thread()
def compare(model, args=(), kwargs=None, *, steps: int = 2000, guide: str = "AutoNormal", lr: float = 1e-2,
            seed: int = 0, progress: bool = False, unwrap: bool = False) -> Comparison:
    """Fit ``model`` and ``reparameterize(model)`` with the same guide family, optimizer, seed and steps.

    ``guide="hybrid"``: AutoNormal on both, and ``fit_hybrid(model)`` as a third column.
    ``unwrap=True``: the model as written (with its ``handlers.reparam`` wrapper) against the plan
    for the model underneath. The table's checks and verdict are in the module docstring.

    >>> c = compare(model, (county, u), {"y": y}, steps=2000)     # doctest: +SKIP
    >>> print(c.table())                                           # doctest: +SKIP
    """
    if guide not in GUIDES:
        raise InputError(f"--guide {guide}: expected one of {', '.join(GUIDES)}")
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"--steps must be a positive integer, got {steps!r}")
    kwargs = dict(kwargs or {})
    report = analyze(model, *args, unwrap=unwrap, **kwargs)
    discrete = [n for n, s in report.sites.items() if s.type == "latent" and s.is_discrete]
    if discrete:
        raise InputError(f"compare: site '{discrete[0]}' is a discrete latent site; SVI with {guide} needs "
                         "continuous latent sites (marginalise it, e.g. with numpyro's enumeration)")
    sites = [n for n, s in report.sites.items() if s.type == "latent"]
    plan = report.plan
    unwrap = unwrap and bool(unwrap_model(model)[1])  # nothing to strip: the model as it is
    same = plan.is_empty() and not unwrap  # with unwrap, even an empty plan drops the wrapper
    fits = []
    runs = [("original", model)]
    if not same:
        runs.append(("reparameterized", reparameterize(model, plan, unwrap=unwrap)))
    if guide == "hybrid":
        runs.append(("hybrid", model))
    for label, m in runs:
        try:
            if label == "hybrid":
                fits.append(_fit_hybrid(label, m, args, kwargs, steps, seed, progress, sites))
            else:
                fits.append(_fit(label, m, "AutoNormal" if guide == "hybrid" else guide, args, kwargs, steps, lr,
                                 seed, progress, sites))
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"compare: SVI on the {label} model failed: {describe_exception(exc)}") from exc
    return Comparison(guide, steps, fits, _prior_sd(model, args, kwargs, sites, seed), same)


def _prior_sd(model, args, kwargs, sites, seed) -> dict[str, float]:
    """Each latent site's prior sd (averaged over its elements); {} if the prior cannot be sampled."""
    try:
        draws = Predictive(model, num_samples=1000, return_sites=sites)(jax.random.PRNGKey(seed + 3), *args,
                                                                          **kwargs)
        return {n: float(np.mean(np.std(np.asarray(draws[n], np.float64), axis=0))) for n in sites if n in draws}
    except Exception:  # noqa: BLE001 - e.g. an improper prior: the check is skipped, nothing else depends on it
        return {}


# -- MCMC: NUTS on the original, on the offsets, and collapsed NUTS (``compare --mcmc``) -----------


@dataclass
class MCMCSummary:
    """One MCMC run, diagnosed over every element of every latent site of the original model."""

    label: str
    seconds: float
    gradients: int
    divergences: int
    min_ess: float
    min_ess_site: str
    max_rhat: float
    max_rhat_site: str

    def problems(self) -> list[str]:
        """Why the run's figures cannot be trusted: divergences, a split R-hat above 1.01 or not known."""
        out = []
        if self.divergences:
            out.append(f"{self.divergences} divergent transition{'s' if self.divergences != 1 else ''} after warm-up")
        if not np.isfinite(self.max_rhat):
            out.append("R-hat unknown (too few draws)")
        elif self.max_rhat > RHAT_LIMIT:
            out.append(f"R-hat {self.max_rhat:.3f} on {self.max_rhat_site}")
        return out


@dataclass
class MCMCComparison:
    chains: int
    warmup: int
    samples: int
    runs: list[MCMCSummary]
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        lines = [f"NUTS, {self.chains} chain(s) x {self.samples} draws after {self.warmup} warm-up, same seed; "
                 "time is wall time incl. warm-up and compilation; gradients after warm-up:", "",
                 f"{'':<16}{'min ESS':>9}  {'(site)':<18}{'ESS/s':>9}{'ESS/1k grads':>14}{'divergences':>13}"
                 f"{'max R-hat':>11}  {'(site)':<18}reliable"]
        warnings = []
        for r in self.runs:
            per_s = r.min_ess / r.seconds if r.seconds > 0 else float("nan")
            per_grad = 1000 * r.min_ess / r.gradients if r.gradients else float("nan")
            problems = r.problems()
            lines.append(f"{r.label:<16}{r.min_ess:>9.0f}  {r.min_ess_site:<18}{per_s:>9.2f}{per_grad:>14.2f}"
                         f"{r.divergences:>13}{r.max_rhat:>11.3f}  {r.max_rhat_site:<18}"
                         f"{'no' if problems else 'yes'}")
            if problems:
                warnings.append(f"  {r.label}: {' and '.join(problems)}: its ESS figures are not to be trusted")
        if warnings:
            lines += ["", f"warnings (reliable: no divergence after warm-up and every split R-hat below "
                          f"{RHAT_LIMIT}):"] + warnings
        return "\n".join(lines + [""] * bool(self.notes) + self.notes)


def _diagnose(label, samples_by_chain, sites, seconds, gradients, divergences) -> MCMCSummary:
    ess, rhat = {}, {}
    for name in sites:
        x = np.asarray(samples_by_chain[name], np.float64)
        ess[name] = float(np.nanmin(effective_sample_size(x))) if x.shape[1] > 3 else float("nan")
        # Split R-hat: each chain's halves compared, so it also applies to a single chain.
        rhat[name] = float(np.nanmax(split_gelman_rubin(x))) if x.shape[1] > 3 else float("nan")
    ess_site = min(sites, key=lambda n: ess[n] if np.isfinite(ess[n]) else np.inf)
    rhat_site = max(sites, key=lambda n: rhat[n] if np.isfinite(rhat[n]) else -np.inf)
    return MCMCSummary(label, seconds, int(gradients), int(divergences), ess[ess_site], ess_site,
                       rhat[rhat_site], rhat_site)


def _nuts(label, model, args, kwargs, sites, warmup, samples, chains, seed, progress) -> MCMCSummary:
    mcmc = MCMC(NUTS(model), num_warmup=warmup, num_samples=samples, num_chains=chains,
                chain_method="sequential", progress_bar=progress)
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), *args, extra_fields=("num_steps", "diverging"), **kwargs)
    draws = mcmc.get_samples(group_by_chain=True)
    jax.block_until_ready(draws)
    seconds = time.perf_counter() - start
    extra = mcmc.get_extra_fields()
    return _diagnose(label, draws, sites, seconds, np.sum(extra["num_steps"]), np.sum(extra["diverging"]))


@one_blas_thread()
def compare_mcmc(model, args=(), kwargs=None, *, warmup: int = 500, samples: int = 500, chains: int = 2,
                 seed: int = 0, progress: bool = False, unwrap: bool = False) -> MCMCComparison:
    """NUTS on ``model``, on ``reparameterize(model)`` and with the Gaussian block integrated out.

    >>> print(compare_mcmc(model, (sigma,), {"y": y}).table())     # doctest: +SKIP
    """
    from .collapsed import AUTO_COLLAPSED_LIMIT, choose_mcmc, collapsed_mcmc

    for name, value in (("--warmup", warmup), ("--samples", samples), ("--chains", chains)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    kwargs = dict(kwargs or {})
    report = analyze(model, *args, unwrap=unwrap, **kwargs)
    sites = [n for n, s in report.sites.items() if s.type == "latent"]
    discrete = [n for n in sites if report.sites[n].is_discrete]
    if discrete:
        raise InputError(f"compare --mcmc: site '{discrete[0]}' is a discrete latent site; NUTS needs continuous "
                         "latent sites")
    runs, notes = [], []
    plan = report.plan
    unwrap = unwrap and bool(unwrap_model(model)[1])
    runs.append(_nuts("original", model, args, kwargs, sites, warmup, samples, chains, seed, progress))
    if plan.is_empty() and not unwrap:
        notes.append("offsets: not run, the plan is empty (the reparameterized model is the original model)")
    else:
        runs.append(_nuts("offsets", reparameterize(model, plan, unwrap=unwrap), args, kwargs, sites, warmup, samples, chains,
                          seed, progress))
    block = report.block
    choice = choose_mcmc(model, *args, block=block, **kwargs) if block is not None else None
    if block is None:
        notes.append("collapsed: not run, the model has no conditionally Gaussian block")
    elif block.size > AUTO_COLLAPSED_LIMIT:
        notes.append(f"collapsed: not run, the block has size {block.size}, above {AUTO_COLLAPSED_LIMIT} for a dense "
                     "H at every gradient")
    else:
        start = time.perf_counter()
        underneath = unwrap_model(model)[0] if unwrap else model  # the block is the unwrapped model's
        result = collapsed_mcmc(underneath, *args, block=block, num_warmup=warmup, num_samples=samples,
                                num_chains=chains, rng_key=seed, progress_bar=progress,
                                approximate=not block.exact, **kwargs)
        label = "collapsed" if block.exact else "collapsed*"
        runs.append(_diagnose(label, result.get_samples(group_by_chain=True), sites,
                              time.perf_counter() - start, result.num_gradients, result.divergences))
        notes.append(f"collapsed: NUTS on {', '.join(block.theta)} with {', '.join(block.names)} "
                     f"(size {block.size}) integrated out, then drawn exactly")
        if not block.exact:
            notes.append("* Laplace marginal (non-Normal likelihood): the collapsed posterior is approximate")
    default = ("offsets: the model has no conditionally Gaussian block" if choice is None else
               f"{'collapsed' if choice.method == 'collapsed' else 'offsets'}: {choice.reason}")
    notes.append(f"default (autoreparam.auto_mcmc): {default}")
    return MCMCComparison(chains, warmup, samples, runs, notes)
