"""The radix select chooses exactly ``lax.top_k``'s set (ties to the lower index) on fresh random
rows: ties, infinities, ``k`` at its limits, leading axes, bf16 and float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import top_k_unsorted


def _rows(rng, kind, shape, dtype):
    x = rng.normal(size=shape).astype(np.float32)
    if kind == "ties":
        x = np.round(x * 2) / 2
    elif kind == "infinities":
        x[rng.random(shape) < 0.3] = -np.inf
        x[rng.random(shape) < 0.05] = np.inf
    elif kind == "constant":
        x[:] = -1.5
    elif kind == "spread":  # many binades: every digit pass decides something
        x = x * np.exp2(rng.integers(-60, 60, shape))
    return jnp.asarray(x, dtype)


@pytest.mark.parametrize("kind", ["normal", "ties", "infinities", "constant", "spread"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("seed", range(3))
def test_same_set_as_lax_top_k(kind, dtype, seed):
    rng = np.random.default_rng(seed)
    lead = tuple(int(n) for n in rng.integers(1, 4, int(rng.integers(1, 3))))
    n = int(rng.integers(1, 700))
    for k in sorted({1, n, int(rng.integers(1, n + 1))}):
        x = _rows(rng, kind, (*lead, n), dtype)
        values, idx = top_k_unsorted(x, k)
        _, want = jax.lax.top_k(x, k)
        assert values.shape == idx.shape == (*lead, k) and values.dtype == x.dtype
        np.testing.assert_array_equal(idx, np.sort(np.asarray(want), axis=-1))
        np.testing.assert_array_equal(values, np.take_along_axis(np.asarray(x), idx, -1))


def test_jits_and_refuses_a_bad_k():
    x = jnp.arange(10.0)[None]
    assert jax.jit(top_k_unsorted, static_argnums=1)(x, 3)[1].tolist() == [[7, 8, 9]]
    for k in (0, 11):
        with pytest.raises(ValueError, match="k must be"):
            top_k_unsorted(x, k)
