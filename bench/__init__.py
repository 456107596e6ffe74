"""Benchmarks (not tests): `make bench` / `python -m bench`; see bench/run.py."""
