"""The data that train, probe and demo share: sources, the split, preprocessing, the training loader.

- dataset.py: Dataset (one split in memory) and the seeded, stratified train/test split.
- sources/: load_dataset and a module per source format (digits and Fashion-MNIST,
  ImageFolder, .npz, IDX, Hugging Face datasets and parquet).
- preprocess.py: images -> model input per a config's Preprocess spec, on the host and in
  each framework.
- loader.py: Loader, the shuffled, per-process, resumable batches of `vitctl train`.
"""
