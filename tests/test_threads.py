import scipy.linalg.cython_lapack  # noqa: F401  (loaded first, so every count below sees the same libraries)
from threadpoolctl import threadpool_info

from autoreparam import one_blas_thread


def blas_threads():
    return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]


def test_one_blas_thread_inside_and_restored_after():
    with one_blas_thread():
        inside = blas_threads()
    assert inside and set(inside) == {1}  # scipy's OpenBLAS (the LAPACK jaxlib calls) is loaded and limited
    after = blas_threads()
    with one_blas_thread():
        pass
    assert blas_threads() == after


def test_decorated_function_runs_limited_and_keeps_its_name():
    @one_blas_thread()
    def factorise(x):
        """doc"""
        return x, blas_threads()

    value, threads = factorise(3)
    assert value == 3 and set(threads) == {1}
    assert factorise.__name__ == "factorise" and factorise.__doc__ == "doc"


def test_overlapping_blocks_in_two_threads_restore_the_limit():
    start = blas_threads()
    first, second = one_blas_thread(), one_blas_thread()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # out of order, as two threads' blocks can end
    assert set(blas_threads()) == {1}  # the second block is still open
    second.__exit__(None, None, None)
    assert blas_threads() == start


def test_an_exception_restores_the_limit():
    start = blas_threads()

    @one_blas_thread()
    def fails():
        raise ValueError("inside")

    try:
        fails()
    except ValueError:
        pass
    assert blas_threads() == start
