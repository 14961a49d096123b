"""Why the hybrid misses its mean target on crossed_logistic: the Laplace conditional's bias in the
Fisher-identity gradient of sigma_a, measured at the reference posterior mean of theta.

    python -m benchmarks.bench_laplace_bias

Draws z from the Laplace Gaussian N(m, H^-1) at theta = (sigma_a, sigma_b) = (1.062, 0.644) (the NUTS
reference means) and compares E[sum a^2] under those plain draws with its self-normalised
importance-weighted estimate (weights p(y, z, theta) / N(z; m, H^-1), ``sample_weighted``), which
targets the exact conditional p(z | theta, y). The sigma_a gradient of log N(a; 0, sigma_a) is
-n / sigma_a + sum a^2 / sigma_a^3: a smaller E[sum a^2] pushes the fitted sigma_a down.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np

from autoreparam.block import block_of_model
from autoreparam.conditional import BlockConditional
from autoreparam.fit import inputs_for_float64

from .models import example

THETA = {"sigma_a": 1.062, "sigma_b": 0.644}
BATCHES, PER_BATCH = 10, 100


def main() -> int:
    m = example("crossed_logistic")
    args, kwargs = m.model_args()
    with jax.enable_x64(True):
        args, kwargs = inputs_for_float64((tuple(args), dict(kwargs)))
        block, _ = block_of_model(m.model, args, kwargs)
        cond = BlockConditional(m.model, block, args, kwargs, method="cg")
        theta = {k: jnp.float64(v) for k, v in THETA.items()}
        draw = jax.jit(lambda k: cond.sample_weighted(k, theta, PER_BATCH))
        sums, log_w = [], []
        for i in range(BATCHES):  # each batch's weights are self-normalised; batches count equally
            z, lw = draw(jax.random.PRNGKey(i))
            sums.append(np.sum(np.asarray(z["a"]) ** 2, axis=1))
            log_w.append(np.asarray(lw))
    sums, w = np.concatenate(sums), np.exp(np.concatenate(log_w))
    w = w / w.sum()
    n, s = int(args[2]), THETA["sigma_a"]  # number of rows (elements of a)
    grad = lambda s2: -n / s + s2 / s ** 3
    out = {"theta": THETA, "draws": int(sums.size), "sum_a2_plain": float(sums.mean()),
           "sum_a2_plain_se": float(sums.std() / np.sqrt(sums.size)), "sum_a2_weighted": float(w @ sums),
           "ess": float(1 / np.sum(w ** 2)), "grad_sigma_a_plain": float(grad(sums.mean())),
           "grad_sigma_a_weighted": float(grad(w @ sums))}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
