"""Property test: on random additive models, ``analyze`` finds the oracle's pairs and dims.

A random model has an optional intercept, 1-3 factors (crossed index arrays, coarsenings of an
earlier factor through an index map, i.e. nesting, and interactions of two earlier factors),
group-level covariates ``u[idx_f] * w``, individual-level covariates ``x * beta``, an optional
``X @ beta`` whose columns are group-level or individual-level, and a Normal, Bernoulli-logit or
Poisson-log likelihood. Latent sites are sampled in a random program order, each either under a
plate or as ``.expand([L]).to_event(1)``, Normal or StudentT, some under ``handlers.scale``,
``handlers.mask`` or a masked distribution. Sizes are tiny, so JAX compiles fast.

A second property, exactness: ``reparameterize`` with a random plan (dense random offsets from
earlier sites, random centredness) changes the log joint by exactly the non-centring's
log-Jacobian, counted once under ``scale`` and ``mask`` and per represented element under a
subsampled plate (the random model then gets a row-level effect inside a subsampled data plate).
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.infer.util import log_density
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import autoreparam
from autoreparam import Offset, Plan, SitePlan
from autoreparam.plan import SparseMap
from autoreparam.trace import unwrap_distribution
from oracle import oracle


@dataclass
class Spec:
    n: int
    intercept: bool
    factors: list  # [(name, size, kind, detail)]
    group_covs: list  # [(name, factor index, u)]
    indiv_covs: list  # [(name, x)]
    slopes: list  # [(name, factor index, x)]: varying slopes x * s[idx_f]
    design: tuple | None  # (name, X, column kinds)
    likelihood: str
    order: list  # latent site names in program order
    plated: dict  # site -> True: under a plate, False: expand().to_event(1)
    idx: list  # per factor: index array (N,)
    y: np.ndarray
    families: dict = field(default_factory=dict)  # site -> "normal" or "studentt"
    wrappers: dict = field(default_factory=dict)  # site -> "scale", "mask" or "masked" ("e": the row effect)
    prior_scale: dict = field(default_factory=dict)  # site -> the prior's scale
    seed: int = 0

    def describe(self) -> str:
        f = ", ".join(f"{name}[{size}]:{kind}{detail}" for name, size, kind, detail in self.factors)
        d = None if self.design is None else self.design[2]
        return (f"n={self.n} {self.likelihood} intercept={self.intercept} factors=({f}) "
                f"group_covs={[(g[0], g[1]) for g in self.group_covs]} "
                f"indiv={[c[0] for c in self.indiv_covs]} slopes={[(c[0], c[1]) for c in self.slopes]} "
                f"design={d} zero_rows={[c[0] for c in self.indiv_covs + self.slopes if not c[-1].all()]} "
                f"order={self.order} families={self.families} wrappers={self.wrappers}")


def random_spec(seed: int) -> Spec:
    """A random additive model; every choice comes from ``seed`` (hypothesis draws the seed,
    so each example is an independent model rather than a mutation of the previous one)."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 25))
    intercept = bool(rng.integers(2))
    factors, idx = [], []
    for k in range(int(rng.integers(1, 4))):
        kinds = ["crossed"] + (["nested", "nested", "interaction"] if factors else [])
        kind = kinds[rng.integers(len(kinds))]
        if kind == "crossed":
            size = int(rng.integers(1, 6))
            factors.append((f"f{k}", size, "crossed", ()))
            idx.append(rng.integers(0, size, n))
        elif kind == "nested":  # a coarsening of an earlier factor p: f_p is nested in f_k
            p = int(rng.integers(len(factors)))
            size = int(rng.integers(1, 5))
            level_map = rng.integers(0, size, factors[p][1])
            factors.append((f"f{k}", size, "nested", (p, level_map)))
            idx.append(level_map[idx[p]])
        else:
            p, q = (int(i) for i in rng.choice(len(factors), 2, replace=len(factors) < 2))
            if factors[p][1] * factors[q][1] > 25:
                q = p = int(np.argmin([f[1] for f in factors]))
            size = factors[p][1] * factors[q][1]
            factors.append((f"f{k}", size, "interaction", (p, q)))
            idx.append(idx[p] * factors[q][1] + idx[q])

    zeros = rng.random() < 0.3  # some covariates vanish on some levels or rows (pinned levels)

    def level_values(size):
        u = rng.choice([-1.0, 1.0], size) * rng.uniform(0.5, 2.0, size)
        if zeros:
            u[rng.random(size) < 0.3] = 0.0
        return u.astype(np.float32)

    def row_values():
        kind = rng.integers(3)
        if kind == 0:  # individual-level
            x = rng.normal(size=n)
        elif kind == 1:  # an indicator (treated or not)
            x = rng.integers(0, 2, n).astype(float)
        else:  # group-level, of a random factor
            f = int(rng.integers(len(factors)))
            return level_values(factors[f][1])[idx[f]]
        if zeros:
            x[rng.random(n) < 0.3] = 0.0
        return x.astype(np.float32)

    group_covs = []
    for k in range(int(rng.integers(0, 3))):
        f = int(rng.integers(len(factors)))
        group_covs.append((f"w{k}", f, level_values(factors[f][1])))
    indiv_covs = [(f"beta{k}", row_values()) for k in range(int(rng.integers(0, 3)))]
    slopes = [(f"s{k}", int(rng.integers(len(factors))), row_values())
              for k in range(int(rng.integers(0, 2)))]
    design = None
    if rng.integers(2):
        cols, col_kinds = [], []
        for _ in range(int(rng.integers(1, 4))):
            if rng.integers(2):
                f = int(rng.integers(len(factors)))
                cols.append(level_values(factors[f][1])[idx[f]])
                col_kinds.append(f"group:f{f}")
            else:
                cols.append(row_values())
                col_kinds.append("row")
        design = ("B", np.column_stack(cols).astype(np.float32), col_kinds)
    likelihood = ["normal", "bernoulli", "poisson"][rng.integers(3)]

    sites = (["mu"] if intercept else []) + [f[0] for f in factors] + [g[0] for g in group_covs] \
        + [c[0] for c in indiv_covs] + [c[0] for c in slopes] + ([design[0]] if design else [])
    order = [sites[i] for i in rng.permutation(len(sites))]
    plated = {s: bool(rng.integers(2)) for s in sites}
    if likelihood == "normal":
        y = rng.normal(size=n).astype(np.float32)
    elif likelihood == "bernoulli":
        y = rng.integers(0, 2, n).astype(np.float32)
    else:
        y = rng.poisson(1.5, n).astype(np.float32)
    # Drawn last, so the models of the first property stay those it was tuned on.
    families = {s: ["normal", "studentt"][rng.integers(2)] for s in sites}
    wrappers = {}
    for name in sites:
        kind = ["none", "scale", "mask", "masked"][rng.integers(4)] if plated[name] and name != "mu" else \
            ["none", "scale"][rng.integers(2)]
        if kind != "none":
            wrappers[name] = kind
    wrappers["e"] = ["none", "scale", "mask", "masked"][rng.integers(4)]  # the subsampled row effect
    prior_scale = {s: float(rng.uniform(0.5, 2.0)) for s in sites}
    return Spec(n, intercept, factors, group_covs, indiv_covs, slopes, design, likelihood, order, plated, idx, y,
                families, wrappers, prior_scale, seed)


specs = st.integers(0, 2**32 - 1).map(random_spec)


def make_model(spec: Spec, subsample: bool = False):
    """The random model; with ``subsample`` it also has a row-level effect ``e`` (scale ``tau``) in
    a subsampled data plate, under the wrapper drawn for it."""
    sizes = {name: size for name, size, _, _ in spec.factors}
    sizes.update({g[0]: 1 for g in spec.group_covs})
    sizes.update({c[0]: 1 for c in spec.indiv_covs})
    sizes.update({name: spec.factors[f][1] for name, f, _ in spec.slopes})
    if spec.design:
        sizes[spec.design[0]] = spec.design[1].shape[1]
    sizes["mu"] = 1

    def factor_index(k):
        _, _, kind, detail = spec.factors[k]
        if kind == "crossed":
            return spec.idx[k]
        if kind == "nested":
            p, level_map = detail
            return level_map[factor_index(p)]  # the index map r[region_of[district]]
        p, q = detail
        return factor_index(p) * spec.factors[q][1] + factor_index(q)

    def law(name, scale):
        if spec.families.get(name) == "studentt":
            return dist.StudentT(5.0, 0.0, scale)
        return dist.Normal(0.0, scale)

    def wrapped(name, size, make_fn):
        """Sample ``name`` under its drawn wrapper (scale, mask handler or masked distribution)."""
        kind = spec.wrappers.get(name, "none")
        mask = jnp.arange(size) % 3 != 1
        with ExitStack() as stack:
            if kind == "scale":
                stack.enter_context(handlers.scale(scale=2.5))
            elif kind == "mask":
                stack.enter_context(handlers.mask(mask=mask))
            fn = make_fn()
            if kind == "masked":
                fn = fn.mask(mask)
            return numpyro.sample(name, fn)

    def model(y=None):
        v = {}
        for name in spec.order:
            scale = spec.prior_scale.get(name, 1.0) if subsample else (3.0 if name == "mu" else 1.0)
            if name == "mu":
                v[name] = wrapped(name, 1, lambda: dist.Normal(0.0, 3.0))
            elif spec.plated[name]:
                with numpyro.plate(f"plate_{name}", sizes[name]):
                    v[name] = wrapped(name, sizes[name], lambda: law(name, scale).expand([sizes[name]]))
            else:
                v[name] = wrapped(name, 1, lambda: law(name, scale).expand([sizes[name]]).to_event(1))
        eta = jnp.zeros(spec.n)
        if spec.intercept:
            eta = eta + v["mu"]
        for k, (name, _, _, _) in enumerate(spec.factors):
            eta = eta + v[name][factor_index(k)]
        for name, f, u in spec.group_covs:
            eta = eta + u[factor_index(f)] * v[name][0]
        for name, x in spec.indiv_covs:
            eta = eta + x * v[name][0]
        for name, f, x in spec.slopes:
            eta = eta + x * v[name][factor_index(f)]
        if spec.design:
            eta = eta + spec.design[1] @ v[spec.design[0]]
        if spec.likelihood == "normal":
            sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        if subsample:
            tau = numpyro.sample("tau", dist.HalfNormal(1.0))
            with numpyro.plate("data", spec.n, subsample_size=max(spec.n // 3, 1)) as rows:
                eta = eta[rows] + wrapped("e", len(rows), lambda: dist.Normal(0.0, tau).expand([len(rows)]))
                obs = None if y is None else jnp.asarray(y)[rows]
                if spec.likelihood == "normal":
                    numpyro.sample("y", dist.Normal(eta, sigma), obs=obs)
                elif spec.likelihood == "bernoulli":
                    numpyro.sample("y", dist.Bernoulli(logits=eta), obs=obs)
                else:
                    numpyro.sample("y", dist.Poisson(rate=jnp.exp(eta)), obs=obs)
            return
        with numpyro.plate("data", spec.n):
            if spec.likelihood == "normal":
                numpyro.sample("y", dist.Normal(eta, sigma), obs=y)
            elif spec.likelihood == "bernoulli":
                numpyro.sample("y", dist.Bernoulli(logits=eta), obs=y)
            else:
                numpyro.sample("y", dist.Poisson(rate=jnp.exp(eta)), obs=y)

    return model


def entering(spec: Spec) -> set[str]:
    """Sites whose coefficients are not all zero (a covariate may vanish on the rows it has)."""
    out = {name for name, _, _, _ in spec.factors} | ({"mu"} if spec.intercept else set())
    out |= {name for name, f, u in spec.group_covs if np.any(u[spec.idx[f]] != 0)}
    out |= {name for name, x in spec.indiv_covs if np.any(x != 0)}
    out |= {name for name, _, x in spec.slopes if np.any(x != 0)}
    if spec.design and np.any(spec.design[1] != 0):
        out.add(spec.design[0])
    return out


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs)
def test_random_additive_models_match_oracle(spec):
    model = make_model(spec)
    report = autoreparam.analyze(model, y=spec.y)
    orc = oracle(model, y=spec.y, check_steps=False)
    note = spec.describe()

    # every latent site that reaches the predictor is an additive term, in program order
    assert [t.site for t in report.terms["y"]] == [s for s in spec.order if s in entering(spec)], note
    assert [s for s in orc.depends["y"] if s != "sigma"] == [t.site for t in report.terms["y"]], note
    # pairs and dims
    assert report.pairs() == orc.additive, note
    # these models are linear in their latent sites: nothing local-only
    assert orc.local_only == set(), note
    assert report.pairs("local") == {}, note
    for inv in report.additive():
        assert inv.residual < 1e-4, (inv, note)


def random_plan(model, y, rng) -> Plan:
    """Each real latent site gets nothing, a dense random offset from an earlier site, random
    centredness, or both; any such plan must be exact."""
    found = []

    def shapes():  # traced for shapes only: nothing is compiled
        tr = handlers.trace(handlers.seed(model, 0)).get_trace(y=y)
        found.extend((n, tuple(jnp.shape(s["value"])), len(s["fn"].event_shape),
                      isinstance(unwrap_distribution(s["fn"]), (dist.Normal, dist.StudentT)))
                     for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"])
        return 0

    jax.eval_shape(shapes)
    earlier, sites = [], []
    for name, shape, event_ndim, real in found:
        if not real:
            earlier.append((name, shape))
            continue
        batch = shape[:len(shape) - event_ndim]
        n_batch, size = int(np.prod(batch, dtype=int)), int(np.prod(shape, dtype=int))
        choice = int(rng.integers(4))  # 0 nothing, 1 offset, 2 non-centred, 3 both
        offsets = ()
        if choice in (1, 3) and earlier:
            parent, parent_shape = earlier[rng.integers(len(earlier))]
            n_a = int(np.prod(parent_shape, dtype=int))
            rows, cols = np.divmod(np.arange(size * n_a), n_a)
            e = SparseMap((size, n_a), tuple(int(r) for r in rows), tuple(int(c) for c in cols),
                          tuple(float(v) for v in rng.normal(size=size * n_a)))
            m = SparseMap((n_a, n_a), tuple(range(n_a)), tuple(range(n_a)), (1.0,) * n_a)
            offsets = (Offset(parent, e, m, tuple(float(v) for v in rng.normal(size=n_batch))),)
        centered = tuple(float(c) for c in rng.uniform(0.0, 1.0, n_batch)) if choice >= 2 else None
        if offsets or centered is not None:
            sites.append(SitePlan(name, shape, batch, offsets, centered, learn_centredness=False))
        earlier.append((name, shape))
    return Plan("random", tuple(sites))


@settings(max_examples=5, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(specs)
def test_random_models_are_reparameterized_exactly(spec):
    model = make_model(spec, subsample=True)
    plan = random_plan(model, spec.y, np.random.default_rng(spec.seed))
    rmodel = autoreparam.reparameterize(model, plan, learn=False)
    rmodel.plan_for(y=spec.y)  # checks the plan on concrete inputs
    original = []
    jax.eval_shape(lambda: original.extend(
        n for n, s in handlers.trace(handlers.seed(model, 0)).get_trace(y=spec.y).items()
        if s["type"] == "sample" and not s["is_observed"]) or 0)
    # the log-Jacobian of the non-centring, once per element; a subsampled element stands for n / b
    subsample_weight = spec.n / max(spec.n // 3, 1)

    @jax.jit
    def log_joints(key):
        tr = handlers.trace(handlers.seed(rmodel, key)).get_trace(y=spec.y)
        latent = {n: s["value"] for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}
        plates = {n: s["value"] for n, s in tr.items() if s["type"] == "plate"}
        lp_reparam, _ = log_density(rmodel, (), {"y": spec.y}, {**latent, **plates})
        lp_orig, otr = log_density(model, (), {"y": spec.y}, {**{n: tr[n]["value"] for n in original}, **plates})
        jac = 0.0
        for s in plan.sites:
            if s.noncentred:
                value = otr[s.name]["value"]
                scale = jnp.broadcast_to(unwrap_distribution(otr[s.name]["fn"]).scale, value.shape)
                c = jnp.reshape(jnp.asarray(s.centredness), s.batch_shape + (1,) * (value.ndim - len(s.batch_shape)))
                jac += (subsample_weight if s.name == "e" else 1.0) * jnp.sum((1.0 - c) * jnp.log(scale))
        return lp_reparam, lp_orig, jac

    lp_reparam, lp_orig, jac = (float(x) for x in log_joints(jax.random.PRNGKey(spec.seed % 1000)))
    note = f"{spec.describe()} plan: {plan}"
    np.testing.assert_allclose(lp_reparam, lp_orig + jac, rtol=1e-4, atol=1e-2, err_msg=note)
