"""Benchmarks that print tables (and append result rows to ``benchmarks/results/``); ``RESULTS.md`` records each
figure with its command.

Run them from the repository root as modules, e.g. ``python -m benchmarks.bench_postprocess``; every script takes
``--smoke`` (tiny synthetic data, or a tiny slice of ``../shared/data``, skipped with a message when absent), which
``tests/test_benchmarks.py`` runs.
"""
