"""tensor_large with the MCMC method the package chooses (``autoreparam.auto_mcmc``), 2 chains.

    python -m benchmarks.mcmc_tensor_large --warmup 1000 --samples 4000 [--method collapsed]

``--method collapsed`` runs ``autoreparam.collapsed_mcmc`` whatever the package would choose.

Prints ``choose_mcmc``'s choice, the wall time (compile included), divergences and, per latent site
of the original model, the largest split R-hat and smallest ESS over its elements, worst first.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin

import autoreparam
from autoreparam.collapsed import choose_mcmc

from .harness import latent_sites
from .models import MODELS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--warmup", type=int, default=1000)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--method", choices=("auto", "collapsed"), default="auto")
    a = p.parse_args(argv)
    spec = MODELS["tensor_large"]
    args, kwargs = spec.inputs("full")
    model = spec.module.model
    print(choose_mcmc(model, *args, **kwargs), flush=True)
    t = time.perf_counter()
    run = autoreparam.auto_mcmc if a.method == "auto" else autoreparam.collapsed_mcmc
    res = run(model, *args, num_warmup=a.warmup, num_samples=a.samples, num_chains=2,
              progress_bar=False, rng_key=0, **kwargs)
    print(f"method {res.method}, {time.perf_counter() - t:.1f} s, divergences {res.divergences}, "
          f"gradients {res.num_gradients}", flush=True)
    draws = res.get_samples(group_by_chain=True)
    rows = []
    for site in latent_sites(model, args, kwargs):
        x = np.asarray(draws[site], np.float64)
        rows.append((float(np.max(split_gelman_rubin(x))), site, float(np.min(effective_sample_size(x)))))
    for rhat, site, ess in sorted(rows, reverse=True):
        print(f"{site}: max R-hat {rhat:.4f}, min ESS {ess:.0f}")


if __name__ == "__main__":
    main()
