"""Reported emitter bugs, one minimal reproduction each: regression tests for the fixed ones, strict
xfails for those still open (a fix makes them fail loudly, so the marker gets removed). The plans
are those of the golden cases, so no new analysis runs except for the command-line reproductions
that emit from a model that is not yet reparameterized.
"""

import json

import numpy as np

import numpyro
import numpyro.primitives
import pytest

import autoreparam
from autoreparam.cli import main
from autoreparam.emit import MARKER
from emit_support import case_path, import_source, load, plan_for, read, trace


def crossed():
    return read(case_path("crossed")), plan_for(case_path("crossed"))


def test_parent_bound_to_another_variable_name(tmp_path):
    """Offset terms use the variable a parent's value is bound to ('m = numpyro.sample("mu", ...)' -> m)."""
    source, plan = crossed()
    renamed = source.replace('mu = numpyro.sample("mu"', 'm = numpyro.sample("mu"').replace(
        "Normal(mu + a[row]", "Normal(m + a[row]")
    assert renamed.count("m = numpyro.sample") == 1
    result = autoreparam.emit_source(renamed, "model", plan)
    assert result.rewritten == ("a", "b") and result.warnings == []
    assert "_autoreparam_absorb(m - _AUTOREPARAM_CENTER['mu'], 'a|mu')" in result.source
    assert "_autoreparam_absorb(m - _AUTOREPARAM_CENTER['mu'], 'b|mu')" in result.source
    assert "_autoreparam_absorb(mu " not in result.source
    # the same output as for the original source, up to the renaming
    original = autoreparam.emit_source(source, "model", plan).source
    assert result.source == original.replace("absorb(mu - ", "absorb(m - ").replace(
        'mu = numpyro.sample("mu"', 'm = numpyro.sample("mu"').replace("Normal(mu + a[row]", "Normal(m + a[row]")
    _, args, kwargs = load(case_path("crossed"))
    module = import_source(result.source, tmp_path)
    tr = trace(module.model, args, kwargs)
    assert tr["a"]["type"] == "deterministic" and tr["b"]["type"] == "deterministic"


def test_parent_not_bound_to_a_name_leaves_the_child_unchanged():
    """A planned site whose offset parent has no variable (here: sampled in an expression) is left as it
    is, with a warning naming the site and its line; sites that do not depend on it are still rewritten."""
    source, plan = crossed()
    unbound = source.replace('        a = numpyro.sample("a", dist.Normal(0.0, sigma_a))',
                             '        a = 1.0 * numpyro.sample("a", dist.Normal(0.0, sigma_a))')
    assert unbound != source
    line_a = unbound.splitlines().index('        a = 1.0 * numpyro.sample("a", dist.Normal(0.0, sigma_a))') + 1
    line_b = unbound.splitlines().index('        b = numpyro.sample("b", dist.Normal(0.0, sigma_b))') + 1
    result = autoreparam.emit_source(unbound, "model", plan)
    assert result.rewritten == ()
    assert result.source == unbound
    assert result.warnings == [
        f"line {line_a}: site 'a' is not bound to a simple name; left unchanged",
        f"line {line_b}: site 'b' has offset parent 'a', whose value is not bound to a simple name earlier in "
        "'model'; left unchanged",
    ]


@pytest.mark.parametrize("head", ["#!/usr/bin/env python\n# -*- coding: utf-8 -*-\n", "#!/usr/bin/env python\n",
                                  "# -*- coding: utf-8 -*-\n"])
def test_shebang_and_coding_line_stay_first(head):
    source, plan = crossed()
    out = autoreparam.emit_source(head + source, "model", plan).source
    plain = autoreparam.emit_source(source, "model", plan).source
    assert out.startswith(head + MARKER)
    assert out == head + plain  # the 3-line header comes right after them, the rest is as without them


def test_statement_between_imports(tmp_path):
    """The helper block goes after the first run of imports and drops only the imports made before it:
    'import numpyro', which comes after a statement, stays in the helper block."""
    source, plan = crossed()
    split = source.replace("import numpy as np\n\nimport numpyro\n",
                           "import numpy as np\nnp.set_printoptions(precision=4)\nimport numpyro\n")
    assert split != source
    out = autoreparam.emit_source(split, "model", plan).source
    helpers = out.index("# --- autoreparam: helpers")
    assert out.index("import numpy as np\n") < helpers < out.index("np.set_printoptions(precision=4)\n")
    block = out[helpers:out.index("class AutoreparamShifted")]
    assert block.splitlines()[2:] == ["import jax", "import jax.numpy as jnp", "import numpyro", "", ""]
    assert "np.set_printoptions(precision=4)\nimport numpyro\nimport numpyro.distributions as dist\n" in out
    _, args, kwargs = load(case_path("crossed"))
    trace(import_source(out, tmp_path).model, args, kwargs)


def test_trailing_comment_of_a_noncentred_site_survives():
    """A non-centred site without offsets ends in the deterministic statement of the site; its trailing
    comment goes there."""
    source = read(case_path("eight_schools"))
    commented = source.replace('theta = numpyro.sample("theta", dist.Normal(mu, tau))',
                               'theta = numpyro.sample("theta", dist.Normal(mu, tau))  # school effects')
    assert commented != source
    result = autoreparam.emit_source(commented, "model", plan_for(case_path("eight_schools")))
    assert result.rewritten == ("theta",)
    assert result.source.count("# school effects") == 1
    assert ("\n        theta = numpyro.deterministic('theta', _autoreparam_noncentre(_autoreparam_shift_loc("
            "dist.Normal(mu, tau), 0.0, (8,)), theta_centered, 'theta_decentered', 'theta_log_det'))"
            "  # school effects\n        numpyro.sample(\"y\"") in result.source


def test_helper_block_has_its_comment():
    source, plan = crossed()
    out = autoreparam.emit_source(source, "model", plan).source
    assert ("import numpyro.distributions as dist\n\n\n"
            "# --- autoreparam: helpers and plan data for the reparameterized sites below ----") in out
    assert ("\n# Generated by `autoreparam analyze --emit source`; this file does not import autoreparam.\n"
            "import jax\n") in out


def _rename_site(plan, old, new):
    data = json.loads(json.dumps(plan.to_json()).replace(f'"{old}"', f'"{new}"'))
    return autoreparam.Plan.from_json(data)


def test_site_name_that_is_not_an_identifier(tmp_path):
    """A site name that is not a Python identifier ('row-effect') is made into one for the variable
    names (xi_row_effect_mu); the site names themselves are kept."""
    source, plan = crossed()
    source = source.replace('numpyro.sample("a", ', 'numpyro.sample("row-effect", ')
    plan = _rename_site(plan, "a", "row-effect")
    assert "row-effect" in plan.names
    result = autoreparam.emit_source(source, "model", plan)
    assert result.rewritten == ("row-effect", "b") and result.warnings == []
    assert "xi_row_effect_mu = _AUTOREPARAM_XI['row-effect|mu'] + 0.02 * numpyro.param('row-effect_offset_mu'" \
        in result.source
    assert "a_base = numpyro.sample('row-effect_base', " in result.source
    assert "a = numpyro.deterministic('row-effect', a_base + a_offset)" in result.source
    assert "xi_b_row_effect = _AUTOREPARAM_XI['b|row-effect'] + 0.02 * numpyro.param('b_offset_row-effect'" \
        in result.source
    assert "_autoreparam_absorb(a - _AUTOREPARAM_CENTER['row-effect'], 'b|row-effect')" in result.source
    _, args, kwargs = load(case_path("crossed"))
    tr = trace(import_source(result.source, tmp_path).model, args, kwargs)
    assert tr["row-effect"]["type"] == "deterministic" and "row-effect_base" in tr
    assert "b_offset_row-effect" in tr


def test_in_place_backup_of_a_crlf_file_is_identical(capsys, tmp_path):
    """The CLI reads and writes without newline translation: the .bak of a CRLF file is byte-identical
    and the rewritten file is the emitted source with CRLF endings throughout."""
    path = tmp_path / "model.py"
    original = read(case_path("crossed")).replace("\n", "\r\n").encode()
    path.write_bytes(original)
    assert main(["analyze", str(path), "--emit", "source", "--in-place"]) == 0
    capsys.readouterr()
    assert (tmp_path / "model.py.bak").read_bytes() == original
    assert b"\r\n" in path.read_bytes() and b"\n" not in path.read_bytes().replace(b"\r\n", b"")
    source, plan = crossed()
    lf = autoreparam.emit_source(source, "model", plan).source
    assert path.read_bytes() == lf.replace("\n", "\r\n").encode()


def test_crlf_source_with_noncentred_sites_has_crlf_docstrings():
    """The helpers' multi-line docstrings (the non-centring classes) had LF inside a CRLF file: libcst
    writes statements with the file's newline but keeps a string's text as it was parsed."""
    source, plan = read(case_path("eight_schools")), plan_for(case_path("eight_schools"))
    assert any(s.noncentred for s in plan.sites)
    crlf = autoreparam.emit_source(source.replace("\n", "\r\n"), "model", plan).source
    assert "\n" not in crlf.replace("\r\n", "")
    assert crlf == autoreparam.emit_source(source, "model", plan).source.replace("\n", "\r\n")


def test_cli_re_emit_of_emitted_eight_schools_is_a_no_op(capsys, tmp_path):
    """The CLI checks the autoreparam marker before it analyses FILE: re-emitting is a no-op (exit 0)."""
    first = tmp_path / "first.py"
    first.write_text(autoreparam.emit_source(read(case_path("eight_schools")), "model",
                                             plan_for(case_path("eight_schools"))).source)
    code = main(["analyze", str(first), "--emit", "source", "-o", str(tmp_path / "second.py")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == ""
    assert err == f"autoreparam: warning: {first}: already reparameterized by autoreparam; nothing to do\n"
    assert (tmp_path / "second.py").read_bytes() == first.read_bytes()


def test_eight_schools_minimal_repro_of_the_plate_bug(tmp_path):
    """The diagnosis of the eight-schools failure, pinned down with stock NumPyro: a reparam handler
    opened inside a plate sees the unbroadcast fn, so LocScaleReparam with a per-school centredness fails;
    the same handler outside the plate works (that is where autoreparam.reparameterize puts it)."""
    import jax.numpy as jnp
    import numpyro.distributions as dist
    from numpyro.infer.reparam import LocScaleReparam

    def inside():
        with numpyro.plate("school", 8):
            with numpyro.handlers.reparam(config={"theta": LocScaleReparam(centered=jnp.full(8, 0.2))}):
                numpyro.sample("theta", dist.Normal(0.0, 1.0))

    def outside_body():
        with numpyro.plate("school", 8):
            numpyro.sample("theta", dist.Normal(0.0, 1.0))

    outside = numpyro.handlers.reparam(outside_body, config={"theta": LocScaleReparam(centered=jnp.full(8, 0.2))})
    assert trace(outside, (), {})["theta"]["value"].shape == (8,)
    with pytest.raises(ValueError, match="Cannot broadcast distribution of shape"):
        trace(inside, (), {})


def test_method_with_the_model_name_is_not_rewritten():
    source, plan = crossed()
    method = '\n\nclass Other:\n    def model(self):\n        a = numpyro.sample("a", dist.Normal(0.0, 1.0))\n        return a\n'
    result = autoreparam.emit_source(source + method, "model", plan)
    assert result.rewritten == ("a", "b")
    assert result.warnings == []
    assert result.source.endswith(method)
    assert result.source == autoreparam.emit_source(source, "model", plan).source + method


def test_parent_variable_rebound_before_the_child(tmp_path):
    source, plan = crossed()
    rebound = source.replace('    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))\n',
                             '    mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))\n    mu = mu + 100.0\n')
    assert rebound != source
    result = autoreparam.emit_source(rebound, "model", plan)
    if "a" not in result.rewritten:  # left unchanged: the warning must say why
        assert any("'a'" in w and "'mu'" in w for w in result.warnings), result.warnings
        return
    # rewritten: the offset of 'a' must be xi * G(value of site 'mu' - centre), as planned
    _, args, kwargs = load(case_path("crossed"))
    module = import_source(result.source, tmp_path)
    tr = trace(module.model, args, kwargs)
    xi = module._AUTOREPARAM_XI["a|mu"]
    want = xi * (tr["mu"]["value"] - module._AUTOREPARAM_CENTER["mu"])  # G for 'a|mu' copies mu to every row
    np.testing.assert_allclose(tr["a"]["value"] - tr["a_base"]["value"], want, rtol=1e-5, atol=1e-5)


SAMPLE_SHAPED_BATCH = '''import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist


def model(g, y=None):
    mu = numpyro.sample("mu", dist.Normal(0, 5))
    tau = numpyro.sample("tau", dist.HalfNormal(1))
    a = numpyro.sample("a", dist.Normal(mu * jnp.ones(2), tau), sample_shape=(6,))
    numpyro.sample("y", dist.Normal(a[g, 0] + a[g, 1], 1.0), obs=y)
'''


def test_sample_shape_over_a_batch(tmp_path):
    """A site drawn with sample_shape= from a batched distribution (6 x 2, batch (2,)): the plan says
    which leading dims are sample dims, and the emitted model's log density equals that of
    reparameterize(model, plan) (the emitted reshapes had put the batch first: the model raised at its
    first run). A plan without that (saved before it existed) leaves the site as written, with a
    warning naming it."""
    from numpyro.infer.util import log_density

    g = np.repeat(np.arange(6), 2)
    y = np.random.default_rng(0).normal(size=12).astype(np.float32)
    module = import_source(SAMPLE_SHAPED_BATCH, tmp_path)
    plan = autoreparam.analyze(module.model, g, y=y).plan
    assert plan["a"].noncentred and plan["a"].batch_shape == (2,) and plan["a"].sample_ndim == 1
    assert autoreparam.Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    result = autoreparam.emit_source(SAMPLE_SHAPED_BATCH, "model", plan)
    assert result.rewritten == ("a",) and result.warnings == []
    emitted = import_source(result.source, tmp_path).model
    assert trace(emitted, (g,), {"y": y})["a"]["value"].shape == (6, 2)  # its own params' defaults broadcast
    values = {"mu": 0.3, "tau": 0.7, "a_decentered": np.linspace(-1.0, 1.0, 12).reshape(6, 2).astype(np.float32),
              "a_centered": np.array([0.2, 0.9], np.float32)}
    got = log_density(emitted, (g,), {"y": y}, values)[0]
    want = log_density(autoreparam.reparameterize(module.model, plan), (g,), {"y": y}, values)[0]
    assert float(got) == pytest.approx(float(want), rel=1e-6)

    # A plan edit that adds the site afresh keeps its sample dims.
    edited = plan.without_site("a").with_centredness("a", 0.0)
    assert edited["a"].sample_ndim == 1
    result = autoreparam.emit_source(SAMPLE_SHAPED_BATCH, "model", edited)
    assert result.rewritten == ("a",) and result.warnings == []
    assert trace(import_source(result.source, tmp_path).model, (g,), {"y": y})["a"]["type"] == "deterministic"

    saved = plan.to_json()
    saved.pop("sample_ndims")
    for site in saved["sites"]:
        site.pop("sample_ndim")
    old = autoreparam.Plan.from_json(saved)
    result = autoreparam.emit_source(SAMPLE_SHAPED_BATCH, "model", old)
    line = SAMPLE_SHAPED_BATCH.splitlines().index('    a = numpyro.sample("a", dist.Normal(mu * jnp.ones(2), tau), '
                                                  'sample_shape=(6,))') + 1
    assert result.rewritten == ()
    assert result.warnings == [f"line {line}: site 'a' is drawn with sample_shape= from a distribution with batch "
                               "shape (2,), and the plan does not give its sample_ndim (re-run the analysis); "
                               "left unchanged"]
    assert trace(import_source(result.source, tmp_path).model, (g,), {"y": y})["a"]["type"] == "sample"


def test_sample_shape_inside_a_plate_is_emitted(tmp_path):
    """Inside a plate NumPyro folds sample_shape into the batch (batch (6, 2), no sample dims): the site
    is rewritten, and its emitted log density is reparameterize's."""
    from numpyro.infer.util import log_density

    source = SAMPLE_SHAPED_BATCH.replace(
        '    a = numpyro.sample("a", dist.Normal(mu * jnp.ones(2), tau), sample_shape=(6,))',
        '    with numpyro.plate("cols", 2):\n        a = numpyro.sample("a", dist.Normal(mu, tau), sample_shape=(6, 1))')
    assert source != SAMPLE_SHAPED_BATCH
    g = np.repeat(np.arange(6), 2)
    y = np.random.default_rng(0).normal(size=12).astype(np.float32)
    module = import_source(source, tmp_path)
    plan = autoreparam.analyze(module.model, g, y=y).plan
    assert plan["a"].batch_shape == (6, 2) and plan["a"].sample_ndim == 0
    result = autoreparam.emit_source(source, "model", plan)
    assert result.rewritten == ("a",) and result.warnings == []
    emitted = import_source(result.source, tmp_path).model
    values = {k: v["value"] for k, v in trace(autoreparam.reparameterize(module.model, plan), (g,), {"y": y}).items()
              if v["type"] in ("sample", "param") and not v.get("is_observed")}
    got = log_density(emitted, (g,), {"y": y}, values)[0]
    want = log_density(autoreparam.reparameterize(module.model, plan), (g,), {"y": y}, values)[0]
    assert float(got) == pytest.approx(float(want), rel=1e-6)


EVENT_SITE = '''import numpyro
import numpyro.distributions as dist


def model(y=None):
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("g", 4):
        z = numpyro.sample("z", dist.Normal(0.0, tau).expand([4]).to_event(1))
    with numpyro.plate("rows", 4, dim=-2), numpyro.plate("cols", 4):
        numpyro.sample("y", dist.Normal(z, 1.0), obs=y)
'''


def test_learned_centredness_of_an_event_site_has_reparameterize_param_shape(tmp_path):
    """A non-centred .to_event site (batch (4,), event (4,)): the emitted ``z_centered`` param has the
    batch shape, as reparameterize's, so that params carry over between the two. It had shape (4, 1):
    reparameterize's (4,) params then lined up with the event dim, a silently different model (the
    log densities differed by 8.9 nats)."""
    from numpyro.infer.util import log_density

    plan = autoreparam.Plan("model", (autoreparam.SitePlan("z", (4, 4), (4,), centredness=(0.5,) * 4),))
    result = autoreparam.emit_source(EVENT_SITE, "model", plan)
    assert result.rewritten == ("z",)
    module, emitted = import_source(EVENT_SITE, tmp_path, "original"), import_source(result.source, tmp_path).model
    reparameterized = autoreparam.reparameterize(module.model, plan)
    y = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    assert trace(emitted, (), {"y": y})["z_centered"]["value"].shape == (4,)
    assert trace(reparameterized, (), {"y": y})["z_centered"]["value"].shape == (4,)
    values = {"tau": 0.7, "z_decentered": np.linspace(-1.0, 1.0, 16).reshape(4, 4).astype(np.float32),
              "z_centered": np.array([0.1, 0.4, 0.6, 0.9], np.float32)}
    got = log_density(emitted, (), {"y": y}, values)[0]
    want = log_density(reparameterized, (), {"y": y}, values)[0]
    assert float(got) == pytest.approx(float(want), rel=1e-6)


MASKED_SITES = '''import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

KEEP = np.array([True, True, False, True, True, False])


def model(g, h, y=None):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfNormal(1.0))
    with numpyro.plate("groups", 6):
        a = numpyro.sample("a", dist.Normal(mu, tau).mask(KEEP))
    sd = numpyro.sample("sd", dist.HalfNormal(1.0).expand([2]).to_event(1))
    with numpyro.plate("k", 3):
        b = numpyro.sample("b", dist.MultivariateNormal(jnp.zeros(2), scale_tril=jnp.diag(sd)).mask(KEEP[:3]))
    with numpyro.plate("n", len(g)):
        numpyro.sample("y", dist.Normal(a[g] + b[h, 0] + b[h, 1], 1.0), obs=y)
'''


def test_noncentred_sites_drawn_from_a_masked_distribution(tmp_path):
    """``.mask(M)`` on a non-centred site with an offset and on a Cholesky MVN site: the emitted helpers
    looked for loc and scale_tril on the MaskedDistribution itself (KeyError 'loc', AttributeError) and the
    emitted model raised at its first run. Now its log joint is reparameterize's, masked elements included."""
    from numpyro.infer.util import log_density

    from autoreparam.plan import Offset, SparseMap

    to_all = Offset("mu", SparseMap((6, 1), tuple(range(6)), (0,) * 6, (1.0,) * 6), SparseMap((1, 1), (0,), (0,), (1.0,)),
                    (-0.5,) * 6)
    plan = autoreparam.Plan("model", (
        autoreparam.SitePlan("a", (6,), (6,), (to_all,), centredness=(0.3,) * 6),
        autoreparam.SitePlan("b", (3, 2), (3,), (), (0.0,) * 3, learn_centredness=False, cholesky=True)))
    result = autoreparam.emit_source(MASKED_SITES, "model", plan)
    assert result.rewritten == ("a", "b") and result.warnings == []
    original = import_source(MASKED_SITES, tmp_path, "original").model
    emitted = import_source(result.source, tmp_path).model
    reparameterized = autoreparam.reparameterize(original, plan)
    g, h = np.arange(12) % 6, np.arange(12) % 3
    kwargs = {"y": np.random.default_rng(0).normal(size=12).astype(np.float32)}
    rng = np.random.default_rng(1)
    values = {"mu": 0.4, "tau": 0.7, "sd": np.array([0.5, 1.5], np.float32),
              "a_decentered": rng.normal(size=6).astype(np.float32),
              "b_decentered": rng.normal(size=(3, 2)).astype(np.float32),
              "a_centered": np.linspace(0.1, 0.9, 6).astype(np.float32),
              "a_offset_mu": np.full(6, 0.2, np.float32)}
    got = log_density(emitted, (g, h), kwargs, values)[0]
    want = log_density(reparameterized, (g, h), kwargs, values)[0]
    assert np.isfinite(float(want))
    assert float(got) == pytest.approx(float(want), rel=1e-6)
