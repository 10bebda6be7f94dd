"""Writing and reading a model's ``.keras`` file in one pass over its weights.

A ``.keras`` file is a zip of ``config.json``, ``metadata.json`` and ``model.weights.h5`` (plus fcn's
``fcn.json``). ``model.save`` builds the HDF5 image in memory, copies each variable into numpy on the
way, then copies the image into the zip: three to four passes over the checkpoint, each over memory the
process has not touched before. Measured (bench/NOTES.md, "Speed notes", items 7-8; 2-core AMD EPYC):
FCN-8s with its Adam state (1.6 GB) took 9.3 s of every commit and transiently twice the checkpoint in
RAM; this writer takes 0.8-2.2 s. ``model.load_weights`` on Python 3.11 re-reads the zip member at every
backward seek HDF5 makes: 4.7 s against 0.9 s in place. On the Intel Xeon with AMX (``make bench``,
2026-12-03): last.keras 3.5 s, best.keras 0.8 s.

Here HDF5 writes each variable's array straight to its place inside the zip (the member is stored, not
compressed, exactly as Keras stores it; the big datasets around the page cache), the CRC is read back
from the file, and ``zipfile`` writes the small members and the central directory. The layout of the
HDF5 image is Keras's own (its private ``_save_state`` walks the model and its ``H5IOStore`` names every
group), so ``keras.saving.load_model`` reads the file like one it wrote; ``tests/test_checkpoint_io.py``
holds it to that, value for value, for every kind of model fcn writes.

The private names are used only where :func:`fcn_cli.accel.keras_internals_usable` says this Keras is
one they were tested with; anywhere else, and on any failure that is not the file system's, the public
``model.save`` / ``model.load_weights`` do the work (:func:`save_with_keras`; the suite runs that path
too, and the whole suite passes under ``FCN_ACCEL=0``, which takes it always).
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

from fcn_cli.accel import keras_internals_usable

WEIGHTS = "model.weights.h5"
_ZIP64_EXTRA = struct.Struct("<HHQQ")  # header id 1, data size 16, uncompressed size, compressed size
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_ALIGN = 4096  # the weights start on a block boundary, and HDF5 puts big datasets on boundaries too
_PADDING_ID = 0xD935  # the extra-field id Android's zipalign pads with; zip readers skip unknown ids
_HEADER_LEN = _ALIGN
_PADDING = _HEADER_LEN - (_LOCAL_HEADER.size + len(WEIGHTS) + _ZIP64_EXTRA.size + 4)
_BOUNCE = 16 << 20  # bytes per direct write / read, through one block-aligned buffer
_DIRECT_MIN = 1 << 20  # writes from this size go around the page cache
_bounce: mmap.mmap | None = None


def _bounce_buffer() -> mmap.mmap:
    global _bounce
    if _bounce is None:
        _bounce = mmap.mmap(-1, _BOUNCE)  # page-aligned, as O_DIRECT needs; kept for the next save
    return _bounce


class _Region:
    """A file-like window of ``fd`` starting at ``base``: what h5py's file-object driver writes to.

    ``direct_fd`` (the same file opened with O_DIRECT, or None): large block-aligned writes go
    through it, around the page cache.
    """

    def __init__(self, fd: int, base: int, direct_fd: int | None = None):
        self.fd, self.base, self.pos, self.size = fd, base, 0, 0
        self.direct_fd = direct_fd
        self.error: OSError | None = None  # HDF5 reports a failed write as its own error; keep the cause

    def _io(self, call, *args):
        try:
            return call(*args)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else (self.pos + offset if whence == 1 else self.size + offset)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        done = 0
        offset = self.base + self.pos
        if self.direct_fd is not None and len(view) >= _DIRECT_MIN and offset % _ALIGN == 0:
            done = self._write_direct(view[: len(view) - len(view) % _ALIGN], offset)
        while done < len(view):
            done += self._io(os.pwrite, self.fd, view[done:], offset + done)
        self.pos += done
        self.size = max(self.size, self.pos)
        return done

    def _write_direct(self, view: memoryview, offset: int) -> int:
        """Whole blocks straight to the disk through the bounce buffer; 0 where the file system
        refuses O_DIRECT (the caller then writes through the page cache)."""
        buffer = _bounce_buffer()
        done = 0
        while done < len(view):
            n = min(len(buffer), len(view) - done)
            buffer[:n] = view[done : done + n]
            try:
                wrote = os.pwrite(self.direct_fd, memoryview(buffer)[:n], offset + done)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    self.error = self.error or exc
                    raise
                self.direct_fd = None
                break
            if wrote != n:
                break
            done += n
        return done

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else n
        buffer = bytearray(max(0, min(n, self.size - self.pos)))
        self.readinto(buffer)
        return bytes(buffer)

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self.size - self.pos))
        got = self._io(os.preadv, self.fd, [view[:n]], self.base + self.pos) if n else 0
        view[got:] = bytes(len(view) - got)  # past the file's end (HDF5's size is set last) reads as zeros
        self.pos += n
        return n

    def truncate(self, size: int | None = None) -> int:
        # Only the length HDF5 sees: save_keras sets the file's own once HDF5 has closed.
        self.size = self.pos if size is None else size
        return self.size

    def flush(self) -> None:
        pass

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True


def _direct_store(region: _Region, mode: str = "w"):
    """Keras's H5IOStore over ``region``; writing reads each variable once (no second numpy copy)."""
    import h5py
    from keras.src.saving.saving_lib import H5IOStore

    # Datasets of 1 MB and more start on a block boundary: their bytes can go around the page cache.
    layout = {"alignment_threshold": _DIRECT_MIN, "alignment_interval": _ALIGN} if mode == "w" else {}

    class DirectH5Store(H5IOStore):
        def __init__(self):  # H5IOStore's state, over a file object it does not accept itself
            self.path_or_io, self.mode, self.archive, self.io_file = WEIGHTS, mode, None, None
            self.h5_file = h5py.File(region, mode=mode, **layout)
            self._h5_entry_path = None
            self._h5_entry_group = {}
            self._h5_entry_metadata = None
            self._h5_entry_initialized = False

        def __setitem__(self, key, value):
            if not self._h5_entry_initialized:
                self._create_h5_group(self._h5_entry_path)
            array = _array_view(value)
            if array.dtype.name == "bfloat16":  # as H5IOStore marks them
                self._h5_entry_group.create_dataset(key, data=array).attrs["dtype"] = "bfloat16"
            else:
                self._h5_entry_group[key] = array

    return DirectH5Store()


def _array_view(value) -> np.ndarray:
    """A variable's current value as numpy: the backend's own array read (one copy at most, against
    Keras's ``convert_to_numpy``, which copies that read once more)."""
    array = np.asarray(getattr(value, "value", value))
    if array.dtype == object:  # not an array numpy understands: Keras's conversion
        import keras

        array = keras.ops.convert_to_numpy(value)
    return array


class _NeedsAssets(Exception):
    """A layer with files of its own (a text vocabulary): only Keras's saver writes those."""


def _no_assets_store():
    from keras.src.saving.saving_lib import DiskIOStore

    class NoAssets(DiskIOStore):
        def __init__(self):
            pass

        def make(self, path):
            raise _NeedsAssets(path)

    return NoAssets()


def _crc32(fd: int, start: int, size: int) -> int:
    """CRC-32 of ``size`` bytes at ``start`` (block-aligned when ``fd`` is O_DIRECT)."""
    buffer = _bounce_buffer()
    crc, done = 0, 0
    while done < size:
        want = min(len(buffer), size - done)
        n = os.preadv(fd, [memoryview(buffer)[: -(-want // _ALIGN) * _ALIGN]], start + done)
        if n <= 0:
            raise OSError(errno.EIO, "short read while checksumming the weights")
        n = min(n, want)
        crc = zlib.crc32(memoryview(buffer)[:n], crc)
        done += n
    return crc


def _open_direct(path, flags: int) -> int | None:
    """``path`` opened again with O_DIRECT, or None where the system or file system has none (tmpfs)."""
    try:
        return os.open(path, flags | os.O_DIRECT)
    except (AttributeError, OSError):
        return None


def _dos_time(stamp: tuple) -> tuple[int, int]:
    year, month, day, hour, minute, second = stamp[:6]
    return (hour << 11) | (minute << 5) | (second // 2), ((year - 1980) << 9) | (month << 5) | day


def save_keras(model, path: str | Path, extra: dict[str, bytes] | None = None) -> None:
    """Write ``model`` (and its optimizer state, when compiled) to ``path`` as a ``.keras`` zip,
    with ``extra`` entries (name -> bytes) added. Raises OSError from the file system as is.

    The big datasets are written with O_DIRECT, around the page cache: a checkpoint is written once
    and not read back by this process, and filling the cache with it costs the memory of new pages.
    On the bench machine 1.6 GB took 3.8 s through the page cache (plus 0.5 s of fsync) and 0.9 s
    direct. Where the file system refuses O_DIRECT everything goes through the cache.
    """
    if not keras_internals_usable():
        return save_with_keras(model, path, extra)
    try:
        from keras.src.saving.saving_lib import _save_state, _serialize_model_as_json
    except ImportError:  # a Keras whose internals moved: its own save, at its own speed
        return save_with_keras(model, path, extra)

    config_json, metadata_json = _serialize_model_as_json(model)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    direct_fd = _open_direct(path, os.O_RDWR)
    region = _Region(fd, _HEADER_LEN, direct_fd)
    try:
        try:
            store = _direct_store(region)
            try:
                _save_state(model, weights_store=store, assets_store=_no_assets_store(), inner_path="",
                            visited_saveables=set())
            finally:
                store.close()
        except Exception as exc:
            if region.error is not None:  # the file system's own reason (a full disk), not HDF5's echo of it
                raise region.error from None
            if isinstance(exc, OSError):
                raise
            # Assets, or a Keras whose internals moved under this writer: Keras's own saver.
            os.close(fd)
            fd = -1
            return save_with_keras(model, path, extra)
        if region.error is not None:
            raise region.error
        size = region.size
        os.ftruncate(fd, _HEADER_LEN + size)  # HDF5's end of file; holes it left read as zeros
        crc = _crc32(direct_fd if region.direct_fd is not None else fd, _HEADER_LEN, size)
        stamp = time.localtime(time.time())[:6]
        dos_time, dos_date = _dos_time(stamp)
        # The weights member first, stored, with zip64 sizes (a member may pass 4 GB).
        fields = _ZIP64_EXTRA.pack(1, 16, size, size) + struct.pack("<HH", _PADDING_ID, _PADDING) + bytes(_PADDING)
        header = _LOCAL_HEADER.pack(0x04034B50, 45, 0, zipfile.ZIP_STORED, dos_time, dos_date, crc,
                                    0xFFFFFFFF, 0xFFFFFFFF, len(WEIGHTS), len(fields))
        os.pwrite(fd, header + WEIGHTS.encode() + fields, 0)
        info = zipfile.ZipInfo(WEIGHTS, date_time=stamp)
        info.compress_type, info.CRC, info.file_size, info.compress_size = zipfile.ZIP_STORED, crc, size, size
        info.header_offset, info.extract_version, info.create_version = 0, 45, 45
        info.external_attr = 0o600 << 16
        with os.fdopen(os.dup(fd), "r+b") as fh:
            fh.seek(_HEADER_LEN + size)
            with zipfile.ZipFile(fh, "w") as zf:  # appends from here; the central directory lists all
                zf.filelist.append(info)
                zf.NameToInfo[WEIGHTS] = info
                zf.writestr("metadata.json", metadata_json)
                zf.writestr("config.json", config_json)
                for name, data in (extra or {}).items():
                    zf.writestr(name, data)
            fh.truncate()
    finally:
        region.fd, region.direct_fd = -1, None  # a late write from a half-closed HDF5 file must fail
        if fd >= 0:
            os.close(fd)
        if direct_fd is not None:
            os.close(direct_fd)


def load_weights(model, path: str | Path) -> None:
    """Load the weights of the ``.keras`` file ``path`` into ``model`` (built from a compatible
    config: its own, or :func:`fcn_cli.accel.serving.serving_config` of it), as ``model.load_weights`` does.

    ``model.load_weights`` reads the weights member through ``zipfile``'s stream, which on
    Python 3.11 re-reads (and re-checksums) the member from its start at every backward seek HDF5
    makes: 4.7 s instead of 1.7 s for FCN-8s. A stored member is read here in place instead (the
    caller has checked the archive's CRCs once, see ``runs.read_checkpoint_meta``).
    """
    if not keras_internals_usable():
        return model.load_weights(str(path))
    try:
        _load_in_place(model, path)
    except OSError:
        raise
    except Exception:  # a wrong file, or internals that moved: Keras's own reader says which, or succeeds
        model.load_weights(str(path))


def _load_in_place(model, path: str | Path) -> None:
    from keras.src.saving.saving_lib import _load_state, _raise_loading_failure

    with open(path, "rb") as fh:  # one open file: offsets and data from the same inode
        with zipfile.ZipFile(fh) as zf:
            info = zf.getinfo(WEIGHTS)
            if info.compress_type != zipfile.ZIP_STORED:
                return model.load_weights(str(path))
            fh.seek(info.header_offset)
            name_len, extra_len = _LOCAL_HEADER.unpack(fh.read(_LOCAL_HEADER.size))[-2:]
            start = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        region = _Region(fh.fileno(), start)
        region.size = info.file_size
        store = _direct_store(region, "r")
        failed, errors = set(), {}
        try:
            _load_state(model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set(),
                        failed_saveables=failed, error_msgs=errors)
        finally:
            store.close()
            region.fd = -1
        if failed:
            _raise_loading_failure(errors)


def save_with_keras(model, path: str | Path, extra: dict[str, bytes] | None = None) -> None:
    """The public path: ``model.save``, then ``extra`` entries appended to the zip."""
    model.save(str(path))
    with zipfile.ZipFile(path, "a") as zf:
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
