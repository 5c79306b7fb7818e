"""Benchmark scripts of synthgen (not part of the installed package).

Run them all with ``python benchmarks/run.py [--quick]``; each ``bench_*.py`` module also runs
on its own and prints its markdown tables.
"""
