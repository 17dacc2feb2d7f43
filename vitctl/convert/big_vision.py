"""big_vision `.npz` checkpoints as a source for `vitctl convert`: lazy reads, config inference, one key table.

numpy (and ml_dtypes) only. What a big_vision `.npz` is (google-research/big_vision, models/vit.py
and utils.py):
- a zip of `.npy` members, one per parameter, named by `utils.tree_flatten_with_names`: the flax
  params tree "/"-joined (`Transformer/encoderblock_3/MlpBlock_0/Dense_1/kernel`). Training
  checkpoints wrap it as `params/...` (or, older, `opt/target/...`); two-tower models (SigLIP)
  hold the image tower under `params/img/...` beside `params/txt/...`.
- bfloat16 arrays come back from `np.load` as raw 2-byte void (`|V2`); big_vision's
  `recover_dtype` reinterprets them, and so do we (ml_dtypes.bfloat16, no float32 detour).
- `Encoder(scan=True)` wraps the block in `nn.scan(variable_axes={"params": 0})`: one
  `Transformer/encoderblock/...` tree whose every leaf has a leading depth axis (L, ...).
- Every kernel already has vitctl's JAX layout: the `embedding` conv kernel is HWIO (P, P, C, D),
  flax `MultiHeadDotProductAttention` keeps query/key/value kernels as (D, N, K), biases as
  (N, K) and the `out` kernel as (N, K, D), dense kernels are (in, out). So every row of the
  table is a rename, and shapes are checked against `mapping.jax_param_shapes`.
- The function matches vitctl's classic config (sequential block, LayerNorm eps 1e-6 with bias,
  tanh GELU, position embedding added before the class token, final norm before pooling, MAP
  head with the encoder's heads and mlp_dim and no norm before its attention) to < 1e-6 in fp32
  (tests/convert/test_big_vision.py). One difference with bfloat16 *parameters*: big_vision's
  MAPHead attention has no `dtype`, so flax computes the probe's query projection in bf16
  (probe and kernel both bf16); vitctl casts to the compute dtype first (logits ~1e-3 apart).
- Not representable, refused by name (UNSUPPORTED): `rep_size`'s `pre_logits` layer, pre-2022
  layouts that big_vision itself repairs in `vit.fix_old_checkpoints`. pool_type "none" stores
  the same keys as "gap" (pass overrides={"pool": "none"}); "0" (token 0 without a class
  token) has no vitctl equivalent and cannot be told apart from "gap" by its keys.

Reading: `np.load` on an `.npz` ignores `mmap_mode` and a naive `dict(np.load(...))` holds the
whole checkpoint in memory (numpy#28795). `NpzReader` reads every member's `.npy` header (shape,
dtype) without its data (zipfile reads the first 4 KiB), and one member's data only when asked.
A stored member (np.savez does not compress) is read with positioned reads at its data offset
straight into the result, its zip CRC-32 computed over the same bytes (ISA-L's, else zlib's; both release the GIL).
A scanned member is one stacked tensor (L, ...); stored in C order, layer i is the next
contiguous run of its bytes, so `NpzReader.iter_layers` reads it one layer at a time (the CRC
accumulates and is checked after the last layer) and the peak memory is one layer. A deflated
(np.savez_compressed) or Fortran-order member is read whole and its layers are views of it.

Public API: `open_npz`, `NpzReader`, `resolve_prefix`, `infer_config`, `plan` -> `Plan`
(entries, shapes, `iter_tensors`), `iter_jax_tensors`, `to_vitctl`, `to_big_vision`.

Shapes: D width, N heads, K head_dim, F mlp_dim, L depth, P patch, C channels, T tokens.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import struct
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Self

import ml_dtypes
import numpy as np

try:  # Intel ISA-L's CRC-32 (a dependency where it has wheels): 3x zlib's; same values
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover
    from zlib import crc32

from vitctl import untrusted
from vitctl.config import ViTConfig
from vitctl.convert import mapping
from vitctl.errors import CheckpointError, ConfigError, UnmappedParamError
from vitctl.formats import fastcopy
from vitctl.formats.fastcopy import scratch

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# Deflate's largest possible expansion (RFC 1951: a 258-byte match in 2 bits, ~1032:1). A member
# that declares more than this times its compressed size lies about its size.
DEFLATE_MAX_RATIO = 1032
Shapes = Mapping[str, tuple[tuple[int, ...], np.dtype]]  # npz key -> (shape, dtype), from headers


# --- Lazy .npz reading ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Header:
    shape: tuple[int, ...]
    dtype: np.dtype  # as returned: bfloat16 for |V2
    stored: np.dtype  # as written in the header
    fortran: bool


class NpzReader:
    """An `.npz` opened lazily: member headers without their data, one member's data on request.

    `shapes()` parses every `.npy` header (zipfile reads the first 4 KiB of a member) and returns
    {key: (shape, dtype)}; `read(key)` reads one member, checking its CRC. Pickled (object)
    arrays are refused, like `np.load(allow_pickle=False)`. Use as a context manager.
    """

    CHUNK = 64 << 20  # bytes copied per read call: the only buffer besides the output array

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._zip = zipfile.ZipFile(self.path)
        except FileNotFoundError:
            raise CheckpointError(f"no such file: {self.path}", hint="check the path of the .npz checkpoint") from None
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
            raise CheckpointError(
                f"{self.path} is not a readable .npz (zip) file: {e}",
                hint="the file may be truncated or corrupt (an interrupted download or copy); fetch it again and compare its size",
            ) from None
        self._members: dict[str, zipfile.ZipInfo] = {}
        try:
            size = self.path.stat().st_size
            for info in self._zip.infolist():
                if info.is_dir():
                    continue
                self._check_member(info, size)
                self._members[info.filename[: -len(".npy")]] = info
        except BaseException:
            self._zip.close()
            raise
        self._headers: dict[str, _Header] = {}

    def _check_member(self, info: zipfile.ZipInfo, size: int) -> None:
        """A member's name and declared sizes, from the zip directory alone: names become tensor
        names (plain relative names only), and the declared size must be one the compressed
        bytes can hold, so a small archive cannot promise (and make vitctl plan for) gigabytes."""
        untrusted.check_name(info.filename, f"{self.path} (zip member)", kind="the member")
        if not info.filename.endswith(".npy"):
            raise CheckpointError(
                f"{self.path}: member '{info.filename}' is not a .npy array",
                hint="a big_vision checkpoint is an np.savez archive of .npy arrays only",
            )
        what = None
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            what = f"uses compression method {info.compress_type}; np.savez writes stored or deflated members only"
        elif info.header_offset + info.compress_size > size:
            what = f"ends at byte {info.header_offset + info.compress_size:,}, past the end of the file ({size:,} bytes): the file is truncated"
        elif info.compress_type == zipfile.ZIP_STORED and info.file_size != info.compress_size:
            what = f"is stored uncompressed, but declares {info.file_size:,} bytes in {info.compress_size:,}"
        elif info.file_size > DEFLATE_MAX_RATIO * info.compress_size + 1024:
            what = f"declares {info.file_size:,} bytes from {info.compress_size:,} compressed, more than deflate can expand to"
        if what:
            raise CheckpointError(f"{self.path}: member '{info.filename}' {what}", hint="the archive is corrupt or hostile: do not use it")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._zip.close()

    def keys(self) -> list[str]:
        """Array names in archive order (np.savez keeps the order it was given)."""
        return list(self._members)

    def __contains__(self, key: str) -> bool:
        return key in self._members

    def _error(self, key: str, what: str) -> CheckpointError:
        return CheckpointError(
            f"{self.path}: member '{key}': {what}",
            hint="the checkpoint is corrupt or truncated; fetch it again (and compare its size and checksum)",
        )

    def _open_at_data(self, key: str):
        """(stream positioned at the member's first data byte, header)."""
        if key not in self._members:
            raise CheckpointError(
                f"{self.path}: no array '{key}'", hint=f"the archive holds {len(self._members)} arrays (NpzReader.keys())"
            )
        info, f = self._members[key], None
        try:
            f = self._zip.open(info)
            version = np.lib.format.read_magic(f)
            readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
            if version not in readers:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, fortran, stored = readers[version](f)
            data_start = f.tell()
        except (ValueError, SyntaxError, RecursionError, MemoryError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
            if f is not None:
                f.close()
            raise self._error(key, f"unreadable .npy header ({type(e).__name__}: {str(e)[:200]})") from None
        if stored.hasobject:
            f.close()
            raise CheckpointError(
                f"{self.path}: member '{key}' is an object array, which needs pickle to load; refused (allow_pickle=False)",
                hint="a checkpoint holds numeric arrays only; an object array can run arbitrary code when unpickled",
            )
        if stored.kind == "V" and (stored.itemsize != 2 or stored.fields):
            f.close()
            raise self._error(key, f"raw dtype {stored.str} (only 2-byte void, numpy's spelling of bfloat16, is understood)")
        dtype = BFLOAT16 if stored.kind == "V" else stored
        header = _Header(tuple(int(n) for n in shape), dtype, stored, bool(fortran))
        expected = data_start + math.prod(header.shape) * stored.itemsize
        if info.file_size != expected:
            f.close()
            raise self._error(
                key, f"the header promises {expected} bytes ({header.shape} {stored.str}) but the member holds {info.file_size}"
            )
        self._headers[key] = header
        return f, header

    def header(self, key: str) -> tuple[tuple[int, ...], np.dtype]:
        """(shape, dtype) of one member, from its header alone."""
        if key not in self._headers:
            self._open_at_data(key)[0].close()
        h = self._headers[key]
        return h.shape, h.dtype

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{key: (shape, dtype)} for every member, reading no array data."""
        return {key: self.header(key) for key in self._members}

    def _stored_span(self, key: str, f, h: _Header, data_start: int) -> int | None:
        """The file offset of a stored (uncompressed, unencrypted) member's first array byte, else None."""
        info = self._members[key]
        if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1 or h.fortran:
            return None
        with open(self.path, "rb") as raw:
            local = os.pread(raw.fileno(), 30, info.header_offset)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None  # let zipfile report it
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        return info.header_offset + 30 + name_len + extra_len + data_start

    def _finish(self, flat: np.ndarray, h: _Header, shape: tuple[int, ...]) -> np.ndarray:
        if not h.stored.isnative:
            flat = flat.byteswap(inplace=True).view(h.stored.newbyteorder("="))
        if h.stored.kind == "V":
            flat = flat.view(BFLOAT16)  # big_vision's recover_dtype: same bits, no float32 detour
        if h.fortran:
            return np.ascontiguousarray(flat.reshape(shape[::-1]).T)
        return flat.reshape(shape)

    def _open_stored(self, key: str):
        """(header, fd, first array byte's offset, CRC-32 of the .npy header) of a stored member, or (header, None, ...)."""
        f, h = self._open_at_data(key)
        with f:
            data_start = f.tell()
            offset = self._stored_span(key, f, h, data_start)
        if offset is None:
            return h, None, 0, 0
        fd = os.open(self.path, os.O_RDONLY)
        try:
            head = os.pread(fd, data_start, offset - data_start)
        except OSError:
            os.close(fd)
            raise
        return h, fd, offset, crc32(head)

    def _pread_into(self, key: str, fd: int, buf: memoryview, offset: int, crc: int, done: int, total: int) -> int:
        """Fills `buf` from the file at `offset` (positioned reads, no intermediate copy); returns the running CRC-32."""
        pos = 0
        try:
            while pos < len(buf):
                n = os.preadv(fd, [buf[pos : pos + self.CHUNK]], offset + pos)
                if not n:
                    raise EOFError(f"data ends after {done + pos} of {total} bytes")
                crc = crc32(buf[pos : pos + n], crc)  # releases the GIL on large buffers
                pos += n
        except OSError as e:
            raise self._error(key, str(e)) from None
        except EOFError as e:
            raise self._error(key, str(e)) from None
        return crc

    def _check_crc(self, key: str, crc: int) -> None:
        if crc != self._members[key].CRC:
            raise self._error(key, f"Bad CRC-32 for file '{self._members[key].filename}'")

    def held_bytes(self, key: str, per_layer: bool = False) -> int:
        """Bytes held in memory while reading `key`: one layer for a stored C-order member read
        with `iter_layers` (per_layer=True), else the whole member."""
        shape, _ = self.header(key)
        h, info = self._headers[key], self._members[key]
        total = math.prod(shape) * h.stored.itemsize
        stored = info.compress_type == zipfile.ZIP_STORED and not info.flag_bits & 0x1 and not h.fortran
        return total // shape[0] if per_layer and stored and shape and shape[0] else total

    def read(self, key: str) -> np.ndarray:
        """One member's array, CRC-checked.

        A stored (np.savez) member in native byte order is mapped (fastcopy.mapped: the result
        views the file's pages, read-only, no copy) and its CRC-32 computed over them; other
        stored members are read with positioned reads into the result's buffer; a deflated
        one goes through zipfile.
        """
        h, fd, offset, crc = self._open_stored(key)
        if fd is None:
            return self._read_zipfile(key)
        try:
            flat, crc = self._read_span(key, h, fd, offset, math.prod(h.shape), crc, 0, math.prod(h.shape) * h.stored.itemsize)
        finally:
            os.close(fd)
        self._check_crc(key, crc)
        return self._finish(flat, h, h.shape)

    def _read_span(self, key: str, h: _Header, fd: int, offset: int, count: int, crc: int, done: int, total: int) -> tuple[np.ndarray, int]:
        """`count` items of the member from byte `offset` of the file, and the running CRC-32."""
        nbytes = count * h.stored.itemsize
        if h.stored.isnative and offset + nbytes <= os.fstat(fd).st_size:
            flat = fastcopy.mapped([(fd, offset, nbytes)]).view(h.stored)
            return flat, crc32(flat.view(np.uint8), crc)  # (ISA-L and zlib release the GIL on large buffers)
        flat = scratch((count,), h.stored)
        return flat, self._pread_into(key, fd, memoryview(flat.view(np.uint8)), offset, crc, done, total)

    def iter_layers(self, key: str) -> Iterator[np.ndarray]:
        """The slices [0], [1], ... of a member along its leading axis, one fresh array each.

        A stored C-order member is read one layer at a time (layer i is the next contiguous run
        of bytes), so memory is one layer, not the stacked tensor; the CRC-32 accumulates over
        the layers and is checked after the last one (a corrupt member fails only then, after
        earlier layers were handed out). Deflated or Fortran-order members fall back to one
        whole-member read, whose slices (views) are yielded.
        """
        h, fd, offset, crc = self._open_stored(key)
        if fd is None or not h.shape:
            if fd is not None:
                os.close(fd)
            array = self.read(key)
            for i in range(array.shape[0] if array.ndim else 0):
                yield array[i]
            return
        try:
            layer = math.prod(h.shape[1:])
            total = math.prod(h.shape) * h.stored.itemsize
            step = layer * h.stored.itemsize
            for i in range(h.shape[0]):
                flat, crc = self._read_span(key, h, fd, offset + i * step, layer, crc, i * step, total)
                if i == h.shape[0] - 1:
                    self._check_crc(key, crc)
                yield self._finish(flat, h, h.shape[1:])
                del flat
            if h.shape[0] == 0:
                self._check_crc(key, crc)
        finally:
            os.close(fd)

    def _read_zipfile(self, key: str) -> np.ndarray:
        """One member through zipfile (deflated members), in chunks straight into the result."""
        f, h = self._open_at_data(key)
        with f:
            flat = np.empty(math.prod(h.shape), dtype=h.stored)
            buf, pos = memoryview(flat.view(np.uint8)), 0
            try:
                while pos < len(buf):
                    n = f.readinto(buf[pos : pos + self.CHUNK])
                    if not n:
                        raise EOFError(f"data ends after {pos} of {len(buf)} bytes")
                    pos += n
                if f.read(1):  # also makes zipfile check the CRC of a member read to its end
                    raise ValueError("more data than the header describes")
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise self._error(key, str(e)) from None
        return self._finish(flat, h, h.shape)


def open_npz(path: str | Path) -> NpzReader:
    """Opens a big_vision `.npz` lazily (see NpzReader)."""
    return NpzReader(path)


# --- The key table ----------------------------------------------------------------------------

# Slot values are the same on both sides; they match one path component each.
SLOTS = {"i": r"\d+", "dense": "kernel|bias", "ln": "scale|bias"}


@dataclasses.dataclass(frozen=True)
class Row:
    big_vision: str  # name under the prefix, per layer (scanned trees are unstacked first)
    vitctl: str  # vitctl JAX per-layer name (mapping.jax_param_shapes(cfg, stacked=False))

    def pattern(self, side: str) -> re.Pattern:
        parts = re.split(r"\{(\w+)\}", getattr(self, side))  # literal, slot, literal, ...
        return re.compile("".join(re.escape(p) if j % 2 == 0 else f"(?P<{p}>{SLOTS[p]})" for j, p in enumerate(parts)))


def _attention_mlp(bv: str, ours: str) -> tuple[Row, ...]:
    """Rows shared by an encoder block and the MAP head (flax module names, auto-numbered)."""
    attn = {"query": "q", "key": "k", "value": "v", "out": "attn_out"}  # MultiHeadDotProductAttention's DenseGenerals
    return (
        Row(f"{bv}LayerNorm_0/{{ln}}", f"{ours}norm/{{ln}}"),
        *(Row(f"{bv}MultiHeadDotProductAttention_0/{a}/{{dense}}", f"{ours}{b}/{{dense}}") for a, b in attn.items()),
        Row(f"{bv}MlpBlock_0/Dense_0/{{dense}}", f"{ours}mlp_in/{{dense}}"),
        Row(f"{bv}MlpBlock_0/Dense_1/{{dense}}", f"{ours}mlp_out/{{dense}}"),
    )


KEY_MAP: tuple[Row, ...] = (
    #   big_vision (models/vit.py _Model)          vitctl JAX
    Row("embedding/{dense}", "patch_embed/proj/{dense}"),  # nn.Conv kernel HWIO (P, P, C, D)
    Row("pos_embedding", "pos_embed"),  # (1, h*w, D): no class-token slot, added before cls
    Row("cls", "cls_token"),  # pool_type "tok" only
    *_attention_mlp("Transformer/encoderblock_{i}/", "blocks/{i}/"),
    Row("Transformer/encoderblock_{i}/LayerNorm_1/{ln}", "blocks/{i}/mlp_norm/{ln}"),
    Row("Transformer/encoder_norm/{ln}", "norm/{ln}"),  # applied before pooling
    Row("MAPHead_0/probe", "map_head/probe"),  # (1, 1, D)
    *_attention_mlp("MAPHead_0/", "map_head/"),  # no norm before its attention
    Row("head/{dense}", "head/{dense}"),
)
_PATTERNS = {side: [(r, r.pattern(side)) for r in KEY_MAP] for side in ("big_vision", "vitctl")}

# Keys big_vision can write that vitctl's models cannot hold: a clear refusal, not a silent drop.
UNSUPPORTED: tuple[tuple[str, str], ...] = (
    (r"pre_logits/(kernel|bias)", "big_vision's `rep_size` pre-logits layer (Dense + tanh before the head), which vitctl's models do not have"),
    (r"Transformer/(posembed_input/)?pos_embedding", "an old ViT layout (position embedding inside Transformer); load it with big_vision's vit.fix_old_checkpoints and re-save"),
    (r"Transformer/encoderblock_\d+/(MultiHeadDotProductAttention_1|LayerNorm_2|MlpBlock_3)/.*",
     "pre-linen module numbering (google-research/vision_transformer); renumber with big_vision's vit.fix_old_checkpoints and re-save"),
    (r"(probe|MultiHeadDotProductAttention_0/.*|MlpBlock_0/.*|LayerNorm_0/.*)", "an inlined MAP head (ViT-G era); load it with big_vision's vit.fix_old_checkpoints and re-save"),
)  # fmt: skip
SCANNED = re.compile(r"Transformer/encoderblock/(.+)")  # nn.scan: one tree, leading depth axis
WRAPPERS = ("params/", "opt/target/")  # what big_vision's utils.load_params unwraps by itself


def _rename(name: str, src: str) -> str | None:
    dst = "vitctl" if src == "big_vision" else "big_vision"
    hits = [(r, m) for r, p in _PATTERNS[src] if (m := p.fullmatch(name))]
    assert len(hits) <= 1, f"{name} matches {len(hits)} rows of the big_vision key table"
    return getattr(hits[0][0], dst).format(**hits[0][1].groupdict()) if hits else None


def to_vitctl(name: str) -> str | None:
    """A big_vision per-layer name (under the prefix) -> vitctl's JAX name; None if no row matches."""
    return _rename(name, "big_vision")


def to_big_vision(name: str) -> str | None:
    """A vitctl JAX per-layer name -> big_vision's name; None if big_vision has no such tensor."""
    return _rename(name, "vitctl")


def _unsupported(name: str) -> str | None:
    return next((why for pattern, why in UNSUPPORTED if re.fullmatch(pattern, name)), None)


# --- Prefix and config inference ------------------------------------------------------------

_EMBED = "embedding/kernel"


def resolve_prefix(keys: Iterable[str], prefix: str | None = None) -> str:
    """The sub-tree holding the ViT: "" (bare keys), "params/", "params/img/", ...

    With prefix=None: the one sub-tree with an `embedding/kernel`, if it is the root or one of
    big_vision's own wrappers (`params/`, `opt/target/`). Several towers (SigLIP's
    `params/img` beside `params/txt`) need an explicit prefix: a ConfigError lists candidates.
    """
    keys = list(keys)
    roots = sorted({k[: -len(_EMBED)] for k in keys if k == _EMBED or k.endswith("/" + _EMBED)})
    if prefix is not None:
        prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        if not any(k.startswith(prefix) for k in keys):
            listed = ", ".join(repr(r.rstrip("/")) for r in roots) or "none found"
            raise ConfigError(f"no key of the checkpoint starts with prefix '{prefix}'", hint=f"ViT sub-trees in this checkpoint: {listed}")
        return prefix
    if len(roots) == 1 and roots[0] in ("", *WRAPPERS):
        return roots[0]
    if not roots:
        raise CheckpointError(
            f"no big_vision ViT in this checkpoint: no key ends with '{_EMBED}'",
            hint=f"its keys start {', '.join(sorted({k.split('/')[0] for k in keys})[:8])}; pass --prefix if the ViT lives under another name",
        )
    tops = sorted({"/".join(k.split("/")[:2]) for k in keys if k.startswith(WRAPPERS)} or {k.split("/")[0] for k in keys})
    raise ConfigError(
        f"the checkpoint holds several sub-trees ({', '.join(tops[:8])}); which one is the image model is ambiguous",
        hint=f"pass --prefix, one of: {', '.join(r.rstrip('/') for r in roots)}",
    )


# Constants of big_vision's ViT that the weights cannot show (flax defaults and vit.py's structure).
BIG_VISION = {
    "block": "sequential",  # Encoder1DBlock: x + MHSA(LN(x)), then x + MLP(LN(x))
    "qk_norm": False,
    "norm": "layernorm",  # flax nn.LayerNorm: centered, with bias ...
    "norm_eps": 1e-6,  # ... epsilon=1e-6
    "gelu_approximate": True,  # flax nn.gelu(approximate=True): the tanh form
    "softmax_dtype": "float32",
    "head_zero_init": True,  # _Model.head_zeroinit default (init only)
}
# (config field, big_vision key under the prefix, per-layer shape -> value); {block} is
# `Transformer/encoderblock_0` or, scanned, `Transformer/encoderblock` (shapes then lead with L).
SIZES = (
    ("width", "embedding/kernel", lambda s: s[3]),  # (P, P, C, D)
    ("patch_size", "embedding/kernel", lambda s: s[0]),
    ("channels", "embedding/kernel", lambda s: s[2]),
    ("num_heads", "{block}/MultiHeadDotProductAttention_0/query/kernel", lambda s: s[-2]),  # (D, N, K)
    ("mlp_dim", "{block}/MlpBlock_0/Dense_0/kernel", lambda s: s[-1]),  # (D, F)
)
BIASES = (
    ("qkv_bias", "{block}/MultiHeadDotProductAttention_0/query/bias"),
    ("attn_out_bias", "{block}/MultiHeadDotProductAttention_0/out/bias"),
    ("mlp_bias", "{block}/MlpBlock_0/Dense_0/bias"),
    ("norm_bias", "{block}/LayerNorm_0/bias"),
)
SINCOS_IMAGE_SIZE = 224  # sincos checkpoints store no position embedding, hence no image size


def infer_config(
    shapes: Shapes, prefix: str | None = None, *, overrides: Mapping[str, Any] | None = None, notes: list[str] | None = None
) -> ViTConfig:
    """The ViTConfig of a big_vision ViT, from its keys and header shapes alone.

    Args:
      shapes: {npz key: (shape, dtype)}, as from NpzReader.shapes().
      prefix: the ViT's sub-tree (see resolve_prefix); None to detect it.
      overrides: config fields to set on top (e.g. image_size for a sincos model).
      notes: if a list, assumptions the weights cannot confirm are appended to it.
    Returns:
      The config; pool "map" if MAPHead_0 exists, "tok" if `cls` does, else "gap" (big_vision's
      rarer pool types "none" and "0" store the same keys as "gap"; see the module docstring).
    """
    notes = notes if notes is not None else []
    prefix = resolve_prefix(shapes, prefix)
    rel = {k[len(prefix) :]: s for k, s in shapes.items() if k.startswith(prefix)}
    if _EMBED not in rel:
        raise CheckpointError(f"no '{prefix}{_EMBED}' in the checkpoint", hint="pass the --prefix of the image model's sub-tree")
    scanned = any(SCANNED.fullmatch(k) for k in rel)
    layers = {int(m.group(1)) for k in rel if (m := re.match(r"Transformer/encoderblock_(\d+)/", k))}
    if scanned and layers:
        raise CheckpointError(
            f"the checkpoint has both scanned (Transformer/encoderblock/) and per-layer (Transformer/encoderblock_{{i}}/) blocks under '{prefix}'"
        )
    if scanned:
        block = "Transformer/encoderblock"
        depths = {rel[k][0][0] if rel[k][0] else 0 for k in rel if SCANNED.fullmatch(k)}
        if len(depths) != 1:
            raise CheckpointError(f"scanned blocks disagree on the depth (leading axis): {sorted(depths)}")
        depth = depths.pop()
    else:
        block = "Transformer/encoderblock_0"
        if sorted(layers) != list(range(len(layers))) or not layers:
            raise CheckpointError(f"encoder blocks are not numbered 0..L-1 under '{prefix}': found {sorted(layers)}")
        depth = len(layers)
    fields: dict[str, Any] = dict(BIG_VISION, depth=depth)
    for field, key, get in SIZES:
        key = key.format(block=block)
        if key not in rel:
            raise CheckpointError(
                f"the checkpoint has no '{prefix}{key}', which big_vision's ViT always has",
                hint="check --prefix and that this is a ViT checkpoint",
            )
        fields[field] = int(get(rel[key][0]))
    P = rel[_EMBED][0]
    if P[0] != P[1]:
        raise CheckpointError(f"non-square patches {P[:2]} are not supported")
    fields.update({field: key.format(block=block) in rel for field, key in BIASES})
    fields["pool"] = "map" if "MAPHead_0/probe" in rel else "tok" if "cls" in rel else "gap"
    fields["num_classes"] = int(rel["head/kernel"][0][-1]) if "head/kernel" in rel else 0
    if "pos_embedding" in rel:
        T = rel["pos_embedding"][0][1]
        g = math.isqrt(T)
        if g * g != T:
            old = math.isqrt(T - 1) ** 2 == T - 1  # old vit.py: cls concatenated first, then the posemb added
            raise CheckpointError(
                f"pos_embedding has {T} tokens, not a square grid" + (": an old layout with a class-token slot (h*w + 1)" if old else ""),
                hint="load it with big_vision's vit.fix_old_checkpoints and re-save" if old else "only square patch grids are supported",
            )
        fields.update(posemb="learn", image_size=g * fields["patch_size"])
    else:
        fields.update(posemb="sincos2d", image_size=SINCOS_IMAGE_SIZE)
        if "image_size" not in (overrides or {}):
            notes.append(
                f"no pos_embedding: sincos2d position embedding, image size unknown; assumed {SINCOS_IMAGE_SIZE} (set image_size to change it)"
            )
    floats = {np.dtype(dt) for k, (_, dt) in rel.items() if np.dtype(dt).kind == "f" or np.dtype(dt) == BFLOAT16}
    fields["param_dtype"] = "bfloat16" if floats == {BFLOAT16} else "float32"
    if floats - {BFLOAT16, np.dtype(np.float32)}:
        notes.append(f"parameter dtypes {sorted(map(str, floats))}: the config says float32")
    notes.append("preprocessing assumed big_vision's usual value_range(-1, 1), bilinear resize; the checkpoint does not record it")
    fields.update(overrides or {})
    try:
        return ViTConfig(**fields)
    except TypeError as e:  # an unknown override field
        raise ConfigError(f"invalid config override: {e}") from None


# --- The plan: every tensor's name, source and shape, before any data is read ----------------


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str  # vitctl JAX per-layer name, e.g. "blocks/3/q/kernel"
    key: str  # npz array name (with the prefix)
    index: int | None  # the layer sliced out of a scanned (L, ...) member, else None
    shape: tuple[int, ...]  # of the produced tensor
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class Plan:
    """What `iter_tensors` will produce, checked for coverage against `cfg`; no data read yet."""

    path: Path
    prefix: str
    cfg: ViTConfig
    entries: tuple[Entry, ...]  # in archive order; a scanned member's layers are adjacent
    ignored: tuple[str, ...]  # npz keys outside the prefix (another tower, optimizer state)
    notes: tuple[str, ...]

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """{vitctl JAX per-layer name: (shape, dtype)}."""
        return {e.name: (e.shape, e.dtype) for e in self.entries}

    def iter_tensors(self, reader: NpzReader | None = None) -> Iterator[tuple[str, np.ndarray]]:
        """(vitctl JAX per-layer name, array) for every entry, reading each member once.

        Arrays keep the stored dtype (bfloat16 stays bfloat16). Peak memory: one member; for a
        scanned checkpoint that is one stacked (L, ...) tensor, whose layer views are yielded.
        """
        own = reader is None
        reader = reader or NpzReader(self.path)
        try:
            key, array, layers, w = None, None, None, None
            for e in self.entries:
                if e.key != key:
                    key, array, layers, w = e.key, None, None, None  # drop the previous member before reading the next
                    if e.index is None:
                        array = reader.read(e.key)
                    else:
                        layers, expect = reader.iter_layers(e.key), 0
                if e.index is None:
                    w = array
                else:
                    assert e.index == expect, (e.key, e.index, expect)  # plan() lists a member's layers in order
                    w, expect = None, expect + 1
                    w = next(layers, None)
                    if w is None:
                        raise CheckpointError(f"{self.path}: member '{e.key}' changed while reading: fewer than {expect} layers")
                if w.shape != e.shape or w.dtype != e.dtype:
                    raise CheckpointError(
                        f"{self.path}: member '{e.key}' changed while reading: {w.shape} {w.dtype}, planned {e.shape} {e.dtype}"
                    )
                yield e.name, w
                w = None
        finally:
            if own:
                reader.close()


def plan(
    source: str | Path | NpzReader,
    cfg: ViTConfig | None = None,
    prefix: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Plan:
    """Maps every npz key under the prefix to vitctl tensors and checks coverage, from headers only.

    Args:
      source: the `.npz` path, or an open NpzReader.
      cfg: the model config (--model / --config); None to infer it (infer_config).
      prefix: the ViT's sub-tree; None to detect it (resolve_prefix).
      overrides: config fields replaced on top of cfg or the inferred config.
    Raises:
      UnmappedParamError: a key that matches no row of KEY_MAP (all of them named), a key of a
        layer vitctl cannot hold (pre_logits), or a tensor cfg expects that is missing, produced
        twice or of the wrong shape.
    """
    reader = source if isinstance(source, NpzReader) else NpzReader(source)
    try:
        shapes = reader.shapes()
    finally:
        if reader is not source:
            reader.close()
    notes: list[str] = []
    prefix = resolve_prefix(shapes, prefix)
    if cfg is None:
        cfg = infer_config(shapes, prefix, overrides=overrides, notes=notes)
    elif overrides:
        cfg = ViTConfig.from_dict({**cfg.to_dict(), **overrides})
    produced = sum(
        (shape[0] if shape else 1) if SCANNED.fullmatch(k[len(prefix) :]) else 1 for k, (shape, _) in shapes.items() if k.startswith(prefix)
    )
    mapping.check_count(produced, cfg, f"the big_vision checkpoint {reader.path}")  # before listing a name per layer
    ignored = tuple(k for k in shapes if not k.startswith(prefix))
    if ignored:
        notes.append(f"{len(ignored)} arrays outside '{prefix}' ignored (e.g. {ignored[0]})")

    entries, unmapped, unsupported = [], [], []
    for key, (shape, dtype) in shapes.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if m := SCANNED.fullmatch(name):  # unstack: the table speaks per layer
            if not shape:
                raise CheckpointError(f"{reader.path}: scanned member '{key}' is a scalar, expected a leading depth axis")
            per_layer = [(f"Transformer/encoderblock_{i}/{m.group(1)}", i, shape[1:]) for i in range(shape[0])]
        else:
            per_layer = [(name, None, shape)]
        for bv_name, index, s in per_layer:
            if (ours := to_vitctl(bv_name)) is not None:
                entries.append(Entry(ours, key, index, tuple(s), np.dtype(dtype)))
            elif why := _unsupported(bv_name):
                unsupported.append(f"'{key}': {why}")
            else:
                unmapped.append(key)
            if index is not None and ours is None:
                break  # one message per scanned member, not L
    if unsupported:
        raise UnmappedParamError(
            f"{reader.path} holds tensors vitctl's models cannot represent: " + "; ".join(unsupported[:4]),
            hint="convert a checkpoint without them, or drop them knowingly (e.g. re-save the npz without pre_logits/* to keep the features without the pre-logits layer)",
        )
    if unmapped:
        raise UnmappedParamError(
            f"{reader.path}: {len(unmapped)} key(s) match no row of the big_vision key table: {', '.join(repr(k) for k in unmapped[:8])}{' ...' if len(unmapped) > 8 else ''}",
            hint=f"vitctl reads big_vision's models/vit.py layout under prefix '{prefix}'; pass --prefix if the ViT lives in a sub-tree",
        )
    _check_coverage(entries, cfg, reader.path, prefix)
    return Plan(Path(reader.path), prefix, cfg, tuple(entries), ignored, tuple(notes))


def _check_coverage(entries: list[Entry], cfg: ViTConfig, path: Path, prefix: str) -> None:
    """Every expected tensor produced once with its shape; missing ones named in big_vision terms."""
    seen: dict[str, str] = {}
    for e in entries:
        if e.name in seen:
            raise UnmappedParamError(f"{path}: '{e.name}' would be produced twice, from '{seen[e.name]}' and '{e.key}'")
        seen[e.name] = e.key
    expected = mapping.jax_param_shapes(cfg, stacked=False)
    got = {e.name: e.shape for e in entries}
    missing = [n for n in expected if n not in got]
    if missing:
        named = [f"'{prefix}{b}'" if (b := to_big_vision(n)) else f"{n} (no big_vision equivalent)" for n in missing]
        raise UnmappedParamError(
            f"{path}: missing {len(missing)} tensor(s) the config needs: {', '.join(named[:8])}{' ...' if len(named) > 8 else ''}",
            hint="the checkpoint is incomplete, or the config (--model/--config) does not describe it; omit both to infer the config",
        )
    mapping.check_coverage(got, expected, f"the big_vision checkpoint {path}")


def iter_jax_tensors(
    path: str | Path, cfg: ViTConfig | None = None, prefix: str | None = None, overrides: Mapping[str, Any] | None = None
) -> Iterator[tuple[str, np.ndarray]]:
    """(vitctl JAX per-layer name, array) for every tensor of a big_vision `.npz`, one member at a time."""
    yield from plan(path, cfg, prefix, overrides).iter_tensors()
