"""What a decoder layer hands its attention policy: :class:`AttnInputs`.

It lives apart from the model and the policies so that both can import it and neither imports
the other.
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttnInputs:
    """One layer's attention inputs for a chunk of ``T`` tokens (``T = 1`` in decode).

    ``q [B, T, Hq, D]``, ``k``/``v`` ``[B, T, Hkv, D]`` after projection, with RoPE applied to
    ``q`` and ``k`` at ``positions [B, T]`` (absolute; ``-1`` marks padding, never attended to
    nor stored). ``q_raw``/``k_raw`` are the same before RoPE, filled only for a policy whose
    ``needs_raw`` is true (learned scorers read them); ``None`` otherwise, so nothing is kept
    alive for policies that don't ask.
    """

    q: jax.Array
    k: jax.Array
    v: jax.Array
    positions: jax.Array
    q_raw: jax.Array | None = None
    k_raw: jax.Array | None = None
