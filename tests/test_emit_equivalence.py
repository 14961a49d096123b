"""The emitted model is the original model in other coordinates.

* Offsets only (``make_plan(noncentre=False)``): the emitted model's log joint at its base
  values, with random offset parameters, equals the original model's log joint at the original
  values (read from the emitted model's deterministic sites). The change of variables has unit
  Jacobian, so this holds to float rounding.
* Non-centred sites: prior draws of the original sites from the emitted model (random
  centredness and offset parameters) match the original model's prior (fixed seeds).
* NUTS runs on the emitted models.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import MCMC, NUTS
from numpyro.infer.util import log_density

import autoreparam
from emit_support import case_path, import_source, latent_names, load, plan_for, prior_samples, random_params, read, trace

OFFSET_CASES = ["tensor", "crossed", "nested", "formatting"]


def emit_module(name, tmp_path, noncentre="auto"):
    path = case_path(name)
    plan = plan_for(path, noncentre=noncentre)
    result = autoreparam.emit_source(read(path), "model", plan)
    assert result.rewritten, result.warnings
    module, args, kwargs = load(path)
    return module, import_source(result.source, tmp_path, stem=name), plan, result, args, kwargs


# -- offsets only: equal log joints ------------------------------------------------------------------

@pytest.mark.parametrize("name", OFFSET_CASES)
def test_log_joint_matches_with_offsets_only(name, tmp_path):
    original, emitted, plan, result, args, kwargs = emit_module(name, tmp_path, noncentre=False)
    assert not any(s.noncentred for s in plan.sites)
    _check_log_joints(original, emitted, result, args, kwargs)


def test_log_joint_matches_when_a_site_is_left_unchanged(tmp_path):
    """Crossed effects with 'b' sampled in a loop: 'a' is rewritten, 'b' is left as it is (with a
    warning), and the partly rewritten model still has the original log joint."""
    path = case_path("crossed")
    plan = plan_for(path, noncentre=False)
    assert not any(s.noncentred for s in plan.sites)
    source = read(path)
    looped = source.replace('    with numpyro.plate("cols", 2):\n        b = numpyro.sample(',
                            '    for _ in range(1):\n        with numpyro.plate("cols", 2):\n'
                            '            b = numpyro.sample(')
    assert looped != source
    result = autoreparam.emit_source(looped, "model", plan)
    line = next(i for i, text in enumerate(looped.splitlines(), 1) if 'b = numpyro.sample("b"' in text)
    assert result.rewritten == ("a",)
    assert result.warnings == [f"line {line}: site 'b' is inside a loop or comprehension; left unchanged"]
    assert '            b = numpyro.sample("b", dist.Normal(0.0, sigma_b))\n' in result.source
    original, args, kwargs = load(path)
    emitted = import_source(result.source, tmp_path, stem="crossed_looped")
    _check_log_joints(original, emitted, result, args, kwargs)


def _check_log_joints(original, emitted, result, args, kwargs):
    probe = trace(emitted.model, args, kwargs)
    original_latent = latent_names(trace(original.model, args, kwargs))
    moved = 0.0
    for seed in range(3):
        params = random_params(probe, seed)
        assert params and all(n.split("_offset_")[0] in result.rewritten for n in params)
        tr = trace(emitted.model, args, kwargs, seed=seed + 10, data=params)
        base = {n: tr[n]["value"] for n in latent_names(tr)}
        for site in result.rewritten:
            assert tr[site]["type"] == "deterministic" and f"{site}_base" in base
            moved = max(moved, float(jnp.max(jnp.abs(tr[site]["value"] - base[f"{site}_base"]))))
        values = {n: tr[n]["value"] for n in original_latent}
        lp_emitted = log_density(emitted.model, args, kwargs, {**params, **base})[0]
        lp_original = log_density(original.model, args, kwargs, values)[0]
        assert np.isfinite(float(lp_original))
        np.testing.assert_allclose(float(lp_emitted), float(lp_original), rtol=1e-6, atol=1e-4)
    assert moved > 1e-2, "the offsets never moved a site: the check would not see a wrong shift"


def test_log_joint_check_sees_a_wrong_offset(tmp_path):
    """Sanity check of the check: dropping the shift from the base density breaks the equality."""
    name = "crossed"
    path = case_path(name)
    plan = plan_for(path, noncentre=False)
    text = autoreparam.emit_source(read(path), "model", plan).source
    broken = text.replace("AutoreparamShifted(dist.Normal(0.0, sigma_b), -b_offset)", "dist.Normal(0.0, sigma_b)")
    assert broken != text
    original, args, kwargs = load(path)
    emitted = import_source(broken, tmp_path, stem="broken")
    params = random_params(trace(emitted.model, args, kwargs), 0)
    tr = trace(emitted.model, args, kwargs, seed=3, data=params)
    base = {n: tr[n]["value"] for n in latent_names(tr)}
    values = {n: tr[n]["value"] for n in latent_names(trace(original.model, args, kwargs))}
    lp_emitted = float(log_density(emitted.model, args, kwargs, {**params, **base})[0])
    lp_original = float(log_density(original.model, args, kwargs, values)[0])
    assert abs(lp_emitted - lp_original) > 1e-2


# -- non-centred sites: same prior ------------------------------------------------------------------

def _ks(x, y):
    x, y = np.sort(x), np.sort(y)
    grid = np.concatenate([x, y])
    return np.max(np.abs(np.searchsorted(x, grid, side="right") / len(x)
                         - np.searchsorted(y, grid, side="right") / len(y)))


@pytest.mark.parametrize("name", [
    "nested",
    "eight_schools",
])
def test_prior_of_original_sites_matches_with_noncentring(name, tmp_path):
    original, emitted, plan, result, args, kwargs = emit_module(name, tmp_path)
    assert any(s.noncentred for s in plan.sites)
    n = 4000
    probe = trace(emitted.model, args, kwargs)
    params = random_params(probe, seed=1, scale=3.0)
    assert any(k.endswith("_centered") for k in params)
    names = latent_names(trace(original.model, args, kwargs))
    got = prior_samples(emitted.model, args, kwargs, names, n, seed=2, params=params)
    want = prior_samples(original.model, args, kwargs, names, n, seed=3)
    ks_limit = 1.95 * np.sqrt(2.0 / n)  # two-sample KS at alpha = 0.001
    heavy = {"tau", "theta"}  # HalfCauchy scale: no finite moments
    for site in names:
        g = np.asarray(got[site]).reshape(n, -1)
        w = np.asarray(want[site]).reshape(n, -1)
        assert g.shape == w.shape, site
        for k in range(g.shape[1]):
            assert _ks(g[:, k], w[:, k]) < ks_limit, (site, k)
            if site in heavy:
                continue
            se_mean = np.sqrt((g[:, k].var() + w[:, k].var()) / n)
            assert abs(g[:, k].mean() - w[:, k].mean()) < 5 * se_mean, (site, k)
            # standard error of the variance from the fourth central moment
            se_var = np.sqrt(sum((np.mean((x - x.mean()) ** 4) - x.var() ** 2) / n for x in (g[:, k], w[:, k])))
            assert abs(g[:, k].var() - w[:, k].var()) < 5 * se_var, (site, k)


@pytest.mark.parametrize("name", [
    "nested",
    "eight_schools",
])
def test_nuts_runs_on_the_emitted_model(name, tmp_path):
    _, emitted, plan, result, args, kwargs = emit_module(name, tmp_path)
    mcmc = MCMC(NUTS(emitted.model), num_warmup=60, num_samples=40, num_chains=1, progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), *args, **kwargs)
    samples = mcmc.get_samples()
    for site in result.rewritten:
        assert site in samples  # deterministic sites are returned with the samples
        assert np.all(np.isfinite(np.asarray(samples[site])))
    decentered = [k for k in samples if k.endswith("_decentered")]
    assert decentered
    for k in decentered:
        assert np.all(np.isfinite(np.asarray(samples[k])))
