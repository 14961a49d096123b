"""The seed's order-three tensor model, small: y_ijt ~ Normal(mu + a_i + b_j + z_t + A_it + B_jt + C_ij, sigma)."""

import numpy as np

import numpyro
import numpyro.distributions as dist

# I, J, T = 3, 2, 4 (simulated from the model's own story with sigma = 0.1, rounded)
Y = np.array([
    [[1.46, 0.36, 0.32, -0.14], [1.62, 0.44, 0.72, 0.51]],
    [[2.07, 1.15, 1.50, 0.80], [0.94, 0.14, 0.60, -0.01]],
    [[1.33, 0.89, 0.98, -0.11], [1.39, 0.92, 1.07, 0.35]],
], dtype=np.float32)


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


def model_args():
    return (3, 2, 4), {"y": Y}
