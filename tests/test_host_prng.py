"""host_prng: the random bits of JAX's threefry computed in numpy, bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoreparam import host_prng
from autoreparam.trace import jit_draws

SEEDS = [0, 1, 7, -3, 2**31 - 1, -(2**31)]

PROGRAMS = {
    "key": lambda s: jax.random.PRNGKey(s),
    "split": lambda s: jax.random.split(jax.random.PRNGKey(s), 5),
    "split 2-d": lambda s: jax.random.split(jax.random.split(jax.random.key(s))[1], (2, 3)),
    "bits 32": lambda s: jax.random.bits(jax.random.PRNGKey(s), (3, 4)),
    "bits 8": lambda s: jax.random.bits(jax.random.PRNGKey(s), (7,), jnp.uint8),
    "bits 16 scalar": lambda s: jax.random.bits(jax.random.PRNGKey(s), (), jnp.uint16),
    "fold_in constant": lambda s: jax.random.fold_in(jax.random.PRNGKey(s), 12345),
    "fold_in traced": lambda s: jax.random.fold_in(jax.random.key(s), s),
    "vmapped split": lambda s: jax.vmap(lambda k: jax.random.split(k, 3))(jax.random.split(jax.random.key(s), 4)),
    "vmapped bits": lambda s: jax.vmap(lambda k: jax.random.bits(k, (2,)))(jax.random.split(jax.random.key(s), 4)),
    "vmapped fold_in": lambda s: jax.vmap(jax.random.fold_in)(jax.random.split(jax.random.key(s), 3),
                                                              jnp.arange(3, dtype=jnp.uint32)),
}


def _host(value):
    return np.asarray(jax.random.key_data(value) if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key)
                      else value)


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_bits_equal_jax(name):
    program = PROGRAMS[name]
    for seed in SEEDS:
        seed = np.int32(seed)
        got = host_prng.evaluate_jaxpr(jax.make_jaxpr(program)(seed), seed)
        want = [_host(w) for w in jax.tree.leaves(jax.jit(program)(seed))]
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape
            np.testing.assert_array_equal(g, w, err_msg=f"{name}, seed {seed}")


def test_floating_point_and_other_prngs_are_left_to_xla():
    floats = jax.make_jaxpr(lambda x: x + 1.0)(np.float32(1.0))
    with pytest.raises(host_prng.HostUnsupported, match="add"):
        host_prng.evaluate_jaxpr(floats, np.float32(1.0))
    rbg = jax.make_jaxpr(lambda s: jax.random.bits(jax.random.key(s, impl="rbg"), (2,)))(np.int32(0))
    with pytest.raises(host_prng.HostUnsupported, match="rbg"):
        host_prng.evaluate_jaxpr(rbg, np.int32(0))


def _threefry_draws(seed):
    a, b = jax.random.split(jax.random.PRNGKey(seed))
    return {"normal": jax.random.normal(a, (5,)), "cauchy": jax.random.cauchy(b, (3,))}


def _with_rbg_draws(seed):
    return {**_threefry_draws(seed), "rbg": jax.random.normal(jax.random.key(seed, impl="rbg"), (2,))}


@pytest.mark.parametrize("program, compiled", [(_threefry_draws, ["remainder"]), (_with_rbg_draws, ["_with_rbg_draws"])])
def test_draws_program_gives_the_compiled_bits(monkeypatch, program, compiled):
    """jit_draws computes the hashes in numpy and compiles the rest; with a part it cannot evaluate
    (another PRNG) it compiles the whole program. Either way the draws are those of one compiled
    program with the same options."""
    from autoreparam import trace

    names = []
    compile_ = trace._compile
    monkeypatch.setattr(trace, "_compile", lambda traced, opts, size: names.append(traced.fun_name) or compile_(traced, opts, size))
    draws = jit_draws(program)
    for seed in (0, 11):
        got = draws(np.int32(seed))
        want = jax.jit(program).trace(np.int32(seed)).lower().compile(
            compiler_options=trace.QUICK_COMPILE_OPTIONS)(np.int32(seed))
        for k in want:
            assert np.asarray(got[k]).tobytes() == np.asarray(want[k]).tobytes(), k
    assert names == compiled  # once, for both seeds: the remainder, or the whole program


def test_arguments_take_the_jaxprs_dtypes():
    """A Python int or an int64 seed where the jaxpr has int32 (x64 off): the seed's shift by 32 is 0."""
    bits = lambda s: jax.random.bits(jax.random.PRNGKey(s), (2,))  # noqa: E731
    for seed in (np.int64(-3), -3):
        got = host_prng.evaluate_jaxpr(jax.make_jaxpr(bits)(seed), seed)[0]
        np.testing.assert_array_equal(got, np.asarray(jax.jit(bits)(seed)))


def test_unsigned_arithmetic_shift_fills_with_the_top_bit():
    from jax import lax

    shift = lambda x, s: lax.shift_right_arithmetic(x, s)  # noqa: E731
    x, s = np.array([200, 3, 255], np.uint8), np.array([2, 1, 9], np.uint8)
    got = host_prng.evaluate_jaxpr(jax.make_jaxpr(shift)(x, s), x, s)[0]
    np.testing.assert_array_equal(got, np.asarray(jax.jit(shift)(x, s)))


def test_what_it_cannot_compute_exactly_raises():
    # a float comparison (XLA flushes denormals, numpy does not)
    compare = jax.make_jaxpr(lambda x: jax.random.fold_in(jax.random.key(0), (x > 0).astype(jnp.uint32)))
    with pytest.raises(host_prng.HostUnsupported, match="float32"):
        host_prng.evaluate_jaxpr(compare(np.float32(1e-45)), np.float32(1e-45))
    # an empty batch of keys
    empty = jax.make_jaxpr(lambda s: jax.vmap(lambda k: jax.random.bits(k, (2,)))(jax.random.split(jax.random.key(s), 0)))
    with pytest.raises(host_prng.HostUnsupported, match="0 keys"):
        host_prng.evaluate_jaxpr(empty(np.int32(1)), np.int32(1))
    # more hashes than compiling them costs
    many = jax.make_jaxpr(lambda s: jax.random.bits(jax.random.key(s), (host_prng.MAX_VALUES + 1,)))
    with pytest.raises(host_prng.HostUnsupported, match="hashes"):
        host_prng.evaluate_jaxpr(many(np.int32(1)), np.int32(1))


def test_the_threefry_flag_is_followed():
    bits = lambda s: jax.random.bits(jax.random.split(jax.random.key(s), 3)[2], (4,))  # noqa: E731
    seed = np.int32(2)
    host_prng.evaluate_jaxpr(jax.make_jaxpr(bits)(seed), seed)  # cached under the default flag
    flag = jax.config.jax_threefry_partitionable
    try:
        jax.config.update("jax_threefry_partitionable", not flag)
        got = host_prng.evaluate_jaxpr(jax.make_jaxpr(bits)(seed), seed)[0]
        np.testing.assert_array_equal(got, np.asarray(jax.jit(bits)(seed)))
    finally:
        jax.config.update("jax_threefry_partitionable", flag)
