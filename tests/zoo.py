"""A zoo of small NumPyro models with hand-derived likelihood-invariant pairs.

Every entry is a ``ZooModel``: the model, its example inputs, and, written by hand from the
math (not from running anything), the additive pairs ``{(observed, A, B): dim}`` with A first
in program order, the additive terms of each observed site, and the funnels.

The rule used throughout: a term that is a function of a set of factors spans the functions
of those factors on the observed rows; two terms share the functions they can both express.
On a complete crossing, functions of S1 and functions of S2 share exactly the functions of
S1 & S2 (dim = product of their sizes, 1 for the constants). With index arrays the shared
part of a[i] and b[j] is one constant per connected component of the bipartite graph of
observed (i, j) pairs; a nested r[region_of[d]] vs d[d] shares one dim per observed region.
A covariate u[county] * w lies in the span of county effects; an individual-level x * beta
does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

import tensor_model


@dataclass
class ZooModel:
    name: str
    model: Callable
    args: tuple
    kwargs: dict
    pairs: dict  # {(observed, A, B): dim}, additive
    terms: dict  # {observed: [site, ...]} in program order
    funnels: dict = field(default_factory=dict)  # {site: scale_parents}
    control: bool = False
    local: set = field(default_factory=set)  # pairs with only a local (non-additive) direction
    within: dict = field(default_factory=dict)  # {(observed, site): dim} of directions inside one site


def _rng(seed):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------------------------
# 1. the seed's order-three tensor model (examples/tensor_model.py), I, J, T = 4, 3, 5
# --------------------------------------------------------------------------------------------
def _tensor():
    I, J, T = 4, 3, 5
    # program order: mu, ..., z, a, A, b, B, C. Factors: mu {}, z {t}, a {i}, A {i,t}, b {j},
    # B {j,t}, C {i,j}; complete crossing -> dim = prod of sizes of the shared factors.
    factors = {"mu": "", "z": "t", "a": "i", "A": "it", "b": "j", "B": "jt", "C": "ij"}
    size = {"i": I, "j": J, "t": T}
    order = list(factors)
    pairs = {}
    for k, a in enumerate(order):
        for b in order[k + 1:]:
            shared = set(factors[a]) & set(factors[b])
            pairs[("y", a, b)] = int(np.prod([size[f] for f in shared], dtype=int))
    # spelled out, so the rule above is checked against the brief's examples
    assert pairs[("y", "mu", "a")] == 1 and pairs[("y", "a", "C")] == I
    assert pairs[("y", "z", "A")] == T and pairs[("y", "A", "B")] == T and len(pairs) == 21
    return ZooModel(
        "tensor", tensor_model.model, (I, J, T), {"y": tensor_model.simulate(I, J, T)},
        pairs, {"y": order},
        funnels={"a": ("sigma_a",), "b": ("sigma_b",), "C": ("sigma_C",)},
    )


# --------------------------------------------------------------------------------------------
# 2. random intercepts with a county-level covariate u[county] * w and an individual-level x
# --------------------------------------------------------------------------------------------
def county_model(county, u, x, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 1.0))
    sigma_a = numpyro.sample("sigma_a", dist.HalfNormal(1.0))
    with numpyro.plate("county", u.shape[0]):
        a = numpyro.sample("a", dist.Normal(0.0, sigma_a))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", county.shape[0]):
        numpyro.sample("y", dist.Normal(mu + a[county] + u[county] * w + x * beta, sigma), obs=y)


COUNTY_U = np.array([0.5, -1.2, 2.0, 0.8, -0.3], dtype=np.float32)


def _county():
    r = _rng(1)
    n_county, n = 5, 40
    county = np.concatenate([np.arange(n_county), r.integers(0, n_county, n - n_county)])
    x = r.normal(size=n).astype(np.float32)
    y = r.normal(size=n).astype(np.float32)
    return ZooModel(
        "county", county_model, (county, COUNTY_U, x), {"y": y},
        # a absorbs mu (constants) and w (u[county] is a function of county); beta is not absorbed;
        # mu vs w: ones is not proportional to u[county]
        {("y", "mu", "a"): 1, ("y", "w", "a"): 1},
        {"y": ["mu", "w", "beta", "a"]},
        funnels={"a": ("sigma_a",)},
    )


# --------------------------------------------------------------------------------------------
# 3. crossed effects through index arrays, unbalanced; connected and disconnected designs
# --------------------------------------------------------------------------------------------
def crossed_model(ia, ib, n_a, n_b, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    with numpyro.plate("A", n_a):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("B", n_b):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    numpyro.sample("y", dist.Normal(mu + a[ia] + b[ib], sigma).to_event(1), obs=y)


def _crossed():
    # 5 levels of a (level 4 never observed), 3 of b; unbalanced but connected:
    # a0-b0, a0-b1, a1-b1, a2-b2, a3-b2, a1-b2 -> one component
    ia = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 1, 0, 0, 3])
    ib = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 0, 0, 2])
    y = _rng(2).normal(size=ia.size).astype(np.float32)
    return ZooModel(
        "crossed", crossed_model, (ia, ib, 5, 3), {"y": y},
        {("y", "mu", "a"): 1, ("y", "mu", "b"): 1, ("y", "a", "b"): 1},
        {"y": ["mu", "a", "b"]},
    )


def _crossed_disconnected():
    # {a0, a1} x {b0, b1} and {a2, a3} x {b2, b3}: two components -> {a, b} has dim 2
    ia = np.array([0, 0, 1, 1, 1, 2, 3, 3, 2, 0])
    ib = np.array([0, 1, 0, 1, 1, 2, 2, 3, 3, 0])
    y = _rng(3).normal(size=ia.size).astype(np.float32)
    return ZooModel(
        "crossed_disconnected", crossed_model, (ia, ib, 4, 4), {"y": y},
        {("y", "mu", "a"): 1, ("y", "mu", "b"): 1, ("y", "a", "b"): 2},
        {"y": ["mu", "a", "b"]},
    )


def signed_model(ia, ib, y=None):
    """a[i] - 2 b[j]: the coefficients differ, the shared directions do not."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    a = numpyro.sample("a", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with numpyro.plate("data", ia.shape[0]):
        numpyro.sample("y", dist.Normal(mu + a[ia] - 2.0 * b[ib], 0.5), obs=y)


def _signed():
    ia = np.array([0, 1, 2, 0, 1, 2, 0])
    ib = np.array([0, 0, 0, 1, 1, 1, 1])
    return ZooModel(
        "signed", signed_model, (ia, ib), {"y": np.zeros(7, np.float32)},
        {("y", "mu", "a"): 1, ("y", "mu", "b"): 1, ("y", "a", "b"): 1},
        {"y": ["mu", "a", "b"]},
    )


# --------------------------------------------------------------------------------------------
# 4. nested groups: district within region through an index map
# --------------------------------------------------------------------------------------------
def nested_model(region_of, district, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau_r = numpyro.sample("tau_r", dist.HalfNormal(1.0))
    with numpyro.plate("region", int(region_of.max()) + 1):
        r = numpyro.sample("r", dist.Normal(0.0, tau_r))
    with numpyro.plate("district", region_of.shape[0]):
        d = numpyro.sample("d", dist.Normal(0.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", district.shape[0]):
        numpyro.sample("y", dist.Normal(mu + r[region_of[district]] + d[district], sigma), obs=y)


NESTED_REGION_OF = np.array([0, 0, 1, 1, 1, 2])


def _nested():
    district = np.array([0, 1, 2, 3, 4, 5, 0, 0, 1, 3, 3, 5, 5, 5, 2, 4, 1, 0])
    y = _rng(4).normal(size=district.size).astype(np.float32)
    return ZooModel(
        "nested", nested_model, (NESTED_REGION_OF, district), {"y": y},
        # d absorbs r by a gather: 3 observed regions
        {("y", "mu", "r"): 1, ("y", "mu", "d"): 1, ("y", "r", "d"): 3},
        {"y": ["mu", "r", "d"]},
        funnels={"r": ("tau_r",)},
    )


def _nested_sparse():
    # 4 regions, 8 districts; region 3 (districts 6, 7) and district 2 are never observed
    region_of = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    district = np.array([0, 1, 3, 4, 5, 0, 3, 5, 4, 1])
    y = _rng(5).normal(size=district.size).astype(np.float32)
    return ZooModel(
        "nested_sparse", nested_model, (region_of, district), {"y": y},
        {("y", "mu", "r"): 1, ("y", "mu", "d"): 1, ("y", "r", "d"): 3},
        {"y": ["mu", "r", "d"]},
        funnels={"r": ("tau_r",)},
    )


# --------------------------------------------------------------------------------------------
# 5. an interaction c[age_edu] next to a[age] and b[edu]
# --------------------------------------------------------------------------------------------
def interaction_model(age, edu, n_age, n_edu, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    with numpyro.plate("age", n_age):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("edu", n_edu):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("age_edu", n_age * n_edu):
        c = numpyro.sample("c", dist.Normal(0.0, 1.0))
    age_edu = age * n_edu + edu
    with numpyro.plate("data", age.shape[0]):
        numpyro.sample("y", dist.Normal(mu + a[age] + b[edu] + c[age_edu], 1.0), obs=y)


def _interaction():
    age = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 2, 1, 0, 0])
    edu = np.array([0, 1, 0, 1, 0, 1, 0, 1, 1, 1, 0, 0, 1])
    y = _rng(6).normal(size=age.size).astype(np.float32)
    return ZooModel(
        "interaction", interaction_model, (age, edu, 3, 2), {"y": y},
        {("y", "mu", "a"): 1, ("y", "mu", "b"): 1, ("y", "mu", "c"): 1,
         ("y", "a", "b"): 1, ("y", "a", "c"): 3, ("y", "b", "c"): 2},
        {"y": ["mu", "a", "b", "c"]},
    )


# --------------------------------------------------------------------------------------------
# 6. links: Bernoulli(logits) with crossed effects, Poisson(exp) with nested effects
# --------------------------------------------------------------------------------------------
def bernoulli_model(ia, ib, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    with numpyro.plate("A", 4):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("B", 3):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", ia.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=mu + a[ia] + b[ib]), obs=y)


def _bernoulli():
    r = _rng(7)
    ia = np.concatenate([np.arange(4), r.integers(0, 4, 26)])
    ib = np.concatenate([np.array([0, 1, 2, 0]), r.integers(0, 3, 26)])
    y = r.integers(0, 2, ia.size).astype(np.float32)
    return ZooModel(
        "bernoulli", bernoulli_model, (ia, ib), {"y": y},
        {("y", "mu", "a"): 1, ("y", "mu", "b"): 1, ("y", "a", "b"): 1},
        {"y": ["mu", "a", "b"]},
    )


def poisson_model(region_of, district, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("region", 3):
        r = numpyro.sample("r", dist.Normal(0.0, 0.5))
    with numpyro.plate("district", region_of.shape[0]):
        d = numpyro.sample("d", dist.Normal(0.0, 0.5))
    eta = mu + r[region_of[district]] + d[district]
    with numpyro.plate("data", district.shape[0]):
        numpyro.sample("y", dist.Poisson(rate=jnp.exp(eta)), obs=y)


def _poisson():
    district = np.array([0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0, 0, 2, 4])
    y = _rng(8).poisson(2.0, district.size).astype(np.float32)
    return ZooModel(
        "poisson", poisson_model, (NESTED_REGION_OF, district), {"y": y},
        {("y", "mu", "r"): 1, ("y", "mu", "d"): 1, ("y", "r", "d"): 3},
        {"y": ["mu", "r", "d"]},
    )


# --------------------------------------------------------------------------------------------
# 7. the predictor written through a numpyro.deterministic site
# --------------------------------------------------------------------------------------------
def deterministic_model(ia, ib, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    with numpyro.plate("A", 3):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("B", 3):
        b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    eta = numpyro.deterministic("eta", mu + a[ia] + b[ib])
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", ia.shape[0]):
        numpyro.sample("y", dist.Normal(eta, sigma), obs=y)


def _deterministic():
    ia = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2])
    ib = np.array([0, 1, 2, 1, 2, 0, 0, 1, 1, 2])
    y = _rng(9).normal(size=ia.size).astype(np.float32)
    return ZooModel(
        "deterministic", deterministic_model, (ia, ib), {"y": y},
        {("y", "mu", "a"): 1, ("y", "mu", "b"): 1, ("y", "a", "b"): 1},
        {"y": ["mu", "a", "b"]},
    )


# --------------------------------------------------------------------------------------------
# 8. vector sites via .expand([K]).to_event(1) (and a matrix site with to_event(2))
# --------------------------------------------------------------------------------------------
def vector_model(ia, ib, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    a = numpyro.sample("a", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    C = numpyro.sample("C", dist.Normal(0.0, 1.0).expand([3, 2]).to_event(2))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", ia.shape[0]):
        numpyro.sample("y", dist.Normal(mu + a[ia] + b[ib] + C[ia, ib], sigma), obs=y)


def _vector():
    ia = np.array([0, 0, 1, 1, 2, 2, 0, 1, 2, 0, 2])  # every (i, j) cell observed
    ib = np.array([0, 1, 0, 1, 0, 1, 1, 1, 0, 0, 1])
    y = _rng(10).normal(size=ia.size).astype(np.float32)
    return ZooModel(
        "vector", vector_model, (ia, ib), {"y": y},
        {("y", "mu", "a"): 1, ("y", "mu", "b"): 1, ("y", "mu", "C"): 1,
         ("y", "a", "b"): 1, ("y", "a", "C"): 3, ("y", "b", "C"): 2},
        {"y": ["mu", "a", "b", "C"]},
    )


# --------------------------------------------------------------------------------------------
# 9. X @ beta with group-level columns
# --------------------------------------------------------------------------------------------
def design_model(X, group, n_group, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("group", n_group):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(mu + X @ beta + a[group], sigma), obs=y)


def _design():
    r = _rng(11)
    n, n_group = 30, 5
    group = np.concatenate([np.arange(n_group), r.integers(0, n_group, n - n_group)])
    U = r.normal(size=(n_group, 2))  # two group-level covariates
    X = np.column_stack([U[group, 0], r.normal(size=n), U[group, 1], r.normal(size=n)])
    y = r.normal(size=n).astype(np.float32)
    return ZooModel(
        "design", design_model, (X.astype(np.float32), group, n_group), {"y": y},
        # a absorbs the 2 group-level columns of X; ones is not in span(X) -> {mu, beta}: 0
        {("y", "mu", "a"): 1, ("y", "beta", "a"): 2},
        {"y": ["mu", "beta", "a"]},
    )


def _design_unscaled():
    """The same design in natural units: a group-level column in the thousands (income), another
    in hundredths (a proportion). Units change no rank: {beta, a} still has dim 2."""
    zm = _design()
    X = zm.args[0] * np.array([1e3, 1.0, 1e-2, 1.0], np.float32)
    zm.name, zm.args = "design_unscaled", (X.astype(np.float32),) + zm.args[1:]
    return zm


# --------------------------------------------------------------------------------------------
# extra: heteroscedastic scale terms, two observed sites, multi-membership (a dense map)
# --------------------------------------------------------------------------------------------
def hetero_model(g, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    a = numpyro.sample("a", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    s0 = numpyro.sample("s0", dist.Normal(0.0, 1.0))
    s = numpyro.sample("s", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    with numpyro.plate("data", g.shape[0]):
        numpyro.sample("y", dist.Normal(mu + a[g], jnp.exp(s0 + s[g])), obs=y)


def _hetero():
    g = np.array([0, 1, 2, 0, 1, 2, 2])
    y = _rng(12).normal(size=g.size).astype(np.float32)
    return ZooModel(
        "hetero", hetero_model, (g,), {"y": y},
        # loc terms and log-scale terms live in different parameters: no cross pairs
        {("y", "mu", "a"): 1, ("y", "s0", "s"): 1},
        {"y": ["mu", "a", "s0", "s"]},
    )


def two_obs_model(g1, g2, h2, y1=None, y2=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    a = numpyro.sample("a", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with numpyro.plate("n1", g1.shape[0]):
        numpyro.sample("y1", dist.Normal(mu + a[g1], 1.0), obs=y1)
    with numpyro.plate("n2", g2.shape[0]):
        numpyro.sample("y2", dist.Normal(a[g2] + b[h2], 1.0), obs=y2)


def _two_obs():
    g1 = np.array([0, 1, 2, 2])
    g2 = np.array([0, 1, 2, 0, 1])
    h2 = np.array([0, 0, 1, 1, 1])
    return ZooModel(
        "two_obs", two_obs_model, (g1, g2, h2),
        {"y1": np.zeros(4, np.float32), "y2": np.zeros(5, np.float32)},
        {("y1", "mu", "a"): 1, ("y2", "a", "b"): 1},
        {"y1": ["mu", "a"], "y2": ["a", "b"]},
    )


def multi_membership_model(i1, i2, j, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    a = numpyro.sample("a", dist.Normal(0.0, 1.0).expand([4]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with numpyro.plate("data", i1.shape[0]):
        numpyro.sample("y", dist.Normal(mu + a[i1] + a[i2] + b[j], 1.0), obs=y)


def _multi_membership():
    # each row reads two levels of a: not a gather. Constant a = c/2 matches constant mu = c
    # and constant b = c; nothing else is shared (a's rows: 0+1, 1+2, 2+3, 3+0, 0+2, 1+3 ...)
    i1 = np.array([0, 1, 2, 3, 0, 1, 0, 2])
    i2 = np.array([1, 2, 3, 0, 2, 3, 1, 3])
    j = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    return ZooModel(
        "multi_membership", multi_membership_model, (i1, i2, j), {"y": np.zeros(8, np.float32)},
        {("y", "mu", "a"): 1, ("y", "mu", "b"): 1, ("y", "a", "b"): 1},
        {"y": ["mu", "a", "b"]},
    )


# --------------------------------------------------------------------------------------------
# controls
# --------------------------------------------------------------------------------------------
def regression_model(X, y=None):
    alpha = numpyro.sample("alpha", dist.Normal(0.0, 5.0))
    beta = numpyro.sample("beta", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(alpha + X @ beta, sigma), obs=y)


def _regression():
    r = _rng(13)
    X = r.normal(size=(20, 3)).astype(np.float32)
    return ZooModel("regression", regression_model, (X,), {"y": r.normal(size=20).astype(np.float32)},
                    {}, {"y": ["alpha", "beta"]}, control=True)


def factor_model(I, J, y=None):
    with numpyro.plate("i", I):
        u = numpyro.sample("u", dist.Normal(0.0, 1.0))
    with numpyro.plate("j", J):
        v = numpyro.sample("v", dist.Normal(0.0, 1.0))
    with numpyro.plate("i2", I, dim=-2), numpyro.plate("j2", J, dim=-1):
        numpyro.sample("y", dist.Normal(u[:, None] * v[None, :], 0.5), obs=y)


def _factor():
    return ZooModel("factor", factor_model, (4, 3), {"y": _rng(14).normal(size=(4, 3)).astype(np.float32)},
                    {}, {"y": []}, control=True, local={("y", "u", "v")})


def eight_schools(J, sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("J", J):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def _eight_schools():
    y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], np.float32)
    sigma = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], np.float32)
    return ZooModel("eight_schools", eight_schools, (8, sigma), {"y": y},
                    {}, {"obs": ["theta"]}, funnels={"theta": ("tau",)}, control=True)


def eight_schools_noncentered(J, sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("J", J):
        theta_tilde = numpyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        numpyro.sample("obs", dist.Normal(mu + tau * theta_tilde, sigma), obs=y)


def _eight_schools_noncentered():
    zm = _eight_schools()
    # mu + tau * theta_tilde: (mu + c, theta_tilde - c / tau) and (tau * k, theta_tilde / k) are
    # invariant only for the current tau / theta_tilde: local, not additive; no funnel left
    return ZooModel("eight_schools_noncentered", eight_schools_noncentered, zm.args, zm.kwargs,
                    {}, {"obs": ["mu"]}, control=True,
                    local={("obs", "mu", "theta_tilde"), ("obs", "tau", "theta_tilde")})


# --------------------------------------------------------------------------------------------
# constrained supports: directions are taken in the unconstrained space of each site
# --------------------------------------------------------------------------------------------
def lkj_model(g, x, n_group, y=None):
    """Correlated varying intercepts and slopes: (diag(sigma) @ L_Rho @ z)[:, g] (Rethinking's m14.1)."""
    L_Rho = numpyro.sample("L_Rho", dist.LKJCholesky(2, 2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0).expand([2]).to_event(1))
    z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2, n_group]).to_event(2))
    ab = jnp.diag(sigma) @ L_Rho @ z
    a_bar = numpyro.sample("a_bar", dist.Normal(0.0, 1.0))
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    with numpyro.plate("data", g.shape[0]):
        numpyro.sample("y", dist.Normal(a_bar + ab[0, g] + ab[1, g] * x, s), obs=y)


def _lkj():
    g = np.tile(np.arange(4), 3)
    x = np.linspace(-1.0, 1.0, g.size).astype(np.float32)
    y = _rng(15).normal(size=g.size).astype(np.float32)
    # L_Rho has one degree of freedom (its correlation), sigma two, z eight. Every group's pair of
    # effects is an invertible map of z[:, g], so z can undo any move of L_Rho (dim 1), of sigma
    # (dim 2) or of a_bar (dim 1), at a point only. L_Rho and sigma cannot undo each other: L_Rho's
    # one direction moves only the slopes, and not proportionally to them (no {L_Rho, sigma}).
    return ZooModel("lkj", lkj_model, (g, x, 4), {"y": y}, {}, {"y": ["a_bar"]}, control=True,
                    local={("y", "L_Rho", "z"), ("y", "sigma", "z"), ("y", "z", "a_bar")})


def simplex_model(g, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    w = numpyro.sample("w", dist.Dirichlet(jnp.ones(3)))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", g.shape[0]):
        numpyro.sample("y", dist.Normal(mu + 2.0 * w[g], sigma), obs=y)


def _simplex():
    # w cannot move all its levels together (they sum to one): mu + c, w - c/2 leaves the simplex,
    # so {mu, w} is no direction at all, additive or local
    g = np.array([0, 1, 2, 0, 1, 2, 2])
    return ZooModel("simplex", simplex_model, (g,), {"y": _rng(16).normal(size=7).astype(np.float32)},
                    {}, {"y": ["mu"]}, control=True)


def positive_effects_model(g, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    b = numpyro.sample("b", dist.HalfNormal(1.0).expand([3]).to_event(1))
    with numpyro.plate("data", g.shape[0]):
        numpyro.sample("y", dist.Normal(mu + b[g], 1.0), obs=y)


def _positive_effects():
    # in b's unconstrained values (log b) the trade-off mu + c, b - c is a curve, not a line: it is
    # a direction at a point (dim 1), not an additive pair, and b is no additive term
    g = np.array([0, 1, 2, 0, 1, 2, 2])
    return ZooModel("positive_effects", positive_effects_model, (g,), {"y": _rng(20).normal(size=7).astype(np.float32)},
                    {}, {"y": ["mu"]}, control=True, local={("y", "mu", "b")})


# --------------------------------------------------------------------------------------------
# directions inside one site
# --------------------------------------------------------------------------------------------
def collinear_design_model(X, y=None):
    beta = numpyro.sample("beta", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", X.shape[0]):
        numpyro.sample("y", dist.Normal(X @ beta, sigma), obs=y)


def _collinear_design():
    # an intercept column and one-hot columns for all three groups: the intercept equals their sum,
    # so beta[0] - beta[1] - beta[2] - beta[3] is invisible to y (rank 4 of 5)
    g = np.array([0, 1, 2, 0, 1, 2, 1, 0])
    X = np.column_stack([np.ones(8), np.eye(3)[g], np.linspace(-1.0, 1.0, 8)]).astype(np.float32)
    return ZooModel("collinear_design", collinear_design_model, (X,), {"y": _rng(17).normal(size=8).astype(np.float32)},
                    {}, {"y": ["beta"]}, control=True, within={("y", "beta"): 1})


def giver_receiver_model(g, n, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    gr = numpyro.sample("gr", dist.MultivariateNormal(jnp.zeros(2), jnp.array([[1.0, 0.5], [0.5, 1.0]]))
                        .expand([n]).to_event(1))
    with numpyro.plate("data", g.shape[0]):
        numpyro.sample("y", dist.Poisson(jnp.exp(mu + gr[g, 0] + gr[g, 1])), obs=y)


def _giver_receiver():
    # each household's giving gr[h, 0] and receiving gr[h, 1] enter one predictor as a sum: one
    # direction per household (gr[h, 0] - gr[h, 1]); gr also absorbs mu (dim 1)
    g = np.array([0, 1, 2, 0, 1, 2, 2])
    return ZooModel("giver_receiver", giver_receiver_model, (g, 3), {"y": _rng(18).poisson(2.0, 7).astype(np.float32)},
                    {("y", "mu", "gr"): 1}, {"y": ["mu", "gr"]}, within={("y", "gr"): 3})


def scaled_giver_receiver_model(g, n, y=None):
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    gr = numpyro.sample("gr", dist.Normal(0.0, 1.0).expand([n, 2]).to_event(2))
    with numpyro.plate("data", g.shape[0]):
        numpyro.sample("y", dist.Normal(tau * (gr[g, 0] + gr[g, 1]), 1.0), obs=y)


def _scaled_giver_receiver():
    # gr is not additive (tau scales it) but gr[h, 0] - gr[h, 1] is invisible at every point; tau
    # against gr is a scale trade-off at a point only
    g = np.array([0, 1, 2, 0, 1, 2, 2])
    return ZooModel("scaled_giver_receiver", scaled_giver_receiver_model, (g, 3),
                    {"y": _rng(19).normal(size=7).astype(np.float32)}, {}, {"y": []}, control=True,
                    local={("y", "tau", "gr")}, within={("y", "gr"): 3})


def drift_interaction_model(d_idx, t_idx, p_idx, num_steps, y=None):
    n_dim, n_pair = 3, 4
    drift = numpyro.sample("drift", dist.GaussianRandomWalk(0.3, num_steps=num_steps).expand([n_dim]).to_event(1))
    pairwise = numpyro.sample("pairwise", dist.Normal(0.0, 1.0).expand([n_pair, n_dim]).to_event(2))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", d_idx.shape[0]):
        numpyro.sample("y", dist.Normal(drift[d_idx, t_idx] + pairwise[p_idx, d_idx], sigma), obs=y)


def _drift_interaction():
    # a random-walk drift per dimension d against an interaction pairwise[p, d]: the factors are
    # drift {d, t}, pairwise {p, d}; on a complete crossing they share the functions of d alone
    # (one shift per dimension: drift[d, :] + c, pairwise[:, d] - c), dim 3
    d, t, p = (a.ravel() for a in np.meshgrid(np.arange(3), np.arange(4), np.arange(4), indexing="ij"))
    return ZooModel("drift_interaction", drift_interaction_model, (d, t, p, 4),
                    {"y": _rng(20).normal(size=d.shape[0]).astype(np.float32)},
                    {("y", "drift", "pairwise"): 3}, {"y": ["drift", "pairwise"]})


def drift_start_model(d_idx, p_idx, num_steps, y=None, y_later=None):
    n_dim, n_pair = 3, 4
    drift = numpyro.sample("drift", dist.GaussianRandomWalk(0.3, num_steps=num_steps).expand([n_dim]).to_event(1))
    pairwise = numpyro.sample("pairwise", dist.Normal(0.0, 1.0).expand([n_pair, n_dim]).to_event(2))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("data", d_idx.shape[0]):
        numpyro.sample("y", dist.Normal(drift[d_idx, 0] + pairwise[p_idx, d_idx], sigma), obs=y)
    numpyro.sample("y_later", dist.Normal(drift[:, 1:], sigma).to_event(2), obs=y_later)


def _drift_start():
    # only the first step drift[d, 0] meets the interaction pairwise[:, d] (one event dimension of
    # the random walk): in y, drift[d, 0] + c against pairwise[:, d] - c for each d (dim 3); y_later
    # sees the later steps alone and shares nothing
    d, p = (a.ravel() for a in np.meshgrid(np.arange(3), np.arange(4), indexing="ij"))
    kwargs = {"y": _rng(21).normal(size=d.shape[0]).astype(np.float32),
              "y_later": _rng(22).normal(size=(3, 4)).astype(np.float32)}
    return ZooModel("drift_start", drift_start_model, (d, p, 5), kwargs,
                    {("y", "drift", "pairwise"): 3}, {"y": ["drift", "pairwise"], "y_later": ["drift"]})


BUILDERS = [
    _tensor, _county, _crossed, _crossed_disconnected, _signed, _nested, _nested_sparse,
    _interaction, _bernoulli, _poisson, _deterministic, _vector, _design, _design_unscaled,
    _hetero, _two_obs, _multi_membership, _regression, _factor, _eight_schools,
    _eight_schools_noncentered, _lkj, _simplex, _positive_effects, _collinear_design, _giver_receiver, _scaled_giver_receiver,
    _drift_interaction, _drift_start,
]


def zoo() -> list[ZooModel]:
    return [b() for b in BUILDERS]


def by_name(name: str) -> ZooModel:
    for b in BUILDERS:
        zm = b()
        if zm.name == name:
            return zm
    raise KeyError(name)
