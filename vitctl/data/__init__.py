"""The data that train, probe and demo share: sources, the split, preprocessing, the training loader.

- dataset.py: Dataset (one split in memory) and the seeded, stratified train/test split.
- sources/: load_dataset and a module per source format (digits and Fashion-MNIST,
  ImageFolder, .npz, IDX, Hugging Face datasets and parquet).
- preprocess.py: images -> model input per a config's Preprocess spec, on the host and in
  each framework.
- lazy.py: open_records, random-access Records that read one example at a time (packed
  directories, ImageFolder file lists, memory-mapped HF arrow, the small in-memory sets).
- records.py / pack.py: the packed format (ArrayRecord shards + manifest.json) and
  `vitctl data pack`, which writes it from any source.
- augment.py: per-example decode and big_vision-style augmentation from a spec string, its
  randomness from (seed, epoch, example index).
- pipeline.py: StreamLoader and eval_batches, the grain pipeline of `vitctl train` and
  `probe` (global shuffle, per-process slices, worker processes, exact resume, mixup/cutmix).
- loader.py: Loader, the in-memory batches the pipeline replaced (kept for its tests and as
  the reference the pipeline is checked against).
"""
