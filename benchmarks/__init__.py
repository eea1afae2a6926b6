"""Benchmarks of deepseek_ops against its peers; `python -m benchmarks` runs them all.

timing.py is the one timing helper (CUDA events, L2 flush, CUDA-graph replay), report.py holds
Record (the JSON schema), the ceiling probe and the report writers; each bench_<op>.py exposes
run(quick=False) -> list[Record] and a pytest-benchmark test.
"""
