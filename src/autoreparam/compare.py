"""SVI on the original and the reparameterized model, side by side (``autoreparam compare``)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from .api import analyze, reparameterize
from .errors import InputError
from .files import write_atomic
from .trace import describe_exception

__all__ = ["GUIDES", "compare", "Comparison", "FitSummary", "compare_mcmc", "MCMCComparison", "MCMCSummary"]

GUIDES = ("AutoNormal", "AutoDiagonalNormal", "AutoLowRankMultivariateNormal", "hybrid")
HYBRID_PARTICLES = 4


@dataclass
class FitSummary:
    """One SVI run: final ELBO (mean and standard error over batches of particles), time, sites."""

    label: str
    elbo: float
    elbo_se: float
    seconds: float
    losses: np.ndarray = field(repr=False)
    sites: dict[str, tuple[float, float]] = field(default_factory=dict)  # site -> (mean, sd), averaged


@dataclass
class Comparison:
    guide: str
    steps: int
    fits: list[FitSummary]

    def table(self) -> str:
        if len(self.fits) == 3:
            return self._table3()
        orig, rep = self.fits
        w = max([12] + [len(name) + 2 for name in orig.sites])
        lines = [f"SVI with {self.guide}, Adam, {self.steps} steps, same seed for both:", "",
                 f"{'':<16}{'ELBO':>22}{'time (s)':>11}",
                 f"{orig.label:<16}{orig.elbo:>12.2f} +- {orig.elbo_se:<7.2f}{orig.seconds:>11.1f}",
                 f"{rep.label:<16}{rep.elbo:>12.2f} +- {rep.elbo_se:<7.2f}{rep.seconds:>11.1f}", "",
                 "posterior per site (mean and sd averaged over the site's elements):",
                 f"{'site':<{w}}{'mean orig':>12}{'mean reparam':>14}{'sd orig':>11}{'sd reparam':>12}{'sd ratio':>10}"]
        for name, (m0, s0) in orig.sites.items():
            m1, s1 = rep.sites[name]
            ratio = s1 / s0 if s0 > 0 else float("nan")
            lines.append(f"{name:<{w}}{m0:>12.3f}{m1:>14.3f}{s0:>11.3f}{s1:>12.3f}{ratio:>10.2f}")
        return "\n".join(lines)

    def _table3(self) -> str:
        """AutoNormal on the original and the reparameterized model, and the hybrid, side by side."""
        w = max([12] + [len(name) + 2 for name in self.fits[0].sites])
        lines = [f"SVI, {self.steps} steps, same seed: AutoNormal with Adam on the original and the reparameterized "
                 f"model; AutoHybrid with natural gradient ({HYBRID_PARTICLES} theta draws per step):", "",
                 f"{'':<16}{'ELBO':>22}{'time (s)':>11}"]
        for fit in self.fits:
            elbo = f"{fit.elbo:>12.2f} +- {fit.elbo_se:<7.2f}" if np.isfinite(fit.elbo) else f"{'n/a':>12}{'':11}"
            lines.append(f"{fit.label:<16}{elbo}{fit.seconds:>11.1f}")
        if not np.isfinite(self.fits[2].elbo):
            lines.append("(hybrid: the block is too large for log det H, so its ELBO is not estimated)")
        lines += ["", "posterior per site (mean and sd averaged over the site's elements):",
                  f"{'site':<{w}}{'mean orig':>11}{'mean reparam':>14}{'mean hybrid':>13}"
                  f"{'sd orig':>10}{'sd reparam':>12}{'sd hybrid':>11}"]
        for name in self.fits[0].sites:
            (m0, s0), (m1, s1), (m2, s2) = (fit.sites.get(name, (np.nan, np.nan)) for fit in self.fits)
            lines.append(f"{name:<{w}}{m0:>11.3f}{m1:>14.3f}{m2:>13.3f}{s0:>10.3f}{s1:>12.3f}{s2:>11.3f}")
        return "\n".join(lines)

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
    import numpyro
    from numpyro.infer import SVI, Predictive, Trace_ELBO
    from numpyro.infer import autoguide

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
                      np.asarray(result.losses), summary)


def _fit_hybrid(label, model, args, kwargs, steps, seed, progress, sites) -> FitSummary:
    """``fit_hybrid`` (natural gradient); its ELBO from ``HybridELBO`` where the block's marginal is exact."""
    from .fit import fit_hybrid
    from .hybrid import HybridELBO

    fit = fit_hybrid(model, *args, steps=steps, num_particles=HYBRID_PARTICLES, seed=seed, num_samples=1000,
                     progress_bar=progress, **kwargs)
    elbo = elbo_se = float("nan")
    if fit.guide.exact_marginal:
        with jax.enable_x64(True):
            estimator = HybridELBO(num_particles=50)
            loss = jax.jit(lambda k: estimator.loss(k, fit.params, model, fit.guide, *args, **kwargs))
            batches = 20
            elbos = np.array([-float(loss(k)) for k in jax.random.split(jax.random.PRNGKey(seed + 1), batches)])
        elbo, elbo_se = float(elbos.mean()), float(elbos.std(ddof=1) / np.sqrt(batches))
    summary = {n: (float(np.mean(fit.samples[n])), float(np.mean(np.std(fit.samples[n], axis=0))))
               for n in sites if n in fit.samples}
    return FitSummary(label, elbo, elbo_se, fit.seconds, fit.losses, summary)


def compare(model, args=(), kwargs=None, *, steps: int = 2000, guide: str = "AutoNormal", lr: float = 1e-2,
            seed: int = 0, progress: bool = False) -> Comparison:
    """Fit ``model`` and ``reparameterize(model)`` with the same guide family, optimizer, seed and steps.

    ``guide="hybrid"``: AutoNormal on both, and ``fit_hybrid(model)`` as a third column.

    >>> c = compare(model, (county, u), {"y": y}, steps=2000)     # doctest: +SKIP
    >>> print(c.table())                                           # doctest: +SKIP
    """
    if guide not in GUIDES:
        raise InputError(f"--guide {guide}: expected one of {', '.join(GUIDES)}")
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"--steps must be a positive integer, got {steps!r}")
    kwargs = dict(kwargs or {})
    report = analyze(model, *args, **kwargs)
    discrete = [n for n, s in report.sites.items() if s.type == "latent" and s.is_discrete]
    if discrete:
        raise InputError(f"compare: site '{discrete[0]}' is a discrete latent site; SVI with {guide} needs "
                         "continuous latent sites (marginalise it, e.g. with numpyro's enumeration)")
    sites = [n for n, s in report.sites.items() if s.type == "latent"]
    fits = []
    runs = [("original", model), ("reparameterized", reparameterize(model))]
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
    return Comparison(guide, steps, fits)


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
                 f"{'max R-hat':>11}  (site)"]
        for r in self.runs:
            per_s = r.min_ess / r.seconds if r.seconds > 0 else float("nan")
            per_grad = 1000 * r.min_ess / r.gradients if r.gradients else float("nan")
            lines.append(f"{r.label:<16}{r.min_ess:>9.0f}  {r.min_ess_site:<18}{per_s:>9.2f}{per_grad:>14.2f}"
                         f"{r.divergences:>13}{r.max_rhat:>11.3f}  {r.max_rhat_site}")
        return "\n".join(lines + [""] * bool(self.notes) + self.notes)


def _diagnose(label, samples_by_chain, sites, seconds, gradients, divergences) -> MCMCSummary:
    from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

    ess, rhat = {}, {}
    for name in sites:
        x = np.asarray(samples_by_chain[name], np.float64)
        ess[name] = float(np.nanmin(effective_sample_size(x))) if x.shape[1] > 3 else float("nan")
        rhat[name] = float(np.nanmax(split_gelman_rubin(x))) if x.shape[0] > 1 and x.shape[1] > 3 else float("nan")
    ess_site = min(sites, key=lambda n: ess[n] if np.isfinite(ess[n]) else np.inf)
    rhat_site = max(sites, key=lambda n: rhat[n] if np.isfinite(rhat[n]) else -np.inf)
    return MCMCSummary(label, seconds, int(gradients), int(divergences), ess[ess_site], ess_site,
                       rhat[rhat_site], rhat_site)


def _nuts(label, model, args, kwargs, sites, warmup, samples, chains, seed, progress) -> MCMCSummary:
    from numpyro.infer import MCMC, NUTS

    mcmc = MCMC(NUTS(model), num_warmup=warmup, num_samples=samples, num_chains=chains,
                chain_method="sequential", progress_bar=progress)
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), *args, extra_fields=("num_steps", "diverging"), **kwargs)
    draws = mcmc.get_samples(group_by_chain=True)
    jax.block_until_ready(draws)
    seconds = time.perf_counter() - start
    extra = mcmc.get_extra_fields()
    return _diagnose(label, draws, sites, seconds, np.sum(extra["num_steps"]), np.sum(extra["diverging"]))


def compare_mcmc(model, args=(), kwargs=None, *, warmup: int = 500, samples: int = 500, chains: int = 2,
                 seed: int = 0, progress: bool = False) -> MCMCComparison:
    """NUTS on ``model``, on ``reparameterize(model)`` and with the Gaussian block integrated out.

    >>> print(compare_mcmc(model, (sigma,), {"y": y}).table())     # doctest: +SKIP
    """
    from .collapsed import AUTO_COLLAPSED_LIMIT, choose_mcmc, collapsed_mcmc

    for name, value in (("--warmup", warmup), ("--samples", samples), ("--chains", chains)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{name} must be a positive integer, got {value!r}")
    kwargs = dict(kwargs or {})
    report = analyze(model, *args, **kwargs)
    sites = [n for n, s in report.sites.items() if s.type == "latent"]
    discrete = [n for n in sites if report.sites[n].is_discrete]
    if discrete:
        raise InputError(f"compare --mcmc: site '{discrete[0]}' is a discrete latent site; NUTS needs continuous "
                         "latent sites")
    runs, notes = [], []
    for label, m in (("original", model), ("offsets", reparameterize(model))):
        runs.append(_nuts(label, m, args, kwargs, sites, warmup, samples, chains, seed, progress))
    block = report.block
    choice = choose_mcmc(model, *args, block=block, **kwargs) if block is not None else None
    if block is None:
        notes.append("collapsed: not run, the model has no conditionally Gaussian block")
    elif block.size > AUTO_COLLAPSED_LIMIT:
        notes.append(f"collapsed: not run, the block has size {block.size}, above {AUTO_COLLAPSED_LIMIT} for a dense "
                     "H at every gradient")
    else:
        start = time.perf_counter()
        result = collapsed_mcmc(model, *args, block=block, num_warmup=warmup, num_samples=samples,
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
