import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from longctx_jax.cache import KV, SlotKV, ring_slot_positions, ring_slots


def _values(positions, heads=2, dim=3):
    """A k/v tensor [B, T, H, D] whose entries encode the token's position."""
    p = np.asarray(positions, np.float32)
    return jnp.asarray(np.broadcast_to(p[:, :, None, None], (*p.shape, heads, dim)))


@settings(max_examples=60, deadline=None)
@given(sink=st.integers(0, 5), window=st.integers(1, 9),
       chunks=st.lists(st.integers(1, 13), min_size=1, max_size=6))
def test_ring_buffer_holds_sink_and_last_window(sink, window, chunks):
    """After any sequence of writes (chunks larger or smaller than the window, wraparound) the
    ring holds exactly positions [0, sink) and the last `window` positions, each in the slot
    that ring_slot_positions names."""
    cache = KV.zeros(1, 2, sink + window, 3, jnp.float32)
    n = 0
    for size in chunks:
        pos = np.arange(n, n + size, dtype=np.int32)[None]
        cache = cache.write(_values(pos), _values(pos), ring_slots(jnp.asarray(pos), sink, window))
        n += size
    slot_pos = np.asarray(ring_slot_positions(n, sink, window))
    expected = set(range(min(n, sink))) | set(range(max(sink, n - window), n))
    assert set(slot_pos[slot_pos >= 0].tolist()) == expected
    stored = np.asarray(cache.k[0, 0, :, 0])
    filled = slot_pos >= 0
    np.testing.assert_array_equal(stored[filled], slot_pos[filled])
    # Valid slots are always a prefix of the ring (what the window decode kernel relies on).
    assert filled.tolist() == [True] * int(filled.sum()) + [False] * int((~filled).sum())


@settings(max_examples=30, deadline=None)
@given(sink=st.integers(0, 4), window=st.integers(1, 6), lengths=st.lists(
    st.integers(0, 20), min_size=2, max_size=3), chunk=st.integers(1, 8))
def test_ring_ragged_rows_ignore_padding(sink, window, lengths, chunk):
    """Rows of different lengths (right-padded with -1) write only their real tokens."""
    b = len(lengths)
    cache = KV.zeros(b, 1, sink + window, 1, jnp.float32)
    width = chunk * -(-max(max(lengths), 1) // chunk)
    for start in range(0, width, chunk):
        pos = np.arange(start, start + chunk)[None].repeat(b, 0)
        pos = np.where(pos < np.array(lengths)[:, None], pos, -1).astype(np.int32)
        v = _values(pos, 1, 1)
        cache = cache.write(v, v, ring_slots(jnp.asarray(pos), sink, window))
    for row, n in enumerate(lengths):
        slot_pos = np.asarray(ring_slot_positions(n, sink, window))
        stored = np.asarray(cache.k[row, 0, :, 0])
        np.testing.assert_array_equal(stored[slot_pos >= 0], slot_pos[slot_pos >= 0])
        assert np.all(stored[slot_pos < 0] == 0)


def test_dense_write_drops_padding_and_out_of_range():
    cache = KV.zeros(2, 1, 6, 1, jnp.float32)
    pos = jnp.array([[0, 1, 2], [3, -1, 7]], jnp.int32)
    v = _values(np.array([[10, 11, 12], [13, 14, 15]]), 1, 1)
    cache = cache.write(v, v, pos)
    np.testing.assert_array_equal(cache.k[:, 0, :, 0], [[10, 11, 12, 0, 0, 0], [0, 0, 0, 13, 0, 0]])


# ------------------------------------------------------------------------ per-head slot cache

def _slot_cache(rng, b, h, s, d, fill):
    """A SlotKV with ``fill[b, h]`` random filled slots at random places."""
    pos = np.full((b, h, s), -1, np.int32)
    for i in range(b):
        for j in range(h):
            where = rng.choice(s, fill[i, j], replace=False)
            pos[i, j, where] = rng.choice(1000, fill[i, j], replace=False)
    return SlotKV(jnp.asarray(rng.normal(size=(b, h, s, d)), jnp.float32),
                  jnp.asarray(rng.normal(size=(b, h, s, d)), jnp.float32), jnp.asarray(pos),
                  jnp.asarray(rng.normal(size=(b, h, s)), jnp.float32))


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 12), st.integers(0, 14),
       st.integers(0, 2**31 - 1))
def test_slot_retain_keeps_exactly_the_top_filled_slots(b, h, s, keep, seed):
    rng = np.random.default_rng(seed)
    cache = _slot_cache(rng, b, h, s, 2, rng.integers(0, s + 1, (b, h)))
    # Integer priorities: ties happen, and go to the lower slot.
    prio = rng.integers(0, 4, (b, h, s)).astype(np.float32)
    out = cache.retain(jnp.asarray(prio), keep)
    pos, k = np.asarray(cache.pos), np.asarray(cache.k)
    for i in range(b):
        for j in range(h):
            filled = [x for x in range(s) if pos[i, j, x] >= 0]
            want = sorted(filled, key=lambda x: (-prio[i, j, x], x))[:keep]
            want = sorted(want, key=lambda x: pos[i, j, x])  # packed in position order
            n = len(want)
            np.testing.assert_array_equal(np.asarray(out.pos)[i, j, :n], pos[i, j, want])
            np.testing.assert_array_equal(np.asarray(out.k)[i, j, :n], k[i, j, want])
            assert np.all(np.asarray(out.pos)[i, j, n:] == -1)
    np.testing.assert_array_equal(out.filled(), np.minimum((pos >= 0).sum(-1), keep))


def test_slot_write_and_free_slots_per_head():
    cache = SlotKV.empty(2, 3, 5, 4, jnp.float32)
    free = cache.free_slots(2)
    np.testing.assert_array_equal(free, np.broadcast_to([0, 1], (2, 3, 2)))
    k = jnp.arange(2 * 2 * 3 * 4, dtype=jnp.float32).reshape(2, 2, 3, 4)
    # Head 1 of sequence 0 drops its second token (slot -1); sequence 1 writes slots 3 and 4,
    # but its second token is padding (position -1): nothing is stored for it.
    slots = jnp.array([[[0, 1], [2, -1], [0, 1]], [[3, 4], [3, 4], [3, 4]]])
    positions = jnp.array([[7, 8], [5, -1]])
    score = jnp.arange(12, dtype=jnp.float32).reshape(2, 3, 2)
    out = cache.write(k, -k, slots, positions, score)
    np.testing.assert_array_equal(out.pos[0, 1], [-1, -1, 7, -1, -1])
    np.testing.assert_array_equal(out.k[0, 1, 2], k[0, 0, 1])
    np.testing.assert_array_equal(out.v[1, 2, 3], -k[1, 0, 2])
    np.testing.assert_array_equal(out.score[1, 0, 3:], [6.0, 0.0])
    np.testing.assert_array_equal(out.filled(), [[2, 1, 2], [1, 1, 1]])
    np.testing.assert_array_equal(out.free_slots(4)[0, 1], [0, 1, 3, 4])
    np.testing.assert_array_equal(out.free_slots(5)[0, 0], [2, 3, 4, -1, -1])
    np.testing.assert_array_equal(out.free_slots(4)[1, 0], [0, 1, 2, 4])
