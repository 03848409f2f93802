"""Thin command-line wrappers over sparse_jax; each experiment is an importable function."""
