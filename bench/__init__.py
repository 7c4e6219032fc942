"""The benchmarks behind `make bench-*`; a package so that bench/gpu_check.py can reuse the others."""
