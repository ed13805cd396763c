"""tinygpt.hub.download against a local HTTP server on 127.0.0.1: never the real network."""
import hashlib
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tinygpt.hub import download as dl
from tinygpt.commands.cli import main as cli_main
from tinygpt.hub.download import DownloadError, download_gpt2, resolve_gpt2

NAME = "gpt2-medium"          # not in KNOWN_FILES, so the server's X-Linked-Etag is the reference
MODEL_PATH = f"/openai-community/{NAME}/resolve/main/model.safetensors"
CONFIG_PATH = f"/openai-community/{NAME}/resolve/main/config.json"
CUT = 100_000                 # bytes a "flaky" server sends before hanging up


class HubHandler(BaseHTTPRequestHandler):
    """Serves `server.files` like the hub: Range support, X-Linked-Etag, optional redirects."""

    def do_GET(self) -> None:
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range")))
        if self.path in srv.redirects:                 # hub: resolve/ -> 302 to the CDN
            target = srv.redirects[self.path]
            self.send_response(302)
            self.send_header("Location", target)
            self._linked_headers(srv.files[target])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path not in srv.files:
            self.send_error(404)
            return
        body, start = srv.files[self.path], 0
        byte_range = self.headers.get("Range")
        if byte_range and not srv.ignore_range:
            start = int(byte_range.removeprefix("bytes=").rstrip("-"))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if not srv.redirects:
            self._linked_headers(body)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if srv.cuts_left > 0:                          # hang up part-way through the body
            srv.cuts_left -= 1
            payload = payload[:CUT]
        self.wfile.write(payload)

    def _linked_headers(self, body: bytes) -> None:
        if len(body) > 1000:                           # the hub sends these for LFS files only
            sha = self.server.advertised_sha or hashlib.sha256(body).hexdigest()
            self.send_header("X-Linked-Etag", f'"{sha}"')
            self.send_header("X-Linked-Size", str(len(body)))

    def log_message(self, *args) -> None:              # keep test output clean
        pass


@pytest.fixture
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    server.files, server.redirects, server.requests = {}, {}, []
    server.ignore_range, server.cuts_left, server.advertised_sha = False, 0, None
    model = np.random.default_rng(0).bytes(300_000)
    config = b'{"n_layer": 2, "n_head": 4, "n_embd": 64}'
    server.files |= {MODEL_PATH: model, CONFIG_PATH: config}
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def fetch(hub, tmp_path, **kwargs) -> Path:
    kwargs = {"progress": False, "timeout": 5.0, **kwargs}
    return download_gpt2(NAME, tmp_path / "weights", base_url=hub.url, **kwargs)


def assert_downloaded(hub, dest: Path) -> None:
    assert dest == dest.parent / NAME
    assert (dest / "model.safetensors").read_bytes() == hub.files[MODEL_PATH]
    assert (dest / "config.json").read_bytes() == hub.files[CONFIG_PATH]
    sha = hashlib.sha256(hub.files[MODEL_PATH]).hexdigest()
    assert (dest / "model.safetensors.sha256").read_text() == f"{sha}  model.safetensors\n"
    assert not list(dest.glob("*.part"))


# --- downloads ------------------------------------------------------------------------------------

def test_full_download_is_checked_and_complete(hub, tmp_path):
    assert_downloaded(hub, fetch(hub, tmp_path))
    assert [r for _, r in hub.requests] == [None, None]       # no Range on a fresh download


def test_hub_style_redirect_keeps_linked_etag_and_range(hub, tmp_path):
    hub.redirects[MODEL_PATH] = "/cdn/blob"
    hub.files["/cdn/blob"] = hub.files[MODEL_PATH]
    hub.advertised_sha = "0" * 64                  # on the 302 only: proves we read it there
    with pytest.raises(DownloadError, match="wrong sha256: expected 0000"):
        fetch(hub, tmp_path)
    hub.advertised_sha, hub.cuts_left = None, 1
    dest = fetch(hub, tmp_path, retries=1)
    assert_downloaded(hub, dest)
    assert ("/cdn/blob", f"bytes={CUT}-") in hub.requests   # Range survived the redirect


def test_cut_connection_resumes_with_range_on_the_next_call(hub, tmp_path):
    hub.cuts_left = 1
    with pytest.raises(DownloadError, match=f"connection lost after {CUT} of 300000 bytes"):
        fetch(hub, tmp_path, retries=0)
    part = tmp_path / "weights" / NAME / "model.safetensors.part"
    assert part.stat().st_size == CUT
    assert not (tmp_path / "weights" / NAME / "model.safetensors").exists()
    assert_downloaded(hub, fetch(hub, tmp_path, retries=0))
    assert (MODEL_PATH, f"bytes={CUT}-") in hub.requests


def test_cut_connection_resumes_within_one_call(hub, tmp_path):
    hub.cuts_left = 2
    assert_downloaded(hub, fetch(hub, tmp_path, retries=2))
    assert [r for p, r in hub.requests if p == MODEL_PATH] == [None, f"bytes={CUT}-",
                                                              f"bytes={2 * CUT}-"]


def test_server_ignoring_range_restarts_from_zero(hub, tmp_path):
    hub.cuts_left, hub.ignore_range = 1, True
    with pytest.raises(DownloadError, match="connection lost"):
        fetch(hub, tmp_path, retries=0)
    assert_downloaded(hub, fetch(hub, tmp_path, retries=0))   # got 200 to a Range request
    assert (MODEL_PATH, f"bytes={CUT}-") in hub.requests


def test_part_file_past_the_end_starts_over(hub, tmp_path):
    dest = tmp_path / "weights" / NAME
    dest.mkdir(parents=True)
    (dest / "model.safetensors.part").write_bytes(bytes(400_000))   # 416 from the server
    assert_downloaded(hub, fetch(hub, tmp_path))


def test_wrong_hash_is_an_error_and_leaves_no_file(hub, tmp_path):
    hub.advertised_sha = "ab" * 32
    actual = hashlib.sha256(hub.files[MODEL_PATH]).hexdigest()
    with pytest.raises(DownloadError, match=f"model.safetensors: .*{MODEL_PATH} has the wrong "
                                            f"sha256: expected {'ab' * 32}, got {actual}"):
        fetch(hub, tmp_path)
    assert not (tmp_path / "weights" / NAME).exists()   # no bad file, and no empty folder


def test_our_hash_table_wins_over_the_server(hub, tmp_path, monkeypatch):
    monkeypatch.setitem(dl.KNOWN_FILES, (NAME, "model.safetensors"), ("cd" * 32, 300_000))
    with pytest.raises(DownloadError, match=f"expected {'cd' * 32}"):
        fetch(hub, tmp_path)
    assert not (tmp_path / "weights" / NAME / "model.safetensors").exists()


def test_404_names_the_url(hub, tmp_path):
    del hub.files[CONFIG_PATH]
    with pytest.raises(DownloadError, match=f"{hub.url}{CONFIG_PATH}: 404 Not Found"):
        fetch(hub, tmp_path)


def test_server_down_names_the_host_and_the_manual_route(tmp_path):
    with socket.socket() as s:                     # a port that was free a moment ago
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=f"cannot reach 127.0.0.1:{port} .* put "
                                            "model.safetensors and config.json in .*gpt2-medium/"):
        download_gpt2(NAME, tmp_path, base_url=f"http://127.0.0.1:{port}", progress=False)
    assert not (tmp_path / NAME).exists()          # nothing fetched: no empty folder left behind


def test_silent_server_times_out_with_a_clear_error(tmp_path):
    with socket.socket() as s:                     # accepts connections, never answers
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(DownloadError, match=f"cannot reach 127.0.0.1:{port} .*timed out"):
            download_gpt2(NAME, tmp_path, base_url=f"http://127.0.0.1:{port}", progress=False,
                          timeout=0.5)


def test_complete_files_are_not_fetched_again(hub, tmp_path):
    fetch(hub, tmp_path)
    n = len(hub.requests)
    assert_downloaded(hub, fetch(hub, tmp_path))
    assert len(hub.requests) == n


def test_known_hash_without_sidecar_is_rehashed_not_fetched(hub, tmp_path, monkeypatch):
    sha = hashlib.sha256(hub.files[MODEL_PATH]).hexdigest()
    monkeypatch.setitem(dl.KNOWN_FILES, (NAME, "model.safetensors"), (sha, 300_000))
    dest = fetch(hub, tmp_path)
    (dest / "model.safetensors.sha256").unlink()
    n = len(hub.requests)
    fetch(hub, tmp_path)
    assert len(hub.requests) == n and (dest / "model.safetensors.sha256").is_file()


def test_unknown_model_name_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match="choose one of gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        download_gpt2("gpt3", tmp_path)


# --- resolving without the network ----------------------------------------------------------------

@pytest.fixture
def hf_home(tmp_path, monkeypatch) -> Path:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return tmp_path / "hf"


def _make_model_dir(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(b"weights")
    (directory / "config.json").write_text("{}")
    return directory


def test_resolve_local_directory_and_weights_dir(hub, tmp_path, hf_home):
    mine = _make_model_dir(tmp_path / "my-gpt2")
    assert resolve_gpt2(mine, base_url=hub.url) == mine
    weights = _make_model_dir(tmp_path / "weights" / NAME)
    assert resolve_gpt2(NAME, tmp_path / "weights", base_url=hub.url) == weights
    assert hub.requests == []


@pytest.mark.parametrize("repo", [f"models--openai-community--{NAME}", f"models--{NAME}"])
def test_resolve_uses_a_hugging_face_cache_snapshot(hub, tmp_path, hf_home, repo):
    repo_dir = hf_home / "hub" / repo
    blob = repo_dir / "blobs" / "abc123"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"weights")
    snapshot = repo_dir / "snapshots" / "deadbeef"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(blob)     # the cache's layout: links into blobs/
    (snapshot / "config.json").write_text("{}")
    _make_model_dir(repo_dir / "snapshots" / "older")     # ignored: refs/main says deadbeef
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("deadbeef")
    assert resolve_gpt2(NAME, tmp_path / "weights", base_url=hub.url) == snapshot
    assert hub.requests == []


def test_resolve_downloads_when_nothing_is_local(hub, tmp_path, hf_home):
    dest = resolve_gpt2(NAME, tmp_path / "weights", base_url=hub.url, progress=False)
    assert_downloaded(hub, dest)


def test_resolve_rejects_incomplete_directory_and_unknown_names(tmp_path, hf_home):
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="half: directory has no model.safetensors"):
        resolve_gpt2(tmp_path / "half")
    with pytest.raises(ValueError, match="'nope' is neither a directory .* nor a GPT-2 model"):
        resolve_gpt2("nope", tmp_path)


# --- command line ---------------------------------------------------------------------------------

def test_cli_download(hub, tmp_path, capsys):
    argv = ["download", NAME, "--dir", str(tmp_path / "w"), "--base-url", hub.url, "--quiet"]
    assert cli_main(argv) == 0
    assert_downloaded(hub, tmp_path / "w" / NAME)
    assert capsys.readouterr().out == f"{NAME}: model.safetensors and config.json in " \
                                      f"{tmp_path / 'w' / NAME}\n"


def test_download_and_load_a_smollm2_hub_folder(hub, tmp_path, shared, capsys):
    """`tinygpt download smollm2-135m-instruct` fetches the hub folder users know, tokenizer
    included, and every command then loads it by name (here the fixture's tiny Llama files)."""
    fixture = shared / "fixtures" / "smollm2-135m-instruct"
    repo = "/HuggingFaceTB/SmolLM2-135M-Instruct/resolve/main/"
    hub.files |= {repo + "model.safetensors":
                  (fixture / "llama-tiny-hf" / "model.safetensors").read_bytes(),
                  repo + "config.json": (fixture / "llama-tiny-hf" / "config.json").read_bytes(),
                  repo + "tokenizer.json": (fixture / "tokenizer" / "tokenizer.json").read_bytes(),
                  repo + "tokenizer_config.json":
                  (fixture / "tokenizer" / "tokenizer_config.json").read_bytes()}
    argv = ["download", "smollm2-135m-instruct", "--dir", str(tmp_path), "--base-url", hub.url,
            "--quiet"]
    assert cli_main(argv) == 0
    assert "tokenizer.json" in capsys.readouterr().out
    from tinygpt.models.llama import Llama
    from tinygpt.hub.pretrained import load_pretrained
    model, tok = load_pretrained("smollm2-135m-instruct", tmp_path, download=False)
    assert isinstance(model, Llama) and tok.encode("Every effort moves you") == [8600, 3867,
                                                                                  7488, 346]


def test_cli_errors_are_one_line_and_exit_2(hub, tmp_path, capsys):
    del hub.files[MODEL_PATH]
    argv = ["download", NAME, "--dir", str(tmp_path), "--base-url", hub.url, "--quiet"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{hub.url}{MODEL_PATH}: 404 Not Found" in err
    hub.files[MODEL_PATH] = b"x" * 2000
    hub.advertised_sha = "ab" * 32
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "wrong sha256" in err


# --- default data files: ../shared/data, the cache, else their public home -----------------------

TEXT = b"I HAD always thought Jack Gisburn rather a cheap genius. " * 2000   # 116 KB
TEXT_PATH = "/the-verdict.txt"


@pytest.fixture
def data_home(hub, tmp_path, monkeypatch) -> Path:
    """The server holds the text, DATA_FILES points there; no ../shared, an empty cache."""
    hub.files[TEXT_PATH] = TEXT
    monkeypatch.setitem(dl.DATA_FILES, "the-verdict.txt", (
        hub.url + TEXT_PATH, hashlib.sha256(TEXT).hexdigest(), len(TEXT)))
    monkeypatch.setenv("TINYGPT_SHARED", str(tmp_path / "shared"))
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_data_file_downloads_into_the_cache_once(hub, data_home):
    path = dl.data_file("the-verdict.txt", progress=False)
    assert path == data_home / "cache" / "the-verdict.txt" and path.read_bytes() == TEXT
    n = len(hub.requests)
    assert dl.data_file("the-verdict.txt", progress=False) == path
    assert len(hub.requests) == n                          # the cache's copy, no request


def test_data_file_prefers_shared_data(hub, data_home):
    shared = data_home / "shared" / "data"
    shared.mkdir(parents=True)
    (shared / "the-verdict.txt").write_bytes(b"ours")
    assert dl.data_file("the-verdict.txt") == shared / "the-verdict.txt"
    assert hub.requests == []


def test_data_file_resumes_a_cut_download(hub, data_home):
    hub.cuts_left = 1
    assert dl.data_file("the-verdict.txt", progress=False, retries=1).read_bytes() == TEXT
    assert (TEXT_PATH, f"bytes={CUT}-") in hub.requests


def test_data_file_with_the_wrong_hash_is_not_kept(hub, data_home):
    hub.files[TEXT_PATH] = TEXT[:-1] + b"!"
    with pytest.raises(DownloadError, match="the-verdict.txt is not in .*wrong sha256"):
        dl.data_file("the-verdict.txt", progress=False)
    assert not (data_home / "cache" / "the-verdict.txt").exists()


def test_data_file_offline_is_one_line_naming_the_file(data_home, monkeypatch):
    with socket.socket() as s:                     # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, sha256, size = dl.DATA_FILES["the-verdict.txt"]
    monkeypatch.setitem(dl.DATA_FILES, "the-verdict.txt", (f"http://127.0.0.1:{port}/t", sha256,
                                                           size))
    with pytest.raises(DownloadError) as e:
        dl.data_file("the-verdict.txt", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the-verdict.txt is not in ")
    assert "cannot reach 127.0.0.1" in msg and "model.safetensors" not in msg


def test_resolve_without_download_names_the_command(tmp_path, hf_home):
    with pytest.raises(FileNotFoundError, match="run `tinygpt download gpt2`"):
        resolve_gpt2("gpt2", tmp_path, download=False)


def test_the_shared_folder_is_the_one_beside_the_checkout(monkeypatch):
    """Data files are looked up in ../shared next to the repository (or $TINYGPT_SHARED): the
    folder the tests use, whatever package folder download.py sits in."""
    monkeypatch.delenv("TINYGPT_SHARED", raising=False)
    checkout = Path(__file__).resolve().parents[1]
    assert dl.shared_dir() == checkout.parent / "shared"
    assert dl.shared_data_dir() == checkout.parent / "shared" / "data"
    monkeypatch.setenv("TINYGPT_SHARED", "/somewhere/else")
    assert dl.shared_data_dir() == Path("/somewhere/else/data")
