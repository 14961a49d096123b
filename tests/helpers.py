"""Small assertions shared by the test files."""

import jax
import jax.extend


def one_line(exc) -> str:
    """The message of an error, asserting it is one non-empty line."""
    msg = str(exc)
    assert msg.strip() and "\n" not in msg, repr(msg)
    return msg


def linear_algebra_operands(jaxpr):
    """(primitive, operand shapes) of every Cholesky and triangular solve in ``jaxpr`` and its sub-jaxprs.

    jaxlib's batched LAPACK kernels split the batch over XLA's intra-op pool and block a worker until
    the pieces finish: two independent batched factorisations in one program can deadlock it (this hung
    ``CollapsedPosterior.complete``). Tests assert every operand is one matrix (2-D)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("cholesky", "triangular_solve"):
            found.append((eqn.primitive.name, [v.aval.shape for v in eqn.invars]))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += linear_algebra_operands(sub)
    return found
