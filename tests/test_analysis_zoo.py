"""``analyze`` on a zoo of small models, checked against hand-derived pairs and a dense oracle."""

from __future__ import annotations

import functools

import numpy as np
import pytest

import autoreparam
import zoo
from oracle import null_space, oracle, orth

NAMES = [b().name for b in zoo.BUILDERS]
ADDITIVE_MODELS = [b().name for b in zoo.BUILDERS if not b().control]
CONTROLS = [b().name for b in zoo.BUILDERS if b().control]


@functools.lru_cache(maxsize=None)
def analysed(name):
    zm = zoo.by_name(name)
    return zm, autoreparam.analyze(zm.model, *zm.args, **zm.kwargs)


@functools.lru_cache(maxsize=None)
def oracled(name):
    zm = zoo.by_name(name)
    return oracle(zm.model, *zm.args, **zm.kwargs)


def entries(report, kind="additive"):
    return {(i.observed, *i.sites): i for i in report.invariances if i.kind == kind}


# -- the hand-written expectation, the oracle and the package agree ---------------------------
@pytest.mark.parametrize("name", NAMES)
def test_oracle_matches_hand_derived_pairs(name):
    zm = zoo.by_name(name)
    assert oracled(name).additive == zm.pairs


@pytest.mark.parametrize("name", NAMES)
def test_pairs_match_hand_derived(name):
    zm, report = analysed(name)
    assert report.pairs() == zm.pairs


@pytest.mark.parametrize("name", NAMES)
def test_pairs_match_oracle(name):
    _, report = analysed(name)
    assert report.pairs() == oracled(name).additive


@pytest.mark.parametrize("name", NAMES)
def test_additive_entries_are_well_formed(name):
    _, report = analysed(name)
    orc = oracled(name)
    for key, inv in entries(report).items():
        obs, a, b = key
        assert inv.residual < 1e-4, (key, inv.residual)
        assert inv.absorption is not None, key
        assert inv.absorption.dim == inv.dim, key
        assert report.sites[a].order < report.sites[b].order, key
        G = inv.absorption.absorption_matrix()
        assert G.shape == (orc.sizes[b], orc.sizes[a]), key
        v = np.random.default_rng(0).standard_normal(orc.sizes[a])
        np.testing.assert_allclose(inv.absorption.absorb(v), G @ v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_terms(name):
    zm, report = analysed(name)
    assert {obs: [t.site for t in terms] for obs, terms in report.terms.items()} == zm.terms
    for obs, terms in report.terms.items():
        for t in terms:
            assert t.observed == obs


@pytest.mark.parametrize("name", NAMES)
def test_funnels(name):
    zm, report = analysed(name)
    assert {f.site: f.scale_parents for f in report.funnels} == zm.funnels


@pytest.mark.parametrize("name", NAMES)
def test_nonadditive_entries_are_local_only(name):
    """Whatever is reported under another kind has a local direction but no global one."""
    zm, report = analysed(name)
    orc = oracled(name)
    assert orc.local_only == zm.local
    for key, inv in entries(report, "local").items():
        assert key in orc.local_only, key
        assert inv.dim == orc.local_dims[key], key
    kinds = {i.kind for i in report.invariances}
    assert kinds <= {"additive", "local"}


@pytest.mark.parametrize("name", CONTROLS)
def test_controls_have_no_additive_entry(name):
    _, report = analysed(name)
    assert [i for i in report.invariances if i.kind == "additive"] == []
    assert report.pairs() == {}


def test_factor_model_local_tradeoff_is_not_additive():
    _, report = analysed("factor")
    assert report.pairs() == {}
    assert report.pairs("local") in ({}, {("y", "u", "v"): 1})


# -- the oracle's own directions: a finite step leaves log_prob unchanged ---------------------
@pytest.mark.parametrize("name", ADDITIVE_MODELS)
def test_oracle_directions_leave_log_prob_unchanged(name):
    orc = oracled(name)
    assert set(orc.step_checks) == set(orc.additive)
    for key, (inv, rnd) in orc.step_checks.items():
        assert inv < 1e-6, (key, inv)
        assert rnd > 1e3 * max(inv, 1e-9), (key, inv, rnd)


# -- absorption maps ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ADDITIVE_MODELS)
def test_absorption_is_pinv_JB_PS_JA(name):
    """G = pinv(J_B) P_S J_A, with J and P_S from the oracle's dense Jacobians."""
    _, report = analysed(name)
    orc = oracled(name)
    for (obs, a, b), inv in entries(report).items():
        ja, jb = orc.J(obs, a), orc.J(obs, b)
        ps = orc.shared_projector(obs, a, b)
        expected = np.linalg.pinv(jb, rcond=1e-6) @ ps @ ja
        G = inv.absorption.absorption_matrix()
        np.testing.assert_allclose(G, expected, atol=1e-4 * max(1.0, np.abs(expected).max()),
                                   err_msg=f"{obs}: {a} -> {b}")
        # J_B G a = P_S J_A a for any a
        v = np.random.default_rng(1).standard_normal((orc.sizes[a], 3))
        np.testing.assert_allclose(jb @ G @ v, ps @ ja @ v, atol=1e-4 * np.abs(ja @ v).max(),
                                   err_msg=f"{obs}: {a} -> {b}")


@pytest.mark.parametrize("name", ADDITIVE_MODELS)
def test_moving_along_absorption_leaves_predictor_unchanged(name):
    """For v in A's shared part, (A + v, B - G v) gives the same distribution parameters."""
    _, report = analysed(name)
    orc = oracled(name)
    rng = np.random.default_rng(2)
    for (obs, a, b), inv in entries(report).items():
        shared = orc.shared_part_of_a(obs, a, b)
        assert shared.shape[1] == inv.dim, (obs, a, b)
        v = shared @ rng.standard_normal(shared.shape[1])
        v = v / np.abs(v).max()
        gv = inv.absorption.absorb(v)
        for which in (0, 1):
            values = orc.point(which)
            before = orc.params_at(values)[obs]
            values[a] = values[a] + v.reshape(values[a].shape).astype(values[a].dtype)
            values[b] = values[b] - gv.reshape(values[b].shape).astype(values[b].dtype)
            after = orc.params_at(values)[obs]
            # A alone does move it
            alone = orc.point(which)
            alone[a] = alone[a] + v.reshape(alone[a].shape).astype(alone[a].dtype)
            effect = np.abs(orc.params_at(alone)[obs] - before).max()
            assert effect > 0, (obs, a, b)
            assert np.abs(after - before).max() <= 1e-4 * effect, (obs, a, b)


def _entry(name, a, b, obs="y"):
    _, report = analysed(name)
    return entries(report)[(obs, a, b)]


def test_absorption_broadcast_mu_into_county_effects():
    inv = _entry("county", "mu", "a")
    assert inv.structure == "broadcast"
    np.testing.assert_allclose(inv.absorption.absorb(np.array([2.0])), np.full(5, 2.0), atol=1e-6)


def test_absorption_broadcast_mu_into_tensor_interaction():
    inv = _entry("tensor", "mu", "C")
    np.testing.assert_allclose(inv.absorption.absorb(np.array([-1.5])), np.full(12, -1.5), atol=1e-6)


def test_absorption_county_covariate_maps_w_to_u():
    inv = _entry("county", "w", "a")
    assert inv.structure == "covariate"
    np.testing.assert_allclose(inv.absorption.absorption_matrix(), zoo.COUNTY_U[:, None], atol=1e-5)


def test_individual_covariate_is_not_absorbed():
    _, report = analysed("county")
    assert not [k for k in report.pairs() if "beta" in k]


def test_absorption_nested_is_a_gather():
    inv = _entry("nested", "r", "d")
    assert inv.structure == "gather"
    region_of = zoo.NESTED_REGION_OF
    onehot = np.eye(3)[region_of]
    np.testing.assert_allclose(inv.absorption.absorption_matrix(), onehot, atol=1e-6)
    r = np.array([1.0, -2.0, 0.5])
    np.testing.assert_allclose(inv.absorption.absorb(r), r[region_of], atol=1e-6)


def test_absorption_nested_sparse_skips_unobserved_levels():
    # pinv(J_d) is zero on unobserved districts (2, 6, 7); region 3 is never observed
    inv = _entry("nested_sparse", "r", "d")
    region_of = np.array([0, 0, 1, 1, 2, 2, 3, 3])
    expected = np.eye(4)[region_of]
    expected[[2, 6, 7]] = 0.0
    expected[:, 3] = 0.0
    np.testing.assert_allclose(inv.absorption.absorption_matrix(), expected, atol=1e-6)


def test_absorption_nested_poisson_is_a_gather():
    inv = _entry("poisson", "r", "d")
    np.testing.assert_allclose(inv.absorption.absorption_matrix(), np.eye(3)[zoo.NESTED_REGION_OF],
                               atol=1e-5)


def test_absorption_crossed_is_the_row_weighted_mean():
    zm, _ = analysed("crossed")
    ia, ib = zm.args[0], zm.args[1]
    inv = _entry("crossed", "a", "b")
    a = np.array([1.0, 2.0, -3.0, 0.5, 7.0])  # level 4 is never observed: it does not count
    np.testing.assert_allclose(inv.absorption.absorb(a), np.full(3, a[ia].mean()), atol=1e-5)


def test_absorption_disconnected_crossed_means_per_component():
    zm, _ = analysed("crossed_disconnected")
    ia = zm.args[0]
    inv = _entry("crossed_disconnected", "a", "b")
    a = np.array([1.0, 2.0, -3.0, 0.5])
    first = np.isin(ia, [0, 1])
    m1, m2 = a[ia[first]].mean(), a[ia[~first]].mean()
    np.testing.assert_allclose(inv.absorption.absorb(a), [m1, m1, m2, m2], atol=1e-5)


def test_absorption_design_group_columns_map_to_group_values():
    zm, _ = analysed("design")
    X = zm.args[0]
    inv = _entry("design", "beta", "a")
    G = inv.absorption.absorption_matrix()
    # rows 0..4 of the data are groups 0..4, so X[:5, c] are the group values of column c
    np.testing.assert_allclose(G[:, 0], X[:5, 0], atol=1e-4)
    np.testing.assert_allclose(G[:, 2], X[:5, 2], atol=1e-4)


def test_tensor_report_lists_21_pairs_with_dims():
    _, report = analysed("tensor")
    dims = {frozenset(k[1:]): d for k, d in report.pairs().items()}
    assert len(dims) == 21
    assert dims[frozenset({"mu", "a"})] == 1
    assert dims[frozenset({"a", "C"})] == 4
    assert dims[frozenset({"z", "A"})] == 5
    assert dims[frozenset({"A", "B"})] == 5
    assert dims[frozenset({"b", "B"})] == 3


def test_oracle_shared_part_helpers_are_consistent():
    orc = oracled("nested")
    ja, jd = orc.J("y", "r"), orc.J("y", "d")
    v = orc.shared_part_of_a("y", "r", "d")
    assert v.shape == (3, 3)
    # J_r v lies in range(J_d)
    q = orth(jd)
    np.testing.assert_allclose(q @ (q.T @ (ja @ v)), ja @ v, atol=1e-6)
    assert null_space(ja).shape[1] == 0


# -- directions inside one site ------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_within_site_directions_match_hand_derived_and_oracle(name):
    zm, report = analysed(name)
    found = {(w.observed, w.site): w.dim for w in report.within}
    assert oracled(name).within == zm.within
    assert found == zm.within


@pytest.mark.parametrize("name", [b().name for b in zoo.BUILDERS if b().within])
def test_within_site_directions_leave_the_likelihood_unchanged(name):
    """Every reported basis vector is null for the oracle's Jacobians at both points; the residual is tiny."""
    _, report = analysed(name)
    orc = oracled(name)
    for w in report.within:
        assert w.residual < 1e-4, (w.site, w.residual)
        assert w.basis.shape == (orc.sizes[w.site], w.dim)
        for which in (0, 1):
            j = orc.J(w.observed, w.site, which)
            assert np.abs(j @ w.basis).max() <= 1e-4 * np.abs(j).max(), (w.site, which)
        assert np.linalg.matrix_rank(w.basis) == w.dim
