"""The benchmarks asset group."""
