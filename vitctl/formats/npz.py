"""`.npz` archives (np.savez, as big_vision writes them) read lazily: headers first, one member's data on request.

numpy (and ml_dtypes) only. `np.load` on an `.npz` ignores `mmap_mode`, and a naive
`dict(np.load(...))` holds the whole archive in memory (numpy#28795). `NpzReader` reads every
member's `.npy` header (shape, dtype) without its data (zipfile reads the first 4 KiB), and one
member's data only when asked.
- bfloat16 arrays are stored as raw 2-byte void (`|V2`); they come back as ml_dtypes.bfloat16
  (big_vision's `recover_dtype`: the same bits, no float32 detour).
- A stored member (np.savez does not compress) is read with positioned reads at its data offset
  straight into the result, its zip CRC-32 computed over the same bytes (ISA-L's, else zlib's;
  both release the GIL).
- A member stacked along its leading axis (L, ...) and stored in C order holds layer i as the
  next contiguous run of its bytes, so `NpzReader.iter_layers` reads it one layer at a time (the
  CRC accumulates and is checked after the last layer) and the peak memory is one layer. A
  deflated (np.savez_compressed) or Fortran-order member is read whole and its layers are views.
- Pickled (object) arrays are refused, like `np.load(allow_pickle=False)`; member names and
  declared sizes are checked against the zip directory before anything is read.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import ml_dtypes
import numpy as np

try:  # Intel ISA-L's CRC-32 (a dependency where it has wheels): 3x zlib's; same values
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover
    from zlib import crc32

from vitctl import untrusted
from vitctl.errors import CheckpointError
from vitctl.formats import fastcopy
from vitctl.formats.fastcopy import scratch

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
# Deflate's largest possible expansion (RFC 1951: a 258-byte match in 2 bits, ~1032:1). A member
# that declares more than this times its compressed size lies about its size.
DEFLATE_MAX_RATIO = 1032


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
