"""The seed's order-three tensor model: y_ijt ~ Normal(mu + a_i + b_j + z_t + A_it + B_jt + C_ij, sigma).

Shrinkage priors on a, b and C, random-walk ("Kalman-style") priors on z and on each row of
A and B, and a wide prior on mu. With informative data (sigma = 0.1) every pair of terms is
only weakly identified by the priors: the posterior is a thin ridge that mean-field VI
cannot see and that NUTS crawls along.

    autoreparam analyze examples/tensor_model.py
"""

import numpy as np

import numpyro
import numpyro.distributions as dist


def model(I, J, T, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 100.0))
    sigma_a = numpyro.sample("sigma_a", dist.HalfNormal(1.0))
    sigma_b = numpyro.sample("sigma_b", dist.HalfNormal(1.0))
    sigma_C = numpyro.sample("sigma_C", dist.HalfNormal(1.0))
    step_z = numpyro.sample("step_z", dist.HalfNormal(1.0))
    step_A = numpyro.sample("step_A", dist.HalfNormal(1.0))
    step_B = numpyro.sample("step_B", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))

    # Plates keep one dim each throughout (i: -2, j: -1); t is the event dim of the random walks
    # and of the likelihood.
    plate_i = numpyro.plate("i", I, dim=-2)
    plate_j = numpyro.plate("j", J, dim=-1)
    z = numpyro.sample("z", dist.GaussianRandomWalk(step_z, num_steps=T))  # (T,)
    with plate_i:
        a = numpyro.sample("a", dist.Normal(0.0, sigma_a))  # (I, 1)
        A = numpyro.sample("A", dist.GaussianRandomWalk(step_A, num_steps=T))  # (I, 1, T)
    with plate_j:
        b = numpyro.sample("b", dist.Normal(0.0, sigma_b))  # (J,)
        B = numpyro.sample("B", dist.GaussianRandomWalk(step_B, num_steps=T))  # (J, T)
    with plate_i, plate_j:
        C = numpyro.sample("C", dist.Normal(0.0, sigma_C))  # (I, J)

    loc = mu + a[..., None] + b[:, None] + z + A + B + C[..., None]  # (I, J, T)
    with plate_i, plate_j:
        numpyro.sample("y", dist.Normal(loc, sigma).to_event(1), obs=y)


def simulate(I=8, J=6, T=10, sigma=0.1, seed=0):
    """Data from the model's own generative story, with observation noise ``sigma``."""
    rng = np.random.default_rng(seed)
    mu = 1.5
    a = rng.normal(0, 1.0, I)
    b = rng.normal(0, 1.0, J)
    C = rng.normal(0, 0.5, (I, J))
    z = np.cumsum(rng.normal(0, 0.3, T))
    A = np.cumsum(rng.normal(0, 0.3, (I, T)), axis=-1)
    B = np.cumsum(rng.normal(0, 0.3, (J, T)), axis=-1)
    loc = (mu + a[:, None, None] + b[None, :, None] + z[None, None, :]
           + A[:, None, :] + B[None, :, :] + C[:, :, None])
    return (loc + rng.normal(0, sigma, (I, J, T))).astype(np.float32)


def model_args(I=8, J=6, T=10):
    return (I, J, T), {"y": simulate(I, J, T)}
