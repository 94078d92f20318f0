"""Runnable notebooks: ``python -m notebooks.run`` executes them (see ``notebooks/README.md``)."""
