"""The fine-tune commands, pretrain, and a user's --out folder: files that are not the run's own survive a
run untouched, every file a run writes is one `check_out` refuses to overwrite, and the real CLI
exits 2 with one line on bad data. Tiny model, tiny data: a few seconds each."""
import json
import os
import subprocess
import sys
import zlib
from fnmatch import fnmatch
from pathlib import Path

import pytest

from tests.chat_fakes import save_tiny_gpt
from tinygpt.commands import MODEL_FILES, cli
from tinygpt.training.checkpoint import RUN_FILES

ROOT = Path(__file__).resolve().parents[1]
ENTRY = {"instruction": "Say hi.", "input": "", "output": "hi", "chosen": "hi", "rejected": "no"}
SPAM = "".join(f"{'spam' if i % 2 else 'ham'}\ttext number {i}\n" for i in range(12))
OWN = {"finetune-classifier": ("classifier.json", "classifier.safetensors", "results.json",
                               "confusion.png"),
       "finetune-instruct": ("instruction-data-with-response.json",),
       "finetune-dpo": ("dpo-responses.json",),
       "pretrain": ()}


@pytest.fixture(scope="module")
def gpt(tmp_path_factory) -> str:
    return save_tiny_gpt(tmp_path_factory.mktemp("tiny") / "gpt")


def user_folder(out: Path) -> dict:
    """A user's files in what will be --out; returns their CRCs."""
    (out / "mine").mkdir(parents=True)
    files = {"notes.txt": b"my notes\n", "mine/config.json": b'{"mine": true}',
             "data.csv": b"a,b\n1,2\n", ".hidden": b"x"}
    for name, data in files.items():
        (out / name).write_bytes(data)
    return {name: zlib.crc32(data) for name, data in files.items()}


def check_run(out: Path, cmd: str, users: dict) -> None:
    for name, crc in users.items():
        assert zlib.crc32((out / name).read_bytes()) == crc, f"{name} was changed"
    patterns = (*RUN_FILES, *MODEL_FILES, *OWN[cmd])
    written = [p.name for p in out.iterdir() if p.name not in ("mine", *users)]
    assert written, "the run wrote nothing"
    for name in written:                 # each would have been refused had the user owned it
        assert any(fnmatch(name, pat) for pat in patterns), f"{name} is not a run file"


def run_cli(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-m", "tinygpt", *argv], capture_output=True,
                          text=True, env=env, timeout=120)


def test_classifier_keeps_a_users_files_and_reruns_over_its_own(gpt, tmp_path):
    out, data = tmp_path / "out", tmp_path / "sms.txt"
    data.write_text(SPAM)
    users = user_folder(out)
    argv = ["finetune-classifier", "--model", gpt, "--data", str(data), "--out", str(out),
            "--epochs", "1", "--batch-size", "2", "--max-steps", "1", "--quiet"]
    assert cli.main(argv) == 0
    check_run(out, "finetune-classifier", users)
    before = json.loads((out / "results.json").read_text())
    assert cli.main(argv) == 0                                 # its own folder: rewritten
    assert json.loads((out / "results.json").read_text())["steps"] == before["steps"]
    check_run(out, "finetune-classifier", users)


@pytest.mark.parametrize("cmd, extra", [
    ("finetune-instruct", ["--sample-tokens", "0", "--max-new-tokens", "1"]),
    ("finetune-dpo", ["--lora-rank", "2", "--responses", "1", "--max-new-tokens", "1"]),
])
def test_instruct_and_dpo_keep_a_users_files(gpt, tmp_path, capsys, cmd, extra):
    out, data = tmp_path / "out", tmp_path / "data.json"
    data.write_text(json.dumps([ENTRY] * 20))
    users = user_folder(out)
    assert cli.main([cmd, "--model", gpt, "--data", str(data), "--out", str(out),
                     "--batch-size", "2", "--max-steps", "1", "--eval-iter", "1", *extra]) == 0
    check_run(out, cmd, users)
    capsys.readouterr()
    assert cli.main([cmd, "--model", gpt, "--data", str(data), "--out", str(out), *extra]) == 2
    assert "already holds checkpoint.json" in capsys.readouterr().err    # a second run: refused


def test_bad_data_is_one_line_and_exit_2_from_the_real_cli(gpt, tmp_path):
    out, data = tmp_path / "out", tmp_path / "prefs.json"
    data.write_bytes(b'[{"instruction": "\xff"}]')
    user_folder(out)
    done = run_cli("finetune-dpo", "--model", gpt, "--data", str(data), "--out", str(out))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and f"{data}: not UTF-8 text" in done.stderr
    assert sorted(p.name for p in out.iterdir()) == [".hidden", "data.csv", "mine", "notes.txt"]


def test_pretrain_never_replaces_a_users_model_and_keeps_their_other_files(tmp_path, capsys):
    data, model = tmp_path / "text.txt", tmp_path / "model.json"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    model.write_text(json.dumps({"n_layer": 1, "n_head": 2, "n_embd": 16}))
    argv = ["pretrain", "--data", str(data), "--tokenizer", "char", "--model", str(model),
            "--context-length", "16", "--batch-size", "2", "--max-steps", "1", "--eval-freq", "1",
            "--eval-iter", "1", "--sample-tokens", "0", "--quiet"]
    theirs = tmp_path / "their-model"
    user_folder(theirs)
    for name in ("model.safetensors", "config.json"):
        (theirs / name).write_bytes(b"a user's " + name.encode())
    assert cli.main([*argv, "--out", str(theirs)]) == 2
    assert "already holds config.json, model.safetensors" in capsys.readouterr().err
    assert (theirs / "model.safetensors").read_bytes() == b"a user's model.safetensors"
    assert sorted(p.name for p in theirs.iterdir()) == sorted(
        [".hidden", "config.json", "data.csv", "mine", "model.safetensors", "notes.txt"])
    out = tmp_path / "out"
    users = user_folder(out)
    assert cli.main([*argv, "--out", str(out)]) == 0
    check_run(out, "pretrain", users)
    capsys.readouterr()
    assert cli.main([*argv, "--out", str(out)]) == 2                  # its own run: resume it
    assert "already holds a checkpoint" in capsys.readouterr().err
