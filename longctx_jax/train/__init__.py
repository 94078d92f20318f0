"""Training of the small learned parts (DuoAttention gates) with optax; synthetic data; orbax."""
