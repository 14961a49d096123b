"""Unit tests of autoreparam.linear_maps against dense numpy computations on small examples."""

import numpy as np
import pytest

from autoreparam.linear_maps import DenseMap, GatherMap, SharedSubspace, shared_subspace


# -- dense reference ---------------------------------------------------------------------------

def reference_dim(A, B, tol=1e-9):
    """dim(range A & range B) = rank A + rank B - rank [A B]."""
    rank = lambda m: np.linalg.matrix_rank(m, tol=tol) if m.size else 0  # noqa: E731
    return rank(A) + rank(B) - rank(np.hstack([A, B]))


def well_separated(A, B, gap=1e-3):
    """True when every singular value of A, B and [A B] is clearly zero or clearly not."""
    for m in (A, B, np.hstack([A, B])):
        s = np.linalg.svd(m, compute_uv=False)
        if np.any((s > 1e-10) & (s < gap)):
            return False
    return True


def check_against_dense(ja, jb, expected_dim=None):
    """The SharedSubspace of (ja, jb) checked against dense pseudo-inverses; returns it."""
    A, B = ja.to_dense(), jb.to_dense()
    sub = shared_subspace(ja, jb)
    assert isinstance(sub, SharedSubspace)
    dim = reference_dim(A, B)
    if expected_dim is not None:
        assert dim == expected_dim, "test example is not what it claims to be"
    assert sub.dim == dim
    U, E, M = sub.U.toarray(), sub.E.toarray(), sub.M.toarray()
    assert U.shape == (ja.n_in, dim)
    assert E.shape == (jb.n_in, dim)
    assert M.shape == (dim, ja.n_in)
    G = sub.absorption_matrix()
    assert G.shape == (jb.n_in, ja.n_in)
    if dim == 0:
        assert sub.structure == "none"
        assert not G.any()
        return sub
    # J_A U == J_B E, with U a basis (J_A U has full column rank dim).
    np.testing.assert_allclose(A @ U, B @ E, atol=1e-9)
    assert np.linalg.matrix_rank(A @ U) == dim
    # G == pinv(J_B) P_S J_A, P_S the orthogonal projector on the shared subspace.
    Q = np.linalg.qr(A @ U)[0]
    P_S = Q @ Q.T
    if np.linalg.matrix_rank(B) == B.shape[1]:
        np.testing.assert_allclose(G, np.linalg.pinv(B) @ P_S @ A, atol=1e-9)
    else:  # B rank-deficient: G is one least-squares solution, not necessarily pinv's
        np.testing.assert_allclose(B @ G, P_S @ A, atol=1e-9)
    # absorb(a) is G @ a.
    a = np.arange(1.0, ja.n_in + 1)
    np.testing.assert_allclose(sub.absorb(a), G @ a, atol=1e-12)
    return sub


# -- GatherMap ---------------------------------------------------------------------------------

@pytest.fixture
def gather():
    # 7 rows, 4 levels, level 3 never used, row 5 has coefficient 0, a minus sign, a covariate.
    index = np.array([0, 1, 1, 2, 0, 2, 1])
    coef = np.array([1.0, -1.0, 2.0, 0.5, 3.0, 0.0, 1.0])
    return GatherMap(index, coef, 4)


def test_gather_to_dense(gather):
    D = gather.to_dense()
    assert D.shape == (7, 4) == (gather.n_out, gather.n_in)
    expected = np.zeros((7, 4))
    for n, (i, c) in enumerate(zip(gather.index, gather.coef)):
        expected[n, i] = c
    np.testing.assert_array_equal(D, expected)


def test_gather_matvec_rmatvec(gather):
    D = gather.to_dense()
    rng = np.random.default_rng(1)
    x, X = rng.normal(size=4), rng.normal(size=(4, 3))
    v, V = rng.normal(size=7), rng.normal(size=(7, 3))
    np.testing.assert_allclose(gather.matvec(x), D @ x)
    np.testing.assert_allclose(gather.matvec(X), D @ X)
    np.testing.assert_allclose(gather.rmatvec(v), D.T @ v)
    np.testing.assert_allclose(gather.rmatvec(V), D.T @ V)
    assert gather.rmatvec(v).shape == (4,)
    assert gather.rmatvec(V).shape == (4, 3)


def test_gather_gram_pinv_project_rank(gather):
    D = gather.to_dense()
    np.testing.assert_allclose(gather.gram_diag(), np.diag(D.T @ D))
    rng = np.random.default_rng(2)
    v, V = rng.normal(size=7), rng.normal(size=(7, 2))
    np.testing.assert_allclose(gather.pinv(v), np.linalg.pinv(D) @ v, atol=1e-12)
    np.testing.assert_allclose(gather.pinv(V), np.linalg.pinv(D) @ V, atol=1e-12)
    np.testing.assert_allclose(gather.project(v), D @ np.linalg.pinv(D) @ v, atol=1e-12)
    assert gather.pinv(v)[3] == 0  # the unused level gets no weight
    assert gather.rank() == np.linalg.matrix_rank(D) == 3


def test_gather_all_zero_coefficients():
    g = GatherMap(np.array([0, 1, 0]), np.zeros(3), 2)
    assert g.rank() == 0
    np.testing.assert_array_equal(g.pinv(np.ones(3)), np.zeros(2))
    np.testing.assert_array_equal(g.project(np.ones(3)), np.zeros(3))


# -- DenseMap ----------------------------------------------------------------------------------

def test_dense_map_algebra():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(8, 3))
    X[:, 2] = X[:, 0] - 2 * X[:, 1]  # rank 2
    d = DenseMap(X)
    assert (d.n_out, d.n_in) == (8, 3)
    x, v = rng.normal(size=3), rng.normal(size=8)
    np.testing.assert_allclose(d.matvec(x), X @ x)
    np.testing.assert_allclose(d.rmatvec(v), X.T @ v)
    np.testing.assert_array_equal(d.to_dense(), X)
    assert d.rank() == 2
    Q = d.orthonormal_range()
    assert Q.shape == (8, 2)
    np.testing.assert_allclose(Q.T @ Q, np.eye(2), atol=1e-12)
    P = X @ np.linalg.pinv(X)
    np.testing.assert_allclose(Q @ Q.T, P, atol=1e-10)
    np.testing.assert_allclose(d.project(v), P @ v, atol=1e-10)
    # Rank-deficient: any least-squares solution (ranks are decided on unit-norm columns).
    np.testing.assert_allclose(X @ d.pinv(v), P @ v, atol=1e-10)
    full = DenseMap(X[:, :2])
    np.testing.assert_allclose(full.pinv(v), np.linalg.pinv(X[:, :2]) @ v, atol=1e-10)


def test_dense_map_zero_and_empty():
    assert DenseMap(np.zeros((4, 2))).rank() == 0
    assert DenseMap(np.zeros((4, 2))).orthonormal_range().shape == (4, 0)
    assert DenseMap(np.zeros((4, 0))).rank() == 0


# -- shared_subspace: gather x gather ----------------------------------------------------------

def broadcast(n):
    """A scalar site broadcast over n rows (``mu``)."""
    return GatherMap(np.zeros(n, dtype=np.int64), np.ones(n), 1)


def groups(index, n_levels=None, coef=None):
    index = np.asarray(index)
    return GatherMap(index, np.ones(index.size) if coef is None else np.asarray(coef, float),
                     int(n_levels if n_levels is not None else index.max() + 1))


def test_broadcast_into_groups():
    mu, a = broadcast(6), groups([0, 1, 2, 0, 1, 2])
    sub = check_against_dense(mu, a, expected_dim=1)
    assert sub.structure == "broadcast"
    np.testing.assert_allclose(sub.absorb(np.array([2.0])), [2.0, 2.0, 2.0])


def test_unbalanced_groups_into_broadcast():
    # group sizes 1, 2 and 5: the absorbed "mean" of a is weighted by group size.
    a, mu = groups([0, 1, 1, 2, 2, 2, 2, 2]), broadcast(8)
    sub = check_against_dense(a, mu, expected_dim=1)
    assert sub.structure == "mean"
    np.testing.assert_allclose(sub.absorption_matrix(), [[1 / 8, 2 / 8, 5 / 8]])


def test_unbalanced_crossed_groups():
    # a[i] + b[j] on an unbalanced, incomplete grid (connected): one shared direction.
    i = [0, 0, 0, 1, 1, 2, 2, 2, 2]
    j = [0, 1, 2, 0, 0, 1, 3, 3, 3]
    sub = check_against_dense(groups(i), groups(j), expected_dim=1)
    assert sub.structure == "mean"


def test_disconnected_crossed_groups_have_one_direction_per_component():
    # levels {a0, a1, b0, b1} and {a2, b2} never share a row: two components.
    i = [0, 1, 0, 1, 2, 2]
    j = [0, 0, 1, 1, 2, 2]
    sub = check_against_dense(groups(i), groups(j), expected_dim=2)
    assert sub.dim == 2


def test_nested_groups():
    # each level of B (county) sits in one level of A (state); B absorbs A level by level.
    state = [0, 0, 0, 1, 1, 1, 1]
    county = [0, 1, 1, 2, 3, 3, 4]
    sub = check_against_dense(groups(state), groups(county), expected_dim=2)
    assert sub.structure == "gather"
    np.testing.assert_allclose(sub.absorb(np.array([1.0, -3.0])), [1, 1, -3, -3, -3])


def test_pinned_level_removes_its_component():
    # Row 3 touches level 1 of A but not B: that level (and its component) is pinned to zero.
    a = groups([0, 0, 1, 1])
    b = groups([0, 0, 1, 1], coef=[1.0, 1.0, 1.0, 0.0])
    sub = check_against_dense(a, b, expected_dim=1)
    U = sub.U.toarray()
    assert U[1].tolist() == [0.0]
    assert U[0, 0] != 0


def test_pinned_level_in_b():
    a = groups([0, 0, 0, 0, 0], coef=[1, 1, 1, 1, 0])  # a broadcast that misses the last row
    b = groups([0, 0, 1, 1, 1])
    check_against_dense(GatherMap(np.zeros(5, dtype=np.int64), a.coef, 1), b, expected_dim=0)


def test_consistent_covariate_ratio():
    # slope * x_n against a group intercept w[g] where x is constant within each group.
    x = np.array([2.0, 2.0, -1.0, -1.0, -1.0, 3.0])
    g = np.array([0, 0, 1, 1, 1, 2])
    slope = GatherMap(np.zeros(6, dtype=np.int64), x, 1)
    sub = check_against_dense(slope, groups(g), expected_dim=1)
    assert sub.structure == "covariate"
    np.testing.assert_allclose(sub.absorb(np.array([1.0])), [2.0, -1.0, 3.0])


def test_inconsistent_covariate_ratio():
    # x varies within group 0: the ratio is inconsistent around that component.
    x = np.array([2.0, 1.0, -1.0, -1.0, -1.0, 3.0])
    g = np.array([0, 0, 1, 1, 1, 2])
    slope = GatherMap(np.zeros(6, dtype=np.int64), x, 1)
    check_against_dense(slope, groups(g), expected_dim=0)
    # group-level slopes u[g] * x_n against intercepts w[g]: only the groups with constant x.
    sub = check_against_dense(groups(g, coef=x), groups(g), expected_dim=2)
    assert sub.structure == "covariate"
    U = sub.U.toarray()
    assert not U[0].any() and U[1].any() and U[2].any()


def test_minus_sign():
    a = groups([0, 1, 0, 1], coef=[-1, -1, -1, -1])
    sub = check_against_dense(broadcast(4), a, expected_dim=1)
    np.testing.assert_allclose(sub.absorb(np.array([1.5])), [-1.5, -1.5])


def test_no_shared_rows():
    a = groups([0, 1, 0, 0], coef=[1, 1, 0, 0])
    b = groups([0, 0, 0, 0], coef=[0, 0, 1, 1])
    sub = check_against_dense(a, GatherMap(b.index, b.coef, 1), expected_dim=0)
    assert sub.U.shape == (2, 0) and sub.E.shape == (1, 0) and sub.M.shape == (0, 2)


@pytest.mark.parametrize("seed", range(40))
def test_random_gathers_against_dense(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 16))
    n_a, n_b = int(rng.integers(1, 5)), int(rng.integers(1, 6))
    ia, ib = rng.integers(0, n_a, n), rng.integers(0, n_b, n)
    kind = seed % 4
    if kind == 0:  # plain indicators
        ca, cb = np.ones(n), np.ones(n)
    elif kind == 1:  # covariates with ratios that are consistent per level of B
        x = rng.choice([1.0, 2.0, -3.0], n)
        ca, cb = x, x * rng.choice([1.0, 2.0], n_b)[ib]
    elif kind == 2:  # some rows miss one of the terms (pinned levels)
        ca = rng.choice([0.0, 1.0], n, p=[0.2, 0.8])
        cb = rng.choice([0.0, 1.0], n, p=[0.2, 0.8])
    else:  # generic coefficients
        ca = rng.choice([0.0, 1.0, -2.0, 0.5], n)
        cb = rng.choice([0.0, 1.0, 3.0, -1.0], n)
    check_against_dense(GatherMap(ia, ca, n_a), GatherMap(ib, cb, n_b))


# -- shared_subspace: dense terms --------------------------------------------------------------

def test_dense_design_with_intercept_against_broadcast():
    rng = np.random.default_rng(5)
    X = np.column_stack([np.ones(8), rng.normal(size=(8, 2))])
    sub = check_against_dense(DenseMap(X), broadcast(8), expected_dim=1)
    assert sub.structure == "covariate"  # B is a gather
    sub2 = check_against_dense(broadcast(8), DenseMap(X), expected_dim=1)
    assert sub2.structure == "linear"


def test_dense_design_against_groups():
    # X contains the indicator of group 0 and a covariate: shared with a[g] in one direction.
    g = np.array([0, 0, 1, 1, 2, 2, 2])
    X = np.column_stack([(g == 0).astype(float), np.arange(7.0) ** 2])
    check_against_dense(DenseMap(X), groups(g), expected_dim=1)
    check_against_dense(groups(g), DenseMap(X), expected_dim=1)


def test_dense_dense_two_dimensional_overlap():
    rng = np.random.default_rng(6)
    Z = rng.normal(size=(10, 2))
    A = np.column_stack([Z, rng.normal(size=10)])
    B = np.column_stack([Z @ np.array([[1.0, 2.0], [0.5, -1.0]]), rng.normal(size=(10, 2))])
    sub = check_against_dense(DenseMap(A), DenseMap(B), expected_dim=2)
    assert sub.structure == "linear"


def test_dense_dense_disjoint():
    rng = np.random.default_rng(7)
    check_against_dense(DenseMap(rng.normal(size=(9, 2))), DenseMap(rng.normal(size=(9, 3))),
                        expected_dim=0)


def test_dense_zero_map():
    check_against_dense(DenseMap(np.zeros((5, 2))), broadcast(5), expected_dim=0)


@pytest.mark.parametrize("seed", range(30))
def test_random_mixed_against_dense(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(6, 14))
    n_b = int(rng.integers(1, 5))
    ib = rng.integers(0, n_b, n)
    gb = GatherMap(ib, rng.choice([0.0, 1.0, 2.0], n, p=[0.1, 0.6, 0.3]), n_b)
    k = int(rng.integers(1, 4))
    X = rng.normal(size=(n, k))
    if seed % 2:  # make part of X lie in the gather's range
        X[:, 0] = gb.matvec(rng.normal(size=n_b))
    if seed % 3 == 0 and k > 1:  # and make X rank-deficient
        X[:, -1] = 2 * X[:, 0]
    A = X
    if not well_separated(A, gb.to_dense()):
        pytest.skip("numerically ambiguous example")
    check_against_dense(DenseMap(X), gb)
    check_against_dense(gb, DenseMap(X))


def test_within_site_directions_sparse_null_space_of_read_values():
    from autoreparam.linear_maps import within_site_directions
    g = np.array([0, 1, 2, 0, 1, 2, 1])
    X = np.column_stack([np.ones(7), np.eye(3)[g], np.zeros(7), np.linspace(-1, 1, 7)])
    basis = within_site_directions(DenseMap(X))  # the zero column (never read) is no direction
    np.testing.assert_allclose(basis.T, [[1.0, -1.0, -1.0, -1.0, 0.0, 0.0]], atol=1e-9)
    wide = np.zeros((2, 4))
    wide[0, :2] = wide[1, 2:] = 1.0  # fewer rows than values: one direction per row
    np.testing.assert_allclose(within_site_directions(DenseMap(wide)).T, [[1, -1, 0, 0], [0, 0, 1, -1]], atol=1e-9)
    assert within_site_directions(DenseMap(np.random.default_rng(0).normal(size=(6, 3)))).shape == (3, 0)
    assert within_site_directions(GatherMap(np.array([0, 1, 1]), np.ones(3), 3)).shape == (3, 0)
