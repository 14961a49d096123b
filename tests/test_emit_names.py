"""Issue 10, emitter side: the emitted model is the original one, whatever the source calls things.

* Names: every variable, helper, import, site and param the emitter adds is fresh (a model's own
  ``a_offset``, ``a_base``, ``xi_a_mu``, param ``a_offset_mu``, site ``a_base`` or ``theta_decentered``
  stays the model's).
* NumPyro is recognised by what the source binds (``import numpyro as npr``, ``from numpyro import
  sample as draw``), and ``jnp`` taken by numpy gets jax.numpy under another name.
* ``@autoreparam.auto`` is removed, with ``import autoreparam`` when nothing else uses it.
* Non-centring is exact under ``handlers.scale``, ``handlers.mask`` and subsampled plates: the emitted
  log joint at d is the original log joint at x(d) plus log |dx/dd|, counted once.
* ``emit_source`` given bytes: one InputError line.

Equivalence is checked as in test_emit_equivalence.py, with numpyro.infer.util.log_density at random
points (random offset and centredness params) mapped through the change of variables. The plans
are those of the golden cases (analysed once per process), so no new analysis runs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density

import autoreparam
from autoreparam import InputError
from emit_support import case_path, import_source, latent_names, load, plan_for, random_params, read, trace


def crossed():
    return read(case_path("crossed")), plan_for(case_path("crossed"))


def _replace(source, old, new):
    assert source.count(old) == 1, old
    return source.replace(old, new)


def _log_det(original_trace, plan, rewritten, params):
    """log |dx/dd| of the non-centred sites, from the original model's own scales (computed here, not
    read from the emitted model)."""
    total = 0.0
    for site in plan.sites:
        if site.name not in rewritten or not site.noncentred:
            continue
        fn = original_trace[site.name]["fn"]
        while hasattr(fn, "base_dist"):
            fn = fn.base_dist
        shape = jnp.shape(original_trace[site.name]["value"])
        centered = params[f"{site.name}_centered"]
        centered = jnp.reshape(centered, tuple(site.batch_shape) + (1,) * (len(shape) - len(site.batch_shape)))
        total += float(jnp.sum((1.0 - centered) * jnp.log(jnp.broadcast_to(fn.scale, shape))))
    return total


def assert_exact(original_model, emitted_model, plan, rewritten, args, kwargs, seeds=(0, 1), jacobian_weight=1.0):
    """The emitted log joint at (d, params) is the original one at x(d) plus the log-Jacobian
    (times ``jacobian_weight``: size / subsample_size under a subsampled plate)."""
    seeded = lambda model: handlers.seed(model, jax.random.PRNGKey(7))  # noqa: E731 (subsampled plates)
    probe = trace(emitted_model, args, kwargs)
    original_latent = latent_names(trace(original_model, args, kwargs))
    moved = 0.0
    for seed in seeds:
        params = random_params(probe, seed)
        tr = trace(emitted_model, args, kwargs, seed=seed + 10, data=params)
        point = {n: tr[n]["value"] for n in latent_names(tr)}
        values = {n: tr[n]["value"] for n in original_latent}
        for site in rewritten:
            assert tr[site]["type"] == "deterministic", site
            assert site not in point
        original_trace = trace(original_model, args, kwargs, data={**params, **values})
        lp_emitted = float(log_density(seeded(emitted_model), args, kwargs, {**params, **point})[0])
        lp_original = float(log_density(seeded(original_model), args, kwargs, {**params, **values})[0])
        assert np.isfinite(lp_original)
        log_det = jacobian_weight * _log_det(original_trace, plan, rewritten, params)
        np.testing.assert_allclose(lp_emitted, lp_original + log_det, rtol=1e-6, atol=2e-4)
        moved = max(moved, max(float(jnp.max(jnp.abs(tr[s]["value"] - v))) for s in rewritten
                               for n, v in point.items() if n.startswith(s + "_")))
    assert moved > 1e-2, "the change of variables never moved a site: the check would not see a wrong one"


def emit_and_import(source, plan, tmp_path, stem):
    result = autoreparam.emit_source(source, "model", plan)
    return result, import_source(source, tmp_path, stem=stem + "_original"), \
        import_source(result.source, tmp_path, stem=stem)


# -- 1. names the emitter adds never shadow the model's -----------------------------------------

def test_user_variables_named_like_the_emitted_ones_keep_their_values(tmp_path):
    """The model's own a_offset, a_base, xi_a_mu and b_offset (used in the likelihood) are not
    overwritten: the emitted variables get the next free suffix."""
    source, plan = crossed()
    source = _replace(source, '    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))\n',
                      '    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))\n'
                      '    a_offset, a_base, xi_a_mu, b_offset = 100.0, -40.0, 7.0, -60.0\n')
    source = _replace(source, "dist.Normal(mu + a[row] + b[col], sigma)",
                      "dist.Normal(mu + a[row] + b[col] + a_offset + a_base + xi_a_mu + b_offset, sigma)")
    result, original, emitted = emit_and_import(source, plan, tmp_path, "shadow_locals")
    assert result.rewritten == ("a", "b") and result.warnings == []
    for name in ("a_offset_1", "a_base_1", "xi_a_mu_1", "b_offset_1"):
        assert f"\n        {name} = " in result.source, name
    args, kwargs = load(case_path("crossed"))[1:]
    assert_exact(original.model, emitted.model, plan, result.rewritten, args, kwargs)


def test_user_globals_named_like_the_helpers_keep_their_values(tmp_path):
    """Module-level names of the model file (here _AUTOREPARAM_XI and AutoreparamShifted, read by the
    model) are not rebound by the helper block."""
    source, plan = crossed()
    source = _replace(source, "Y = np.array(", "_AUTOREPARAM_XI = 0.5\nAutoreparamShifted = 2.0\n\nY = np.array(")
    source = _replace(source, "dist.Normal(mu + a[row] + b[col], sigma)",
                      "dist.Normal(mu + a[row] + b[col], sigma * _AUTOREPARAM_XI * AutoreparamShifted)")
    result, original, emitted = emit_and_import(source, plan, tmp_path, "shadow_globals")
    assert result.rewritten == ("a", "b")
    assert "\n_AUTOREPARAM_XI_1 = " in result.source and "\nclass AutoreparamShifted_1(" in result.source
    args, kwargs = load(case_path("crossed"))[1:]
    assert_exact(original.model, emitted.model, plan, result.rewritten, args, kwargs)


def test_user_param_named_like_an_offset_param(tmp_path):
    """A model's own param 'a_offset_mu' stays its own: the offset param becomes 'a_offset_mu_1'."""
    source, plan = crossed()
    source = _replace(source, '    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))\n',
                      '    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))\n'
                      '    shift = numpyro.param("a_offset_mu", 0.5)\n')
    source = _replace(source, "dist.Normal(mu + a[row]", "dist.Normal(mu + shift + a[row]")
    result, original, emitted = emit_and_import(source, plan, tmp_path, "shadow_param")
    assert result.rewritten == ("a", "b")
    assert "numpyro.param('a_offset_mu_1', jnp.zeros((3,)))" in result.source
    args, kwargs = load(case_path("crossed"))[1:]
    tr = trace(emitted.model, args, kwargs)
    assert jnp.shape(tr["a_offset_mu"]["value"]) == () and jnp.shape(tr["a_offset_mu_1"]["value"]) == (3,)
    assert_exact(original.model, emitted.model, plan, result.rewritten, args, kwargs)


def test_user_sites_named_like_the_emitted_sites(tmp_path):
    """Sites 'a_base' (next to 'a') and 'theta_decentered', 'theta_log_det' (next to a non-centred
    'theta') are the model's: the emitted sites take the next free suffix."""
    source, plan = crossed()
    source = _replace(source, "    sigma = numpyro.sample(", '    numpyro.deterministic("a_base", 2.0 * a)\n'
                      '    sigma = numpyro.sample(')
    result, original, emitted = emit_and_import(source, plan, tmp_path, "shadow_site")
    assert "numpyro.sample('a_base_1', " in result.source
    args, kwargs = load(case_path("crossed"))[1:]
    tr = trace(emitted.model, args, kwargs)
    np.testing.assert_allclose(tr["a_base"]["value"], 2.0 * tr["a"]["value"], rtol=1e-6)
    assert_exact(original.model, emitted.model, plan, result.rewritten, args, kwargs)

    source, plan = read(case_path("eight_schools")), plan_for(case_path("eight_schools"))
    source = _replace(source, '        numpyro.sample("y"',
                      '        numpyro.deterministic("theta_decentered", theta - mu)\n'
                      '        numpyro.sample("theta_log_det", dist.Normal(0.0, 1.0))\n'
                      '        numpyro.sample("y"')
    result, original, emitted = emit_and_import(source, plan, tmp_path, "shadow_decentered")
    assert result.rewritten == ("theta",)
    assert "'theta_decentered_1', 'theta_log_det_1')" in result.source
    args, kwargs = load(case_path("eight_schools"))[1:]
    assert_exact(original.model, emitted.model, plan, result.rewritten, args, kwargs)


# -- 2. @autoreparam.auto is removed ----------------------------------------------------------------

DECORATED = [
    ("import autoreparam\n", "@autoreparam.auto\n"),
    ("from autoreparam import auto\n", "@auto\n"),
    ("import autoreparam as ar\n", '# the decorator below is removed\n@ar.auto(init="zero", learn=False)\n'),
]


@pytest.mark.parametrize("imports, decorator", DECORATED)
def test_auto_decorator_and_its_import_are_removed(imports, decorator, tmp_path):
    source, plan = crossed()
    decorated = _replace(source, "import numpyro\n", "import numpyro\n" + imports)
    decorated = _replace(decorated, "\ndef model(", "\n" + decorator + "def model(")
    result = autoreparam.emit_source(decorated, "model", plan)
    assert result.rewritten == ("a", "b") and result.warnings == []
    code = [line for line in result.source.splitlines() if not line.lstrip().startswith("#")]
    assert not any("autoreparam" in line or "auto" in line.split() for line in code if "import" in line)
    assert not any(line.startswith("@") for line in code)
    # without the decorator and the import, the output is that of the undecorated source
    comment = [line + "\n" for line in decorator.splitlines() if line.startswith("#")]
    assert result.source == autoreparam.emit_source(source, "model", plan).source.replace(
        "\ndef model(", "\n" + "".join(comment) + "def model(")
    emitted = import_source(result.source, tmp_path, stem="undecorated")
    assert not hasattr(emitted.model, "plan_for")  # a plain function, not reparameterized at run time
    args, kwargs = load(case_path("crossed"))[1:]
    sites = list(trace(emitted.model, args, kwargs))
    assert sites.count("a_base") == 1 and not any(s.endswith("_base_base") for s in sites)


def test_auto_import_used_elsewhere_is_kept():
    source, plan = crossed()
    decorated = _replace(source, "import numpyro\n", "import numpyro\nimport autoreparam\n")
    decorated = _replace(decorated, "\ndef model(", "\n@autoreparam.auto\ndef model(")
    decorated += '\n\nif __name__ == "__main__":\n    print(autoreparam.analyze(model, *model_args()[0]))\n'
    result = autoreparam.emit_source(decorated, "model", plan)
    assert "\nimport autoreparam\n" in result.source and "@autoreparam.auto" not in result.source
    # of a list of names, only the decorator's goes
    listed = _replace(source, "import numpyro\n",
                      "import numpyro\nfrom autoreparam import (\n    analyze,\n    auto,\n)\n")
    listed = _replace(listed, "\ndef model(", "\n@auto\ndef model(") + "\n\nprint(analyze)\n"
    result = autoreparam.emit_source(listed, "model", plan)
    assert "\nfrom autoreparam import (\n    analyze,\n)\n" in result.source and "@auto" not in result.source


def test_runtime_reparameterize_of_the_function_is_reported():
    source, plan = crossed()
    wrapped = _replace(source, "import numpyro\n", "import numpyro\nimport autoreparam\n")
    wrapped += "\n\nrmodel = autoreparam.reparameterize(model)\n"
    result = autoreparam.emit_source(wrapped, "model", plan)
    line = wrapped.splitlines().index("rmodel = autoreparam.reparameterize(model)") + 1
    assert result.warnings == [f"line {line}: 'model' is passed to autoreparam.reparameterize there, which "
                               "reparameterizes it again at run time; use the emitted function as it is"]


# -- 3. NumPyro recognised by name, imports under free names ------------------------------------------

def test_numpyro_under_other_names_is_rewritten(tmp_path):
    source, plan = crossed()
    aliased = _replace(source, "import numpyro\nimport numpyro.distributions as dist\n",
                       "import numpyro as npr\nimport numpyro.distributions as D\nfrom numpyro import sample as draw\n")
    aliased = aliased.replace("numpyro.sample(", "npr.sample(").replace("numpyro.plate(", "npr.plate(")
    aliased = aliased.replace("dist.", "D.")
    aliased = _replace(aliased, 'b = npr.sample("b"', 'b = draw("b"')
    assert "numpyro.sample" not in aliased and "numpyro.plate" not in aliased and "dist." not in aliased
    result, original, emitted = emit_and_import(aliased, plan, tmp_path, "aliased")
    assert result.rewritten == ("a", "b") and result.warnings == []
    assert "AutoreparamShifted(D.Normal(0.0, sigma_b), -b_offset)" in result.source
    args, kwargs = load(case_path("crossed"))[1:]
    assert_exact(original.model, emitted.model, plan, result.rewritten, args, kwargs)


def test_jnp_taken_by_numpy_gets_jax_numpy_under_a_free_name(tmp_path):
    source, plan = crossed()
    taken = _replace(source, "import numpy as np\n", "import numpy as np\nimport numpy as jnp\n")
    taken = _replace(taken, "Y = np.array(", "NOISE = jnp.random.default_rng(0).normal(size=9) * 0.0\nY = np.array(")
    taken = _replace(taken, "    sigma = numpyro.sample(",
                     "    jax = None  # a local named like an import of the emitter's: the import is renamed\n"
                     "    sigma = numpyro.sample(")
    result, original, emitted = emit_and_import(taken, plan, tmp_path, "jnp_numpy")
    assert result.rewritten == ("a", "b")
    assert "\nimport jax.numpy as jnp_1\n" in result.source and "import jax.numpy as jnp\n" not in result.source
    assert "\nimport jax as jax_1\n" in result.source
    assert "jnp_1.reshape(xi_a_mu, (3,))" in result.source
    assert emitted.jnp is np and emitted.jnp_1 is jnp
    args, kwargs = load(case_path("crossed"))[1:]
    assert_exact(original.model, emitted.model, plan, result.rewritten, args, kwargs)


# -- 4. exact non-centring under scale, mask and subsampling ------------------------------------------

EIGHT_PLATE = 'with numpyro.plate("school", len(sigma)):'
HANDLED = {
    "none": EIGHT_PLATE,
    "scale": 'with numpyro.plate("school", len(sigma)), numpyro.handlers.scale(scale=2.5):',
    "mask": 'with numpyro.plate("school", len(sigma)), numpyro.handlers.mask(mask=np.arange(8) % 3 != 0):',
    "subsampled": 'with numpyro.plate("school", 20, subsample_size=len(sigma)):',
    "scale_and_mask": 'with numpyro.handlers.scale(scale=0.5), numpyro.handlers.mask(mask=np.arange(8) < 6), '
                      'numpyro.plate("school", len(sigma)):',
}


@pytest.mark.parametrize("handled", list(HANDLED))
def test_noncentring_is_exact_under_scale_mask_and_subsampling(handled, tmp_path):
    """The emitted log joint at d equals the original at x(d) plus log |dx/dd| = sum (1 - c) log tau, once:
    neither scaled with the site (scale 2.5) nor dropped with its mask. Under a subsampled plate (8 of 20)
    it is weighed by 20/8 like the density: the minibatch estimates the full model's log joint."""
    source, plan = read(case_path("eight_schools")), plan_for(case_path("eight_schools"))
    result, original, emitted = emit_and_import(_replace(source, EIGHT_PLATE, HANDLED[handled]), plan, tmp_path,
                                                f"eight_{handled}")
    assert result.rewritten == ("theta",)
    args, kwargs = load(case_path("eight_schools"))[1:]
    assert_exact(original.model, emitted.model, plan, result.rewritten, args, kwargs,
                 jacobian_weight=20 / 8 if handled == "subsampled" else 1.0)


def test_noncentring_with_offsets_is_exact_under_scale_and_mask(tmp_path):
    """Offsets and non-centring together (nested effects), with a scale on one plate and a mask on the other,
    and the whole model scaled from outside."""
    source, plan = read(case_path("nested")), plan_for(case_path("nested"))
    assert all(s.noncentred for s in plan.sites) and all(s.offsets for s in plan.sites)
    handled = _replace(source, 'with numpyro.plate("regions", 2):',
                       'with numpyro.plate("regions", 2), numpyro.handlers.mask(mask=np.array([True, False])):')
    handled = _replace(handled, 'with numpyro.plate("districts", 4):',
                       'with numpyro.plate("districts", 4), numpyro.handlers.scale(scale=3.0):')
    result, original, emitted = emit_and_import(handled, plan, tmp_path, "nested_handled")
    assert result.rewritten == ("r", "d")
    args, kwargs = load(case_path("nested"))[1:]
    assert_exact(original.model, emitted.model, plan, result.rewritten, args, kwargs)
    assert_exact(handlers.scale(original.model, 1.7), handlers.scale(emitted.model, 1.7), plan, result.rewritten,
                 args, kwargs, seeds=(2,))


# -- 5. bad input -----------------------------------------------------------------------------------

def test_source_given_as_bytes_is_one_input_error():
    source, plan = crossed()
    with pytest.raises(InputError) as info:
        autoreparam.emit_source(source.encode(), "model", plan)
    assert str(info.value) == ("emit_source: source must be the text of a Python file (str), got bytes; "
                               "decode it first, e.g. source.decode('utf-8')")
    with pytest.raises(InputError, match=r"^emit_source: source must be the text of a Python file \(str\), got "
                                         r"NoneType$"):
        autoreparam.emit_source(None, "model", plan)


FAMILIES = {  # the funnel's source text -> the same law built here, at mu = 1, tau = 2
    "StudentT(4.0, mu, tau)": lambda mu, tau: dist.StudentT(4.0, mu, tau),
    "Cauchy(mu, tau)": dist.Cauchy,
    "Laplace(mu, tau)": dist.Laplace,
    "Logistic(mu, tau)": dist.Logistic,
    "Gumbel(mu, tau)": dist.Gumbel,
    "SoftLaplace(mu, tau)": dist.SoftLaplace,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_noncentring_of_every_loc_scale_family_is_exact(family, tmp_path):
    """The eight-schools plan on a source whose funnel is another loc-scale family (StudentT keeps its df),
    under a scale handler: exact log joint, and x(d) has the family's law (a KS test against direct draws)."""
    source, plan = read(case_path("eight_schools")), plan_for(case_path("eight_schools"))
    source = _replace(source, 'numpyro.sample("theta", dist.Normal(mu, tau))',
                      f'numpyro.sample("theta", dist.{family})')
    source = _replace(source, EIGHT_PLATE, HANDLED["scale"])
    result, original, emitted = emit_and_import(source, plan, tmp_path, "family")
    assert result.rewritten == ("theta",)
    args, kwargs = load(case_path("eight_schools"))[1:]
    assert_exact(original.model, emitted.model, plan, result.rewritten, args, kwargs, seeds=(0,))
    n = 2000
    fixed = {"mu": 1.0, "tau": 2.0, "theta_centered": jnp.full(8, 0.3)}
    draws = numpyro.infer.Predictive(handlers.substitute(emitted.model, data=fixed), num_samples=n,
                                     return_sites=["theta"])(jax.random.PRNGKey(0), *args)["theta"][:, 0]
    direct = FAMILIES[family](1.0, 2.0).sample(jax.random.PRNGKey(1), (n,))
    x, y = np.sort(np.asarray(draws)), np.sort(np.asarray(direct))
    grid = np.concatenate([x, y])
    ks = np.max(np.abs(np.searchsorted(x, grid, side="right") - np.searchsorted(y, grid, side="right"))) / n
    assert ks < 1.95 * np.sqrt(2.0 / n)  # two-sample KS at alpha = 0.001


def test_fresh_name():
    from autoreparam.names import fresh_name

    assert fresh_name("a_base", {"a"}) == "a_base"
    assert fresh_name("a_base", {"a_base", "a_base_1", "a_base_3"}) == "a_base_2"


def test_plan_is_checked_and_a_site_with_nothing_to_do_is_left_alone(tmp_path):
    """A hand-built plan: a site without offsets or non-centring is not rewritten (it used to emit
    ``x_base + None``), and a NaN xi is refused before anything is emitted."""
    import dataclasses

    source, plan = crossed()
    idle = dataclasses.replace(plan[plan.names[0]], offsets=())
    assert not idle.noncentred
    rest = tuple(s for s in plan.sites if s.name != idle.name)
    result = autoreparam.emit_source(source, "model", dataclasses.replace(plan, sites=(idle,) + rest))
    assert idle.name not in result.rewritten
    import_source(result.source, tmp_path, stem="idle_site")  # the emitted file imports and runs its helpers

    site = rest[0] if rest else plan.sites[0]
    off = dataclasses.replace(site.offsets[0], init=(float("nan"),) * len(site.offsets[0].init))
    broken = dataclasses.replace(plan, sites=tuple(dataclasses.replace(s, offsets=(off,) + s.offsets[1:])
                                                   if s.name == site.name else s for s in plan.sites))
    with pytest.raises(autoreparam.PlanError, match="must be finite"):
        autoreparam.emit_source(source, "model", broken)
    with pytest.raises(autoreparam.PlanError, match="must be finite"):
        autoreparam.emit_config(broken)
