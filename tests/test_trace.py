"""Unit tests of autoreparam.trace: sites, shapes, plates, program order, discrete flags, fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import numpyro.primitives
import pytest
from numpyro.contrib.control_flow import scan
from numpyro.distributions import constraints

from autoreparam import InputError, ModelError, Plate, Site
from autoreparam.trace import (
    ModelTrace,
    check_model_inputs,
    describe_exception,
    site_dependencies,
    support_name,
    trace_model,
    unwrap_distribution,
)


def rich_model(X, y=None):
    p = numpyro.param("p", jnp.ones(2), constraint=constraints.positive)
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    numpyro.sample("u", dist.Uniform(0.0, 2.0))
    numpyro.sample("k", dist.Poisson(3.0))
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    z = numpyro.sample("z", dist.GaussianRandomWalk(s, num_steps=5))
    with numpyro.plate("i", 4, dim=-2):
        with numpyro.plate("j", 5):
            c = numpyro.sample("c", dist.Normal(0.0, s))
    eta = numpyro.deterministic("eta", mu + X @ w + p.sum())
    with numpyro.plate("n", X.shape[0]):
        numpyro.sample("y", dist.Normal(eta + c.sum() + z.sum(), 1.0), obs=y)


X6 = np.ones((6, 3), dtype=np.float32)
Y6 = jnp.zeros(6)


@pytest.fixture(scope="module")
def rich():
    return trace_model(rich_model, (X6,), {"y": Y6})


def test_program_order_and_types(rich):
    assert list(rich.sites) == ["p", "mu", "s", "u", "k", "w", "z", "c", "eta", "y"]
    assert [s.order for s in rich.sites.values()] == list(range(10))
    types = {n: s.type for n, s in rich.sites.items()}
    assert types == {"p": "param", "mu": "latent", "s": "latent", "u": "latent", "k": "latent",
                     "w": "latent", "z": "latent", "c": "latent", "eta": "deterministic",
                     "y": "observed"}
    assert rich.latent_names == ["mu", "s", "u", "w", "z", "c"]  # k is discrete
    assert rich.observed_names == ["y"]
    assert rich.shape_only is True
    assert all(isinstance(s, Site) for s in rich.sites.values())


def test_shapes_and_distributions(rich):
    s = rich.sites
    assert s["p"].shape == (2,) and s["p"].support == "positive" and s["p"].distribution is None
    assert (s["mu"].shape, s["mu"].distribution, s["mu"].params) == ((), "Normal", ("loc", "scale"))
    assert (s["s"].distribution, s["s"].support, s["s"].params) == ("HalfNormal", "positive", ("scale",))
    assert s["u"].support == "interval(0, 2)"
    w = s["w"]
    assert (w.shape, w.batch_shape, w.event_shape) == ((3,), (), (3,))
    assert w.distribution == "Normal" and w.support == "real_vector"
    z = s["z"]
    assert (z.shape, z.event_shape, z.distribution) == ((5,), (5,), "GaussianRandomWalk")
    c = s["c"]
    assert (c.shape, c.batch_shape, c.event_shape) == ((4, 5), (4, 5), ())
    assert c.size == 20
    assert s["eta"].shape == (6,) and s["eta"].distribution is None
    assert s["y"].shape == (6,) and s["y"].batch_shape == (6,)


def test_plates(rich):
    s = rich.sites
    assert s["mu"].plates == ()
    assert s["c"].plates == (Plate("i", 4, -2, 4), Plate("j", 5, -1, 5))  # sorted by dim
    assert s["y"].plates == (Plate("n", 6, -1, 6),)


def test_same_plate_at_different_dims():
    def model(y=None):
        with numpyro.plate("i", 3):
            a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        with numpyro.plate("i", 3, dim=-2), numpyro.plate("t", 4, dim=-1):
            numpyro.sample("y", dist.Normal(a[:, None], 1.0), obs=y)

    mt = trace_model(model, (), {"y": jnp.zeros((3, 4))})
    assert mt.sites["a"].plates == (Plate("i", 3, -1, 3),)
    assert mt.sites["y"].plates == (Plate("i", 3, -2, 3), Plate("t", 4, -1, 4))


def test_subsampled_plate_records_full_size_and_subsample_size():
    def model(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("n", 10, subsample_size=4) as ind:
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y[ind])

    mt = trace_model(model, (jnp.zeros(10),))
    y = mt.sites["y"]
    assert y.shape == (4,)
    # Plate's documented fields: name, *full* size, batch dim, subsample size.
    assert y.plates == (Plate("n", 10, -1, 4),)


def test_discrete_flags_and_notes(rich):
    assert rich.sites["k"].is_discrete and rich.sites["k"].support == "integer_nonnegative"
    assert not any(rich.sites[n].is_discrete for n in rich.latent_names)
    assert len(rich.notes) == 1 and "'k'" in rich.notes[0] and "discrete" in rich.notes[0]


def test_discrete_kinds():
    def model(y=None):
        numpyro.sample("b", dist.Bernoulli(0.3))
        numpyro.sample("c", dist.Categorical(jnp.ones(3) / 3))
        numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Poisson(2.0), obs=y)

    mt = trace_model(model, (), {"y": jnp.array(3)})
    assert mt.sites["b"].is_discrete and mt.sites["c"].is_discrete
    assert mt.sites["y"].is_discrete and mt.sites["y"].type == "observed"
    assert mt.latent_names == ["mu"]
    assert [n.split("'")[1] for n in mt.notes] == ["b", "c"]


def test_site_to_json(rich):
    j = rich.sites["c"].to_json()
    assert j["name"] == "c" and j["shape"] == [4, 5] and j["type"] == "latent"
    assert j["plates"] == [{"name": "i", "size": 4, "dim": -2, "subsample_size": 4},
                           {"name": "j", "size": 5, "dim": -1, "subsample_size": 5}]
    assert set(j) == {"name", "type", "order", "distribution", "shape", "batch_shape",
                      "event_shape", "support", "is_discrete", "plates", "params"}


def test_support_names():
    assert support_name(constraints.real) == "real"
    assert support_name(constraints.positive) == "positive"
    assert support_name(constraints.unit_interval) == "unit_interval"
    assert support_name(constraints.interval(0.0, 2.0)) == "interval(0, 2)"
    assert support_name(constraints.greater_than(1.0)) == "greater_than(1)"
    assert support_name(constraints.independent(constraints.real, 1)) == "real_vector"
    assert support_name(constraints.independent(constraints.positive, 2)) == "positive^2"
    assert support_name(constraints.simplex) == "simplex"
    assert support_name(constraints.interval(jnp.zeros(2), 1.0)) == "interval(array, 1)"


def test_unwrap_distribution():
    d = dist.Normal(0.0, 1.0).expand([3]).to_event(1).mask(False)
    assert type(unwrap_distribution(d)) is dist.Normal
    base = dist.Gamma(1.0, 1.0)
    assert unwrap_distribution(base) is base


# -- shape-only pass vs eager fallback ---------------------------------------------------------

def grouped_model_int_of_data(idx, y=None):
    n_groups = int(jnp.max(idx)) + 1  # needs the concrete value of the data
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("g", n_groups):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", idx.shape[0]):
        numpyro.sample("y", dist.Normal(mu + a[idx], 1.0), obs=y)


def grouped_model(idx, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("g", 3):
        a = numpyro.sample("a", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", idx.shape[0]):
        numpyro.sample("y", dist.Normal(mu + a[idx], 1.0), obs=y)


IDX = np.array([0, 1, 2, 0, 1, 2])


def test_shape_only_pass():
    mt = trace_model(grouped_model, (jnp.asarray(IDX),), {"y": Y6})
    assert mt.shape_only is True


def test_eager_fallback_when_model_needs_concrete_data():
    eager = trace_model(grouped_model_int_of_data, (jnp.asarray(IDX),), {"y": Y6})
    assert eager.shape_only is False
    reference = trace_model(grouped_model, (jnp.asarray(IDX),), {"y": Y6})
    assert eager.sites == reference.sites
    # The same model with numpy data: the eager run gives the same sites again.
    assert trace_model(grouped_model_int_of_data, (IDX,), {"y": Y6}).sites == reference.sites


def test_numpy_code_on_numpy_data_stays_shape_only():
    def model(idx, y=None):
        n_groups = int(np.max(idx)) + 1  # numpy on numpy data: concrete under eval_shape too
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("g", n_groups):
            a = numpyro.sample("a", dist.Normal(0.0, 1.0))
        with numpyro.plate("n", idx.shape[0]):
            numpyro.sample("y", dist.Normal(mu + a[idx], 1.0), obs=y)

    mt = trace_model(model, (IDX,), {"y": Y6})
    assert mt.shape_only is True
    assert mt.sites == trace_model(grouped_model, (IDX,), {"y": Y6}).sites


def test_eager_fallback_that_still_fails_is_a_model_error():
    def model(y=None):
        scale = jax.jit(lambda v: float(v.sum()))(y)  # a tracer error even when run eagerly
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, scale), obs=y)

    with pytest.raises(ModelError) as info:
        trace_model(model, (), {"y": Y6})
    assert "\n" not in str(info.value)


def test_scan_sites_are_a_model_error():
    def model(y=None):
        def step(carry, yt):
            x = numpyro.sample("x", dist.Normal(carry, 1.0))
            numpyro.sample("obs", dist.Normal(x, 1.0), obs=yt)
            return x, None

        scan(step, 0.0, y)

    with pytest.raises(ModelError, match="'x'.*scan"):
        trace_model(model, (), {"y": jnp.zeros(3)})


def test_no_observed_site_is_a_note_and_not_callable_an_error():
    def model():
        numpyro.sample("mu", dist.Normal(0.0, 1.0))

    mt = trace_model(model)
    assert mt.latent_names == ["mu"] and mt.observed_names == []
    assert any("no observed site" in note for note in mt.notes)
    with pytest.raises(InputError, match="callable"):
        trace_model("model")


# -- model inputs and helpers ------------------------------------------------------------------

def test_check_model_inputs_accepts_arrays_numbers_and_containers():
    check_model_inputs(
        (np.zeros(3), jnp.ones(2), 1, 2.5, True, None, "s", np.float32(1.0), [np.zeros(2), 3],
         (1, 2)),
        {"data": {"x": np.zeros(2), "n": 3}, "y": None},
    )


class FrameLike:
    """Stands in for a pandas DataFrame: has .values and __len__ but is not an array."""

    def __init__(self):
        self.values = np.zeros(3)

    def __len__(self):
        return 3


@pytest.mark.parametrize(
    "args, kwargs, where",
    [
        ((FrameLike(),), {}, "args[0]"),
        ((np.zeros(2), [1, object()]), {}, "args[1][1]"),
        ((), {"data": {"x": FrameLike()}}, "data"),
        ((), {"y": {1, 2}}, "y"),
    ],
)
def test_check_model_inputs_rejects_other_objects(args, kwargs, where):
    with pytest.raises(InputError) as info:
        check_model_inputs(args, kwargs)
    msg = str(info.value)
    assert where in msg and "\n" not in msg
    assert "expected arrays" in msg


def test_describe_exception():
    assert describe_exception(ValueError("first\nsecond")) == "ValueError: first"
    assert describe_exception(KeyError("k")) == "KeyError: 'k'"
    assert describe_exception(RuntimeError()) == "RuntimeError"


# -- run, point, dependencies ------------------------------------------------------------------

def test_point_is_uniform_in_unconstrained_space(rich):
    p1, p1_again, p2 = rich.point(1), rich.point(1), rich.point(2)
    assert set(p1) == {"mu", "s", "u", "k", "w", "z", "c"}  # latent sample sites, incl. discrete
    for n in p1:
        np.testing.assert_array_equal(p1[n], p1_again[n])
        assert jnp.shape(p1[n]) == rich.sites[n].shape
    assert not np.allclose(p1["c"], p2["c"])
    assert np.all(np.abs(p1["mu"]) < 2) and np.all(np.abs(p1["c"]) < 2)
    assert -2 < np.log(p1["s"]) < 2
    assert 0 < p1["u"] < 2


def continuous_model(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    s = numpyro.sample("s", dist.HalfNormal(1.0))
    u = numpyro.sample("u", dist.Uniform(0.0, 2.0))
    with numpyro.plate("g", 3):
        w = numpyro.sample("w", dist.Dirichlet(jnp.ones(4)))
        a = numpyro.sample("a", dist.Normal(mu, s))
    numpyro.sample("y", dist.Normal(a + w[:, 0] * u, 1.0), obs=y)


def test_point_of_fixed_supports_is_drawn_in_numpy_uniform_in_unconstrained_space():
    """Every support fixed and continuous: the point is drawn without running the model, and is
    still uniform in (-2, 2) of each site's unconstrained space, the same for the same seed."""
    mt = trace_model(continuous_model, (), {"y": np.zeros(3, np.float32)})
    assert set(mt.supports) == {"mu", "s", "u", "w", "a"}
    p1, p1_again, p2 = mt.point(1), mt.point(1), mt.point(2)
    for n in p1:
        np.testing.assert_array_equal(p1[n], p1_again[n])
        assert jnp.shape(p1[n]) == mt.sites[n].shape and p1[n].dtype == jnp.float32
        assert not np.allclose(p1[n], p2[n])
        u = dist.biject_to(mt.supports[n]).inv(p1[n])
        assert np.all(np.abs(np.asarray(u)) < 2)
    np.testing.assert_allclose(np.sum(p1["w"], axis=-1), 1.0, rtol=1e-5)
    assert 0 < p1["u"] < 2 and p1["s"] > 0
    # the model runs at the point
    assert np.isfinite(float(jnp.sum(mt.run(p1)["y"]["fn"].log_prob(np.zeros(3)))))


def test_run_substitutes_values(rich):
    values = rich.point(3)
    values["mu"] = jnp.array(0.25)
    tr = rich.run(values)
    assert [n for n, site in tr.items() if site["type"] != "plate"] == list(rich.sites)
    assert tr["mu"]["value"] == 0.25
    np.testing.assert_array_equal(tr["y"]["value"], Y6)
    assert tr["y"]["is_observed"]


def test_site_dependencies_go_through_deterministic_sites(rich):
    deps = site_dependencies(rich, rich.point(1))
    assert deps["eta"] == {"mu", "w", "p"}
    assert deps["c"] == {"s"}
    assert deps["z"] == {"s"}
    assert deps["y"] == {"eta", "c", "z"}  # not mu or w: they are behind eta
    assert deps["mu"] == set()


def test_model_trace_is_a_dataclass_with_inputs(rich):
    assert isinstance(rich, ModelTrace)
    assert rich.args[0] is X6 and set(rich.kwargs) == {"y"}


def test_jit_draws_computes_the_prng_in_numpy_and_keeps_the_bits(monkeypatch):
    from numpyro.infer.initialization import init_to_median

    from autoreparam import trace
    from autoreparam.trace import QUICK_COMPILE_OPTIONS, jit_draws

    def model():
        numpyro.sample("m", dist.Normal(0.0, 1.0))
        numpyro.sample("t", dist.HalfCauchy(5.0).expand([3]))

    def program(seed):
        tr = numpyro.handlers.trace(numpyro.handlers.substitute(
            numpyro.handlers.seed(model, seed), substitute_fn=init_to_median(num_samples=101))).get_trace()
        return {n: tr[n]["value"] for n in ("m", "t")}

    names = []
    compile_ = trace._compile
    monkeypatch.setattr(trace, "_compile", lambda traced, opts, size: names.append(traced.fun_name) or compile_(traced, opts, size))
    split = jit_draws(program)(np.int32(5))
    assert names == ["remainder"]  # the PRNG's part ran in numpy (host_prng): one program, for the rest
    names.clear()
    monkeypatch.setattr(trace.host_prng, "evaluate", lambda eqns, env: (_ for _ in ()).throw(
        trace.host_prng.HostUnsupported("not here")))
    fallback = jit_draws(program)(np.int32(5))
    assert names == ["program"]  # else the whole program compiles
    whole = jax.jit(program).trace(np.int32(5)).lower().compile(compiler_options=QUICK_COMPILE_OPTIONS)(np.int32(5))
    for name in ("m", "t"):
        assert np.asarray(split[name]).tobytes() == np.asarray(whole[name]).tobytes()
        assert np.asarray(fallback[name]).tobytes() == np.asarray(whole[name]).tobytes()


def test_programs_bound_by_their_running_compile_with_llvm_optimisations(monkeypatch):
    from autoreparam import trace

    seen = []
    compile_ = jax.stages.Lowered.compile
    monkeypatch.setattr(jax.stages.Lowered, "compile",
                        lambda self, compiler_options=None: seen.append(compiler_options) or compile_(self, compiler_options))

    def energy(x):
        return jnp.sum(jnp.exp(x) * x)

    x = np.linspace(-1.0, 1.0, 60_000, dtype=np.float32)  # 40,000 values per equation
    assert trace.values_per_equation(jax.make_jaxpr(energy)(x)) == pytest.approx(40_000, rel=1e-4)
    once, often = trace.jit_quick(energy)(x), trace.jit_quick(energy, runs=10)(x)
    quick = {**trace.SERIAL_CODEGEN, **trace.QUICK_COMPILE_OPTIONS}
    assert seen == [quick, {**quick, **trace.RUNTIME_BOUND_OPTIONS}]
    assert np.asarray(often) == pytest.approx(np.asarray(once), rel=1e-5)


def _numpy_indexed_minibatch(x, y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", len(x), subsample_size=5) as idx:
        numpyro.sample("y", dist.Normal(mu * x[idx], 1.0), obs=y[idx])  # numpy indexed by the subsample


def test_subsample_indices_of_the_first_run_make_later_runs_traceable():
    from numpyro.infer.util import log_density

    from autoreparam.trace import log_joint

    x = np.linspace(-1.0, 1.0, 20).astype(np.float32)
    y = (2.0 * x).astype(np.float32)
    mt = trace_model(_numpy_indexed_minibatch, (x, y))
    assert not mt.shape_only and set(mt.subsamples) == {"n"}
    eager = numpyro.handlers.trace(numpyro.handlers.seed(_numpy_indexed_minibatch, 0)).get_trace(x, y)
    np.testing.assert_array_equal(mt.subsamples["n"], eager["n"]["value"])  # seed 0's indices
    # staged, which the traced indices made impossible: one compiled program, not op by op
    staged = jax.jit(lambda mu: log_joint(mt, {"mu": mu}))
    want = log_density(numpyro.handlers.seed(_numpy_indexed_minibatch, 0), (x, y), {}, {"mu": 0.5})[0]
    np.testing.assert_allclose(staged(np.float32(0.5)), want, rtol=1e-6)
    with pytest.raises(jax.errors.TracerArrayConversionError):  # what the model does without them
        jax.jit(lambda mu: log_density(numpyro.handlers.seed(_numpy_indexed_minibatch, 0), (x, y), {},
                                       {"mu": mu})[0])(np.float32(0.5))


def test_compiled_draws_follow_x64():
    """One ModelTrace, its prior medians drawn without x64 and then with it: a program each."""
    mt = trace_model(_numpy_indexed_minibatch, (np.zeros(20, np.float32), np.zeros(20, np.float32)))
    read = lambda traces: traces[0]["mu"]["value"]  # noqa: E731
    from numpyro.infer.initialization import init_to_median

    assert mt.run_with_init("median", (init_to_median(num_samples=15),), read).dtype == np.float32
    with jax.enable_x64(True):
        assert mt.run_with_init("median", (init_to_median(num_samples=15),), read).dtype == np.float64


def _plate_named_twice(x, y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    with numpyro.plate("n", len(x), subsample_size=5) as idx:
        numpyro.sample("y", dist.Normal(mu * x[idx], 1.0), obs=y[idx])
    with numpyro.plate("n", len(x)):  # the same name again, whole
        numpyro.sample("z", dist.Normal(mu * x, 1.0), obs=y)


def _subsampled_twice(x, y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
    for site in ("y", "z"):
        with numpyro.plate("n", len(x), subsample_size=5) as idx:  # each use draws its own indices
            numpyro.sample(site, dist.Normal(mu * x[idx], 1.0), obs=y[idx])


@pytest.mark.parametrize("model", [_plate_named_twice, _subsampled_twice])
def test_a_plate_name_used_twice_keeps_its_own_indices(model):
    from numpyro.infer.util import log_density

    from autoreparam.trace import log_joint

    x = np.linspace(-1.0, 1.0, 20).astype(np.float32)
    y = (2.0 * x).astype(np.float32)
    mt = trace_model(model, (x, y))
    assert mt.subsamples == {}  # which indices belong to which use is not recorded: runs stay eager
    want = log_density(numpyro.handlers.seed(model, 0), (x, y), {}, {"mu": 0.5})[0]
    np.testing.assert_allclose(jax.jit(lambda mu: log_joint(mt, {"mu": mu}))(np.float32(0.5)), want, rtol=1e-6)


@pytest.mark.parametrize("model", [grouped_model, grouped_model_int_of_data])
def test_replayed_log_joint_has_the_same_derivatives(model):
    """A log joint traced once and replayed primitive by primitive: its gradient and dense Hessian
    (forward over reverse, vmapped, as the guard forms it) equal those of the model traced under the
    transformations, to the bit; also for a model that needs its data's values in Python."""
    from autoreparam.trace import log_joint, replayed

    mt = trace_model(model, (jnp.asarray(IDX),), {"y": Y6})
    values = {"mu": jnp.float32(0.3), "a": jnp.array([0.5, -1.0, 2.0], jnp.float32)}

    def neg(v, scale):
        return -scale * log_joint(mt, v)

    def hessian(fn):
        grad = jax.grad(fn)
        flat, unravel = jax.flatten_util.ravel_pytree(values)
        hvp = lambda t: jax.flatten_util.ravel_pytree(  # noqa: E731
            jax.jvp(lambda x: grad(x, 2.0), (values,), (unravel(t),))[1])[0]
        return jax.jit(jax.vmap(hvp))(jnp.eye(flat.size))

    direct, once = hessian(neg), hessian(replayed(neg))
    assert np.array_equal(np.asarray(direct), np.asarray(once))
    assert np.asarray(direct)[3, 3] == pytest.approx(2.0 * (1.0 + len(IDX)))  # mu (after a): prior + each observation
    for name in values:
        assert np.array_equal(jax.grad(neg)(values, 2.0)[name], jax.grad(replayed(neg))(values, 2.0)[name])
