"""One BLAS thread around the package's small dense linear algebra.

JAX's CPU Cholesky and triangular solves call the OpenBLAS that scipy ships. On a machine with
few cores its threads compete with XLA's own: a 148 x 148 Cholesky inside a jitted loop took
0.85-1.66 ms with OpenBLAS's default threads and 0.07-0.19 ms with one on the 2-core machine
(``python -m benchmarks.blas_threads``). The entry points that factorise the
Gaussian block (``collapsed_mcmc``, ``gibbs_mcmc``, ``CollapsedPosterior.complete``,
``fit_hybrid``, ``compare``) run under it (``@one_blas_thread()`` works as a decorator too); wrap your own ``MCMC.run`` on a
``CollapsedPosterior.potential_fn`` in it the same way. The limit is lifted on exit.

>>> from autoreparam import one_blas_thread
>>> with one_blas_thread():
...     pass
"""

from __future__ import annotations

import contextlib
import threading

from threadpoolctl import ThreadpoolController

__all__ = ["one_blas_thread"]


_lock = threading.Lock()
_depth = 0  # ``one_blas_thread`` blocks open in any thread
_limits = None  # the threadpoolctl limiter of the outermost block: it restores the limits on exit
# Found once: finding the loaded libraries reads /proc/self/maps (about 1-3 ms, at every
# ``CollapsedPosterior.complete`` call otherwise). Libraries loaded after the first block are not limited.
_controller = None


@contextlib.contextmanager
def one_blas_thread():
    """Limit BLAS/LAPACK libraries (OpenBLAS, MKL, BLIS) to one thread inside the ``with`` block.

    Blocks may nest and overlap across threads: the first to enter sets the limit, the last to
    leave restores what was there before (each restoring its own entry value would leave the
    limit set when two threads' blocks end out of order).
    """
    global _depth, _limits, _controller
    with _lock:
        if _controller is None:
            # threadpoolctl limits only the libraries already loaded: load the LAPACK jaxlib calls first.
            import scipy.linalg.cython_lapack  # noqa: F401
            _controller = ThreadpoolController()
        if _depth == 0:
            _limits = _controller.limit(limits=1, user_api="blas")
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                _limits.restore_original_limits()
                _limits = None
