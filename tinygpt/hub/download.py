"""Fetch model weights (GPT-2, SmolLM2) and the default data files: resumable, checked, atomic.

This module owns getting files onto disk and finding them again. `download_gpt2` fetches
`model.safetensors` and `config.json` into `weights/<name>/`, and `resolve_gpt2` turns a name or a
directory (a training run, a hub-layout folder) into a folder that holds both, preferring what is
already on disk (a folder you made, an earlier download, or a Hugging Face cache snapshot) over the
network. `data_file` finds a default text (tiny-shakespeare, the book's the-verdict.txt) in
../shared/data or tinygpt's cache, else downloads it into the cache from its public home. Reading
the files is left to `formats/safetensors.py` and the family adapters (`gpt2.py`, `llama.py`). Uses only the standard library and tqdm.

How a file arrives, so an interrupted or corrupt download never sits under the final name:
bytes go to `<file>.part`; a rerun continues it with an HTTP Range request (a server that answers
200 instead of 206 makes us start over); the whole file is then checked against its sha256 (our
table below, else the `X-Linked-Etag` header the hub sends for large files), a `<file>.sha256`
sidecar is written, and `.part` is renamed over the final name. A file with a matching sidecar is
not fetched again (delete the sidecar to force a re-check).

Run it: `python -m tinygpt download gpt2` (548 MB into weights/gpt2/).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

from tqdm import tqdm

GPT2_NAMES = ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
GPT2_FILES = ("model.safetensors", "config.json")
HF_URL = "https://huggingface.co"
HF_ORG = "openai-community"   # the hub's home of the GPT-2 repos ("gpt2" alone redirects there)
# model name -> (hub repository, files): GPT-2's four sizes and the Llama-family SmolLM2, whose
# folder also carries its tokenizer
LLAMA_FILES = GPT2_FILES + ("tokenizer.json", "tokenizer_config.json")
HUB_MODELS: dict[str, tuple[str, tuple[str, ...]]] = {
    **{name: (f"{HF_ORG}/{name}", GPT2_FILES) for name in GPT2_NAMES},
    "smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", LLAMA_FILES),
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M", LLAMA_FILES),
}
MODEL_NAMES = tuple(HUB_MODELS)

# (name, file) -> (sha256, size in bytes). Only hashes we have checked ourselves; for anything
# else we trust the hash the hub reports in X-Linked-Etag (sent for LFS files, not config.json).
KNOWN_FILES: dict[tuple[str, str], tuple[str, int]] = {
    ("gpt2", "model.safetensors"):
        ("248dfc3911869ec493c76e65bf2fcf7f615828b0254c12b473182f0f81d3a707", 548_105_171),
}
# Default data files of the demos and `tinygpt pretrain`: name -> (public URL, sha256, bytes)
DATA_FILES: dict[str, tuple[str, str, int]] = {
    "tinyshakespeare.txt": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed", 1_115_394),
    "the-verdict.txt": (                  # the book's chapter 2 text
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/"
        "01_main-chapter-code/the-verdict.txt",
        "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f", 20_479),
}
CHUNK = 1 << 20               # bytes per read: large enough for speed, small enough for the bar
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class DownloadError(OSError):
    """A download failed; the message names the URL or file and what to do next."""


class Unreachable(DownloadError):
    """The server could not be reached at all (offline, a wrong host, a timeout)."""


class ModelNotFound(FileNotFoundError, ValueError):
    """A path or name that is neither a model directory nor a GPT-2 model name."""


class _Interrupted(Exception):
    """The connection ended early; the bytes received so far are kept in the .part file."""

    def __init__(self, have: int, total: int | None, reason: str):
        super().__init__(reason)
        self.have, self.total, self.reason = have, total, reason


# --- public API -----------------------------------------------------------------------------------

def download_gpt2(name: str, dir: str | os.PathLike = "weights", *, base_url: str = HF_URL,
                  progress: bool = True, timeout: float = 30.0, retries: int = 2) -> Path:
    """Download model `name`'s files (`HUB_MODELS`: GPT-2's model.safetensors and config.json;
    SmolLM2's also its tokenizer) into `dir/name/`; return that.

    Files already complete are skipped without a request. `retries` is how many times a cut
    connection is resumed within this call; after that a rerun resumes from the .part file.
    """
    _check_name(name)
    dest = Path(dir) / name
    created = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    repo, files = HUB_MODELS[name]
    try:
        for file in files:
            url = f"{base_url.rstrip('/')}/{repo}/resolve/main/{file}"
            sha256, size = KNOWN_FILES.get((name, file), (None, None))
            download_file(url, dest / file, sha256=sha256, size=size, progress=progress,
                          timeout=timeout, retries=retries)
    except Unreachable as e:
        raise Unreachable(f"{e}; to supply the files by hand, put {' and '.join(files)} in "
                          f"{dest}/ or pass a local directory that holds them") from None
    finally:
        if created and dest.is_dir() and not any(dest.iterdir()):   # leave no empty folder
            dest.rmdir()
    return dest


def resolve_gpt2(path_or_name: str | os.PathLike, dir: str | os.PathLike = "weights", *,
                 download: bool = True, base_url: str = HF_URL, progress: bool = True) -> Path:
    """A directory holding GPT-2's model.safetensors and config.json, downloading only if needed.

    In order: `path_or_name` itself if it is such a directory (a hub-layout folder, or a training
    run that finished); `dir/name/`; a Hugging Face cache snapshot of the model (`$HF_HUB_CACHE`,
    `$HF_HOME/hub` or ~/.cache/huggingface/hub); else `download_gpt2(name, dir)`, or with
    `download=False` a FileNotFoundError naming `tinygpt download <name>`.
    """
    path = Path(path_or_name)
    if _has_gpt2_files(path):
        return path
    name = str(path_or_name)
    if name not in MODEL_NAMES:
        if (path / "checkpoint.json").is_file():
            raise ModelNotFound(f"{path}: a training run with a checkpoint but no final "
                                f"{GPT2_FILES[0]}: it did not finish; continue it with "
                                f"`tinygpt pretrain --out {path} --resume`")
        if path.is_dir():
            missing = [f for f in GPT2_FILES if not (path / f).is_file()]
            raise ModelNotFound(f"{path}: directory has no {' or '.join(missing)}")
        raise ModelNotFound(f"{name!r} is neither a directory holding {' and '.join(GPT2_FILES)} "
                            f"nor a GPT-2 model name or SmolLM2's ({', '.join(MODEL_NAMES)}); "
                            "fetch one with `tinygpt download gpt2`, see weights/README.md")
    local = Path(dir) / name
    if _has_gpt2_files(local):
        return local
    snapshot = find_hf_snapshot(name)
    if snapshot is not None:
        return snapshot
    if not download:
        raise FileNotFoundError(f"no GPT-2 weights at {local / GPT2_FILES[0]}: run "
                                f"`tinygpt download {name}` (see weights/README.md)")
    return download_gpt2(name, dir, base_url=base_url, progress=progress)


def cache_dir() -> Path:
    """tinygpt's download cache: `$TINYGPT_CACHE`, else ~/.cache/tinygpt."""
    return Path(os.environ.get("TINYGPT_CACHE") or Path.home() / ".cache" / "tinygpt")


def shared_dir() -> Path:
    """../shared beside this checkout (`$TINYGPT_SHARED` if set), where our own machines keep
    the data files and fixtures. This file is <checkout>/tinygpt/hub/download.py."""
    return Path(os.environ.get("TINYGPT_SHARED") or
                Path(__file__).resolve().parents[3] / "shared")


def shared_data_dir() -> Path:
    """`shared_dir()`/data."""
    return shared_dir() / "data"


def data_file(name: str, *, progress: bool = True, timeout: float = 30.0,
              retries: int = 2) -> Path:
    """The default data file `name` (a key of DATA_FILES) on disk: ../shared/data/<name>, else the
    cache's copy, else downloaded into the cache from its public home (resumable, sha256-checked).

    Offline, raises DownloadError naming the file, the places looked in and the URL, in one line.
    """
    if name not in DATA_FILES:
        raise ValueError(f"unknown data file {name!r}; known: {', '.join(DATA_FILES)}")
    url, sha256, size = DATA_FILES[name]
    shared = shared_data_dir() / name
    if shared.is_file():
        return shared
    cached = cache_dir() / name
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        return download_file(url, cached, sha256=sha256, size=size, progress=progress,
                             timeout=timeout, retries=retries)
    except OSError as e:                           # DownloadError, or an unwritable cache
        raise DownloadError(f"{name} is not in {shared.parent} or {cached.parent}, and fetching "
                            f"it failed: {e}") from None


def find_hf_snapshot(name: str) -> Path | None:
    """A Hugging Face cache snapshot of `name` with both files, or None. Never downloads."""
    hub = _hf_hub_cache()
    repo_id = HUB_MODELS.get(name, (f"{HF_ORG}/{name}", ()))[0]
    for repo in (hub / f"models--{repo_id.replace('/', '--')}", hub / f"models--{name}"):
        snapshots = repo / "snapshots"
        if not snapshots.is_dir():
            continue
        candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
        ref = repo / "refs" / "main"
        if ref.is_file():             # the revision `main` pointed to when last fetched
            candidates.insert(0, snapshots / ref.read_text().strip())
        for snapshot in candidates:
            if _has_gpt2_files(snapshot):   # is_file follows the cache's symlinks into blobs/
                return snapshot
    return None


def download_file(url: str, path: str | os.PathLike, *, sha256: str | None = None,
                  size: int | None = None, progress: bool = True, timeout: float = 30.0,
                  retries: int = 2) -> Path:
    """Fetch `url` to `path` via `path.part`, resuming and verifying; see the module docstring.

    `sha256`/`size` are what we expect; without `sha256` the hub's X-Linked-Etag is used, and
    with neither the file is stored unverified (its hash still goes into the sidecar).
    """
    path = Path(path)
    if _is_complete(path, sha256, size):
        return path
    part = path.with_name(path.name + ".part")
    for attempt in range(retries + 1):
        try:
            remote_sha256 = _fetch(url, part, progress, timeout)
            break
        except _Interrupted as e:
            if attempt == retries:
                of = f" of {e.total}" if e.total is not None else ""
                raise DownloadError(f"{url}: connection lost after {e.have}{of} bytes "
                                    f"({e.reason}); {part} is kept: run again to resume") from None
    _verify_and_publish(url, part, path, sha256 or remote_sha256, size)
    return path


# --- one request ----------------------------------------------------------------------------------

class _KeepRedirectHeaders(urllib.request.HTTPRedirectHandler):
    """Follow redirects, remembering each redirect's headers: the hub answers `resolve/` with a
    302 to its CDN and puts X-Linked-Etag/X-Linked-Size on that 302, not on the final response."""

    def __init__(self) -> None:
        self.seen: list = []

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        self.seen.append(headers)
        return super().redirect_request(req, fp, code, msg, headers, newurl)   # keeps Range


def _fetch(url: str, part: Path, progress: bool, timeout: float) -> str | None:
    """One GET into `part`, resuming from its size; returns the sha256 the server reports."""
    have = part.stat().st_size if part.exists() else 0
    redirects = _KeepRedirectHeaders()
    request = urllib.request.Request(url, headers={"User-Agent": "tinygpt"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.build_opener(redirects).open(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:       # our .part is at or past the end: start again
            part.unlink()
            raise _Interrupted(0, None, "server rejected the resume range") from None
        if e.code == 404:
            raise DownloadError(f"{url}: 404 Not Found") from None
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise Unreachable(f"cannot reach {urlsplit(url).netloc} for {url} ({reason})") from None

    with response:
        headers = [*redirects.seen, response.headers]
        remote_sha256 = _linked_sha256(headers)
        if response.status == 206:
            start, total = _content_range(response.headers.get("Content-Range", ""))
            if start != have:
                part.unlink()
                raise _Interrupted(0, total, f"server resumed at byte {start}, not {have}")
        else:                            # 200: the server ignored Range, so start over
            have, length = 0, response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        with open(part, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, desc=part.name[:-5], unit="B", unit_scale=True,
                unit_divisor=1024, disable=not progress, leave=False) as bar:
            try:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    have += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise _Interrupted(have, total, type(e).__name__) from None
    # NOTE: http.client returns a short body without an error when a connection closes early,
    # so comparing against the announced length is the only sign of a cut download.
    if total is not None and have < total:
        raise _Interrupted(have, total, "server closed the connection")
    return remote_sha256


def _verify_and_publish(url: str, part: Path, path: Path, sha256: str | None,
                        size: int | None) -> None:
    """Check `part` against `sha256`/`size`, then write the sidecar and rename it to `path`."""
    actual_size = part.stat().st_size
    actual = _sha256_file(part)
    if size is not None and actual_size != size:
        part.unlink()
        raise DownloadError(f"{path}: download from {url} has the wrong size: expected {size} "
                            f"bytes, got {actual_size}; the bad file was removed, run again")
    if sha256 is not None and actual != sha256:
        part.unlink()
        raise DownloadError(f"{path}: download from {url} has the wrong sha256: expected "
                            f"{sha256}, got {actual}; the bad file was removed, run again")
    with open(part, "rb") as f:
        os.fsync(f.fileno())            # data on disk before the rename makes it official
    sidecar = _sidecar(path)
    tmp = sidecar.with_name(sidecar.name + ".tmp")
    tmp.write_text(f"{actual}  {path.name}\n")          # `sha256sum -c` format
    os.replace(tmp, sidecar)
    os.replace(part, path)


def _linked_sha256(headers: list) -> str | None:
    for h in headers:
        etag = (h.get("X-Linked-Etag") or "").removeprefix("W/").strip('"').lower()
        if _SHA256.match(etag):
            return etag
    return None


def _content_range(value: str) -> tuple[int, int | None]:
    """'bytes 100-999/1000' -> (100, 1000); total None when the server sends '*'."""
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", value.strip())
    if not m:
        raise DownloadError(f"server sent a malformed Content-Range {value!r}")
    return int(m[1]), None if m[2] == "*" else int(m[2])


# --- files on disk --------------------------------------------------------------------------------

def _is_complete(path: Path, sha256: str | None, size: int | None) -> bool:
    """True if `path` needs no download: its sidecar (or, failing that, a re-hash) matches."""
    if not path.is_file() or (size is not None and path.stat().st_size != size):
        return False
    sidecar = _sidecar(path)
    if sidecar.is_file():
        recorded = sidecar.read_text().split(maxsplit=1)[:1]
        return bool(recorded) and (sha256 is None or recorded[0] == sha256)
    if sha256 is not None and _sha256_file(path) == sha256:
        sidecar.write_text(f"{sha256}  {path.name}\n")
        return True
    return False


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _has_gpt2_files(directory: Path) -> bool:
    return all((directory / f).is_file() for f in GPT2_FILES)


def _check_name(name: str) -> None:
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")


def _hf_hub_cache() -> Path:
    """Where huggingface_hub keeps its cache, by the same environment variables it reads."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "huggingface" / "hub"
