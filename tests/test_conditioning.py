"""Never make the geometry worse: the curvature point, and the conditioning guard of the plan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import autoreparam
import crossed_logistic
from autoreparam import conditioning
from autoreparam.analysis import analyze_model
from autoreparam.curvature import Curvature
from autoreparam.plan import Plan
from autoreparam.planning import build_plan, plan_with_notes

N_PATIENTS, N_VISITS = 12, 6


def tutorial_data(seed=0):
    """NumPyro's hierarchical linear regression tutorial shape: lung capacity near 2,700 per patient."""
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(N_PATIENTS), N_VISITS).astype(np.int32)
    weeks = rng.uniform(0, 60, size=patient.size).astype(np.float32)
    alpha = rng.normal(2700.0, 800.0, N_PATIENTS)
    beta = rng.normal(-8.0, 5.0, N_PATIENTS)
    y = (alpha[patient] + beta[patient] * weeks + rng.normal(0, 150.0, patient.size)).astype(np.float32)
    return (patient, weeks), {"y": y}


def tutorial(patient, weeks, y=None):
    mu_a = numpyro.sample("mu_a", dist.Normal(0.0, 500.0))
    sigma_a = numpyro.sample("sigma_a", dist.HalfNormal(100.0))
    mu_b = numpyro.sample("mu_b", dist.Normal(0.0, 3.0))
    sigma_b = numpyro.sample("sigma_b", dist.HalfNormal(100.0))
    with numpyro.plate("patients", N_PATIENTS):
        alpha = numpyro.sample("alpha", dist.Normal(mu_a, sigma_a))
        beta = numpyro.sample("beta", dist.Normal(mu_b, sigma_b))
    sigma = numpyro.sample("sigma", dist.HalfNormal(100.0))
    with numpyro.plate("visits", len(patient)):
        numpyro.sample("y", dist.Normal(alpha[patient] + beta[patient] * weeks, sigma), obs=y)


SIGMA8 = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], dtype=np.float32)
Y8 = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], dtype=np.float32)


def schools(sigma, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    with numpyro.plate("school", len(sigma)):
        theta = numpyro.sample("theta", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(theta, sigma), obs=y)


@pytest.fixture(scope="module")
def tutorial_analysis():
    """The report and the model trace of the tutorial shape (``analysis.analyze_model``)."""
    args, kwargs = tutorial_data()
    return analyze_model(tutorial, args, kwargs)


@pytest.fixture(scope="module")
def tutorial_report(tutorial_analysis):
    """The same report as ``autoreparam.analyze`` gives (planned through its model trace)."""
    report, model_trace = tutorial_analysis
    return report.attach_planner(functools.partial(plan_with_notes, report, model_trace))


@pytest.fixture(scope="module")
def tutorial_plan(tutorial_report):
    return tutorial_report.plan


@pytest.fixture(scope="module")
def schools_analysis():
    return analyze_model(schools, (SIGMA8,), {"y": Y8})


@pytest.fixture(scope="module")
def schools_geometry(schools_analysis):
    _, mt = schools_analysis
    return conditioning.ReparamGeometry(mt, mt.latent_names, {"theta": ((8,), (), True)}, {})


@pytest.fixture(scope="module")
def tutorial_curvature(tutorial_analysis):
    report, model_trace = tutorial_analysis
    return Curvature(model_trace, None, report.hyperparameters)


def test_curvature_point_reaches_intercepts_far_from_the_start(tutorial_curvature):
    """The MAP over the non-hyperparameters puts the intercepts where the data put them (~2,700),
    not a few prior units from the start where fixed-size first-order steps stop."""
    (patient, weeks), kwargs = tutorial_data()
    y = kwargs["y"]
    unpooled = np.array([np.polyfit(weeks[patient == j], y[patient == j], 1)[1] for j in range(N_PATIENTS)])
    alpha = np.asarray(tutorial_curvature.point["alpha"], dtype=np.float64)
    # Shrunk towards mu_a ~ Normal(0, 500) at the prior-median sigma_a, but thousands from the start.
    assert abs(alpha.mean() - unpooled.mean()) < 0.25 * unpooled.std()


def test_curvature_hvp_reuses_the_map_program_with_the_same_products(tutorial_curvature):
    """At a MAP point the HVP along real non-hyperparameter sites comes from the Newton program,
    and equals the log joint's HVP at the point (the program that also reads the hyperparameters)."""
    curv = tutorial_curvature
    assert curv._map_hvp is not None and {"alpha", "beta", "mu_a"} <= curv._map_sites
    assert "sigma_a" not in curv._map_sites  # a hyperparameter, held fixed by the MAP
    rng = np.random.default_rng(0)
    tangent = {"alpha": rng.standard_normal(N_PATIENTS), "mu_a": rng.standard_normal(())}
    shared = curv.hvp(tangent, read=("alpha", "beta", "mu_a"))
    own = curv.hvp(tangent)  # reads sigma_a too: the point's own HVP program
    assert "sigma_a" not in shared and "sigma_a" in own
    for n in ("alpha", "beta", "mu_a"):
        np.testing.assert_allclose(shared[n], own[n], rtol=1e-4, atol=1e-4 * np.abs(own[n]).max())


def test_tutorial_shape_leaves_the_data_dominated_intercepts_centred(tutorial_plan):
    """Each intercept has informative data: the plan must not non-centre it far (it was 0.01)."""
    plan = tutorial_plan
    if "alpha" in plan.names and plan["alpha"].noncentred:
        assert min(plan["alpha"].centredness) >= 0.5
    else:
        assert "alpha" not in plan.names or not plan["alpha"].noncentred


def test_guard_drops_a_harmful_noncentring_and_says_so(tutorial_analysis, tutorial_curvature):
    """Partially non-centring the data-dominated intercepts (as the centredness estimate proposes)
    worsens the conditioning: the guard drops it, with a note naming the site (str and JSON)."""
    unguarded = build_plan(*tutorial_analysis, guard=False)
    for centredness in (None, 0.5):
        plan = unguarded if centredness is None else unguarded.with_centredness("alpha", centredness)
        assert plan["alpha"].noncentred
        kept, notes, figures = conditioning.check_plan_sites(tutorial_curvature, list(plan.sites),
                                                             dict(plan.anchors))
        assert "alpha" not in [s.name for s in kept if s.noncentred]
        assert figures["plan"] > conditioning.WORSE_FACTOR * figures["original"]
        assert figures["kept"] <= conditioning.WORSE_FACTOR * figures["original"]
        assert any("non-centring of alpha" in n for n in notes)

    noted = Plan(plan.model, tuple(kept), plan.candidates, plan.latent, plan.init, plan.anchors, plan.xi_step,
                 notes=tuple(notes))
    assert "non-centring of alpha" in str(noted)
    again = Plan.from_json(noted.to_json())
    assert again.notes == noted.notes


def test_default_plan_lists_what_the_guard_dropped(tutorial_report, tutorial_plan):
    """The default plan of the tutorial shape leaves alpha centred and says why, in plan and report."""
    plan = tutorial_plan
    assert "alpha" not in plan.names or not plan["alpha"].noncentred
    assert any("non-centring of alpha" in note for note in plan.notes)
    for note in plan.notes:
        assert note in tutorial_report.notes
        assert note in str(plan)
        assert note in str(tutorial_report)


def test_guard_keeps_the_helpful_noncentring_of_weak_data(schools_analysis):
    """Eight schools (weak data, a funnel): non-centring helps and is kept, with no note."""
    plan = build_plan(*schools_analysis)
    assert plan["theta"].noncentred
    assert max(plan["theta"].centredness) < 0.5
    assert not plan.notes


def _schools_point():
    return {"mu": jnp.asarray(4.0), "tau": jnp.asarray(3.0),
            "theta": jnp.asarray(np.linspace(-2.0, 9.0, 8), dtype=jnp.float32)}


def test_reparameterized_hessian_matches_a_hand_written_noncentred_model(schools_geometry):
    """The change of variables written from the plan's data equals NumPyro's LocScaleReparam by hand."""
    geometry = schools_geometry
    c = np.linspace(0.1, 0.9, 8).astype(np.float32)
    knobs = {"xi": {}, "centredness": {"theta": jnp.asarray(c)}}
    point = _schools_point()
    _, dense, n = geometry.operator(point, knobs)

    def neg_log_joint(flat):
        mu, log_tau, z = flat[0], flat[1], flat[2:]
        tau = jnp.exp(log_tau)
        theta = mu + tau ** (1 - c) * (z - c * mu)
        lp = dist.Normal(0.0, 5.0).log_prob(mu) + dist.HalfCauchy(5.0).log_prob(tau) + log_tau
        lp += dist.Normal(c * mu, tau ** c).log_prob(z).sum()
        lp += dist.Normal(theta, SIGMA8).log_prob(Y8).sum()
        return -lp

    mu, tau, theta = point["mu"], point["tau"], point["theta"]
    z = c * mu + (theta - mu) / tau ** (1 - c)
    expected = np.asarray(jax.hessian(neg_log_joint)(jnp.concatenate([jnp.stack([mu, jnp.log(tau)]), z])))
    assert n == 10
    np.testing.assert_allclose(dense, expected, rtol=2e-3, atol=1e-5 * np.abs(expected).max())


def test_condition_number_matches_dense_eigenvalues(monkeypatch, schools_geometry):
    """Dense path: exactly the eigenvalue ratio of D^-1/2 H D^-1/2; Lanczos path (HVPs only): close to it."""
    geometry = schools_geometry
    knobs = {"xi": {}, "centredness": {"theta": jnp.full(8, 0.3)}}
    point = _schools_point()
    hvp, dense, n = geometry.operator(point, knobs)
    d = np.sqrt(np.abs(np.diag(dense)))
    ev = np.abs(np.linalg.eigvals(dense / d[:, None] / d[None, :]))
    exact = ev.max() / ev.min()
    assert conditioning.condition_number(hvp, n, dense) == pytest.approx(exact, rel=1e-6)

    monkeypatch.setattr(conditioning, "DENSE_LIMIT", 0)
    hvp_free, no_dense, n_free = geometry.operator(point, knobs)
    assert no_dense is None and n_free == n
    np.testing.assert_allclose(hvp_free(np.eye(n)[3]), dense[:, 3], rtol=1e-4, atol=1e-6)
    lanczos = conditioning.condition_number(hvp_free, n_free, None, steps=n)
    assert lanczos == pytest.approx(exact, rel=0.5)


def test_lanczos_finds_the_extreme_eigenvalues():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.standard_normal((50, 50)))
    eigenvalues = np.geomspace(0.01, 100.0, 50)
    m = (q * eigenvalues) @ q.T
    ritz = conditioning.lanczos_eigenvalues(lambda v: m @ v, 50, 50)
    assert ritz.min() == pytest.approx(eigenvalues.min(), rel=1e-6)
    assert ritz.max() == pytest.approx(eigenvalues.max(), rel=1e-6)


def _sample_shape_funnel(g, y=None):
    abar = numpyro.sample("abar", dist.Normal(0, 1.5))
    sigma = numpyro.sample("sigma", dist.Exponential(1))
    a = numpyro.sample("a", dist.Normal(abar, sigma), sample_shape=(6,))  # as the Rethinking ports write it
    numpyro.sample("y", dist.Normal(a[g], 2.0), obs=y)


def _sample_shape_of_a_batch(g, y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfNormal(1))
    a = numpyro.sample("a", dist.Normal(mu * jnp.ones(2), tau), sample_shape=(6,))  # (6, 2): sample dims first
    numpyro.sample("y", dist.Normal(a[g, 0] + a[g, 1], 1.0), obs=y)


@pytest.mark.parametrize("model", [_sample_shape_funnel, _sample_shape_of_a_batch])
def test_guard_runs_on_sites_sampled_with_sample_shape(model):
    g = np.repeat(np.arange(6), 2)
    y = np.random.default_rng(0).normal(size=12)
    report = autoreparam.analyze(model, g, y=y)
    plan = report.plan
    assert plan["a"].noncentred
    assert not any("could not run" in note for note in plan.notes), plan.notes


def _with_prng_key(g, y=None):
    jitter = jax.random.normal(numpyro.prng_key(), (len(g),)) * 0.1  # a prng_key message has no name
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", 6):
        a = numpyro.sample("a", dist.Normal(0.0, tau))
    numpyro.sample("y", dist.Normal(a[g] + jitter, 2.0), obs=y)


def _numpy_indexed_subsample(g, x, y=None):
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", 6):
        a = numpyro.sample("a", dist.Normal(0.0, tau))
    with numpyro.plate("n", len(g), subsample_size=8) as idx:
        # numpy indexing by the subsample: traced, it cannot be; given (ModelTrace.subsamples) it is
        numpyro.sample("y", dist.Normal(a[g[idx]] + x[idx], 2.0), obs=y[idx])


def _size_from_data(g, x, y=None):
    n_groups = int(jnp.max(jnp.asarray(g))) + 1  # staged, this fails: the eager rerun must start afresh
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", n_groups):
        a = numpyro.sample("a", dist.Normal(0.0, tau))
    numpyro.sample("y", dist.Normal(a[g] + x, 2.0), obs=y)


@pytest.mark.parametrize("model", [_with_prng_key, _numpy_indexed_subsample, _size_from_data])
def test_guard_runs_on_models_that_draw_keys_or_index_in_numpy(model):
    g = np.repeat(np.arange(6), 4)
    data = np.random.default_rng(1).normal(size=24).astype(np.float32)
    args = (g,) if model is _with_prng_key else (g, data)
    plan = autoreparam.analyze(model, *args, y=data).plan
    assert plan["a"].noncentred
    assert not any("could not run" in note for note in plan.notes), plan.notes


def _asymmetric_funnel(g, y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 1.5))
    s = numpyro.sample("s", dist.Exponential(1))
    with numpyro.plate("groups", 6):
        a = numpyro.sample("a", dist.AsymmetricLaplace(mu, s, 1.5))
    numpyro.sample("y", dist.Normal(a[g], 5.0), obs=y)


def test_plan_does_not_non_centre_a_family_it_cannot():
    """The plan itself (CLI, emitter, reparameterize(model, plan)) leaves it centred, with a note."""
    g = np.repeat(np.arange(6), 2)
    report = autoreparam.analyze(_asymmetric_funnel, g, y=np.zeros(12))
    assert "a" in {f.site for f in report.funnels}
    assert "a" not in report.plan.names
    assert any(note.startswith("site 'a' is AsymmetricLaplace, which autoreparam cannot non-centre")
               for note in report.notes)


# -- offsets fitted where the hyperparameters are not ---------------------------------------------
G_VAGUE, N_VAGUE = 20, 4


def _vague_scale_data():
    """Small group effects (spread 0.15) under a vague HalfNormal(10) scale (prior median 6.7)."""
    rng = np.random.default_rng(0)
    g = np.repeat(np.arange(G_VAGUE), N_VAGUE).astype(np.int32)
    a = rng.normal(0.0, 0.15, G_VAGUE)
    return g, (1.0 + a[g] + rng.normal(0.0, 1.0, g.size)).astype(np.float32)


def _vague_scale_effects(g, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    s = numpyro.sample("s", dist.HalfNormal(10.0))
    # An MVN funnel, which the default plan non-centres by its Cholesky factor; the tests below plan
    # with noncentre=False to keep its offsets.
    with numpyro.plate("groups", G_VAGUE):
        a = numpyro.sample("a", dist.MultivariateNormal(jnp.zeros(1), scale_tril=s * jnp.eye(1)))
    numpyro.sample("y", dist.Normal(mu + a[g, 0], 1.0), obs=y)


@pytest.fixture(scope="module")
def vague_scale_analysis():
    g, y = _vague_scale_data()
    return analyze_model(_vague_scale_effects, (g,), {"y": y})


def test_guard_drops_an_offset_fitted_at_a_vague_prior_median(vague_scale_analysis, monkeypatch):
    """At the prior median of s the data dominate each effect, so the offset a <- mu gets xi -0.99;
    where the data put s (about 0.2) the prior dominates and that coupling ties every effect to mu.
    The whole log joint's conditioning at the prior median and a factor e either side does not see
    it; the conditional geometry of a and mu at the empirical-Bayes s does, and the offset goes."""
    monkeypatch.setattr(conditioning, "OFFSETS_CHECK", True)  # off by default until the tensor case is settled
    unguarded = build_plan(*vague_scale_analysis, noncentre=False, guard=False)
    assert min(unguarded["a"].offsets[0].init) < -0.9
    plan = build_plan(*vague_scale_analysis, noncentre=False)
    assert "a" not in plan.names or not plan["a"].offsets
    note = next(n for n in plan.notes if "offset a <- mu" in n)
    assert "not where the data put them (s 0.2" in note
    assert note in str(plan)


def test_empirical_bayes_point_finds_the_scale_the_data_say(vague_scale_analysis):
    """The second point of the offsets' check: s near the effects' spread, not its prior median."""
    report, model_trace = vague_scale_analysis
    curv = Curvature(model_trace, None, report.hyperparameters)
    plan = build_plan(report, model_trace, noncentre=False, guard=False)
    site = plan["a"]
    off = site.offsets[0]
    specs = {"a": (tuple(site.batch_shape), ((off.parent, off.absorb, jnp.asarray(dict(plan.anchors)["mu"])),), False)}
    geometry = conditioning.ReparamGeometry(model_trace, curv.names, specs, {})
    knobs = {"xi": {("a", "mu"): jnp.zeros(site.batch_shape)}, "centredness": {}}
    centre, moved = conditioning.offset_points(geometry, curv, report.hyperparameters, knobs)
    assert float(centre["s"]) > 3.0
    assert 0.1 < float(moved["s"]) < 0.5


def test_change_of_variables_of_a_sample_shaped_batch_matches_a_hand_written_one():
    """The guard's log joint when a non-centred site's sample_shape dims come before its batch dims:
    each column j of a (6, 2) site has its own centredness c_j."""
    g = np.repeat(np.arange(6), 2)
    y = np.random.default_rng(0).normal(size=12).astype(np.float32)
    report, mt = analyze_model(_sample_shape_of_a_batch, (g,), {"y": y})
    c = np.array([0.2, 0.7], np.float32)
    geometry = conditioning.ReparamGeometry(mt, mt.latent_names, {"a": ((2,), (), True)}, {})
    knobs = {"xi": {}, "centredness": {"a": jnp.asarray(c)}}
    u = {"mu": jnp.asarray(0.3), "tau": jnp.asarray(-0.4),
         "a": jnp.asarray(np.random.default_rng(1).normal(size=(6, 2)), dtype=jnp.float32)}

    def neg_log_joint(mu, log_tau, z):
        tau = jnp.exp(log_tau)
        a = mu + tau ** (1 - c) * (z - c * mu)
        lp = dist.Normal(0, 5).log_prob(mu) + dist.HalfNormal(1).log_prob(tau) + log_tau
        lp += dist.Normal(c * mu, tau ** c).log_prob(z).sum()
        lp += dist.Normal(a[g, 0] + a[g, 1], 1.0).log_prob(y).sum()
        return -lp

    expected = float(neg_log_joint(u["mu"], u["tau"], u["a"]))
    assert float(geometry._value(u, knobs)) == pytest.approx(expected, rel=1e-5)


def test_the_guard_runs_beside_a_multivariate_normal_funnel():
    """A MultivariateNormal funnel (a Cholesky factor, no scale) beside a loc-scale funnel: the guard's
    centre looked up the MVN site's scale and failed (KeyError), leaving every such plan unchecked."""
    from autoreparam.notes import NoteKind

    def model(g, h, y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", dist.HalfNormal(1.0))
        with numpyro.plate("groups", 6):
            a = numpyro.sample("a", dist.Normal(mu, tau))
        sd = numpyro.sample("sd", dist.HalfNormal(1.0).expand([2]).to_event(1))
        with numpyro.plate("k", 3):
            b = numpyro.sample("b", dist.MultivariateNormal(jnp.zeros(2), scale_tril=jnp.diag(sd)))
        with numpyro.plate("n", len(g)):
            numpyro.sample("y", dist.Normal(a[g] + b[h, 0] + b[h, 1], 1.0), obs=y)

    g, h = np.arange(24) % 6, np.arange(24) % 3
    plan = autoreparam.analyze(model, g, h, y=np.random.default_rng(0).normal(size=24).astype(np.float32)).plan
    assert plan["b"].cholesky and plan["a"].noncentred
    assert [n for n in plan.notes if n.kind is NoteKind.GUARD_FAILED] == []


# -- the likelihood's curvature from its linear predictors ------------------------------------------
ROW = np.repeat(np.arange(6), 4).astype(np.int32)
# examples/crossed_logistic.py on 6 x 4 levels, every cell observed once
CROSSED_ARGS, CROSSED_KWARGS = crossed_logistic.model_args(num_rows=6, num_cols=4, num_obs=24)
COUNTS = (np.arange(24) % 5).astype(np.float32)
GROUP = np.repeat(np.arange(10), 1000).astype(np.int32)


def scaled_poisson(row, y=None):
    """A log link, under ``handlers.scale`` and ``mask``."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("rows", 6):
        a = numpyro.sample("a", dist.Normal(mu, tau))
    with numpyro.handlers.scale(scale=3.0), numpyro.handlers.mask(mask=np.arange(len(row)) % 4 != 1):
        with numpyro.plate("obs", len(row)):
            numpyro.sample("y", dist.Poisson(jnp.exp(a[row])), obs=y)


def subsampled_events(row, y=None):
    """The observations as one event (``to_event``), and a subsampled plate of them."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("rows", 6):
        a = numpyro.sample("a", dist.Normal(mu, tau))
    numpyro.sample("y", dist.Normal(a[row], 0.7).to_event(1), obs=y)
    with numpyro.plate("again", len(row), subsample_size=12) as idx:
        numpyro.sample("y2", dist.Normal(a[row[idx]], 0.7), obs=y[idx])


def sheared_by_data(group, y=None):
    """Where float32 sums of the data's curvature cancel after an offset (xi near -1): 1,000
    observations of sd 0.01 per group."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", 10):
        a = numpyro.sample("a", dist.Normal(0.0, tau))
    with numpyro.plate("obs", len(group)):
        numpyro.sample("y", dist.Normal(mu + a[group], 0.01), obs=y)


def _sheared_data():
    rng = np.random.default_rng(3)
    return (GROUP,), {"y": (1.0 + rng.normal(0, 0.3, 10)[GROUP] + rng.normal(0, 0.01, GROUP.size)).astype(np.float32)}


def weibull_scale(group, y=None, z=None):
    """A parameter that is not the first by name (Weibull: concentration, scale): the maps' rows."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", 10):
        a = numpyro.sample("a", dist.Normal(mu, tau))
    with numpyro.plate("obs", len(group)):
        numpyro.sample("y", dist.Normal(a[group], 1.0), obs=y)
        numpyro.sample("z", dist.Weibull(jnp.exp(mu + a[group]), 1.5), obs=z)


def scaled_by_a_latent(group, y=None):
    """``c`` reaches the likelihood only as ``handlers.scale``'s factor, flat at its prior median 0."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", 10):
        a = numpyro.sample("a", dist.Normal(mu, tau))
    c = numpyro.sample("c", dist.Normal(0.0, 1.0))
    with numpyro.handlers.scale(scale=jnp.exp(c ** 2)), numpyro.plate("obs", len(group)):
        numpyro.sample("y", dist.Normal(a[group], 1.0), obs=y)


def truncated_by_a_latent(group, y=None, z=None):
    """``b`` reaches ``z`` through a truncated law, whose parameters (low, high) do not show it."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", 10):
        a = numpyro.sample("a", dist.Normal(mu, tau))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("obs", len(group)):
        numpyro.sample("y", dist.Normal(a[group], 1.0), obs=y)
    with numpyro.plate("obs2", 40):
        numpyro.sample("z", dist.TruncatedNormal(b ** 2 + jnp.zeros(40), 0.5, low=-3.0), obs=z)


def one_scaled_beside_much_data(group, y=None):
    """``c`` scales one observation beside 10,000 of sd 0.01: its curvature (32) is far below the
    data's, so it must not hide under a tolerance taken from the largest entries."""
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", 10):
        a = numpyro.sample("a", dist.Normal(0.0, tau))
    c = numpyro.sample("c", dist.Normal(0.0, 1.0))
    with numpyro.plate("obs", len(group)):
        numpyro.sample("y", dist.Normal(mu + a[group], 0.01), obs=y)
    with numpyro.handlers.scale(scale=jnp.exp(c ** 2)):
        numpyro.sample("y0", dist.Normal(mu + a[0], 1.0), obs=7.0)


SMALL_GROUP = GROUP[::100]
SMALL_Y = np.sin(np.arange(SMALL_GROUP.size, dtype=np.float32))
HIDDEN_CASES = {
    "scaled_by_a_latent": (scaled_by_a_latent, (SMALL_GROUP,), {"y": SMALL_Y}),
    "truncated_by_a_latent": (truncated_by_a_latent, (SMALL_GROUP,),
                              {"y": SMALL_Y, "z": np.cos(np.arange(40, dtype=np.float32))}),
    "one_scaled_beside_much_data": (one_scaled_beside_much_data, *_sheared_data()),
}

STRUCTURED_CASES = {
    "weibull_scale": (weibull_scale, (SMALL_GROUP,), {"y": SMALL_Y, "z": 1.0 + SMALL_Y ** 2}),
    "crossed_logistic": (crossed_logistic.model, CROSSED_ARGS, CROSSED_KWARGS),
    "scaled_poisson": (scaled_poisson, (ROW,), {"y": COUNTS}),
    "subsampled_events": (subsampled_events, (ROW,), {"y": COUNTS - 2.0}),
    "sheared_by_data": (sheared_by_data, *_sheared_data()),
}


def _guard_hessians(monkeypatch, model, args, kwargs, predictors=None):
    """The guard's Hessians by the linear predictors next to the model's own, at every point and
    plan subset the guard visits, and the plan; ``predictors`` replaces ``linear_predictors``."""
    from autoreparam import planning
    from autoreparam.api import analyze

    monkeypatch.setattr(conditioning, "STRUCTURED_MIN_WORK", 0)
    if predictors is not None:
        monkeypatch.setattr(planning, "linear_predictors", predictors)
    pairs, fell_back = [], []
    operator, decide = conditioning.ReparamGeometry.operator, conditioning.ReparamGeometry.use_structured_at

    def spy_decide(self, points):
        structured = bool(self.likelihood)
        if structured and not decide(self, points):
            fell_back.append(True)
        return bool(self.likelihood)

    def spy(self, theta, knobs, sites=None):
        structured = bool(self.likelihood)
        out = operator(self, theta, knobs, sites)
        if structured and not self.likelihood:
            fell_back.append(True)
        if self.likelihood:
            dense = np.asarray(self._dense(theta, knobs, np.eye(out[2], dtype=np.float32)), np.float64)
            pairs.append((out[1], 0.5 * (dense + dense.T)))
        return out

    monkeypatch.setattr(conditioning.ReparamGeometry, "operator", spy)
    monkeypatch.setattr(conditioning.ReparamGeometry, "use_structured_at", spy_decide)
    plan = analyze(model, *args, **kwargs).plan
    return pairs, fell_back, plan


@pytest.mark.parametrize("case", sorted(STRUCTURED_CASES))
def test_the_guards_hessian_by_linear_predictors_is_the_models_own(monkeypatch, case):
    model, args, kwargs = STRUCTURED_CASES[case]
    pairs, fell_back, _ = _guard_hessians(monkeypatch, model, args, kwargs)
    assert pairs and not fell_back
    for structured, dense in pairs:
        assert np.abs(structured - dense).max() <= 1e-5 * np.abs(dense).max()
        kappa = conditioning.condition_number(None, len(dense), dense)
        if kappa < 1e5:  # beyond, float32 rounding of the model's own Hessian decides its smallest eigenvalue
            assert conditioning.condition_number(None, len(dense), structured) == pytest.approx(kappa, rel=1e-3)


@pytest.mark.parametrize("case", sorted(HIDDEN_CASES))
def test_a_latent_site_the_likelihood_reads_outside_its_parameters_falls_back(monkeypatch, case):
    """Its gradient vanishes at the guard's points, but not its curvature: the Hessian-vector check
    sees it, and the guard keeps the model's own Hessian and plan."""
    from autoreparam.api import analyze

    model, args, kwargs = HIDDEN_CASES[case]
    _, fell_back, plan = _guard_hessians(monkeypatch, model, args, kwargs)
    assert fell_back
    monkeypatch.setattr(conditioning, "STRUCTURED_MIN_WORK", float("inf"))
    assert plan.to_json() == analyze(model, *args, **kwargs).plan.to_json()


def test_linear_predictors_need_every_latent_parent_as_a_term():
    """A latent observation scale is read outside the predictor: the guard keeps the model's Hessian."""
    report = analyze_model(tutorial, *tutorial_data())[0]
    latent = {n for n, s in report.sites.items() if s.type == "latent"}
    assert conditioning.linear_predictors(report.terms, report.parents, latent) is None
    report = analyze_model(crossed_logistic.model, CROSSED_ARGS, CROSSED_KWARGS)[0]
    latent = {n for n, s in report.sites.items() if s.type == "latent"}
    (predictor,) = conditioning.linear_predictors(report.terms, report.parents, latent)
    assert (predictor.observed, predictor.param) == ("y", "logits")
    assert sorted(site for site, _ in predictor.terms) == ["a", "b", "mu"]


def hidden_scale(group, y=None):
    """``b`` reaches ``y`` through a deterministic site, with no gradient at its prior median 0."""
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", 10):
        a = numpyro.sample("a", dist.Normal(0.0, tau))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    s = numpyro.deterministic("s", jnp.exp(b ** 2))
    with numpyro.plate("obs", len(group)):
        numpyro.sample("y", dist.Normal(a[group], s), obs=y)


def test_a_latent_site_read_through_a_deterministic_one_is_read():
    group = GROUP[::100]
    report = analyze_model(hidden_scale, (group,), {"y": np.sin(np.arange(group.size)).astype(np.float32)})[0]
    assert report.parents["y"] == {"a", "s"}
    latent = {n for n, s in report.sites.items() if s.type == "latent"}
    assert conditioning.linear_predictors(report.terms, report.parents, latent) is None


def test_a_predictor_the_model_contradicts_falls_back_to_its_own_hessian(monkeypatch):
    """The likelihood's gradient is checked against the predictors at every point: a map that is
    wrong (here twice the true one) leaves the model's own Hessian, and the same plan."""
    from autoreparam.linear_maps import GatherMap

    def doubled(terms, parents, latent):
        found = conditioning.linear_predictors(terms, parents, latent)
        return tuple(conditioning.LinearPredictor(p.observed, p.param, tuple(
            (site, GatherMap(m.index, 2.0 * m.coef, m.n_in)) for site, m in p.terms)) for p in found)

    _, fell_back, plan = _guard_hessians(monkeypatch, crossed_logistic.model, CROSSED_ARGS, CROSSED_KWARGS, doubled)
    assert fell_back
    monkeypatch.setattr(conditioning, "STRUCTURED_MIN_WORK", float("inf"))
    from autoreparam.api import analyze
    assert plan.to_json() == analyze(crossed_logistic.model, *CROSSED_ARGS, **CROSSED_KWARGS).plan.to_json()
