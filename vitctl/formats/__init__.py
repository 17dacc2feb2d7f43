"""File formats vitctl reads and writes, one module per format, below every command.

    base.py         reader and writer protocols, TensorInfo, where a checkpoint's files may lie, write errors
    safetensors.py  model.safetensors and HF shards: header-validated mapped reader, header-first writer
    orbax.py        Orbax params/: the one reader and the one writer
    zarr.py         Orbax's zarr arrays: chunk shapes, metadata checks, uncompressed chunks read in place
    npz.py          big_vision .npz archives, read lazily
    layout.py       the checkpoint directory: config.json, params/, model.safetensors; save and load
    fastcopy.py     the speed tricks the readers and writers use (each with a plain path)

Nothing here imports vitctl.convert, a command or an app: a format knows files, names and
arrays, not what a conversion or a training run does with them.
"""
