"""Attention policies: one module per method, all behind the interface in :mod:`.base`."""

from longctx_jax.policies.base import AttentionPolicy, available, make_policy, policy_from_spec
from longctx_jax.policies.full import Full
from longctx_jax.policies.streaming import Streaming
from longctx_jax.policies.duo import Duo  # noqa: F401  (registers "duo")
from longctx_jax.policies.recycled import Recycled  # noqa: F401  (registers "recycled")
from longctx_jax.policies.locret import Locret  # noqa: F401  (registers "locret")
from longctx_jax.policies.snapkv import SnapKV  # noqa: F401  (registers "snapkv")
from longctx_jax.policies.retrieval import Retrieval  # noqa: F401  (registers "retrieval")

__all__ = ["AttentionPolicy", "Full", "Streaming", "available", "make_policy", "policy_from_spec"]
