"""The sparse precision of an exact block and its elimination, against dense algebra."""

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

from autoreparam.block import block_of_model
from autoreparam.conditional import BlockConditional
from autoreparam.precision import _factor_inverse, _greedy_groups, elimination_cost

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_greedy_groups_keep_every_component_within_the_cap():
    # A path 0-1-2-3-4-5 and an isolated 6.
    neighbours = [{1}, {0, 2}, {1, 3}, {2, 4}, {3, 5}, {4}, set()]
    order = sorted(range(7), key=lambda i: len(neighbours[i]))
    groups, rest = _greedy_groups(order, neighbours, 7, 1)
    assert all(len(g) == 1 for g in groups)  # cap 1: an independent set
    chosen = {i for g in groups for i in g}
    assert not any(j in chosen for i in chosen for j in neighbours[i])
    groups, rest = _greedy_groups(order, neighbours, 7, 3)
    assert sorted(map(len, groups)) == [1, 2, 3] and rest == [3]  # 0-1-2 | 4-5 | 6, 3 left to the rest
    assert sorted([i for g in groups for i in g] + rest) == list(range(7))


def test_elimination_cost_prefers_fewer_operations():
    # (The tensor_small case, groups beating a diagonal elimination, is elimination_cost's doctest.)
    assert elimination_cost([1] * 8, 1) < elimination_cost([9], 0)  # eight schools: no groups of one block


@pytest.fixture(scope="module")
def tensor():
    module = _example("tensor_model")
    args, kwargs = module.model_args(3, 2, 4)
    block, note = block_of_model(module.model, args, kwargs)
    assert block is not None, note
    return module.model, args, kwargs, block


@pytest.fixture(scope="module")
def tensor_conditional(tensor):
    model, args, kwargs, block = tensor
    return BlockConditional(model, block, args, kwargs, method="dense")


def test_the_cost_model_groups_the_tensor_block(tensor_conditional):
    precision = tensor_conditional.precision
    precision.eliminate()
    # Each row of A with its row of C (and a_i) is one group; mu, z, b and B are left to the Schur complement.
    assert max(map(len, precision.groups)) > 1 and len(precision.rest) > 0, precision.groups
    assert "groups of at most" in tensor_conditional.precision_note


def test_grouped_elimination_matches_the_dense_integral_its_gradient_and_draws(tensor_conditional):
    conditional = tensor_conditional
    precision = conditional.precision
    precision.eliminate((8,))
    assert max(map(len, precision.groups)) > 1 and len(precision.rest) > 0  # beyond a diagonal elimination

    @jax.jit
    def compare(theta):
        _, g, q = conditional._exact_parts(theta, assemble=False)

        def dense(q, g):
            H = precision.assemble(q)
            return 0.5 * g @ jnp.linalg.solve(H, g) - 0.5 * jnp.linalg.slogdet(H)[1]

        H = precision.assemble(q)
        eps0 = jnp.zeros(precision.size)
        return (jax.value_and_grad(precision.log_integral, argnums=(0, 1))(q, g),
                jax.value_and_grad(dense, argnums=(0, 1))(q, g),
                H, g, precision.draw(q, g, eps0), jax.jacfwd(lambda eps: precision.draw(q, g, eps))(eps0))

    with jax.enable_x64(True):
        for seed in (3, 4):
            theta = conditional._as_theta(conditional._theta_point(seed))
            (value, (dq, dg)), (expected, (eq, eg)), H, g, mean, M = jax.tree.map(np.asarray, compare(theta))
            np.testing.assert_allclose(value, expected, rtol=1e-10)
            np.testing.assert_allclose(dg, eg, rtol=1e-8, atol=1e-10)
            # H reads only one representative of each group of equal Q entries: so does either gradient.
            np.testing.assert_allclose(dq, eq, rtol=1e-7, atol=1e-9 * np.abs(eq).max())
            # A draw is affine in the noise: z = m + M eps with M M^T = H^-1.
            np.testing.assert_allclose(mean, np.linalg.solve(H, g), rtol=1e-8, atol=1e-10)
            covariance = np.linalg.inv(H)
            np.testing.assert_allclose(M @ M.T, covariance, rtol=1e-8, atol=1e-10 * np.abs(covariance).max())


@pytest.mark.parametrize("n", [1, 2, 4, 8, 9])
def test_factor_inverse_is_the_inverse_of_the_cholesky_factor(n):
    # Up to 8 rows by unrolled scalar arithmetic, above by LAPACK: both give L^-1 with L L^T = K.
    rng = np.random.default_rng(n)
    a = rng.normal(size=(n, n))
    K = a @ a.T + n * np.eye(n)
    with jax.enable_x64(True):
        got = np.asarray(_factor_inverse(jnp.asarray(K)))
    np.testing.assert_allclose(got, np.linalg.inv(np.linalg.cholesky(K)), rtol=1e-10, atol=1e-12)


def test_entries_as_one_product_with_the_distinct_precisions_match_the_gathered_sums(tensor_conditional):
    conditional = tensor_conditional
    precision = conditional.precision
    gathered = precision._by_group
    assert gathered is None  # 15 distinct precisions and 4,004 entries: the gathers are cheaper here
    def entries_and_integral(theta):  # traced anew each call: log_integral is rebuilt below
        _, g, q = conditional._exact_parts(theta, assemble=False)
        return precision.entries(q), jax.value_and_grad(precision.log_integral, argnums=(0, 1))(q, g)

    with jax.enable_x64(True):
        theta = conditional._as_theta(conditional._theta_point(5))
        expected = jax.tree.map(np.asarray, jax.jit(entries_and_integral)(theta))
        try:
            precision._by_group = precision.entries_by_group()
            precision.eliminate()  # rebuilds log_integral on the product form
            got = jax.tree.map(np.asarray, jax.jit(entries_and_integral)(theta))
        finally:
            precision._by_group = gathered
            precision.eliminate()
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-8, atol=1e-10 * np.abs(b).max())


def _shifted_groups(group, y, uniform_mu=False):
    mu = numpyro.sample("mu", dist.Uniform(-5.0, 5.0) if uniform_mu else dist.Normal(0.0, 1.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("groups", 5):
        a = numpyro.sample("a", dist.Normal(0.0, tau))
    with numpyro.plate("obs", len(y)):
        numpyro.sample("y", dist.Normal(mu + a[group], sigma), obs=y)


@pytest.mark.parametrize("uniform_mu", [False, True])
def test_the_gradient_at_zero_from_the_precisions_equals_the_models(uniform_mu):
    # With mu in the block, the residuals at z = 0 (y, and a - 0) do not move with theta: the gradient
    # is a fixed product with the distinct precisions. A Uniform mu is theta and shifts y's residual:
    # the model's own gradient is kept.
    group = np.repeat(np.arange(5), 6)
    y = np.random.default_rng(0).normal(size=30)
    kwargs = {"uniform_mu": uniform_mu}
    block, note = block_of_model(_shifted_groups, (group, y), kwargs)
    assert block is not None, note
    conditional = BlockConditional(_shifted_groups, block, (group, y), kwargs, method="dense")
    assert conditional.precision.gradient_is_linear is not uniform_mu

    @jax.jit
    def both(theta):
        return conditional._exact_parts(theta, assemble=False)[1], conditional._grad(theta, jnp.zeros(block.size))

    with jax.enable_x64(True):
        for seed in (3, 4):
            mine, model = both(conditional._as_theta(conditional._theta_point(seed)))
            np.testing.assert_allclose(mine, model, rtol=1e-10, atol=1e-12 * np.abs(model).max())
