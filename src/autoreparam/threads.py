"""One BLAS thread around the package's small dense linear algebra.

JAX's CPU Cholesky and triangular solves call the OpenBLAS that scipy ships. On a machine with
few cores its threads compete with XLA's own: a 148 x 148 Cholesky inside a jitted loop took
0.85-1.66 ms with OpenBLAS's default threads and 0.07-0.19 ms with one on the 2-core machine
(``python -m benchmarks.blas_threads``). The entry points that factorise the
Gaussian block (``collapsed_mcmc``, ``gibbs_mcmc``, ``CollapsedPosterior.complete``,
``fit_hybrid``, ``compare``) run under ``one_blas_thread``; wrap your own ``MCMC.run`` on a
``CollapsedPosterior.potential_fn`` in it the same way. The limit is lifted on exit.

>>> from autoreparam import one_blas_thread
>>> with one_blas_thread():
...     pass
"""

from __future__ import annotations

import contextlib
import functools

from threadpoolctl import threadpool_limits

__all__ = ["one_blas_thread", "with_one_blas_thread"]


@contextlib.contextmanager
def one_blas_thread():
    """Limit BLAS/LAPACK libraries (OpenBLAS, MKL, BLIS) to one thread inside the ``with`` block."""
    # threadpoolctl limits only the libraries already loaded: load the LAPACK jaxlib calls first.
    import scipy.linalg.cython_lapack  # noqa: F401
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def with_one_blas_thread(fn):
    """Decorator: run ``fn`` under ``one_blas_thread``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with one_blas_thread():
            return fn(*args, **kwargs)
    return wrapper
