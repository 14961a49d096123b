"""Plans: the analytic xi, JSON round trips, edits and their errors, ``str``, load/save.

The analytic xi is checked on the normal-normal model against two closed forms: minus the
shrinkage factor ``n_i tau^2 / (n_i tau^2 + sigma^2)`` and the posterior regression slope of
``a_i`` on ``mu`` computed from the exact Gaussian posterior covariance.
"""

import dataclasses
import json
import os
import resource
import signal

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import numpyro.primitives
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density

import autoreparam
import zoo
from helpers import one_line
from autoreparam import ConditionalOffsetReparam, InputError, Plan, PlanError
from autoreparam.plan import Offset, SparseMap
from autoreparam.analysis import analyze_model
from autoreparam.reparam import apply_config, build_config


# -- the normal-normal model: y_ij ~ Normal(mu + a_i, sigma), a_i ~ Normal(0, tau) -------------
SIGMA, TAU, S_MU = 0.8, 1.3, 10.0
N_I = np.array([1, 2, 5, 12, 30])  # unbalanced groups
GROUP = np.repeat(np.arange(N_I.size), N_I)
Y_NN = np.random.default_rng(2).normal(1.0, 1.0, GROUP.size).astype(np.float32)


def normal_normal(group, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, S_MU))
    with numpyro.plate("groups", N_I.size):
        a = numpyro.sample("a", dist.Normal(0.0, TAU))
    with numpyro.plate("data", group.shape[0]):
        numpyro.sample("y", dist.Normal(mu + a[group], SIGMA), obs=y)


def exact_posterior_covariance():
    """Covariance of (mu, a_1..a_K) under the exact Gaussian posterior (known sigma, tau)."""
    k = N_I.size
    prec = np.zeros((k + 1, k + 1))
    prec[0, 0] = N_I.sum() / SIGMA**2 + 1.0 / S_MU**2
    prec[0, 1:] = prec[1:, 0] = N_I / SIGMA**2
    prec[1:, 1:] = np.diag(N_I / SIGMA**2 + 1.0 / TAU**2)
    return np.linalg.inv(prec)


@pytest.fixture(scope="module")
def nn_report():
    return autoreparam.analyze(normal_normal, GROUP, y=Y_NN)


@pytest.fixture(scope="module")
def nn_plan(nn_report):
    return nn_report.plan


def test_analytic_xi_is_minus_the_shrinkage_factor(nn_plan):
    assert nn_plan.names == ("a",)
    (off,) = nn_plan["a"].offsets
    assert off.parent == "mu"
    xi = np.asarray(off.init)
    expected = -N_I * TAU**2 / (N_I * TAU**2 + SIGMA**2)
    np.testing.assert_allclose(xi, expected, rtol=1e-3)
    # unbalanced groups get different xi: the test is not fooled by a single shared value
    assert np.ptp(expected) > 0.2


def test_analytic_xi_is_the_posterior_regression_slope(nn_plan):
    cov = exact_posterior_covariance()
    slope = cov[0, 1:] / cov[0, 0]  # E[a_i | mu] = const + slope_i * mu
    np.testing.assert_allclose(np.asarray(nn_plan["a"].offsets[0].init), slope, rtol=1e-3)


@pytest.mark.parametrize("at", ["median", "map", {"mu": 3.0, "a": np.ones(N_I.size)}])
def test_analytic_xi_of_a_gaussian_model_does_not_depend_on_the_point(nn_report, nn_plan, at):
    plan = nn_report.make_plan(at=at)
    np.testing.assert_allclose(plan["a"].offsets[0].init, nn_plan["a"].offsets[0].init, rtol=1e-3)


def test_zero_init_plan(nn_report):
    plan = nn_report.make_plan(init="zero")
    assert plan.init == "zero" and plan.names == ("a",)
    assert all(v == 0.0 for v in plan["a"].offsets[0].init)
    assert plan.xi_step == 1.0


@pytest.mark.parametrize("kwargs, word", [
    (dict(init="exact"), "init"),
    (dict(init=None), "init"),
    (dict(noncentre="sometimes"), "noncentre"),
    (dict(at="mode"), "at"),
    (dict(at={"nope": 1.0}), "nope"),
])
def test_make_plan_bad_options(nn_report, kwargs, word):
    with pytest.raises(InputError) as info:
        nn_report.make_plan(**kwargs)
    assert word in one_line(info.value)


# -- a crossed model with two offset sites, and eight schools (a non-centred site) -------------
@pytest.fixture(scope="module")
def crossed():
    zm = zoo.by_name("crossed")
    report = autoreparam.analyze(zm.model, *zm.args, **zm.kwargs)
    return zm, report.plan


@pytest.fixture(scope="module")
def schools():
    zm = zoo.by_name("eight_schools")
    report = autoreparam.analyze(zm.model, *zm.args, **zm.kwargs)
    return zm, report


def test_crossed_plan_structure(crossed):
    _, plan = crossed
    assert plan.names == ("a", "b")
    assert plan["a"].parents == ("mu",)
    assert plan["b"].parents == ("mu", "a")
    assert plan["a"].shape == (5,) and plan["a"].batch_shape == (5,)
    for s in plan.sites:
        for off in s.offsets:
            assert len(off.init) == int(np.prod(s.batch_shape))
            assert off.E.shape[0] == int(np.prod(s.shape))
    assert {c for c, _ in plan.anchors} == {"mu", "a"}
    assert not plan.is_empty()


def test_json_round_trip_gives_an_equal_plan(crossed, schools):
    for plan in (crossed[1], schools[1].plan):
        text = json.dumps(plan.to_json())
        back = Plan.from_json(json.loads(text))
        assert back == plan
        assert back.candidates == plan.candidates  # not part of ==, but kept
        assert back.anchors == plan.anchors and back.xi_step == plan.xi_step
        assert str(back) == str(plan)


def _log_joint(model, plan, args, kwargs, seed=0):
    """Log joint of the reparameterized model at a prior draw, with random xi params."""
    rmodel = autoreparam.reparameterize(model, plan)
    tr = handlers.trace(handlers.seed(rmodel, seed)).get_trace(*args, **kwargs)
    rng = np.random.default_rng(seed)
    params = {n: jnp.asarray(rng.normal(size=np.shape(s["value"])), jnp.float32)
              for n, s in tr.items() if s["type"] == "param" and "_offset_" in n}
    values = {n: s["value"] for n, s in tr.items() if s["type"] == "sample" and not s["is_observed"]}
    return float(log_density(rmodel, args, kwargs, {**params, **values})[0]), params


def test_save_load_gives_an_equal_plan_and_identical_log_joint(crossed, tmp_path):
    zm, plan = crossed
    path = tmp_path / "plan.json"
    plan.save(path)
    assert json.loads(path.read_text())["format"] == 1
    loaded = Plan.load(path)
    assert loaded == plan
    lp, params = _log_joint(zm.model, plan, zm.args, zm.kwargs)
    lp_loaded, params_loaded = _log_joint(zm.model, loaded, zm.args, zm.kwargs)
    assert set(params) == {"a_offset_mu", "b_offset_mu", "b_offset_a"} == set(params_loaded)
    assert lp == lp_loaded
    # save also accepts a str path and overwrites
    plan.without_site("a").save(str(path))
    assert Plan.load(str(path)).names == ("b",)



def test_plan_saved_with_the_former_field_names_loads(schools):
    """Plans written before the names were settled ("centers", "centered", "learn_centered") load."""
    plan = schools[1].plan
    assert plan.anchors or any(s.noncentred for s in plan.sites)
    data = plan.to_json()
    data["centers"] = data.pop("anchors")
    for site in data["sites"]:
        site["centered"], site["learn_centered"] = site.pop("centredness"), site.pop("learn_centredness")
    assert Plan.from_json(json.loads(json.dumps(data))) == plan

# -- edits ---------------------------------------------------------------------------------------
def test_without_site(crossed):
    _, plan = crossed
    edited = plan.without_site("a")
    assert edited.names == ("b",)
    assert edited["b"] == plan["b"]
    assert plan.names == ("a", "b")  # the original is untouched (frozen data)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.sites = ()
    with pytest.raises(PlanError) as info:
        plan.without_site("nope")
    assert "nope" in one_line(info.value)
    # mu is a latent site but not in the plan
    with pytest.raises(PlanError) as info:
        plan.without_site("mu")
    assert "mu" in one_line(info.value)


def test_without_parent(crossed):
    _, plan = crossed
    edited = plan.without_parent("b", "a")
    assert edited["b"].parents == ("mu",)
    assert edited["a"] == plan["a"]
    assert plan["b"].parents == ("mu", "a")
    # removing the only offset of a centred site drops the site from the plan
    assert plan.without_parent("a", "mu").names == ("b",)
    with pytest.raises(PlanError) as info:
        plan.without_parent("b", "sigma")
    msg = one_line(info.value)
    assert "'b'" in msg and "sigma" in msg and "mu" in msg  # lists the parents it has
    with pytest.raises(PlanError) as info:
        plan.without_parent("nope", "mu")
    assert "nope" in one_line(info.value)


def test_with_parent_restores_an_offset(crossed):
    _, plan = crossed
    assert plan.without_parent("b", "a").with_parent("b", "a") == plan
    assert plan.without_parent("b", "mu").with_parent("b", "mu") == plan  # program order kept
    assert plan.without_site("a").with_parent("a", "mu") == plan
    assert plan.with_parent("b", "a") == plan  # already there: no change
    with pytest.raises(PlanError) as info:
        plan.with_parent("b", "sigma")
    msg = one_line(info.value)
    assert "'b'" in msg and "sigma" in msg
    with pytest.raises(PlanError) as info:
        plan.with_parent("nope", "mu")
    assert "nope" in one_line(info.value)


def test_with_centredness(crossed, schools):
    _, plan = crossed
    nc = plan.with_centredness("a", 0.25, learn=False)
    assert nc["a"].centredness == (0.25,) * 5 and not nc["a"].learn_centredness
    assert nc["a"].offsets == plan["a"].offsets and nc["a"].noncentred
    assert plan["a"].centredness is None
    for back in (nc.with_centredness("a", None), nc.with_centredness("a", 1)):
        assert back["a"].centredness is None and not back["a"].noncentred
        assert back["a"].offsets == plan["a"].offsets and back["b"] == plan["b"]
    assert plan.with_centredness("a", None) == plan
    assert plan.with_centredness("a", 0.0)["a"].centredness == (0.0,) * 5
    # a latent site that is not in the plan yet is added, in program order
    with_mu = plan.with_centredness("mu", 0.5)
    assert with_mu.names == ("mu", "a", "b") and with_mu["mu"].centredness == (0.5,)
    # eight schools: theta is a funnel and is non-centred by default; it can be forced centred
    schools_plan = schools[1].plan
    assert schools_plan["theta"].noncentred and schools_plan["theta"].offsets == ()
    centred = schools_plan.with_centredness("theta", None)
    assert centred.is_empty() and centred.names == ()
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(PlanError) as info:
            plan.with_centredness("a", bad)
        msg = one_line(info.value)
        assert "'a'" in msg and "[0, 1]" in msg
    with pytest.raises(PlanError) as info:
        plan.with_centredness("nope", 0.5)
    assert "nope" in one_line(info.value)


def test_str_is_readable(crossed, schools):
    _, plan = crossed
    text = str(plan)
    lines = text.splitlines()
    assert lines[0].startswith("plan for crossed_model: 2 sites with offsets, 0 non-centred")
    assert len(lines) == 3
    a_line = next(ln for ln in lines if ln.strip().startswith("a "))
    b_line = next(ln for ln in lines if ln.strip().startswith("b "))
    assert "mu" in a_line and "mu" in b_line and " a " in b_line.replace("(", " ")
    assert "xi" in b_line
    nc = str(schools[1].plan)
    assert "theta" in nc and "non-centred" in nc.splitlines()[1]
    empty = str(schools[1].make_plan(noncentre=False))
    assert "0 sites with offsets, 0 non-centred" in empty and "empty" in empty


def test_build_config(crossed):
    _, plan = crossed
    config = build_config(plan)
    assert list(config) == ["a", "b"]
    assert all(isinstance(r, ConditionalOffsetReparam) for r in config.values())
    assert config["b"].site == plan["b"]
    assert "'b'" in repr(config["b"]) and "'mu', 'a'" in repr(config["b"])
    assert config.plan is plan
    assert callable(config.record(lambda: None)) and callable(apply_config(lambda: None, config))
    assert build_config(plan.without_site("a").without_site("b")) == {}


# -- load / save ---------------------------------------------------------------------------------
@pytest.mark.parametrize("content, word", [
    (None, "no such"),  # missing file
    ("{not json", "JSON"),
    ("", "JSON"),
    ("[1, 2, 3]", "plan"),
    ('{"format": 99, "model": "m", "sites": []}', "plan"),
    ('{"format": 1, "model": "m"}', "malformed"),
    ('{"format": 1, "model": "m", "sites": [{"name": "a"}]}', "malformed"),
])
def test_load_bad_file_raises_plan_error_naming_the_file(tmp_path, content, word):
    path = tmp_path / "my_plan.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PlanError) as info:
        Plan.load(path)
    msg = one_line(info.value)
    assert str(path) in msg
    assert word.lower() in msg.lower()


def test_load_binary_file_raises_plan_error_naming_the_file(tmp_path):
    # A file that is not UTF-8 text is as much "not a plan" as invalid JSON.
    path = tmp_path / "binary_plan.json"
    path.write_bytes(b"\xff\xfe\x00\x81 not a plan")
    with pytest.raises(PlanError) as info:
        Plan.load(path)
    assert str(path) in one_line(info.value)


def test_load_directory_raises_plan_error_naming_it(tmp_path):
    path = tmp_path / "plans"
    path.mkdir()
    with pytest.raises(PlanError) as info:
        Plan.load(path)
    assert str(path) in one_line(info.value)


def _listing(directory):
    return sorted((p.name, p.read_bytes()) for p in directory.iterdir() if p.is_file())


def test_save_into_missing_directory_fails_without_writing(crossed, tmp_path):
    _, plan = crossed
    target = tmp_path / "missing" / "plan.json"
    with pytest.raises(PlanError) as info:
        plan.save(target)
    assert "plan.json" in str(info.value)
    assert not (tmp_path / "missing").exists()
    assert list(tmp_path.iterdir()) == []


def test_save_failure_keeps_the_old_file(crossed, tmp_path):
    """The target keeps its old content when the new content cannot be written."""
    _, plan = crossed
    path = tmp_path / "plan.json"
    plan.save(path)
    before = path.read_bytes()
    # Make every write fail part way, like a full disk: a read-only directory does not stop
    # root, a file-size limit (RLIMIT_FSIZE, SIGXFSZ ignored -> EFBIG) does.
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256, hard))  # the plan JSON is a few kB
    try:
        with pytest.raises(PlanError):
            plan.without_site("a").save(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert path.read_bytes() == before
    assert Plan.load(path) == plan
    # no half-written file left behind (a temporary file next to it is half-written too)
    assert [name for name, _ in _listing(tmp_path)] == ["plan.json"], os.listdir(tmp_path)


def test_save_failure_leaves_no_new_file(crossed, tmp_path):
    _, plan = crossed
    path = tmp_path / "new_plan.json"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256, hard))
    try:
        with pytest.raises(PlanError):
            plan.save(path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == [], os.listdir(tmp_path)


def test_centredness_of_an_event_shaped_funnel_ignores_a_common_shift_per_component():
    """Per-group (intercept, slope) effects: a shift of every intercept, which the vague-scale MAP
    leaves in the deviations from the barely informed mean, must not make the groups look
    data-dominated (a site-wide mean over both components did: 0.47 became 0.98)."""
    from autoreparam.curvature import Curvature

    G, N = 12, 240
    g = np.repeat(np.arange(G), N // G)
    x = np.random.default_rng(0).normal(size=N).astype(np.float32)

    def model(g, x, y=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        tau = numpyro.sample("tau", dist.Uniform(0.0, 10.0))
        with numpyro.plate("groups", G):
            a = numpyro.sample("a", dist.Normal(mu, tau).to_event(1))
        with numpyro.plate("obs", len(g)):
            numpyro.sample("y", dist.Normal(a[g, 0] + x * a[g, 1], 1.0), obs=y)

    def centredness(shift):
        a = np.random.default_rng(2).normal(0, 0.3, size=(G, 2)) + np.array([shift, 0.0])
        y = (a[g, 0] + x * a[g, 1] + np.random.default_rng(1).normal(size=N)).astype(np.float32)
        report, model_trace = analyze_model(model, (g, x), {"y": y})
        assert [f.site for f in report.funnels] == ["a"]
        return Curvature(model_trace, None, report.hyperparameters).centredness("a")

    c0, c5 = centredness(0.0), centredness(5.0)
    assert c0.max() < autoreparam.planning.CENTRED_ENOUGH  # weak data per group: a plan non-centres them
    np.testing.assert_allclose(c5, c0, atol=0.01)


# -- applying G = E @ M: array operations where the maps sum over axes and broadcast ------------
def _sparse(dense) -> SparseMap:
    rows, cols = np.nonzero(dense)
    return SparseMap(dense.shape, tuple(int(r) for r in rows), tuple(int(c) for c in cols),
                     tuple(float(v) for v in dense[rows, cols]))


def _group_map(group_of, groups, weights) -> np.ndarray:
    """(groups, n): element k of the input goes to group ``group_of[k]`` with ``weights[k]``."""
    m = np.zeros((groups, group_of.size))
    m[group_of, np.arange(group_of.size)] = weights
    return m


_RNG = np.random.default_rng(5)
_I, _T, _J = 4, 3, 5
# (parent shape, site shape, M, E): the tensor model's maps and two that are not axis-aligned.
_MAPS = {
    "broadcast": ((), (_I, _J), np.ones((1, 1)), np.ones((_I * _J, 1))),
    "gather": ((_T,), (_I, 1, _T), np.eye(_T), _group_map(np.tile(np.arange(_T), _I), _T, 1.0).T),
    "mean over an axis": ((_I, 1, _T), (_J, _T), _group_map(np.tile(np.arange(_T), _I), _T, 1.0 / _I),
                          _group_map(np.tile(np.arange(_T), _J), _T, 1.0).T),
    "weights and coefficients": ((_I, _T), (_I, _J), _group_map(np.repeat(np.arange(_I), _T), _I,
                                                                _RNG.normal(size=_I * _T)),
                                 _group_map(np.repeat(np.arange(_I), _J), _I, _RNG.normal(size=_I * _J)).T),
    "permuted gather": ((_T,), (_J, _T), np.eye(_T)[::-1], _group_map(np.tile(np.arange(_T), _J), _T, 1.0).T),
    "two groups per element": ((_I,), (2,), np.array([[1.0, 1, 1, 0], [0, 1, 1, 1]]), np.eye(2)),
}


@pytest.mark.parametrize("case", list(_MAPS))
def test_offset_absorb_applies_E_times_M(case):
    parent_shape, site_shape, m, e = _MAPS[case]
    off = Offset("p", _sparse(e), _sparse(m), (0.0,))
    x = _RNG.normal(size=parent_shape).astype(np.float32)
    expected = (e @ m @ x.reshape(-1)).reshape(site_shape)
    np.testing.assert_allclose(off.absorb(jnp.asarray(x), site_shape), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["broadcast", "gather", "mean over an axis", "weights and coefficients"])
def test_axis_aligned_offsets_and_their_gradient_need_no_gather_scatter_or_product(case):
    """As sums over axes and broadcasts they fuse with the model; a gather, its gradient's scatter
    or a dense product each cost a kernel of their own per gradient."""
    parent_shape, site_shape, m, e = _MAPS[case]
    off = Offset("p", _sparse(e), _sparse(m), (0.0,))
    weights = jnp.asarray(_RNG.normal(size=site_shape), jnp.float32)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: jnp.sum(weights * off.absorb(x, site_shape))))(
        jnp.ones(parent_shape, jnp.float32))
    used = {eqn.primitive.name for eqn in jaxpr.jaxpr.eqns}
    assert not used & {"gather", "scatter-add", "scatter_add", "dot_general"}, used
