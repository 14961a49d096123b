"""Structured linear maps from a latent site into an observed site's linear predictor.

A latent site ``A`` enters the predictor ``eta`` (N values) through a constant linear map
``J_A``. Two structures cover the models this package is for, and both cost O(N):

- ``GatherMap``: every row touches at most one element of ``A`` (``eta_n += coef_n * A[index_n]``):
  indexing ``a[idx]``, broadcasting over plates, ``x * w``, ``u[county] * w``, minus signs.
- ``DenseMap``: a small ``A`` (``X @ beta``) stored as an N x size matrix.

``shared_subspace`` computes ``range(J_A) & range(J_B)`` for a pair and its absorption map
``G = pinv(J_B) P_S J_A``, factored as ``E @ M`` with sparse factors, never a dense
pseudo-inverse of a large map.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

# Relative tolerances. Inputs come from float32 JVPs (rounding ~1e-7), real structure is O(1).
RATIO_RTOL = 1e-4
NULL_TOL = 1e-4
RANK_RTOL = 1e-5


def _segment_sum(values: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """Sum rows of ``values`` (N or N x d) into ``n`` groups given by ``index``."""
    if values.ndim == 1:
        return np.bincount(index, weights=values, minlength=n)[:n]
    return np.stack([np.bincount(index, weights=values[:, j], minlength=n)[:n]
                     for j in range(values.shape[1])], axis=1)


@dataclass(frozen=True)
class GatherMap:
    """``J x = coef * x[index]``: row n reads element ``index[n]`` scaled by ``coef[n]``."""

    index: np.ndarray
    coef: np.ndarray
    n_in: int

    @property
    def n_out(self) -> int:
        return self.index.shape[0]

    def matvec(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        c = self.coef if x.ndim == 1 else self.coef[:, None]
        return c * x[self.index]

    def rmatvec(self, v: np.ndarray) -> np.ndarray:
        c = self.coef if v.ndim == 1 else self.coef[:, None]
        return _segment_sum(c * v, self.index, self.n_in)

    def gram_diag(self) -> np.ndarray:
        return _segment_sum(self.coef**2, self.index, self.n_in)

    def pinv(self, v: np.ndarray) -> np.ndarray:
        """Least-squares coordinates of ``v`` (N or N x d) in this map's input space."""
        g = self.gram_diag()
        g = np.where(g > 0, g, np.inf)
        return self.rmatvec(v) / (g if v.ndim == 1 else g[:, None])

    def project(self, v: np.ndarray) -> np.ndarray:
        return self.matvec(self.pinv(v))

    def rank(self) -> int:
        return int(np.count_nonzero(self.gram_diag() > 0))

    def to_dense(self) -> np.ndarray:
        out = np.zeros((self.n_out, self.n_in))
        out[np.arange(self.n_out), self.index] = self.coef
        return out

    def rows(self, rows: slice) -> "GatherMap":
        """The map onto the outputs ``rows`` only."""
        return GatherMap(self.index[rows], self.coef[rows], self.n_in)

    def absolute(self) -> "GatherMap":
        """``|J|``: ``|J|^T |v|`` bounds the rounding of ``J^T v``."""
        return GatherMap(self.index, np.abs(self.coef), self.n_in)


@dataclass(frozen=True)
class DenseMap:
    """``J`` stored as an N x size matrix (small latent sites such as a coefficient vector)."""

    matrix: np.ndarray

    @property
    def n_in(self) -> int:
        return self.matrix.shape[1]

    @property
    def n_out(self) -> int:
        return self.matrix.shape[0]

    def matvec(self, x):
        return self.matrix @ np.asarray(x, dtype=np.float64)

    def rmatvec(self, v):
        return self.matrix.T @ v

    def _column_scale(self) -> np.ndarray:
        # Ranks are decided on unit-norm columns, so a covariate's units (dollars next to a
        # proportion) cannot push a real direction under the cutoff.
        norms = np.linalg.norm(self.matrix, axis=0)
        return np.where(norms > 0, 1.0 / np.where(norms > 0, norms, 1.0), 0.0)

    def orthonormal_range(self) -> np.ndarray:
        u, s, _ = np.linalg.svd(self.matrix * self._column_scale(), full_matrices=False)
        if s.size == 0 or s[0] == 0:
            return np.zeros((self.n_out, 0))
        return u[:, s > s[0] * RANK_RTOL]

    def pinv(self, v):
        d = self._column_scale()
        y = np.linalg.lstsq(self.matrix * d, v, rcond=RANK_RTOL)[0]
        return d[:, None] * y if y.ndim == 2 else d * y

    def project(self, v):
        q = self.orthonormal_range()
        return q @ (q.T @ v)

    def rank(self) -> int:
        return self.orthonormal_range().shape[1]

    def to_dense(self):
        return self.matrix

    def rows(self, rows: slice) -> "DenseMap":
        return DenseMap(self.matrix[rows])

    def absolute(self) -> "DenseMap":
        return DenseMap(np.abs(self.matrix))


LinearMap = GatherMap | DenseMap


@dataclass(frozen=True)
class SharedSubspace:
    """``range(J_A) & range(J_B)`` for a pair of terms, in each site's coordinates.

    ``U`` (n_A x dim) and ``E`` (n_B x dim) are bases with ``J_A U = J_B E``; ``M`` (dim x n_A)
    gives the coordinates of A's shared part, so the absorption map is ``G = E @ M`` and
    ``(U r, -E r)`` is an invariant direction for any ``r``.
    """

    dim: int
    U: sp.csr_matrix
    E: sp.csr_matrix
    M: sp.csr_matrix
    structure: str  # broadcast | gather | mean | covariate | linear | none

    def absorb(self, a_flat: np.ndarray) -> np.ndarray:
        """``G @ a``: A's contribution expressed in B's coordinates."""
        return self.E @ (self.M @ np.asarray(a_flat, dtype=np.float64))

    def absorption_matrix(self) -> np.ndarray:
        return (self.E @ self.M).toarray()


def _empty(n_a: int, n_b: int) -> SharedSubspace:
    z = lambda r, c: sp.csr_matrix((r, c))  # noqa: E731
    return SharedSubspace(0, z(n_a, 0), z(n_b, 0), z(0, n_a), "none")


def shared_subspace(ja: LinearMap, jb: LinearMap) -> SharedSubspace:
    """The shared subspace of two terms, with its absorption map from A into B."""
    if isinstance(ja, GatherMap) and isinstance(jb, GatherMap):
        return _shared_gather(ja, jb)
    return _shared_dense(ja, jb)


def _shared_gather(ja: GatherMap, jb: GatherMap) -> SharedSubspace:
    """Both terms are gathers: solve ``c_A u[g_A] = c_B w[g_B]`` on the bipartite level graph.

    Levels of A and B are nodes, rows touching both are edges with ratio ``c_A / c_B``. A
    connected component carries one shared direction if the ratios are consistent around
    it and none of its levels is pinned to zero by a row that touches only one of A, B.
    """
    n_a, n_b = ja.n_in, jb.n_in
    on_a, on_b = ja.coef != 0, jb.coef != 0
    both = on_a & on_b
    if not both.any():
        return _empty(n_a, n_b)
    ga, gb = ja.index[both], jb.index[both] + n_a
    n_nodes = n_a + n_b
    adj = sp.coo_matrix((np.ones(ga.size), (ga, gb)), shape=(n_nodes, n_nodes)).tocsr()
    n_comp, label = connected_components(adj, directed=False)

    pinned = np.zeros(n_nodes, bool)
    pinned[ja.index[on_a & ~on_b]] = True
    pinned[jb.index[on_b & ~on_a] + n_a] = True

    ratio = ja.coef[both] / jb.coef[both]  # phi_B[g_B] = ratio * phi_A[g_A]
    phi = np.full(n_nodes, np.nan)
    has_edge = np.zeros(n_nodes, bool)
    has_edge[ga] = has_edge[gb] = True
    roots = np.full(n_comp, -1)
    edge_nodes = np.flatnonzero(has_edge)
    roots[label[edge_nodes[::-1]]] = edge_nodes[::-1]  # lowest node of each component with edges
    roots = roots[roots >= 0]
    phi[roots] = 1.0
    # Breadth-first propagation of potentials, all components at once (diameter iterations).
    while True:
        known_a, known_b = ~np.isnan(phi[ga]), ~np.isnan(phi[gb])
        fwd = known_a & ~known_b
        bwd = known_b & ~known_a
        if not (fwd.any() or bwd.any()):
            break
        phi[gb[fwd]] = ratio[fwd] * phi[ga[fwd]]
        phi[ga[bwd]] = phi[gb[bwd]] / ratio[bwd]

    mismatch = np.abs(phi[gb] - ratio * phi[ga]) > RATIO_RTOL * np.abs(phi[gb])
    dead = np.zeros(n_comp, bool)
    dead[label[ga[mismatch]]] = True
    dead[label[pinned]] = True
    live_comp = np.zeros(n_comp, bool)
    live_comp[label[roots]] = True
    live_comp &= ~dead
    if not live_comp.any():
        return _empty(n_a, n_b)
    col_of = np.cumsum(live_comp) - 1  # component -> column of the basis
    dim = int(live_comp.sum())

    a_nodes = np.flatnonzero(live_comp[label[:n_a]] & has_edge[:n_a])
    b_nodes = np.flatnonzero(live_comp[label[n_a:]] & has_edge[n_a:])
    a_cols = col_of[label[a_nodes]]
    b_cols = col_of[label[b_nodes + n_a]]
    phi_a, phi_b = phi[a_nodes], phi[b_nodes + n_a]
    w_a = ja.gram_diag()[a_nodes]
    norm = np.bincount(a_cols, weights=phi_a**2 * w_a, minlength=dim)

    U = sp.csr_matrix((phi_a, (a_nodes, a_cols)), shape=(n_a, dim))
    E = sp.csr_matrix((phi_b, (b_nodes, b_cols)), shape=(n_b, dim))
    M = sp.csr_matrix((phi_a * w_a / norm[a_cols], (a_cols, a_nodes)), shape=(dim, n_a))

    unit = np.allclose(phi_a, phi_a[0]) and np.allclose(phi_b, phi_a[0])
    a_per_comp = np.bincount(a_cols, minlength=dim)
    if n_a == 1:
        structure = "broadcast" if unit else "covariate"
    elif (a_per_comp == 1).all():
        structure = "gather" if unit else "covariate"
    else:
        structure = "mean" if unit else "linear"
    return SharedSubspace(dim, U, E, M, structure)


def _as_dense_basis(j: LinearMap) -> np.ndarray:
    if isinstance(j, DenseMap):
        return j.orthonormal_range()
    # A gather's range has one orthonormal column per level that is used.
    g = j.gram_diag()
    used = np.flatnonzero(g > 0)
    col = np.full(j.n_in, -1)
    col[used] = np.arange(used.size)
    rows = np.flatnonzero(j.coef != 0)
    q = np.zeros((j.n_out, used.size))
    q[rows, col[j.index[rows]]] = j.coef[rows] / np.sqrt(g[j.index[rows]])
    return q


def _shared_dense(ja: LinearMap, jb: LinearMap) -> SharedSubspace:
    """At least one term is dense (small): intersect via projections and one thin SVD."""
    small, other = (jb, ja) if isinstance(jb, DenseMap) and (
        not isinstance(ja, DenseMap) or jb.n_in <= ja.n_in
    ) else (ja, jb)
    q = _as_dense_basis(small)
    if q.shape[1] == 0:
        return _empty(ja.n_in, jb.n_in)
    residual = q - other.project(q)
    # Thin SVD: q has few columns and N rows (a full one would build an N x N factor).
    _, s, vt = np.linalg.svd(residual, full_matrices=residual.shape[0] < residual.shape[1])
    s_full = np.zeros(q.shape[1])
    s_full[: s.size] = s
    null = vt[s_full < NULL_TOL].T
    dim = null.shape[1]
    if dim == 0:
        return _empty(ja.n_in, jb.n_in)
    qs = q @ null  # orthonormal basis of the shared subspace in observation space
    U = ja.pinv(qs)
    E = jb.pinv(qs)
    M = ja.rmatvec(qs).T
    clean = lambda x: sp.csr_matrix(np.where(np.abs(x) > 1e-12 * np.abs(x).max(), x, 0.0))  # noqa: E731
    return SharedSubspace(dim, clean(U), clean(E), clean(M), "covariate" if isinstance(jb, GatherMap) else "linear")


def within_site_directions(j: LinearMap) -> np.ndarray:
    """Directions inside one site that its map does not see: ``null(J)`` on the values ``J`` reads.

    Values the map never reads (an unobserved level, a zero column) are left out: the prior alone
    sees them, which is no trade-off. The basis (n_in x dim) is in reduced row echelon form, so each
    direction is as sparse as the structure allows (``gr[0, 0] - gr[0, 1]``, not a mix of all groups).
    A gather reads one value per row, so its null space is only unread values: empty.
    """
    if not isinstance(j, DenseMap):
        return np.zeros((j.n_in, 0))
    read = np.flatnonzero(np.linalg.norm(j.matrix, axis=0) > 0)
    if read.size < 2:
        return np.zeros((j.n_in, 0))
    sub = DenseMap(j.matrix[:, read])
    d = sub._column_scale()
    # full V only when there are fewer rows than values (a full U of a tall map would be N x N)
    _, s, vt = np.linalg.svd(sub.matrix * d, full_matrices=sub.n_out < sub.n_in)
    rank = int(np.count_nonzero(s > s[0] * RANK_RTOL))
    null = d[:, None] * vt[rank:].T  # J (d * x) = 0 for x in null(J * d)
    if null.shape[1] == 0:
        return np.zeros((j.n_in, 0))
    out = np.zeros((j.n_in, null.shape[1]))
    out[read] = _echelon(null.T).T
    return out


def _echelon(rows: np.ndarray) -> np.ndarray:
    """Reduced row echelon form of a full-row-rank matrix (pivots scaled to 1, tiny entries zeroed)."""
    r = np.array(rows, dtype=np.float64)
    n_rows, n_cols = r.shape
    col = 0
    for i in range(n_rows):
        while col < n_cols:
            pivot = i + int(np.argmax(np.abs(r[i:, col])))
            if abs(r[pivot, col]) > NULL_TOL * np.abs(r).max():
                break
            col += 1
        if col == n_cols:
            break
        r[[i, pivot]] = r[[pivot, i]]
        r[i] /= r[i, col]
        others = np.arange(n_rows) != i
        r[others] -= np.outer(r[others, col], r[i])
        col += 1
    r[np.abs(r) < 1e-9 * max(np.abs(r).max(), 1e-30)] = 0.0
    return r
