"""sparse_jax: weight-sparse GPT-2-style transformers and their circuits, in JAX."""

__version__ = "0.1.0"
