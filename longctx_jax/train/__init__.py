"""Training of the small learned parts (DuoAttention gates, Locret retaining heads): a shared
loop with orbax checkpoints and exact resume (:mod:`.loop`), synthetic data, optax."""
