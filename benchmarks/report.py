"""Markdown tables and plots from the harness results (``benchmarks/results/harness*.json``)."""

from __future__ import annotations

import numpy as np

from .harness import METHODS, NAT, NUTS_METHODS, VI_METHODS

SHORT = {"AutoNormal": "AutoNormal", "AutoLowRankMVN": "AutoLowRankMVN", "AutoMVN": "AutoMVN",
         "VIP AutoNormal": "VIP + AutoNormal", "autoreparam zero": "autoreparam zero + AutoNormal",
         "autoreparam analytic": "autoreparam analytic + AutoNormal", "NUTS": "NUTS",
         "NUTS autoreparam": "NUTS on autoreparam", "hybrid": "hybrid (AutoHybrid + natural gradient)",
         "NUTS collapsed": "collapsed NUTS (block integrated out)", "Gibbs": "Gibbs (NUTS on theta, exact z)"}
COLORS = {"AutoNormal": "#1f77b4", "AutoLowRankMVN": "#17becf", "AutoMVN": "#9467bd",
          "VIP AutoNormal": "#ff7f0e", "autoreparam zero": "#8c564b", "autoreparam analytic": "#d62728",
          "NUTS": "#7f7f7f", "NUTS autoreparam": "#2ca02c", "hybrid": "#e377c2", "NUTS collapsed": "#bcbd22",
          "Gibbs": "#000000"}


def md_table(head, rows) -> str:
    out = ["| " + " | ".join(map(str, head)) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)


def f(x, fmt="{:.2f}", none="-"):
    return none if x is None else fmt.format(x)


def rate(x):
    return "-" if x is None else (f"{x:,.0f}" if x >= 100 else f"{x:.3g}")


def ess_per_kgrad(r: dict):
    """min-ESS per 1,000 gradient evaluations (leapfrog steps) of the sampling phase: no compile time in it."""
    grads = r["mean_tree_size"] * r["chains"] * r["samples"]
    return None if r.get("min_ess") is None or not grads else 1000.0 * r["min_ess"] / grads


def worst(value, site):
    return "-" if value is None else f"{value:.2f} ({site})"


def fmt_seconds(x):
    if x is None:
        return "-"
    return f"{x:.2f}" if x < 10 else f"{x:.0f}"


def model_table(m: dict) -> str:
    head = ["method", "ELBO (+- se) [seeds min, max]", "below best", f"steps to {NAT:g} nat", f"s to {NAT:g} nat",
            "s / 1k steps", "mean err: worst site", "median", "sd ratio: worst site", "median",
            "min-ESS/s", "min-ESS / 1k grads", "div.", "max R-hat"]
    rows = []
    for name in METHODS:
        r = m["methods"].get(name)
        if r is None and name in m.get("skipped", {}):
            rows.append([SHORT[name], f"not run: {m['skipped'][name]}"] + ["-"] * (len(head) - 2))
            continue
        if r is None:
            err = next((v["error"] for k, v in m.get("errors", {}).items() if k.startswith(name)), None)
            if err is not None:
                rows.append([SHORT[name], f"failed: {err[:80]}"] + ["-"] * (len(head) - 2))
            continue
        if r["kind"] == "vi":
            s = r["summary"]
            reach = (f"{s['reach_step']:,.0f}" if s["reach_step"] is not None else "not reached")
            if s["seeds"] > 1 and s["reach_step"] is not None and s["reached"] < s["seeds"]:
                reach += f" ({s['reached']}/{s['seeds']} seeds)"
            if s["elbo"] is None and s.get("surrogate") is not None:
                elbo = "n/a (no log det H)"
            elif s["elbo"] is None:
                elbo = f"diverged ({s['diverged']}/{s['seeds']} seeds)"
            else:
                elbo = f"{s['elbo']:.1f} +- {s['elbo_se']:.1f}"
                if s["seeds"] > 1 and s["elbo_min"] is not None:
                    elbo += f" [{s['elbo_min']:.1f}, {s['elbo_max']:.1f}]"
                if s["diverged"]:
                    elbo += f" ({s['diverged']}/{s['seeds']} seeds diverged)"
            rows.append([
                SHORT[name], elbo, f(s["gap_to_best"], "{:.1f}"), reach, fmt_seconds(s["reach_seconds"]),
                f(s["seconds_per_1000_steps"]),
                worst(s["mean_err_worst"], s["mean_err_worst_site"]), f(s["mean_err_median"]),
                worst(s["sd_ratio_worst"], s["sd_ratio_worst_site"]), f(s["sd_ratio_median"]),
                "-", "-", "-", "-"])
        else:
            c = r["compare"]["summary"]
            rows.append([
                SHORT[name], "-", "-", "-", "-", "-",
                worst(c["mean_err_worst"], c["mean_err_worst_site"]), f(c["mean_err_median"]),
                worst(c["sd_ratio_worst"], c["sd_ratio_worst_site"]), f(c["sd_ratio_median"]),
                rate(r.get("min_ess_per_s")) + f" ({r['min_ess_site']})", rate(ess_per_kgrad(r)),
                r["divergences"], f(r.get("max_rhat"), "{:.3f}")])
    return md_table(head, rows)


def hybrid_line(m: dict) -> str:
    """The hybrid against the issue's targets: steps and seconds to reach them, per-step cost, CG iterations."""
    r = m["methods"].get("hybrid")
    if r is None:
        return ""
    s = r["summary"]
    t = s["target"]
    lo, hi = t["sd_ratio"]
    plain = m["methods"].get("AutoNormal", {}).get("summary")
    cost = "" if not plain or not plain.get("seconds_per_1000_steps") else \
        f" ({s['seconds_per_1000_steps'] / plain['seconds_per_1000_steps']:.1f} x AutoNormal's, float64 against float32)"
    reached = (f"reached at step {s['target_step']:,.0f} ({fmt_seconds(s['target_seconds'])} s of SVI)"
               if s["target_step"] is not None else "NOT reached")
    solver = (("Laplace, " if s.get("laplace") else "") + f"dense Cholesky (block of {s['block_size']:,} values)"
              if s["dense"] else
              f"CG, {s['cg_iterations_per_draw']:.0f} iterations per draw (block of {s['block_size']:,} values)")
    elbo = ("hybrid ELBO with the Laplace log p(y, theta)" if s.get("laplace") else "exact hybrid ELBO") \
        if s["dense"] else "no ELBO (CG path: the loss is the joint surrogate)"
    draws = (f"the draws are fit_hybrid's: theta resampled by p(y, theta) / q(theta) (SIR, {s['resample_theta']} "
             "proposals per draw)" if s.get("resample_theta") else
             f"the draws are fit_hybrid's: theta resampled by p(y, theta) / q(theta) from one pool of "
             f"{s['theta_pool']:,} proposals (pooled SIR, sparse exact marginal; pool ESS per seed "
             f"{', '.join(f'{e:.0f}' for e in s['theta_pool_ess'])})" if s.get("theta_pool") else
             "the draws are plain draws of q(theta) p(z | theta, y)")
    if s.get("plain_sd_ratio_worst") is not None:
        draws += (f"; plain draws of q (no resampling): worst sd ratio "
                  f"{worst(s['plain_sd_ratio_worst'], s['plain_sd_ratio_worst_site'])}, worst mean err "
                  f"{worst(s['plain_mean_err_worst'], s['plain_mean_err_worst_site'])}")
    elbo += "; " + draws
    return (f"hybrid: target worst-site sd ratio in [{lo}, {hi}] and worst mean err <= {t['mean_err']} ref sds: "
            f"{reached}, met at the end in {s['target_met_at_end']}/{s['seeds']} seeds; "
            f"{f(s['seconds_per_1000_steps'])} s / 1k steps{cost}; conditional: {solver}; theta = "
            f"{', '.join(s['theta'])}; {elbo}.")


def reference_line(m: dict) -> str:
    ref = m["reference"]
    if ref["kind"].startswith("NUTS"):
        return (f"reference: {ref['kind']}, {ref['chains']} chains x {ref['samples']} draws after "
                f"{ref['warmup']} warmup (min ESS {ref['min_ess']:.0f} at {ref['min_ess_site']}, max R-hat "
                f"{ref['max_rhat']:.3f}, {ref['divergences']} divergences)")
    return f"reference: {ref['kind']}"


def headline_rows(results: dict) -> list:
    rows = []
    for name, m in results["models"].items():
        if "failed" in m:
            rows.append([name, "failed"] + ["-"] * (len(HEADLINE_HEAD) - 2))
            continue
        meth = m["methods"]
        vi = {k: v["summary"] for k, v in meth.items() if v["kind"] == "vi"}
        an = vi.get("autoreparam analytic")
        plain = vi.get("AutoNormal")
        others = {k: v for k, v in vi.items() if not k.startswith("autoreparam") and v["elbo"] is not None}
        best_other = max(others, key=lambda k: others[k]["elbo"]) if others else None
        nu, nr = meth.get("NUTS"), meth.get("NUTS autoreparam")
        ok = an is not None and an["elbo"] is not None
        ess_ratio = m["ratios"].get("nuts_min_ess_per_s_reparam_over_original")
        g0, g1 = (ess_per_kgrad(x) if x else None for x in (nu, nr))
        mixed = "" if not nu or nu.get("max_rhat") is None or nu["max_rhat"] < 1.1 else \
            f"; original R-hat {nu['max_rhat']:.2f}"
        rows.append([
            name,
            f"{SHORT[m['best_elbo_method']]}" if m.get("best_elbo_method") else "-",
            "-" if not ok or plain is None or plain["elbo"] is None else f"{an['elbo'] - plain['elbo']:+.1f}",
            "-" if not ok or best_other is None else f"{an['elbo'] - others[best_other]['elbo']:+.1f} ({SHORT[best_other]})",
            "-" if not ok or plain is None or plain["sd_ratio_worst"] is None else
            f"{plain['sd_ratio_worst']:.3f} -> {an['sd_ratio_worst']:.3f}",
            "-" if not ok else worst(an["mean_err_worst"], an["mean_err_worst_site"]),
            "-" if not (nu and nr) else f"{rate(nu.get('min_ess_per_s'))} -> {rate(nr.get('min_ess_per_s'))}"
                                        + ("" if ess_ratio is None else f" (x{ess_ratio:.3g})") + mixed,
            "-" if g0 is None or g1 is None else f"{rate(g0)} -> {rate(g1)}" + (f" (x{g1 / g0:.3g})" if g0 else ""),
            "-" if not (nu and nr) else f"{nu['divergences']} -> {nr['divergences']}",
            collapsed_cell(nu, meth.get("NUTS collapsed"), m.get("skipped", {}).get("NUTS collapsed")),
        ])
    return rows


HEADLINE_HEAD = ["model", "best VI (median ELBO)", "ELBO: analytic - AutoNormal",
                 "ELBO: analytic - best non-autoreparam VI", "worst-site sd ratio: AutoNormal -> analytic",
                 "analytic: worst-site mean err", "NUTS min-ESS/s: original -> autoreparam",
                 "NUTS min-ESS / 1k gradients", "NUTS divergences",
                 "collapsed NUTS: min-ESS/s (x original), / 1k grads, div., max R-hat"]


def collapsed_cell(original: dict | None, collapsed: dict | None, skipped: str | None) -> str:
    if collapsed is None:
        return "not run" + (" (offsets chosen)" if skipped else "")
    ratio = "" if not original or not original.get("min_ess_per_s") else \
        f" (x{collapsed['min_ess_per_s'] / original['min_ess_per_s']:.3g})"
    return (f"{rate(collapsed['min_ess_per_s'])}{ratio}, {rate(ess_per_kgrad(collapsed))}, "
            f"{collapsed['divergences']}, {f(collapsed.get('max_rhat'), '{:.3f}')}")


def markdown(results: dict) -> str:
    cfg, mach = results["config"], results["machine"]
    out = []
    say = out.append
    say(f"Command: `{results['command']}` ({results['mode']} mode), {results['created']}; total wall time "
        f"{results['total_seconds']:.0f} s, CPU time {results['cpu_seconds']:.0f} s, {results['jobs']} "
        f"process{'es' if results['jobs'] > 1 else ''}.")
    say(f"Machine: {mach.get('nproc')} CPUs (`nproc`), {mach.get('cpu', '?')}, {mach.get('ram_gib', '?')} GiB RAM; "
        f"1-minute load average {mach.get('load_at_start')} at start, {mach.get('load_at_end')} at end; "
        f"Python {mach.get('python')}, jax {mach.get('jax')}, numpyro {mach.get('numpyro')}; git {mach.get('git', '?')}.")
    say(f"VI: `numpyro.optim.Adam({results['lr']})`, `Trace_ELBO`, medians over {cfg['seeds']} seed(s); final "
        f"ELBO from {cfg['final_particles']} particles (+- its standard error, median over seeds); "
        f"'below best' = nats below the model's best median ELBO; 'steps / s to {NAT:g} nat' = the first of "
        f"{cfg['checkpoints']} checkpoints (each a {cfg['ckpt_particles']}-particle ELBO) from which the ELBO stays "
        f"within {NAT:g} nat of that best to the end, median over seeds (a seed that never does counts as infinite), seconds of SVI steps only (compilation and the autoreparam analysis "
        f"are listed below each table); posterior moments from {cfg['draws']} guide draws. NUTS: "
        f"{cfg['nuts_chains']} chains x {cfg['nuts_samples']} draws after {cfg['nuts_warmup']} warmup, "
        f"chains run one after another; min-ESS/s = the smallest ESS over every element of every latent site "
        f"of the original model, divided by the sampling time, which excludes warmup and the compilation "
        f"NumPyro does inside every `run` (measured by a 2-draw run from the same state and subtracted); "
        f"min-ESS / 1k grads = the same ESS per 1,000 gradient evaluations (leapfrog steps) of the sampling "
        f"phase, which does not depend on timing at all.")
    say("mean err = |mean - reference mean| / reference sd; sd ratio = sd / reference sd; per site the median "
        "over its elements, then the worst site (largest mean error; sd ratio furthest from 1 on a log scale) "
        "and the median over sites. 1 is perfect for the sd ratio, 0 for the mean error.\n")
    for note in results.get("notes", []):
        say(f"Note: {note}\n")
    say("### Summary\n")
    say(md_table(HEADLINE_HEAD, headline_rows(results)) + "\n")
    for name, m in results["models"].items():
        say(f"### {name}: {m.get('size', '')}\n")
        if "failed" in m:
            say(f"FAILED: {m['failed']['error']} ({m['failed'].get('where')})\n")
            continue
        best = ("none (every VI method failed or diverged)" if m.get("best_elbo") is None else
                f"{m['best_elbo']:.1f} ({SHORT[m['best_elbo_method']]})")
        steps = "no" if m.get("steps") is None else f"{m['steps']:,}"
        say(f"{m['description']}; {reference_line(m)}; {steps} SVI steps per VI method; best median ELBO {best}.\n")
        say(model_table(m) + "\n")
        if "hybrid" in m["methods"]:
            say(hybrid_line(m) + "\n")
        if m.get("mcmc_choice"):
            say(f"autoreparam.choose_mcmc: {m['mcmc_choice']['method']} ({m['mcmc_choice']['reason']}).\n")
        an = m["analysis"]
        comp = ", ".join(f"{SHORT[k]} {v['compile_seconds']:.1f}" for k, v in m["methods"].items() if v["kind"] == "vi")
        say(f"autoreparam analysis {an['analyze_seconds']:.1f} s + plan {an['plan_analytic_seconds']:.1f} s "
            f"(analytic) / {an['plan_zero_seconds']:.1f} s (zero); compile s: {comp}. NUTS warmup + sampling s: "
            + ", ".join(f"{SHORT[k]} {m['methods'][k]['warmup_seconds']:.0f} + {m['methods'][k]['sampling_seconds']:.1f}"
                        + (f" (+ {m['methods'][k]['sampling_overhead_seconds']:.1f} compiling the sampling loop)"
                           if m['methods'][k].get('sampling_overhead_seconds') else "")
                        for k in NUTS_METHODS if k in m["methods"]) + ".")
        say("```\n" + an["plan_analytic"] + "\n```")
        if m.get("vip_sites"):
            say(f"VIP reparameterizes: {', '.join(m['vip_sites'])}.")
        for k, v in m.get("errors", {}).items():
            say(f"- {k} failed: {v['error'][:300]} ({v.get('where')})")
        say("")
    return "\n".join(out)


# -- plots ------------------------------------------------------------------------------------------
def plots(results: dict, directory, suffix: str = "") -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [(k, m) for k, m in results["models"].items() if "failed" not in m]
    paths = []
    if not models:
        return paths
    n = len(models)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols

    # ELBO against steps: nats below the model's best median ELBO, log scale.
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    for ax, (name, m) in zip(axes.flat, models):
        best = m["best_elbo"]
        for meth in VI_METHODS:
            r = m["methods"].get(meth)
            if r is None:
                continue
            runs = [run for run in r["runs"] if not run.get("diverged")]
            if not runs:
                continue
            steps = np.array([c[0] for c in runs[0]["checkpoints"]])
            E = np.array([[c[2] if c[2] is not None else np.nan for c in run["checkpoints"]] for run in runs])
            gap = np.clip(best - E, 0.1, None)
            med = np.nanmedian(gap, axis=0)
            ax.plot(steps, med, color=COLORS[meth], label=SHORT[meth], lw=1.6)
            if gap.shape[0] > 1:
                ax.fill_between(steps, np.nanmin(gap, 0), np.nanmax(gap, 0), color=COLORS[meth], alpha=0.15, lw=0)
        ax.axhline(NAT, color="k", ls="--", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{name} ({m['size']})", fontsize=9)
        ax.set_xlabel("Adam steps")
        ax.set_ylabel("nats below best ELBO")
        ax.grid(alpha=0.3, which="both", lw=0.4)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.suptitle("ELBO against steps (median over seeds that did not diverge, band = min..max; floor 0.1; "
                 "dashed: 1 nat)", fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    p = directory / f"elbo_vs_steps{suffix}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    # sd ratio per site and method.
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.9 * rows), squeeze=False)
    for ax, (name, m) in zip(axes.flat, models):
        sites = list(m["latent_sites"])
        present = [k for k in METHODS if k in m["methods"]
                   and not (m["methods"][k]["kind"] == "vi" and m["methods"][k]["summary"]["elbo"] is None)]
        width = 0.8 / max(len(present), 1)
        for j, meth in enumerate(present):
            r = m["methods"][meth]
            per = r["summary"]["sites"] if r["kind"] == "vi" else r["compare"]["sites"]
            x = np.arange(len(sites)) - 0.4 + (j + 0.5) * width
            y = np.array([per[s]["sd_ratio"] for s in sites])
            lo = np.array([per[s]["sd_ratio_min"] for s in sites])
            hi = np.array([per[s]["sd_ratio_max"] for s in sites])
            ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o" if r["kind"] == "vi" else "s", ms=3.5,
                        color=COLORS[meth], label=SHORT[meth], lw=0.8, capsize=0,
                        mfc="none" if r["kind"] == "nuts" else COLORS[meth])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks(np.arange(len(sites)))
        ax.set_xticklabels(sites, rotation=45, ha="right", fontsize=7)
        ax.set_title(f"{name} ({m['size']})", fontsize=9)
        ax.set_ylabel("sd / reference sd")
        ax.grid(alpha=0.3, axis="y", which="both", lw=0.4)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(8, len(labels)), fontsize=8, frameon=False)
    fig.suptitle("posterior sd / reference sd per site (marker: median over the site's elements, bar: min..max)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    p = directory / f"sd_ratio_per_site{suffix}.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths
