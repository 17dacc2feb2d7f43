"""The data that train, probe and demo share: sources, the split, preprocessing, the training loader.

- dataset.py: Dataset (one split in memory) and the seeded, stratified train/test split.
- sources.py: load_dataset and a reader per source (digits, Fashion-MNIST, ImageFolder,
  .npz, IDX, Hugging Face datasets and parquet).
- preprocess.py: images -> model input per a config's Preprocess spec, on the host and in
  each framework.
- loader.py: Loader, the shuffled, per-process, resumable batches of `vitctl train`.
"""
