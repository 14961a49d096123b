"""Bad plans, plans without data, bad ``at=``: one clear line naming the site and field.

Hand-edited or corrupted plans (JSON or dataclasses) are refused by ``Plan.from_json``,
``Plan.load`` and ``reparameterize(model, plan)`` with a PlanError naming the site and the
field, never a raw JAX/NumPyro error at the first call. A given plan is checked against the
model's sampled sites, so it needs no data (prior predictive checks).
"""

import copy
import dataclasses
import json
import math

import jax
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer import Predictive

import autoreparam
from autoreparam import InputError, Offset, Plan, PlanError, SitePlan
from autoreparam.plan import SparseMap
from helpers import one_line

N = 6
Y = np.random.default_rng(0).normal(size=N).astype(np.float32)


def model(y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("i", N):
        a = numpyro.sample("a", dist.Normal(mu, tau))
        numpyro.sample("y", dist.Normal(a, 0.5), obs=y)


def good_plan() -> Plan:
    e = SparseMap((N, 1), tuple(range(N)), (0,) * N, (1.0,) * N)
    m = SparseMap((1, 1), (0,), (0,), (1.0,))
    off = Offset("mu", e, m, (-0.5,) * N, "broadcast")
    site = SitePlan("a", (N,), (N,), (off,), (0.3,) * N)
    return Plan("model", (site,), (("a", off),), (("mu", (), ()), ("tau", (), ()), ("a", (N,), (N,))),
                "analytic", (("mu", (0.1,)),), 0.02)


def _site(d):
    return d["sites"][0]


def _offset(d):
    return d["sites"][0]["offsets"][0]


def edit(fn):
    def apply(d):
        fn(d)
        return d
    return apply


# (edit of the plan's JSON, words the one-line message must contain)
CORRUPTIONS = {
    "init too short": (edit(lambda d: _offset(d).update(init=_offset(d)["init"][:-1])), ["'a'", "'mu'", "init", "5"]),
    "init NaN": (edit(lambda d: _offset(d)["init"].__setitem__(2, math.nan)), ["'a'", "init", "finite"]),
    "init inf": (edit(lambda d: _offset(d)["init"].__setitem__(0, math.inf)), ["'a'", "init", "finite"]),
    "init not numbers": (edit(lambda d: _offset(d).update(init="zero")), ["'a'", "init", "numbers"]),
    "init with null": (edit(lambda d: _offset(d)["init"].__setitem__(0, None)), ["'a'", "init", "numbers"]),
    "anchors inf": (edit(lambda d: d["anchors"].update(mu=[math.inf])), ["anchors", "'mu'", "finite"]),
    "anchors too long": (edit(lambda d: d["anchors"].update(mu=[0.0, 1.0])), ["anchors", "'mu'", "2 values"]),
    "centredness NaN": (edit(lambda d: _site(d)["centredness"].__setitem__(1, math.nan)), ["'a'", "centredness", "finite"]),
    "centredness above 1": (edit(lambda d: _site(d)["centredness"].__setitem__(1, 1.5)), ["'a'", "centredness", "[0, 1]"]),
    "centredness below 0": (edit(lambda d: _site(d)["centredness"].__setitem__(1, -0.1)), ["'a'", "centredness", "[0, 1]"]),
    "centredness too short": (edit(lambda d: _site(d).update(centredness=[0.3])), ["'a'", "centredness", "expected 6"]),
    "centredness a number": (edit(lambda d: _site(d).update(centredness=0.3)), ["'a'", "centredness", "list"]),
    "E row out of range": (edit(lambda d: _offset(d)["E"]["rows"].__setitem__(0, 99)), ["'a'", "'E'", "rows", "99"]),
    "M col out of range": (edit(lambda d: _offset(d)["M"]["cols"].__setitem__(0, 3)), ["'a'", "'M'", "cols", "3"]),
    "negative index": (edit(lambda d: _offset(d)["E"]["cols"].__setitem__(0, -1)), ["'a'", "'E'", "cols"]),
    "E lengths differ": (edit(lambda d: _offset(d)["E"]["vals"].pop()), ["'a'", "'E'", "same length"]),
    "E vals NaN": (edit(lambda d: _offset(d)["E"]["vals"].__setitem__(0, math.nan)), ["'a'", "'E'", "vals"]),
    "E vals strings": (edit(lambda d: _offset(d)["E"]["vals"].__setitem__(0, "1")), ["'a'", "'E'", "vals"]),
    "E for another size": (edit(lambda d: _offset(d)["E"].update(shape=[N + 1, 1])), ["'a'", "'E'", "7 rows"]),
    "E and M do not chain": (edit(lambda d: _offset(d)["M"].update(shape=[2, 1])), ["'a'", "'E'", "'M'"]),
    "E shape of 3 dims": (edit(lambda d: _offset(d)["E"].update(shape=[N, 1, 1])), ["'a'", "'E'", "shape"]),
    "E missing": (edit(lambda d: _offset(d).pop("E")), ["'a'", "'E'", "missing"]),
    "parent not a string": (edit(lambda d: _offset(d).update(parent=3)), ["'a'", "parent"]),
    "offset from itself": (edit(lambda d: _offset(d).update(parent="a")), ["'a'", "itself"]),
    "two offsets from mu": (edit(lambda d: _site(d)["offsets"].append(copy.deepcopy(_offset(d)))), ["'a'", "'mu'", "two"]),
    "offset not an object": (edit(lambda d: _site(d).update(offsets=[1])), ["'a'", "offset", "object"]),
    "offsets not a list": (edit(lambda d: _site(d).update(offsets={"mu": 1})), ["'a'", "offsets", "list"]),
    "shape a string": (edit(lambda d: _site(d).update(shape="abc")), ["'a'", "shape"]),
    "shape negative": (edit(lambda d: _site(d).update(shape=[-6])), ["'a'", "shape"]),
    "shape of floats": (edit(lambda d: _site(d).update(shape=[6.0])), ["'a'", "shape"]),
    "batch shape not in shape": (edit(lambda d: _site(d).update(batch_shape=[7])), ["'a'", "batch_shape"]),
    "sample_ndim negative": (edit(lambda d: _site(d).update(sample_ndim=-1)), ["'a'", "sample_ndim"]),
    "sample_ndim a string": (edit(lambda d: _site(d).update(sample_ndim="1")), ["'a'", "sample_ndim"]),
    "batch not after sample dims": (edit(lambda d: _site(d).update(sample_ndim=1)), ["'a'", "sample dims"]),
    "sample_ndims negative": (edit(lambda d: d.update(sample_ndims={"a": -1})), ["sample_ndims['a']"]),
    "sample_ndims a list": (edit(lambda d: d.update(sample_ndims=[1])), ["sample_ndims", "JSON object"]),
    "name missing": (edit(lambda d: _site(d).pop("name")), ["sites[0]", "name"]),
    "name empty": (edit(lambda d: _site(d).update(name="")), ["name", "empty"]),
    "learn_centredness a string": (edit(lambda d: _site(d).update(learn_centredness="yes")), ["'a'", "learn_centredness"]),
    "duplicate site": (edit(lambda d: d["sites"].append(copy.deepcopy(_site(d)))), ["'a'", "twice"]),
    "sites an object": (edit(lambda d: d.update(sites={"a": {}})), ["sites", "list"]),
    "model missing": (edit(lambda d: d.pop("model")), ["model", "missing"]),
    "init unknown": (edit(lambda d: d.update(init="exact")), ["init", "exact"]),
    "xi_step zero": (edit(lambda d: d.update(xi_step=0)), ["xi_step", "positive"]),
    "xi_step NaN": (edit(lambda d: d.update(xi_step=math.nan)), ["xi_step", "finite"]),
    "xi_step a string": (edit(lambda d: d.update(xi_step="1")), ["'xi_step' must be a number, got '1'"]),
    "xi_step a huge integer": (edit(lambda d: d.update(xi_step=10 ** 400)), ["'xi_step'", "401 digits"]),
    "E vals beyond float32": (edit(lambda d: _offset(d)["E"]["vals"].__setitem__(0, 1e300)),
                              ["'a'", "'E'", "vals", "finite in float32", "1e+300"]),
    "candidate init NaN": (edit(lambda d: d["candidates"][0]["init"].__setitem__(0, math.nan)), ["'a'", "init"]),
    "latent shape a string": (edit(lambda d: d["latent"][2].update(shape="6")), ["latent", "shape"]),
}


def test_good_plan_round_trips():
    plan = good_plan()
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_plan_json_raises_plan_error_naming_site_and_field(case, tmp_path):
    corrupt, words = CORRUPTIONS[case]
    data = corrupt(json.loads(json.dumps(good_plan().to_json())))
    with pytest.raises(PlanError) as info:
        Plan.from_json(data)
    msg = one_line(info.value)
    for word in words:
        assert word in msg, msg
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    with pytest.raises(PlanError) as info:
        Plan.load(path)
    msg = one_line(info.value)
    assert str(path) in msg and all(word in msg for word in words), msg


def _replace_offset(plan, **changes):
    site = plan["a"]
    return dataclasses.replace(plan, sites=(dataclasses.replace(site, offsets=(
        dataclasses.replace(site.offsets[0], **changes),)),))


def _replace_site(plan, **changes):
    return dataclasses.replace(plan, sites=(dataclasses.replace(plan["a"], **changes),))


HAND_BUILT = {
    "init too long": (lambda p: _replace_offset(p, init=(0.1,) * (N + 1)), ["'a'", "init"]),
    "init NaN": (lambda p: _replace_offset(p, init=(math.nan,) * N), ["'a'", "init", "finite"]),
    "E index out of range": (lambda p: _replace_offset(p, E=SparseMap((N, 1), (0, 9), (0, 0), (1.0, 1.0))),
                             ["'a'", "'E'", "rows"]),
    "centredness above 1": (lambda p: _replace_site(p, centredness=(2.0,) * N), ["'a'", "centredness", "[0, 1]"]),
    "centredness NaN": (lambda p: _replace_site(p, centredness=(math.nan,) * N), ["'a'", "centredness"]),
    "shape of another model": (lambda p: _replace_site(p, shape=(N + 1,), batch_shape=(N + 1,)), ["'a'", "shape"]),
    "anchors of another size": (lambda p: dataclasses.replace(p, latent=(), anchors=(("mu", (0.0, 1.0)),)),
                                ["anchors", "'mu'"]),
    "parent after the site": (lambda p: _replace_offset(p, parent="y"), ["'a'", "'y'"]),
}


@pytest.mark.parametrize("case", list(HAND_BUILT))
def test_hand_built_bad_plan_is_refused_by_reparameterize(case):
    change, words = HAND_BUILT[case]
    plan = change(good_plan())
    with pytest.raises(PlanError) as info:
        rmodel = autoreparam.reparameterize(model, plan)
        handlers.seed(rmodel, 0)(y=Y)
    msg = one_line(info.value)
    for word in words:
        assert word in msg, msg


# -- a given plan needs no data ----------------------------------------------------------------------
def test_given_plan_runs_a_prior_predictive_check_without_data():
    rmodel = autoreparam.reparameterize(model, good_plan())
    samples = Predictive(rmodel, num_samples=20)(jax.random.PRNGKey(0), y=None)
    assert samples["a"].shape == (20, N) and samples["y"].shape == (20, N)
    assert np.all(np.isfinite(np.asarray(samples["y"])))


def funnel():
    """Neal's funnel as NumPyro's example writes it: no observed site at all."""
    y = numpyro.sample("y", dist.Normal(0.0, 3.0))
    numpyro.sample("x", dist.Normal(0.0, jax.numpy.exp(y / 2)).expand([3]).to_event(1))


def test_given_plan_for_a_model_without_observed_sites():
    plan = Plan("funnel", (SitePlan("x", (3,), (), (), (0.0,)),))
    tr = handlers.trace(handlers.seed(autoreparam.reparameterize(funnel, plan), 0)).get_trace()
    assert tr["x"]["type"] == "deterministic" and tr["x_decentered"]["type"] == "sample"


def test_analysed_plan_is_reused_for_a_call_without_data():
    rmodel = autoreparam.reparameterize(model, init="zero")
    plan = rmodel.plan_for(y=Y)
    assert rmodel.plan_for(y=None) is plan
    samples = Predictive(rmodel, num_samples=5)(jax.random.PRNGKey(0), y=None)
    assert samples["y"].shape == (5, N)


# -- at= ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("at, words", [
    ({"a": np.zeros(3)}, ["'a'", "(3,)", "(6,)"]),
    ({"a": 0.0}, ["'a'", "()", "(6,)"]),
    ({"alpha": np.zeros(N)}, ["'alpha'", "latent", "mu"]),
    ({"y": np.zeros(N)}, ["'y'", "latent"]),
    ({"a": "zeros"}, ["'a'", "numbers", "(6,)"]),
    ({"a": [0.0] * 5 + [math.nan]}, ["'a'", "finite"]),
])
def test_bad_at_raises_one_line_naming_the_site(at, words):
    rmodel = autoreparam.reparameterize(model, at=at)
    with pytest.raises(InputError) as info:
        rmodel.plan_for(y=Y)
    msg = one_line(info.value)
    for word in words:
        assert word in msg, msg


@pytest.mark.parametrize("at", [5, "mode", ["a"]])
def test_at_of_the_wrong_kind_is_refused_at_once(at):
    with pytest.raises(InputError) as info:
        autoreparam.reparameterize(model, at=at)
    assert "at" in one_line(info.value)
