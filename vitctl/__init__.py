"""vitctl: ViT-22B-style Vision Transformers in JAX and PyTorch, one function, proven.

This module imports neither jax nor torch.
"""

__version__ = "0.1.0"
