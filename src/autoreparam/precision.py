"""The precision H(theta) of an exact Gaussian block, assembled from fixed sparse pieces.

With Normal likelihoods every term of log p(y, z, theta) that involves the block z is a Gaussian
log density of a residual that is affine in z, r_s = x_s - loc_s (the site's value minus its
``loc``; a random walk has no ``loc``), so

    H(theta) = sum_s J_s^T Q_s(theta) J_s,   J_s = d r_s / d z,   Q_s = -d^2 log p_s / d x_s^2.

When J_s does not depend on theta (gathers, sums, products with data: the usual case), it is read
once, sparse, at construction: Jacobian-vector products on chunks of unit vectors, of which only
the nonzeros are kept (never a dense matrix of the data's size times the block's). Per call,
Q_s(theta) comes from the site's own distribution, one Hessian-vector product per colour of its
event (1 for elementwise Normals, 3 for a random walk's tridiagonal precision), and H is a
segment sum of the products of the nonzero pairs: O(nonzeros) work, no model HVPs. With few
distinct Q values the entries are one fixed product with them, and so is the gradient of the log
joint at z = 0 when the residuals there do not move with theta (``gradient_at_zero``): the model
then runs forward only.

The construction checks H against the model's Hessian-vector products at two theta; a model
this does not describe (J depending on theta, as for loc = s * a; a family without a known
residual) raises :class:`Unsupported`, and the caller keeps the HVP path.

The Gaussian integral (``log_integral``) and the draws eliminate groups of elements first: the
connected components of H[S, S] for a set S chosen greedily by fewest neighbours, each at most a
cap that minimises an operation count (:func:`elimination_cost`). Cap 1 gives a diagonal H[S, S]
(eight schools: 8 of 9 values, radon: 85 of 89); on the tensor model each row of A with its row
of C and its a_i is one group (tensor_small: 8 groups of 17, leaving 77 of 213 values to the dense
Schur factor instead of 148; tensor_large: 32 groups of 43, leaving 363 of 1,739 instead of 715).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from .trace import unwrap_distribution

__all__ = ["SparsePrecision", "Unsupported", "elimination_cost"]

#: Families whose log density is a quadratic form in ``value - loc`` (``loc`` if they have one).
_GAUSSIAN_FAMILIES = (dist.Normal, dist.MultivariateNormal, dist.LowRankMultivariateNormal,
                      dist.GaussianRandomWalk)
#: Event size up to which a site's event precision pattern is read densely (one HVP per element).
_EVENT_LIMIT = 512
#: Most pair products H may be assembled from (above, the HVP path is no slower).
_TERM_LIMIT = 20_000_000
_CHUNK = 64
#: H's entries are a dense product with the distinct precisions when that takes at most this many
#: multiply-adds per pair-product term (a gather costs several).
_DENSE_TERMS_FACTOR = 4
#: Largest sizes tried for the groups of block elements eliminated before the dense factor.
_GROUP_CAPS = (1, 2, 4, 8, 16, 32, 64)
#: Multiply-adds charged per group factored on its own (a loop step of a few microseconds).
_PER_GROUP_COST = 5_000
#: Size up to which a dense factor is computed by unrolled jnp operations instead of LAPACK.
_UNROLLED_BELOW = 8


class Unsupported(Exception):
    """The model's precision is not of the form sum_s J_s^T Q_s(theta) J_s with fixed J_s."""


def _hvp(site, x, probe):
    """-d^2/dx^2 of the site's (scaled) log density, applied to ``probe``."""
    def log_density(v):
        log_prob = site["fn"].log_prob(v)
        if site["scale"] is not None:
            log_prob = log_prob * site["scale"]
        return jnp.sum(log_prob)
    return -jax.jvp(jax.grad(log_density), (x,), (probe,))[1]


class SparsePrecision:
    """H(theta) of the block for the model run ``run(theta, z) -> trace``, from the residuals of ``sites``.

    ``size``: the block size D; ``thetas``: three generic theta points (the first reads J, the
    first two group the Q entries that are the same function of theta, all three check H); ``hvp(theta, v)``: the model's own H v, for the check; ``grad(theta)``: its gradient in z at z = 0, which lets ``gradient_at_zero`` serve where it agrees (without it, it never does). Raises :class:`Unsupported`.
    """

    def __init__(self, run, sites, size, thetas, hvp, *, grad=None, seed=0):
        self._run = run
        self.sites = tuple(sites)
        self.size = int(size)
        theta0, theta1, theta2 = thetas
        self._compiled = {}
        self._layout = self._read_layout(theta0)
        rows, cols, vals = self._read_jacobian(theta0)
        self._colours = [self._event_colours(name, (theta0, theta1), seed) for name in self.sites]
        self._build_terms(rows, cols, vals, (theta0, theta1))
        self._check(thetas, hvp, grad, (rows, cols, vals), seed)
        self.eliminate()

    # ------------------------------------------------------------ construction

    def _read_layout(self, theta):
        """Per site: (batch size, event size), checking the family."""
        layout = {}

        def record():
            tr = self._run(theta, jnp.zeros(self.size, jnp.float64))
            for name in self.sites:
                fn = tr[name]["fn"]
                base = unwrap_distribution(fn)
                if not isinstance(base, _GAUSSIAN_FAMILIES):
                    raise Unsupported(f"site '{name}' is {type(base).__name__}, not a Gaussian family")
                event = int(np.prod(fn.event_shape, dtype=int))
                # Dims from sample_shape= lead the value; they are batch dims here (independent draws).
                layout[name] = (int(np.prod(jnp.shape(tr[name]["value"]), dtype=int)) // event, event)
            return 0

        jax.eval_shape(record)
        return layout

    def _residuals(self, theta, z):
        tr = self._run(theta, z)
        out = []
        for name in self.sites:
            site = tr[name]
            value = jnp.asarray(site["value"], jnp.float64)
            base = unwrap_distribution(site["fn"])
            loc = getattr(base, "loc", None) if not isinstance(base, dist.GaussianRandomWalk) else None
            residual = value if loc is None else value - jnp.broadcast_to(loc, value.shape)
            out.append(jnp.ravel(residual))
        return jnp.concatenate(out)

    def _read_jacobian(self, theta):
        """COO nonzeros of d residuals / d z (affine in z), read in chunks of unit columns."""
        zero = jnp.zeros(self.size, jnp.float64)
        jvps = jax.jit(jax.vmap(lambda v: jax.jvp(lambda z: self._residuals(theta, z), (zero,), (v,))[1]))
        rows, cols, vals = [], [], []
        for start in range(0, self.size, _CHUNK):
            width = min(_CHUNK, self.size - start)
            units = np.zeros((_CHUNK, self.size))
            units[np.arange(width), start + np.arange(width)] = 1.0
            block = np.asarray(jvps(jnp.asarray(units)))[:width]  # (width, R)
            c, r = np.nonzero(block)
            rows.append(r)
            cols.append(c + start)
            vals.append(block[c, r])
        rows, cols, vals = (np.concatenate(a) for a in (rows, cols, vals))
        self.num_rows = int(sum(b * k for b, k in self._layout.values()))
        return rows, cols, vals

    def _site_outputs(self, theta, name, probes):
        """-Hessian of the site's log density times each probe (probes over the event, one per row)."""
        probes = jnp.asarray(np.stack(probes), jnp.float64)
        key = ("site outputs", name, probes.shape)
        if key not in self._compiled:  # one compile per site and number of probes, whatever theta
            def run(theta, probes):
                site = self._run(theta, jnp.zeros(self.size, jnp.float64))[name]
                x = jnp.asarray(site["value"], jnp.float64)
                batch, event = self._layout[name]
                outs = [_hvp(site, x, jnp.broadcast_to(p, (batch, event)).reshape(x.shape)) for p in probes]
                return jnp.stack([o.reshape(batch, event) for o in outs])
            self._compiled[key] = jax.jit(run)
        return np.asarray(self._compiled[key](theta, probes))

    def _event_colours(self, name, thetas, seed):
        """Colours of the event elements: within a colour, each row of Q meets at most one member.

        Returns (colours as lists of event indices, pattern entries (a', a)).
        """
        batch, event = self._layout[name]
        rng = np.random.default_rng(seed)
        weights = rng.uniform(1.0, 2.0, event)
        diagonal = True
        for theta in thetas:
            plain, weighted = self._site_outputs(theta, name, [np.ones(event), weights])
            if not np.allclose(weighted, plain * weights, rtol=1e-9, atol=1e-12 * (np.abs(plain).max() + 1e-300)):
                diagonal = False
        if diagonal:
            return [list(range(event))], [(a, a) for a in range(event)]
        if event > _EVENT_LIMIT:
            raise Unsupported(f"site '{name}' has an event of {event} values with a non-diagonal precision")
        pattern = np.zeros((event, event), bool)
        for theta in thetas:
            outs = self._site_outputs(theta, name, list(np.eye(event)))  # (probe a, batch, a')
            pattern |= np.any(outs != 0, axis=1).T  # [a', a]
        colours, members = [], []
        for a in range(event):
            rows_a = pattern[:, a]
            for c, taken in enumerate(members):
                if not np.any(rows_a & taken):
                    colours[c].append(a)
                    members[c] = taken | rows_a
                    break
            else:
                colours.append([a])
                members.append(rows_a.copy())
        entries = [(int(r), int(a)) for a in range(event) for r in np.nonzero(pattern[:, a])[0]]
        return colours, entries

    def _group_q(self, thetas):
        """Q entries equal at every theta of ``thetas`` (e.g. one 1/sigma^2 for all observations) are
        taken for the same function of theta: one representative each. The third theta of the
        check tests that assumption."""
        at = jax.jit(lambda th: self.site_precisions(self._run(th, jnp.zeros(self.size, jnp.float64))))
        values = np.stack([np.asarray(at(theta)) for theta in thetas], axis=1)
        _, representative, group = np.unique(values, axis=0, return_index=True, return_inverse=True)
        return group.ravel(), representative

    def _build_terms(self, rows, cols, vals, thetas):
        """The (Q entry, H target, coefficient) triples of H = sum Q[i, j] J_i^T J_j, folded to the upper triangle."""
        order = np.argsort(rows, kind="stable")
        rows, cols, vals = rows[order], cols[order], vals[order]
        counts = np.bincount(rows, minlength=self.num_rows)
        indptr = np.concatenate([[0], np.cumsum(counts)])
        q_index, row_i, row_j = [], [], []
        q_offset = row_offset = 0
        for name, (colours, entries) in zip(self.sites, self._colours):
            batch, event = self._layout[name]
            b = np.arange(batch)
            for e, (a_out, a_in) in enumerate(entries):
                q_index.append(q_offset + e * batch + b)
                row_i.append(row_offset + b * event + a_out)
                row_j.append(row_offset + b * event + a_in)
            q_offset += len(entries) * batch
            row_offset += batch * event
        self.num_q = q_offset
        q_index, row_i, row_j = (np.concatenate(a) for a in (q_index, row_i, row_j))
        group, representative = self._group_q(thetas)
        self._q_rows = (group[q_index], row_i, row_j)  # per Q entry: its group, H = ... J_i^T Q_ij J_j
        self.num_groups = len(representative)
        self._representative = jnp.asarray(representative, jnp.int32)
        pairs = counts[row_i] * counts[row_j]
        total = int(pairs.sum())
        if total > _TERM_LIMIT:
            raise Unsupported(f"H would take {total} pair products (limit {_TERM_LIMIT})")
        entry, within = _ragged(pairs)
        width_j = counts[row_j][entry]
        at_i = indptr[row_i[entry]] + within // np.maximum(width_j, 1)
        at_j = indptr[row_j[entry]] + within % np.maximum(width_j, 1)
        p, q = cols[at_i], cols[at_j]
        coef = vals[at_i] * vals[at_j]
        target = np.minimum(p, q).astype(np.int64) * self.size + np.maximum(p, q)
        key = group[q_index[entry]].astype(np.int64) * (self.size * self.size) + target
        unique, inverse = np.unique(key, return_inverse=True)
        coef = np.bincount(inverse.ravel(), weights=coef, minlength=len(unique))
        keep = coef != 0
        unique, coef = unique[keep], coef[keep]
        D2 = self.size * self.size
        term_q, term_target = unique // D2, unique % D2
        targets, term_entry = np.unique(term_target, return_inverse=True)
        term_entry = term_entry.ravel()
        p, q = targets // self.size, targets % self.size
        # The fold sums H[p, q] and H[q, p] into one entry: halve it off the diagonal.
        coef = coef * np.where(p == q, 1.0, 0.5)[term_entry]
        self.targets = np.stack([p, q], axis=1)  # the distinct entries of H's upper triangle
        self._term_q = jnp.asarray(term_q, jnp.int32)
        self._term_entry = jnp.asarray(term_entry, jnp.int32)
        self._term_coef = jnp.asarray(coef, jnp.float64)
        self._entry_sum = _GatherSum(term_entry, len(targets))  # terms -> entries of H
        self._q_sum = _GatherSum(term_q, self.num_groups)  # terms -> Q groups (the transpose)
        # Few distinct precisions (radon: 3): H's entries are one small product q_rep @ E instead.
        self._by_group = (self.entries_by_group() if self.num_groups * len(targets) <= _DENSE_TERMS_FACTOR * len(coef)
                          else None)
        self.num_terms = int(len(coef))
        dense = np.full((self.size, self.size), len(targets))
        dense[p, q] = dense[q, p] = np.arange(len(targets))
        self._dense_index = jnp.asarray(dense, jnp.int32)

    def _check(self, thetas, hvp, grad, jacobian, seed):
        """H against the model's HVPs (else :class:`Unsupported`); then whether the gradient at z = 0
        is linear in the Q values (``_zero_gradient_by_group``), against the model's gradient."""
        rng = np.random.default_rng(seed + 3)
        probes = jnp.asarray(rng.normal(size=(3, self.size)))
        zero = jnp.zeros(self.size, jnp.float64)

        def mine_at(th):
            q = self.site_precisions(self._run(th, zero))
            return probes @ self.assemble(q), q[self._representative], self._residuals(th, zero)

        model_at = jax.jit(lambda th: (jax.vmap(lambda v: hvp(th, v))(probes),
                                       None if grad is None else grad(th)))
        mine_at = jax.jit(mine_at)
        mine = [jax.tree.map(np.asarray, mine_at(theta)) for theta in thetas]
        model = [jax.tree.map(np.asarray, model_at(theta)) for theta in thetas]
        for (mine_h, _, _), (model_h, _) in zip(mine, model):
            if not np.allclose(mine_h, model_h, rtol=1e-7, atol=1e-9 * np.abs(model_h).max()):
                raise Unsupported("H from the sparse residual Jacobians differs from the model's Hessian-vector "
                                  "products (a Jacobian depends on theta)")
        r0 = mine[0][2]
        self._by_group_gradient = None
        if grad is not None and all(np.array_equal(r0, r) for _, _, r in mine[1:]):
            by_group = self._zero_gradient_by_group(r0, *jacobian)
            if by_group is not None and all(
                    np.allclose(by_group @ q, g, rtol=1e-7, atol=1e-9 * (np.abs(g).max() + 1e-300))
                    for (_, q, _), (_, g) in zip(mine, model)):
                self._by_group_gradient = jnp.asarray(by_group)

    def _zero_gradient_by_group(self, r0, rows, cols, vals):
        """G^T with the block gradient of log p(y, z=0, theta) = G^T @ (representative Q values), from
        the residuals at z = 0, ``r0``, which must not depend on theta; None where G would be larger
        than the Jacobians' nonzeros (the model's own gradient is then as cheap: eight schools, 8
        distinct precisions x 9 values against 25 nonzeros).

        Each Gaussian term's gradient at z = 0 is -J^T Q r0. When r0 does not move with theta (theta
        scales the block's Gaussians but does not shift them: the usual case), that is linear in the
        Q values with fixed coefficients, so the gradient needs no pass back through the model, and
        its derivative in theta no second-order one. ``rows, cols, vals``: the Jacobian's nonzeros."""
        if self.num_groups * self.size > len(vals):
            return None
        group, row_i, row_j = self._q_rows
        # s = -Q r0 by (Q group, row), then G_g = J^T s_g over the Jacobian's nonzeros in each row.
        key = group.astype(np.int64) * self.num_rows + row_i
        pairs, inverse = np.unique(key, return_inverse=True)
        weight = np.bincount(inverse.ravel(), weights=-r0[row_j], minlength=len(pairs))
        pair_group, pair_row = pairs // self.num_rows, pairs % self.num_rows
        order = np.argsort(rows, kind="stable")
        counts = np.bincount(rows, minlength=self.num_rows)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pair, within = _ragged(counts[pair_row])
        at = order[starts[pair_row[pair]] + within]
        by_group = np.zeros((self.size, self.num_groups))
        np.add.at(by_group, (cols[at], pair_group[pair]), weight[pair] * vals[at])
        return by_group

    # ------------------------------------------------------------ per call

    @property
    def gradient_is_linear(self) -> bool:
        """Whether ``gradient_at_zero`` serves (see ``_zero_gradient_by_group``); if not, the caller
        differentiates the model."""
        return self._by_group_gradient is not None

    def gradient_at_zero(self, q) -> jax.Array:
        """The block gradient of log p(y, z=0, theta), linear in the flat Q entries."""
        return _weighted_rows(q[self._representative], self._by_group_gradient)

    def site_precisions(self, trace) -> jax.Array:
        """The flat Q entries of every site at the trace's theta (the trace's block values do not matter)."""
        out = []
        for name, (colours, entries) in zip(self.sites, self._colours):
            site = trace[name]
            x = jnp.asarray(site["value"], jnp.float64)
            batch, event = self._layout[name]
            colour_of = {a: c for c, members in enumerate(colours) for a in members}
            hvps = []
            for members in colours:
                probe = np.zeros(event)
                probe[members] = 1.0
                hvps.append(_hvp(site, x, jnp.broadcast_to(jnp.asarray(probe), (batch, event)).reshape(x.shape))
                            .reshape(batch, event))
            out.extend(hvps[colour_of[a_in]][:, a_out] for a_out, a_in in entries)
        return jnp.concatenate(out)

    def entries_by_group(self) -> jax.Array:
        """E^T with H's distinct entries = (representative Q values) @ E: (entries, distinct precisions)."""
        by_group = np.zeros((self.num_groups, len(self.targets)))
        np.add.at(by_group, (np.asarray(self._term_q), np.asarray(self._term_entry)), np.asarray(self._term_coef))
        return jnp.asarray(by_group.T)

    def entries(self, q) -> jax.Array:
        """The distinct entries of H (``targets``) from the flat Q entries: sums of pair products."""
        if self._by_group is not None:
            return _weighted_rows(q[self._representative], self._by_group)
        return self._entry_sum(q[self._representative][self._term_q] * self._term_coef)

    def _entries_transpose(self, d_entries) -> jax.Array:
        """The gradient of ``entries`` in the representatives' Q values, from that in H's entries."""
        if self._by_group is not None:
            return d_entries @ self._by_group
        return self._q_sum(d_entries[self._term_entry] * self._term_coef)

    def assemble(self, q) -> jax.Array:
        """The dense D x D precision from the flat Q entries."""
        h = self.entries(q)
        return jnp.concatenate([h, jnp.zeros((1,), h.dtype)])[self._dense_index]

    # ------------------------------------------------------------ the Gaussian integral

    def eliminate(self, caps=None):
        """Choose the elimination order (``caps``: the group sizes to try, default ``_GROUP_CAPS``)
        and build ``log_integral`` and ``draw`` on it."""
        self.groups, self.rest = self._split(_GROUP_CAPS if caps is None else caps)
        self.log_integral = self._make_integral()

    def _split(self, caps):
        """The elimination order: groups of block elements eliminated first, then the rest R.

        For each cap k in ``caps``, elements are taken greedily by fewest neighbours into S as long as every
        connected component of H[S, S] keeps at most k elements; k = 1 makes H[S, S] diagonal. The
        cap with the fewest estimated operations per gradient is kept (:func:`elimination_cost`).
        Returns the groups (lists of block indices, H[S, S] is block diagonal with them) and R.
        """
        neighbours = [set() for _ in range(self.size)]
        for i, j in self.targets:
            if i != j:
                neighbours[i].add(j)
                neighbours[j].add(i)
        order = sorted(range(self.size), key=lambda i: len(neighbours[i]))
        best = None
        for cap in caps:
            groups, rest = _greedy_groups(order, neighbours, self.size, cap)
            cost = elimination_cost([len(g) for g in groups], len(rest))
            if best is None or cost < best[0]:
                best = (cost, groups, rest)
        _, groups, rest = best
        return groups, np.asarray(rest, np.int64)

    @property
    def eliminated(self) -> int:
        """How many block elements are eliminated before the dense factorisation of the rest."""
        return int(sum(len(g) for g in self.groups))

    def _make_integral(self):
        """F(q, g) = 1/2 g^T H^-1 g - 1/2 log det H, H = H(q), with a hand-written gradient.

        H = [[A, B], [B^T, C]] in the order (groups, R), A block diagonal with one small dense block
        per group (padded to a common size k with unit diagonal). A's blocks are factored one at a
        time, L_b^-1 B_b and the Schur complement K = C - B^T A^-1 B follow as batched products, and
        only K is factored densely. dF/dH = -(m m^T + H^-1) / 2 is needed only on H's nonzero
        entries: H^-1 on A's blocks, on B and on C, from A^-1 and K^-1 without forming H^-1.
        dF/dg = m.
        """
        groups, R = self.groups, self.rest
        nb, nR, n = len(groups), len(R), len(self.targets)
        k = max(len(g) for g in groups)
        members = np.full((nb, k), self.size)  # padding reads an appended zero / writes a dropped slot
        for b, g in enumerate(groups):
            members[b, :len(g)] = g
        padded = members == self.size
        group_of = np.full(self.size, -1)
        slot_of = np.full(self.size, -1)
        for b, g in enumerate(groups):
            group_of[g] = b
            slot_of[g] = np.arange(len(g))
        position_R = np.full(self.size, -1)
        position_R[R] = np.arange(nR)
        zero = n  # index of the appended zero entry of h
        dense = np.concatenate([np.asarray(self._dense_index), np.full((1, self.size), zero)], axis=0)
        dense = np.concatenate([dense, np.full((self.size + 1, 1), zero)], axis=1)
        A_index = jnp.asarray(dense[members[:, :, None], members[:, None, :]], jnp.int32)
        B_index = jnp.asarray(dense[members[:, :, None], np.asarray(R)[None, None, :]], jnp.int32)
        C_index = jnp.asarray(dense[np.ix_(R, R)], jnp.int32)
        pad_eye = jnp.asarray(np.einsum("bi,ij->bij", padded, np.eye(k)))
        members_j = jnp.asarray(members, jnp.int32)
        R_j = jnp.asarray(R, jnp.int32)
        # Where each entry of H sits in [(H^-1) on A's blocks, (H^-1)_SR, (H^-1)_RR], flattened.
        p, q = self.targets[:, 0], self.targets[:, 1]
        in_S = group_of >= 0
        inverse_index = np.empty(n, np.int64)
        for e, (i, j) in enumerate(zip(p, q)):
            if in_S[i] and in_S[j]:  # the same group: H[S, S] is block diagonal
                inverse_index[e] = group_of[i] * k * k + slot_of[i] * k + slot_of[j]
            elif in_S[i] or in_S[j]:
                s_, r_ = (i, j) if in_S[i] else (j, i)
                inverse_index[e] = nb * k * k + (group_of[s_] * k + slot_of[s_]) * nR + position_R[r_]
            else:
                inverse_index[e] = nb * k * k + nb * k * nR + position_R[i] * nR + position_R[j]
        inverse_index = jnp.asarray(inverse_index, jnp.int32)
        off_diagonal = jnp.asarray(np.where(p == q, 1.0, 2.0))
        p, q = jnp.asarray(p, jnp.int32), jnp.asarray(q, jnp.int32)

        def inverse_factors(A):
            """L_b^-1 of each block's Cholesky factor. One block at a time: a batched LAPACK kernel
            can deadlock XLA's CPU thread pool (see CollapsedPosterior._draw_block)."""
            if k == 1:
                return 1.0 / jnp.sqrt(A)
            return jax.lax.map(_factor_inverse, A)

        def factor(q_entries, g):
            h = jnp.concatenate([self.entries(q_entries), jnp.zeros((1,), g.dtype)])
            g_pad = jnp.concatenate([g, jnp.zeros((1,), g.dtype)])
            L_inv = inverse_factors(h[A_index] + pad_eye)  # (nb, k, k)
            u = _group_product("bij,bj->bi", L_inv, g_pad[members_j])
            log_det = -2.0 * jnp.sum(jnp.log(jnp.diagonal(L_inv, axis1=1, axis2=2)))
            if nR == 0:
                m_S = _group_product("bji,bj->bi", L_inv, u)
                return _scatter(m_S, None), log_det, (L_inv, None, None)
            V = _group_product("bij,bjr->bir", L_inv, h[B_index])  # L_b^-1 B_b
            LK_inv = _factor_inverse(h[C_index] - jnp.einsum("bir,bis->rs", V, V))  # of the Schur complement
            m_R = LK_inv.T @ (LK_inv @ (g[R_j] - jnp.einsum("bir,bi->r", V, u)))
            m_S = _group_product("bji,bj->bi", L_inv, u - jnp.einsum("bir,r->bi", V, m_R))
            log_det = log_det - 2.0 * jnp.sum(jnp.log(jnp.diagonal(LK_inv)))
            return _scatter(m_S, m_R), log_det, (L_inv, V, LK_inv)

        def _scatter(m_S, m_R):
            m = jnp.zeros(self.size + 1, m_S.dtype).at[members_j.ravel()].set(m_S.ravel())[:self.size]
            return m if m_R is None else m.at[R_j].set(m_R)

        @jax.custom_vjp
        def integral(q_entries, g):
            m, log_det, _ = factor(q_entries, g)
            return 0.5 * jnp.vdot(g, m) - 0.5 * log_det

        def forward(q_entries, g):
            m, log_det, factors = factor(q_entries, g)
            return 0.5 * jnp.vdot(g, m) - 0.5 * log_det, (m, factors)

        def backward(residuals, cotangent):
            m, (L_inv, V, LK_inv) = residuals
            A_inv = _group_product("bji,bjk->bik", L_inv, L_inv)
            if LK_inv is None:
                inverse = A_inv.ravel()
            else:
                K_inv = LK_inv.T @ LK_inv
                X = _group_product("bji,bjr->bir", L_inv, V)  # A^-1 B
                SR = -jnp.einsum("bir,rs->bis", X, K_inv)  # (H^-1)_SR
                SS = A_inv - _group_product("bir,bjr->bij", SR, X)  # A^-1 + A^-1 B K^-1 B^T A^-1
                inverse = jnp.concatenate([SS.ravel(), SR.ravel(), K_inv.ravel()])
            d_entries = -0.5 * cotangent * off_diagonal * (m[p] * m[q] + inverse[inverse_index])
            d_groups = self._entries_transpose(d_entries)
            # Only the representatives were read (the others are the same functions of theta).
            d_q = jnp.zeros(self.num_q, d_groups.dtype).at[self._representative].set(d_groups)
            return d_q, cotangent * m

        integral.defvjp(forward, backward)
        self._factor = factor
        self._members, self._R = members_j, R_j
        # Without LAPACK calls, draws can be vmapped safely (see _factor_inverse).
        self.vectorizable = k == 1 and nR <= _UNROLLED_BELOW
        return integral

    def draw(self, q, g, eps) -> jax.Array:
        """z ~ N(H^-1 g, H^-1) from standard normal ``eps`` (length D), by the same elimination:
        z_R from the Schur complement's factor, then each group's z given z_R."""
        m, _, (L_inv, V, LK_inv) = self._factor(q, g)
        eps_S = jnp.concatenate([eps, jnp.zeros((1,), eps.dtype)])[self._members]
        if LK_inv is None:
            step_S = _group_product("bji,bj->bi", L_inv, eps_S)
            step_R = None
        else:
            step_R = LK_inv.T @ eps[self._R]
            step_S = _group_product("bji,bj->bi", L_inv, eps_S - jnp.einsum("bir,r->bi", V, step_R))
        step = jnp.zeros(self.size + 1, m.dtype).at[self._members.ravel()].set(step_S.ravel())[:self.size]
        return m + (step if step_R is None else step.at[self._R].set(step_R))


def _ragged(lengths):
    """For ranges of the given lengths laid end to end: (each position's range, its index within it)."""
    owner = np.repeat(np.arange(len(lengths)), lengths)
    return owner, np.arange(len(owner)) - np.repeat(np.cumsum(lengths) - lengths, lengths)


def _weighted_rows(weights, rows_t):
    """``weights @ rows_t.T`` as a broadcast product and a sum along the minor axis: XLA fuses it
    with its neighbours, where a dot of a few rows is a library call whose fixed cost dominates."""
    return jnp.sum(rows_t * weights, axis=-1)


def _group_product(spec, X, Y):
    """``jnp.einsum(spec, X, Y)`` for products within each group (leading axis b, group size i/j/k).
    With groups of one element, a broadcast product: XLA's CPU runtime runs a batched dot of 1 x 1
    matrices as one tiny product per group."""
    if X.shape[1] > 1:
        return jnp.einsum(spec, X, Y)
    if spec in ("bij,bj->bi", "bji,bj->bi"):
        return X[:, :, 0] * Y
    if spec == "bir,bjr->bij":
        return jnp.sum(X * Y, axis=-1, keepdims=True)
    return X * Y  # bij,bjr->bir; bji,bjr->bir; bji,bjk->bik


def _factor_inverse(K):
    """L^-1 for the lower Cholesky factor L of K. Below ``_UNROLLED_BELOW`` rows, by unrolled jnp
    operations: no LAPACK call, whose fixed cost dominates tiny matrices and whose batched
    kernels must not run under ``vmap`` (they can deadlock XLA's CPU thread pool)."""
    n = K.shape[-1]
    if n > _UNROLLED_BELOW:
        return jax.scipy.linalg.solve_triangular(jnp.linalg.cholesky(K), jnp.eye(n, dtype=K.dtype), lower=True)
    # Entry by entry on scalars, stacked once at the end: XLA fuses scalar arithmetic into a few
    # kernels, where row updates of a matrix (``.at[].set``) cost a kernel each.
    L = [[None] * n for _ in range(n)]
    for j in range(n):
        L[j][j] = jnp.sqrt(K[..., j, j] - sum(L[j][t] * L[j][t] for t in range(j)))
        for i in range(j + 1, n):
            L[i][j] = (K[..., i, j] - sum(L[i][t] * L[j][t] for t in range(j))) / L[j][j]
    zero = jnp.zeros_like(K[..., 0, 0])
    X = [[zero] * n for _ in range(n)]
    for i in range(n):  # forward substitution: L X = I
        for c in range(i + 1):
            X[i][c] = ((1.0 if c == i else 0.0) - sum(L[i][t] * X[t][c] for t in range(c, i))) / L[i][i]
    return jnp.stack([jnp.stack(row, axis=-1) for row in X], axis=-2)


def _greedy_groups(order, neighbours, size, cap):
    """Elements taken in ``order`` into S while every connected component of S stays at most ``cap``
    elements (union-find); returns S's components (the groups) and the rest."""
    parent = list(range(size))
    count = [1] * size
    in_S = [False] * size

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    rest = []
    for i in order:
        roots = {find(j) for j in neighbours[i] if in_S[j]}
        if 1 + sum(count[r] for r in roots) > cap:
            rest.append(i)
            continue
        in_S[i] = True
        for r in roots:
            parent[r] = i
            count[i] += count[r]
    groups = {}
    for i in range(size):
        if in_S[i]:
            groups.setdefault(find(i), []).append(i)
    return sorted(groups.values()), sorted(rest)


def elimination_cost(group_sizes, rest) -> float:
    """Estimated multiply-adds of one value and gradient of the Gaussian integral: the groups'
    factors (padded to the largest), the Schur complement, its factor and inverse, and H^-1 on the
    groups. Groups above one element pay a fixed cost each for being factored one at a time.

    >>> elimination_cost([1] * 65, 148) > elimination_cost([16] * 8, 85)  # tensor_small: diagonal vs rows
    True
    """
    nb, k = len(group_sizes), max(group_sizes, default=0)
    per_group = 0 if k <= 1 else _PER_GROUP_COST
    return nb * (k ** 3 + 3 * k * k * rest + 2 * k * rest * rest + per_group) + 1.7 * rest ** 3


class _GatherSum:
    """``segment_sum`` by gathers only (XLA's CPU scatter-add costs several times more per element).

    Segments are grouped by their number of members rounded up to a power of two; each group
    gathers a padded (segments, width) matrix of the values and sums its rows.
    """

    def __init__(self, segment_ids, num_segments):
        segment_ids = np.asarray(segment_ids)
        n = len(segment_ids)
        order = np.argsort(segment_ids, kind="stable")
        counts = np.bincount(segment_ids, minlength=num_segments)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        widths = np.where(counts > 0, 2 ** np.ceil(np.log2(np.maximum(counts, 1))).astype(int), 0)
        self.groups, placed = [], []
        for width in np.unique(widths):
            segs = np.nonzero(widths == width)[0]
            if width == 0:
                continue
            offsets = np.arange(width)
            index = np.where(offsets[None, :] < counts[segs, None],
                             order[np.minimum(starts[segs, None] + offsets[None, :], n - 1)], n)
            self.groups.append(jnp.asarray(index, jnp.int32))
            placed.append(segs)
        placed = np.concatenate(placed) if placed else np.zeros(0, int)
        where = np.full(num_segments, len(placed))  # empty segments read the appended zero
        where[placed] = np.arange(len(placed))
        self.where = jnp.asarray(where, jnp.int32)

    def __call__(self, values):
        padded = jnp.concatenate([values, jnp.zeros((1,), values.dtype)])
        sums = [jnp.sum(padded[index], axis=1) for index in self.groups]
        return jnp.concatenate(sums + [jnp.zeros((1,), values.dtype)])[self.where]
