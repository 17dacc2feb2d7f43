"""The per-backend preprocessing, under its old name: it lives in vitctl.data.preprocess.

Kept importable for the scripts under bench/ (bench/verify.py, bench/verify_bf16.py).
"""

from vitctl.data.preprocess import IMAGE_SUFFIXES, load_image_files, normalize, random_images, to_jax_input, to_torch_input

__all__ = ["IMAGE_SUFFIXES", "load_image_files", "normalize", "random_images", "to_jax_input", "to_torch_input"]
