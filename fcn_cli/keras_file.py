"""Writing a model to a ``.keras`` file in one pass over its weights.

A ``.keras`` file is a zip of ``config.json``, ``metadata.json`` and ``model.weights.h5`` (plus our
``fcn.json``). ``model.save`` builds the HDF5 image in memory, copies each variable into numpy on
the way, then copies the image into the zip: three to four passes over the checkpoint, each over
memory the process has not touched before. For FCN-8s with its Adam state (1.6 GB) that took 9.5 s
of every commit on the bench machine, and transiently twice the checkpoint in RAM.

Here HDF5 writes each variable's buffer straight to its place inside the zip (the member is stored,
not compressed, exactly as Keras stores it), the CRC is read back from the page cache, and
``zipfile`` writes the small members and the central directory. The layout of the HDF5 image is
Keras's own (its ``_save_state`` walks the model and its ``H5IOStore`` names every group), so
``keras.saving.load_model`` reads the file like one it wrote; ``tests/test_keras_file.py`` holds it
to that, byte for byte in the weights, for every kind of model fcn writes.
"""

from __future__ import annotations

import os
import struct
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

WEIGHTS = "model.weights.h5"
_ZIP64_EXTRA = struct.Struct("<HHQQ")  # header id 1, data size 16, uncompressed size, compressed size
_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_HEADER_LEN = _LOCAL_HEADER.size + len(WEIGHTS) + _ZIP64_EXTRA.size
_CRC_CHUNK = 64 << 20


class _Region:
    """A file-like window of ``fd`` starting at ``base``: what h5py's file-object driver writes to."""

    def __init__(self, fd: int, base: int):
        self.fd, self.base, self.pos, self.size = fd, base, 0, 0
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
        while done < len(view):
            done += self._io(os.pwrite, self.fd, view[done:], self.base + self.pos + done)
        self.pos += done
        self.size = max(self.size, self.pos)
        return done

    def read(self, n: int = -1) -> bytes:
        n = self.size - self.pos if n is None or n < 0 else n
        data = self._io(os.pread, self.fd, n, self.base + self.pos)
        self.pos += len(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        memoryview(buffer)[: len(data)] = data
        return len(data)

    def truncate(self, size: int | None = None) -> int:
        self.size = self.pos if size is None else size
        self._io(os.ftruncate, self.fd, self.base + self.size)
        return self.size

    def flush(self) -> None:
        pass

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True


def _direct_store(region: _Region):
    """Keras's H5IOStore writing into ``region``, taking each variable's buffer without a copy."""
    import h5py
    from keras.src.saving.saving_lib import H5IOStore

    class DirectH5Store(H5IOStore):
        def __init__(self):  # H5IOStore's state, over a file object it does not accept itself
            self.path_or_io, self.mode, self.archive, self.io_file = WEIGHTS, "w", None, None
            self.h5_file = h5py.File(region, mode="w")
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
    """A variable's current value as numpy without copying it where the backend allows (TensorFlow
    hands out its buffer; a later update copies on write, so the array stays as read)."""
    inner = getattr(value, "value", value)
    try:
        return np.asarray(inner)
    except Exception:  # noqa: BLE001  any backend object numpy cannot view: Keras's own conversion
        import keras

        return keras.ops.convert_to_numpy(value)


def _crc32(fd: int, start: int, size: int) -> int:
    buffer = bytearray(min(size, _CRC_CHUNK) or 1)
    crc, done = 0, 0
    while done < size:
        n = os.preadv(fd, [memoryview(buffer)[: min(len(buffer), size - done)]], start + done)
        if n <= 0:
            raise OSError("short read while checksumming the weights")
        crc = zlib.crc32(memoryview(buffer)[:n], crc)
        done += n
    return crc


def _dos_time(stamp: tuple) -> tuple[int, int]:
    year, month, day, hour, minute, second = stamp[:6]
    return (hour << 11) | (minute << 5) | (second // 2), ((year - 1980) << 9) | (month << 5) | day


def save_keras(model, path: str | Path, extra: dict[str, bytes] | None = None) -> None:
    """Write ``model`` (and its optimizer state, when compiled) to ``path`` as a ``.keras`` zip,
    with ``extra`` entries (name -> bytes) added. Raises OSError from the file system as is."""
    try:
        from keras.src.saving.saving_lib import H5IOStore, _save_state, _serialize_model_as_json  # noqa: F401
    except ImportError:  # a Keras whose internals moved: its own save, at its own speed
        return _save_with_keras(model, path, extra)

    config_json, metadata_json = _serialize_model_as_json(model)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        region = _Region(fd, _HEADER_LEN)
        try:
            store = _direct_store(region)
            try:
                _save_state(model, weights_store=store, assets_store=None, inner_path="", visited_saveables=set())
            finally:
                store.close()
        except Exception:
            if region.error is not None:  # the file system's own reason (a full disk), not HDF5's echo of it
                raise region.error from None
            raise
        size, crc = region.size, _crc32(fd, _HEADER_LEN, region.size)
        stamp = time.localtime(time.time())[:6]
        dos_time, dos_date = _dos_time(stamp)
        # The weights member first, stored, with zip64 sizes (a member may pass 4 GB).
        header = _LOCAL_HEADER.pack(0x04034B50, 45, 0, zipfile.ZIP_STORED, dos_time, dos_date, crc,
                                    0xFFFFFFFF, 0xFFFFFFFF, len(WEIGHTS), _ZIP64_EXTRA.size)
        os.pwrite(fd, header + WEIGHTS.encode() + _ZIP64_EXTRA.pack(1, 16, size, size), 0)
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
        os.close(fd)


def _save_with_keras(model, path: str | Path, extra: dict[str, bytes] | None) -> None:
    model.save(str(path))
    with zipfile.ZipFile(path, "a") as zf:
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
