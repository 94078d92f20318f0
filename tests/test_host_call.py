"""Host calls from jitted code (``host_offload.host_call``): the FFI handler against
``io_callback``, the reference it replaces."""

from __future__ import annotations

import jax
import jax.experimental
import jax.numpy as jnp
import numpy as np
import pytest

from host_offload import host_call as hc
from longctx_jax.generate import generate
from longctx_jax.policies import make_policy

pytestmark = pytest.mark.skipif(not hc._registered(), reason="no C++ compiler: io_callback only")


def _mix(scale, x, y):
    return (x.astype(np.float32) * scale + y[:, None]).astype(np.float32)


def _loop(x, y):
    """Forty calls in a jitted loop, each on the last one's result: any lost, repeated or
    reordered call changes the answer."""
    def body(i, x):
        out = hc.host_call(_mix, jax.ShapeDtypeStruct(x.shape, jnp.float32),
                           x.astype(jnp.bfloat16), y + i, static=(0.5,))
        return x + out
    return jax.lax.fori_loop(0, 40, body, x)


def test_handler_equals_io_callback(monkeypatch):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
    y = jnp.asarray(rng.normal(size=5), jnp.float32)
    got = jax.jit(_loop)(x, y)
    assert "longctx_host_call" in jax.jit(_loop).lower(x, y).as_text()
    monkeypatch.setenv("LONGCTX_HOST_CALL", "callback")
    jax.clear_caches()  # trace again: the route is chosen while tracing
    assert "longctx_host_call" not in jax.jit(_loop).lower(x, y).as_text()
    want = jax.jit(_loop)(x, y)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_a_call_without_a_result_runs_after_its_operands():
    seen = []

    @jax.jit
    def f(x):
        for i in range(3):
            x = x + 1
            hc.host_call(lambda v: seen.append(np.array(v)), None, x * (i + 1))
        return x

    f(jnp.zeros(2, jnp.int32)).block_until_ready()
    assert [v.tolist() for v in seen] == [[1, 1], [4, 4], [9, 9]]


def test_a_failing_function_raises_its_message():
    def bad(x):
        raise ValueError("the store is gone")

    f = jax.jit(lambda x: hc.host_call(bad, jax.ShapeDtypeStruct(x.shape, x.dtype), x))
    with pytest.raises(Exception, match="host call failed: ValueError: the store is gone"):
        f(jnp.ones(3)).block_until_ready()


def test_a_long_message_is_cut_whole():
    def bad(x):
        raise ValueError("é" * 2000)  # two bytes a character: cut past the handler's buffer

    f = jax.jit(lambda x: hc.host_call(bad, jax.ShapeDtypeStruct(x.shape, x.dtype), x))
    with pytest.raises(Exception, match="host call failed: ValueError: éé"):
        f(jnp.ones(3)).block_until_ready()


def test_a_result_of_the_wrong_shape_is_an_error():
    f = jax.jit(lambda x: hc.host_call(np.ravel, jax.ShapeDtypeStruct((3, 2), x.dtype), x))
    with pytest.raises(Exception, match=r"returned shape \(6,\), expected \(3, 2\)"):
        f(jnp.ones((2, 3))).block_until_ready()


def test_retrieval_decodes_alike_through_either_route(tiny, monkeypatch):
    """The same tokens with the handler and with io_callback (qivf: prefill queries, inserts
    and retrieval all cross)."""
    cfg, params = tiny
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, cfg.vocab_size, n).tolist() for n in (40, 29)]
    policy = make_policy("retrieval", sink=2, window=4, k=3, index="qivf", scan=0.5,
                         min_index_keys=8)
    traced = []
    monkeypatch.setattr(hc, "io_callback", lambda *a, **k: traced.append(1) or
                        jax.experimental.io_callback(*a, **k))
    runs = []
    for route in ("ffi", "callback"):
        monkeypatch.setenv("LONGCTX_HOST_CALL", route)
        jax.clear_caches()  # trace again: the route is chosen while tracing
        runs.append(generate(cfg, params, policy, prompts, max_new_tokens=6, chunk_size=16,
                             max_len=64))
        assert bool(traced) == (route == "callback")
    for row in range(2):
        assert runs[0].ids(row) == runs[1].ids(row)
