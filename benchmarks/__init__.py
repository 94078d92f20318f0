"""Speed, memory and quality benchmarks; each module is a script run from the repository root as
``python -m benchmarks.<name>`` (e.g. ``python -m benchmarks.decode --help``)."""
