"""The demos' first step on a machine without ../shared: the data file is fetched, or, offline,
one line says to pass its path. Nothing here trains or touches the network."""
import importlib.util
import socket
from pathlib import Path

import pytest

from tinygpt.hub import download

DEMOS = Path(__file__).resolve().parents[1] / "demos"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, DEMOS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No ../shared, an empty cache, and every data URL pointing at a closed port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name, (_, sha256, size) in list(download.DATA_FILES.items()):
        monkeypatch.setitem(download.DATA_FILES, name, (f"http://127.0.0.1:{port}/{name}",
                                                        sha256, size))
    monkeypatch.setenv("TINYGPT_SHARED", str(tmp_path / "shared"))
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("demo, text", [("shakespeare_char", "tinyshakespeare.txt"),
                                        ("pretrain_verdict", "the-verdict.txt")])
def test_offline_demo_says_to_pass_the_path(offline, capsys, demo, text):
    assert _load(demo).main([]) != 0
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert text in err and "pass the file's path" in err and "Traceback" not in err
