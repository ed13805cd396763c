"""A catalogue of bad command lines: each exits 2 with one short stderr line that names the flag,
file, field or tensor at fault, never a traceback, and leaves nothing half-written in --out.

Every case is (argv builder, needle). The builders get `Paths`: a tiny GPT-2-format model folder,
a finished 2-step char-level run and a `prepare`d folder, each made once per module and copied
where a case damages it. The whole file runs in well under a minute on 2 cores.
"""
from __future__ import annotations

import json
import math
import shutil
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tinygpt import GPT, GPTConfig
from tinygpt.commands import cli
from tinygpt.formats.safetensors import load_safetensors, save_safetensors
from tinygpt.text.tokenizer import GPT2Tokenizer
from tinygpt.core.validate import json_checksum
from tinygpt.hub.pretrained import save_pretrained

TEXT = "".join(f"the cat {w} on the mat. a dog {w} by the door.\n"
               for w in ("sat", "ran", "lay", "hid", "sat", "ran", "ate", "sat") * 6)
TINY = {"n_layer": 1, "n_head": 2, "n_embd": 16}
TRAIN = ["--context-length", "16", "--batch-size", "2", "--max-steps", "2", "--eval-freq", "2",
         "--eval-iter", "1", "--sample-tokens", "0", "--quiet"]


@dataclass
class Paths:
    tmp: Path
    gpt: Path              # tiny GPT-2-format model folder (GPT-2 tokenizer)
    run: Path              # finished char-level run (checkpoint + model)
    text: Path             # the run's data
    prepared: Path         # `tinygpt prepare --tokenizer char` of TEXT
    model_json: Path       # TINY as a GPTConfig JSON file

    def copy(self, src: Path, name: str) -> Path:
        dst = self.tmp / name
        shutil.copytree(src, dst)
        return dst

    def write(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        return path

    def pretrain(self, *extra: str, data: Path | None = None) -> list[str]:
        return ["pretrain", "--data", str(data or self.text), "--tokenizer", "char", "--model",
                str(self.model_json), *TRAIN, "--out", str(self.tmp / "out"), *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("base")
    cfg = GPTConfig(vocab_size=50257, block_size=32, n_layer=1, n_head=2, n_embd=8,
                    qkv_bias=True, tie_weights=True)
    save_pretrained(GPT(cfg, seed=0), root / "gpt", tokenizer=GPT2Tokenizer())
    text = root / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    model_json = root / "model.json"
    model_json.write_text(json.dumps(TINY))
    assert cli.main(["pretrain", "--data", str(text), "--tokenizer", "char", "--model",
                     str(model_json), *TRAIN, "--out", str(root / "run")]) == 0
    assert cli.main(["prepare", str(text), str(root / "prepared"), "--tokenizer", "char",
                     "--quiet"]) == 0
    return {"gpt": root / "gpt", "run": root / "run", "text": text,
            "prepared": root / "prepared", "model_json": model_json}


# --- helpers the cases use to damage a copy ---------------------------------------------------

def gpt_with_config(p: Paths, name: str, edit) -> Path:
    """A copy of the tiny model whose config.json is `edit(dict)`, or `edit` itself (text/bytes)."""
    d = p.copy(p.gpt, name)
    path = d / "config.json"
    if callable(edit):
        cfg = json.loads(path.read_text())
        edit(cfg)
        path.write_text(json.dumps(cfg))
    elif isinstance(edit, bytes):
        path.write_bytes(edit)
    else:
        path.write_text(edit)
    return d


def gpt_with_tensor(p: Paths, name: str, tensor: str, value: float) -> Path:
    d = p.copy(p.gpt, name)
    arrays = {k: np.array(v) for k, v in load_safetensors(d / "model.safetensors").items()}
    arrays[tensor].reshape(-1)[3] = value
    save_safetensors(arrays, d / "model.safetensors", metadata={"format": "pt"})
    return d


def resign(record: dict) -> dict:
    """Give an edited record a valid checksum, so the check after the checksum is what fails."""
    from tinygpt.training.checkpoint import record_checksum
    record["record_crc32"] = record_checksum(record)
    return record


def run_with_record(p: Paths, name: str, edit, sign: bool = True) -> Path:
    d = p.copy(p.run, name)
    path = d / "checkpoint.json"
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(resign(record) if sign else record))
    return d


def resume(d: Path, *extra: str) -> list[str]:
    return ["pretrain", "--out", str(d), "--resume", "--quiet", *extra]


def prepared_with(p: Paths, name: str, meta=None, file: str = "meta.json",
                  content: bytes | None = None) -> Path:
    d = p.copy(p.prepared, name)
    if meta is not None:
        m = json.loads((d / "meta.json").read_text())
        meta(m)
        m["meta_crc32"] = json_checksum(m, "meta_crc32")   # so the check after it is what fails
        (d / "meta.json").write_text(json.dumps(m))
    if content is not None:
        (d / file).write_bytes(content)
    return d


def set_key(key, value):
    def edit(d):
        d[key] = value
    return edit


def drop_key(key):
    def edit(d):
        d.pop(key)
    return edit


def nested(key, sub, value):
    def edit(d):
        d[key][sub] = value
    return edit


def generate(model: Path | str, *extra: str) -> list[str]:
    return ["generate", "--model", str(model), "--prompt", "Hello", "--max-new-tokens", "2",
            *extra]


# --- the catalogue: (id, argv builder, needle in the message) ---------------------------------

CASES = [
    # 1-3: malformed config.json / --model JSON: object, types, sizes; named file and field
    ("model-json-list", lambda p: p.pretrain("--model", str(p.write("m.json", "[1, 2]"))),
     "m.json"),
    ("model-json-invalid", lambda p: p.pretrain("--model", str(p.write("m.json", "{"))),
     "m.json: not valid JSON"),
    ("model-json-empty", lambda p: p.pretrain("--model", str(p.write("m.json", ""))),
     "m.json: empty"),
    ("model-json-not-utf8", lambda p: p.pretrain("--model", str(p.write("m.json", b'{"\xff": 1}'))),
     "m.json: not valid UTF-8"),
    ("model-json-str-field", lambda p: p.pretrain("--model", str(p.write(
        "m.json", json.dumps({**TINY, "n_embd": "16"})))), "n_embd"),
    ("model-json-float-field", lambda p: p.pretrain("--model", str(p.write(
        "m.json", json.dumps({**TINY, "n_embd": 16.0})))), "n_embd"),
    ("model-json-bool-field", lambda p: p.pretrain("--model", str(p.write(
        "m.json", json.dumps({**TINY, "n_layer": True})))), "n_layer"),
    ("model-json-nan-epsilon", lambda p: p.pretrain("--model", str(p.write(
        "m.json", json.dumps({**TINY, "layer_norm_epsilon": math.nan})))), "layer_norm_epsilon"),
    ("config-list", lambda p: generate(gpt_with_config(p, "g", "[1, 2]")), "config.json"),
    ("config-invalid", lambda p: generate(gpt_with_config(p, "g", "{")), "config.json"),
    ("config-empty", lambda p: generate(gpt_with_config(p, "g", "")), "config.json: empty"),
    ("config-not-utf8", lambda p: generate(gpt_with_config(p, "g", b'{"\xff": 1}')),
     "config.json: not valid UTF-8"),
    ("config-vocab-1e15", lambda p: generate(gpt_with_config(p, "g", set_key("vocab_size", 1e15))),
     "vocab_size"),
    ("config-vocab-huge-int", lambda p: generate(gpt_with_config(
        p, "g", set_key("vocab_size", 10**15))), "vocab_size"),
    ("config-str-n-embd", lambda p: generate(gpt_with_config(p, "g", set_key("n_embd", "8"))),
     "n_embd"),
    ("config-too-many-layers", lambda p: generate(gpt_with_config(p, "g", set_key("n_layer", 5000))),
     "n_layer 5000"),
    ("tokenizer-json-invalid", lambda p: generate(_with_file(p, "tinygpt-tokenizer.json", "{")),
     "tinygpt-tokenizer.json"),
    # 2, 4: prepared data: meta.json and the .bin files, named
    ("meta-invalid", lambda p: p.pretrain(data=prepared_with(p, "d", content=b"{")), "meta.json"),
    ("meta-list", lambda p: p.pretrain(data=prepared_with(p, "d", content=b"[]")), "meta.json"),
    ("meta-not-utf8", lambda p: p.pretrain(data=prepared_with(p, "d", content=b"{\"\xff\"")),
     "meta.json"),
    ("meta-unknown-dtype", lambda p: p.pretrain(data=prepared_with(
        p, "d", meta=set_key("dtype", "float77"))), "dtype"),
    ("meta-no-chars", lambda p: p.pretrain(data=prepared_with(p, "d", meta=drop_key("chars"))),
     "meta.json: missing chars"),
    ("meta-edited", lambda p: p.pretrain(data=_prepared_edited(p)), "meta.json: fails its checksum"),
    ("meta-no-tokenizer", lambda p: p.pretrain(data=prepared_with(
        p, "d", meta=drop_key("tokenizer"))), "meta.json: missing tokenizer"),
    ("train-bin-odd-size", lambda p: p.pretrain(data=prepared_with(
        p, "d", file="train.bin", content=(p.prepared / "train.bin").read_bytes()[:-1])),
     "train.bin"),
    ("train-bin-replaced", lambda p: p.pretrain(data=prepared_with(
        p, "d", file="train.bin", content=bytes(reversed((p.prepared / "train.bin").read_bytes())))),
     "train.bin"),
    # 3, 4: checkpoint.json fields (re-signed, so the field check is what fails)
    ("record-str-batch-size", lambda p: resume(run_with_record(
        p, "r", nested("train_config", "batch_size", "2"))), "batch_size"),
    ("record-no-cursor", lambda p: resume(run_with_record(p, "r", drop_key("cursor"))),
     "checkpoint.json: missing cursor"),
    ("record-optimizer-none", lambda p: resume(run_with_record(
        p, "r", nested("optimizer", "type", None))), "checkpoint.json"),
    ("record-list", lambda p: resume(_run_with_file(p, "checkpoint.json", "[]")),
     "checkpoint.json"),
    # 11: the record itself is checksummed
    ("record-step-edited", lambda p: resume(run_with_record(p, "r", set_key("step", 1), False)),
     "checksum"),
    ("record-rng-edited", lambda p: resume(run_with_record(
        p, "r", lambda r: r["model_rng"]["state"].update(state=12345), False)), "checksum"),
    # 5: every float flag finite and in range, before any work
    ("temperature-nan", lambda p: generate(p.gpt, "--temperature", "nan"), "--temperature"),
    ("temperature-inf", lambda p: generate(p.gpt, "--temperature", "inf"), "--temperature"),
    ("top-p-nan", lambda p: generate(p.gpt, "--top-p", "nan"), "--top-p"),
    ("lr-nan", lambda p: p.pretrain("--lr", "nan"), "lr"),
    ("lr-inf", lambda p: p.pretrain("--lr", "inf"), "lr"),
    ("min-lr-nan", lambda p: p.pretrain("--min-lr", "nan"), "min_lr"),
    ("grad-clip-nan", lambda p: p.pretrain("--grad-clip", "nan"), "grad_clip"),
    ("weight-decay-nan", lambda p: p.pretrain("--weight-decay", "nan"), "weight_decay"),
    ("beta1-too-big", lambda p: p.pretrain("--beta1", "1.5"), "beta1"),
    ("beta2-nan", lambda p: p.pretrain("--beta2", "nan"), "beta2"),
    ("max-seconds-nan", lambda p: p.pretrain("--max-seconds", "nan"), "max_seconds"),
    ("dropout-nan", lambda p: p.pretrain("--dropout", "nan"), "--dropout"),
    ("val-fraction-nan", lambda p: ["prepare", str(p.text), str(p.tmp / "out"), "--val-fraction",
                                    "nan", "--quiet"], "val_fraction"),
    # 6: --eos inside the vocabulary
    ("eos-too-big", lambda p: generate(p.gpt, "--eos", "99999"), "--eos"),
    ("eos-negative", lambda p: generate(p.gpt, "--eos", "-1"), "--eos"),
    # 7: a prompt that is not UTF-8 (how Python passes the byte 0xff of argv)
    ("prompt-not-utf8", lambda p: ["generate", "--model", str(p.gpt), "--prompt", "a\udcff"],
     "--prompt"),
    ("start-context-not-utf8", lambda p: p.pretrain("--start-context", "a\udcff"),
     "start_context"),
    # 8: seeds
    ("generate-seed-negative", lambda p: generate(p.gpt, "--seed", "-1"), "--seed"),
    ("gradcheck-seed-negative", lambda p: ["gradcheck", "--seed", "-1"], "--seed"),
    ("pretrain-seed-negative", lambda p: p.pretrain("--seed", "-1"), "seed"),
    # 9: weights that are not finite, the tensor named
    ("weights-nan", lambda p: generate(gpt_with_tensor(p, "g", "h.0.mlp.c_fc.weight", math.nan)),
     "h.0.mlp.c_fc.weight"),
    ("weights-inf", lambda p: generate(gpt_with_tensor(p, "g", "wte.weight", math.inf)),
     "wte.weight"),
    # 10: --resume checks what it is given against the run
    ("resume-other-data", lambda p: resume(p.copy(p.run, "r"), "--data", str(p.write(
        "other.txt", TEXT.upper()))), "--data"),
    ("resume-edited-data", lambda p: resume(_run_with_edited_data(p)), "--data"),
    ("resume-other-tokenizer", lambda p: resume(p.copy(p.run, "r"), "--tokenizer", "gpt2"),
     "--tokenizer"),
    ("resume-dropout", lambda p: resume(p.copy(p.run, "r"), "--dropout", "0.2"),
     "(dropout: checkpoint 0.1, now 0.2)"),              # and nothing else differs
    # 12: a failed prepare leaves no output folder
    ("prepare-missing-input", lambda p: ["prepare", str(p.tmp / "nope.txt"), str(p.tmp / "out"),
                                         "--quiet"], "nope.txt"),
    ("prepare-empty-input", lambda p: ["prepare", str(p.write("e.txt", "")), str(p.tmp / "out"),
                                       "--quiet"], "e.txt"),
    ("prepare-not-utf8", lambda p: ["prepare", str(p.write("b.txt", b"ab\xffcd")),
                                    str(p.tmp / "out"), "--quiet"], "b.txt"),
    # 14: a start context the char-level data cannot encode: the flag named, before training
    ("start-context-unknown-char", lambda p: p.pretrain("--sample-tokens", "5"),
     "start_context"),
]


def _with_file(p: Paths, name: str, content: str) -> Path:
    d = p.copy(p.gpt, "g")
    (d / name).write_text(content)
    return d


def _run_with_file(p: Paths, name: str, content: str) -> Path:
    d = p.copy(p.run, "r")
    (d / name).write_text(content)
    return d


def _prepared_edited(p: Paths) -> Path:
    d = p.copy(p.prepared, "d")
    meta = json.loads((d / "meta.json").read_text())
    meta["chars"] = meta["chars"][1:] + meta["chars"][:1]          # ids would decode wrongly
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def _run_with_edited_data(p: Paths) -> Path:
    """A copy of the run whose recorded data file was edited in place after training."""
    d = p.copy(p.run, "r")
    data = p.write("edited.txt", TEXT)
    record = json.loads((d / "checkpoint.json").read_text())
    record["extra"]["data"] = str(data)
    from tinygpt.training.distributed import fingerprint
    record["extra"]["data_fingerprint"] = fingerprint(data)
    (d / "checkpoint.json").write_text(json.dumps(resign(record)))
    data.write_text(TEXT.replace("cat", "cap"), encoding="utf-8")
    return d


def _snapshot(path: Path) -> dict:
    if not path.exists():
        return {}
    return {str(f.relative_to(path)): zlib.crc32(f.read_bytes()) if f.is_file() else None
            for f in sorted(path.rglob("*"))}


def _out_dir(argv: list[str]) -> Path | None:
    if "--out" in argv:
        return Path(argv[argv.index("--out") + 1])
    if argv[0] == "prepare":
        return Path(argv[2])
    return None


@pytest.mark.parametrize("build, needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input(build, needle, base, tmp_path, capsys):
    argv = build(Paths(tmp_path, **base))
    out = _out_dir(argv)
    existed = out is not None and out.exists()
    before = _snapshot(out) if out else None
    capsys.readouterr()
    try:
        code = cli.main(argv)
    except SystemExit as e:                 # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert len(lines[0]) < 400, lines[0]
    assert needle in lines[0], lines[0]
    if out is not None:
        assert _snapshot(out) == before, f"{out} changed"
        assert existed or not out.exists(), f"{out} was left behind"


def test_catalogue_covers_the_issue():
    assert len(CASES) >= 39
    assert len({c[0] for c in CASES}) == len(CASES)
