"""Evaluation: synthetic long-context tasks, scorers, a grid runner and plots."""

from longctx_jax.evals.runner import MODES, CellResult, format_table, run_eval
from longctx_jax.evals.tasks import NIAH_VARIANTS, TASKS, Sample, exact_match, make_samples

__all__ = ["CellResult", "MODES", "NIAH_VARIANTS", "Sample", "TASKS", "exact_match",
           "format_table", "make_samples", "run_eval"]
