"""The training loop and `tinygpt pretrain`: loss goes down, accumulation, bit-identical resume,
NaN stop, checkpoints that survive a full disk, and one clear error per kind of bad input.

Tiny models (1-2 layers, width 16-32) on a synthetic text, a few steps each: the file runs in
well under a minute on 2 cores.
"""
import errno
import json
import os
import socket
from dataclasses import replace

import numpy as np
import pytest

import tinygpt.formats.safetensors
from tinygpt import GPT, GPTConfig
from tinygpt.commands import cli
from tinygpt.hub import download
from tinygpt.training.checkpoint import load_checkpoint, read_record
from tinygpt.text.data import DataLoader, GPTDataset
from tinygpt.text.tokenizer import CharTokenizer
from tinygpt.training.train import TrainConfig, TrainingDiverged, default_loss, estimate_loss, train

TEXT = "".join(f"the cat {w} on the mat. a dog {w} by the door.\n"
               for w in ("sat", "ran", "lay", "hid", "sat", "ran", "ate", "sat") * 6)
TOK = CharTokenizer.from_text(TEXT)
T = 16
MODEL = GPTConfig(vocab_size=TOK.n_vocab, block_size=T, n_layer=1, n_head=2, n_embd=16,
                  dropout=0.1)


def _loaders(seed: int = 0, batch_size: int = 4):
    ids = TOK.encode(TEXT)
    n = int(0.9 * len(ids))
    train_ds, val_ds = GPTDataset(ids[:n], T, T), GPTDataset(ids[n:], T, T)
    return (DataLoader(train_ds, batch_size, shuffle=True, drop_last=True, seed=seed),
            DataLoader(val_ds, batch_size))


def _cfg(**kw) -> TrainConfig:
    base = dict(context_length=T, batch_size=4, max_steps=8, lr=3e-3, eval_freq=2, eval_iter=2,
                sample_tokens=0)
    return TrainConfig(**{**base, **kw})


def test_tiny_model_loss_decreases():
    train_data, val_data = _loaders()
    result = train(GPT(MODEL), train_data, val_data, _cfg(max_steps=30, eval_freq=30, lr=1e-2),
                   progress=False)
    first, last = result.evals[0], result.evals[-1]
    assert first["train_loss"] == pytest.approx(np.log(TOK.n_vocab), abs=0.3)   # ~uniform at init
    assert last["train_loss"] < first["train_loss"] - 0.8
    assert last["val_loss"] < first["val_loss"] - 0.8
    assert len(result.losses) == 30 and result.step == 30


def test_accumulating_two_micro_batches_equals_one_double_batch():
    cfg = replace(MODEL, dropout=0.0)
    x, y = _loaders(batch_size=4)[0].dataset.batch(np.arange(4))
    halves = [(x[:2], y[:2]), (x[2:], y[2:])]
    models = []
    for data, accum in (([(x, y)], 1), (halves, 2)):
        model = GPT(cfg, seed=1)
        train(model, data, None, _cfg(max_steps=1, accum=accum, optimizer="sgd", beta1=0.0,
                                      grad_clip=0.0, eval_iter=1), progress=False)
        models.append(model)
    for (name, a), (_, b) in zip(*(m.named_parameters() for m in models)):
        # float32 sums taken in another order: a few ulps
        np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-7, err_msg=name)


def _stop_at_checkpoint(step: int):
    def log(msg: str) -> None:
        if msg.startswith(f"checkpoint: step {step} "):
            raise KeyboardInterrupt
    return log


def test_resume_is_bit_identical(tmp_path):
    cfg = _cfg(max_steps=8, accum=2, ckpt_freq=4, warmup=2, min_lr=3e-4, sample_tokens=4,
               start_context="the")
    full = train(GPT(MODEL), *_loaders(), replace(cfg, out_dir=str(tmp_path / "a")),
                 tokenizer=TOK, progress=False)
    out = str(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):                 # stopped right after step 4's save
        train(GPT(MODEL), *_loaders(), replace(cfg, out_dir=out), tokenizer=TOK,
              log=_stop_at_checkpoint(4), progress=False)
    assert read_record(out)["step"] == 4
    # a fresh process would build a new model and loaders: other seeds prove nothing leaks through
    resumed = train(GPT(MODEL, seed=99), *_loaders(seed=99), replace(cfg, out_dir=out),
                    tokenizer=TOK, progress=False, resume=True)
    assert resumed.steps == [5, 6, 7, 8]
    assert resumed.losses == full.losses[4:]                             # exact, not approx
    assert resumed.evals == full.evals
    a, _ = load_checkpoint(tmp_path / "a")
    b, _ = load_checkpoint(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    calls = []

    def loss_fn(model, x, y):
        calls.extend([1] if model.training else [])      # count training calls, not evaluation
        loss = default_loss(model, x, y)
        return loss * float("nan") if model.training and len(calls) == 3 else loss

    cfg = _cfg(max_steps=6, ckpt_freq=2, eval_freq=100, out_dir=str(tmp_path))
    with pytest.raises(TrainingDiverged, match=r"at step 3: loss is nan.*step 2"):
        train(GPT(MODEL), *_loaders(), cfg, loss_fn=loss_fn, progress=False)
    arrays, record = load_checkpoint(tmp_path)
    assert record["step"] == 2 and all(np.isfinite(a).all() for a in arrays.values())


def test_disk_full_during_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    real_save = tinygpt.training.checkpoint.save_safetensors
    saves = []

    def save_then_disk_full(tensors, path, metadata=None):
        saves.append(path)
        if len(saves) == 2:                             # the temp file is written, then fsync fails
            def no_space(fd):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            monkeypatch.setattr(tinygpt.formats.safetensors.os, "fsync", no_space)
        return real_save(tensors, path, metadata)

    monkeypatch.setattr(tinygpt.training.checkpoint, "save_safetensors", save_then_disk_full)
    with pytest.raises(OSError, match=r"No space left.*previous checkpoint \(step 2\) is intact"):
        train(GPT(MODEL), *_loaders(), _cfg(max_steps=4, ckpt_freq=2, out_dir=str(tmp_path)),
              progress=False)
    monkeypatch.undo()
    arrays, record = load_checkpoint(tmp_path)
    assert record["step"] == 2
    names = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("loss.png", "lr.png"))
    assert names == ["checkpoint.json", "ckpt-0000002.safetensors", "log.csv"]  # no temp files
    # (loss.png and lr.png: matplotlib's, present only when it is installed)


def test_log_csv_and_loss_png_hold_every_evaluation(tmp_path):
    pytest.importorskip("matplotlib")
    result = train(GPT(MODEL), *_loaders(), _cfg(max_steps=4, out_dir=str(tmp_path)),
                   progress=False)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert len(rows) == 1 + len(result.evals) == 1 + 3               # header; steps 0, 2, 4
    assert [int(r.split(",")[0]) for r in rows[1:]] == [e["step"] for e in result.evals]
    png = (tmp_path / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000   # a drawn figure
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# --- the command line ---------------------------------------------------------------------------

@pytest.fixture
def tiny_run(tmp_path):
    """(data file, model json, base argv) for a 2-step char-level `tinygpt pretrain`."""
    data = tmp_path / "text.txt"
    data.write_text(TEXT)
    model = tmp_path / "model.json"
    model.write_text(json.dumps({"n_layer": 1, "n_head": 2, "n_embd": 16}))
    argv = ["pretrain", "--data", str(data), "--tokenizer", "char", "--model", str(model),
            "--context-length", "16", "--batch-size", "2", "--max-steps", "2", "--eval-freq", "2",
            "--eval-iter", "1", "--sample-tokens", "0", "--quiet"]
    return data, model, argv


def _cli_error(argv, capsys) -> str:
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_cli_pretrain_and_resume(tiny_run, tmp_path, capsys):
    _, _, argv = tiny_run
    out = str(tmp_path / "run")
    assert cli.main(argv + ["--out", out]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert (tmp_path / "run" / "log.csv").read_text().startswith("step,epoch,tokens_seen")
    # resume with a longer run: everything else comes from the checkpoint
    assert cli.main(["pretrain", "--out", out, "--resume", "--max-steps", "3", "--quiet"]) == 0
    assert read_record(out)["step"] == 3


def test_cli_misspelled_flag_is_an_error(tiny_run, capsys):
    with pytest.raises(SystemExit):
        cli.main(tiny_run[2] + ["--warmupp", "3"])
    with pytest.raises(SystemExit):                     # no abbreviations either
        cli.main(tiny_run[2] + ["--warm", "3"])
    assert "unrecognized arguments" in capsys.readouterr().err


def test_cli_missing_data_file(tiny_run, tmp_path, capsys):
    argv = tiny_run[2] + ["--out", str(tmp_path / "o")]
    argv[argv.index("--data") + 1] = str(tmp_path / "nope.txt")
    assert "not found" in _cli_error(argv, capsys)


def test_cli_data_shorter_than_context(tiny_run, tmp_path, capsys):
    data, _, argv = tiny_run
    data.write_text(TEXT[:40])
    assert "too short for one window" in _cli_error(argv + ["--out", str(tmp_path / "o")], capsys)


def test_cli_checkpoint_from_another_config(tiny_run, tmp_path, capsys):
    _, model, argv = tiny_run
    out = str(tmp_path / "run")
    assert cli.main(argv + ["--out", out]) == 0
    model.write_text(json.dumps({"n_layer": 2, "n_head": 2, "n_embd": 16}))
    err = _cli_error(argv + ["--out", out, "--resume"], capsys)
    assert "another model config" in err and "n_layer: checkpoint 1, now 2" in err


@pytest.mark.parametrize("damage", ["truncate", "flip", "json"])
def test_cli_corrupted_checkpoint(tiny_run, tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert cli.main(tiny_run[2] + ["--out", str(out)]) == 0
    tensors = out / read_record(out)["tensors"]
    raw = bytearray(tensors.read_bytes())
    if damage == "truncate":
        tensors.write_bytes(raw[:len(raw) // 2])
    elif damage == "flip":
        raw[-5] ^= 0xFF                                   # one byte of the last tensor
        tensors.write_bytes(bytes(raw))
    else:
        (out / "checkpoint.json").write_text('{"step": 2, "tens')
    err = _cli_error(["pretrain", "--out", str(out), "--resume", "--quiet"], capsys)
    assert "corrupted" in err


def test_cli_unwritable_output_dir(tiny_run, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    err = _cli_error(tiny_run[2] + ["--out", str(blocker / "run")], capsys)
    assert "not writable" in err


def test_cli_disk_full(tiny_run, tmp_path, capsys, monkeypatch):
    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", no_space)          # every durable write fails
    err = _cli_error(tiny_run[2] + ["--out", str(tmp_path / "run")], capsys)
    # the step-0 evaluation's log is the first file written
    assert "No space left on device" in err and "training log in" in err and "run" in err


def test_cli_disk_full_at_the_first_checkpoint(tiny_run, tmp_path, capsys, monkeypatch):
    def no_space(tensors, path, metadata=None):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(tinygpt.training.checkpoint, "save_safetensors", no_space)
    err = _cli_error(tiny_run[2] + ["--out", str(tmp_path / "run")], capsys)
    assert "No space left on device" in err and "no earlier checkpoint" in err


@pytest.mark.filterwarnings("ignore::RuntimeWarning")     # overflow on the way to NaN
def test_cli_nan_is_one_line(tiny_run, tmp_path, capsys):
    err = _cli_error(tiny_run[2] + ["--out", str(tmp_path / "run"), "--lr", "1e30",
                                    "--max-steps", "4", "--grad-clip", "0"], capsys)
    assert "diverged at step" in err


def test_cli_offline_without_data(tiny_run, tmp_path, capsys, monkeypatch):
    with socket.socket() as s:                          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, sha256, size = download.DATA_FILES["the-verdict.txt"]
    monkeypatch.setitem(download.DATA_FILES, "the-verdict.txt",
                        (f"http://127.0.0.1:{port}/the-verdict.txt", sha256, size))
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TINYGPT_SHARED", str(tmp_path / "no-shared"))     # not ../shared/data
    argv = tiny_run[2]
    i = argv.index("--data")
    err = _cli_error(argv[:i] + argv[i + 2:] + ["--out", str(tmp_path / "o")], capsys)
    assert "pass --data" in err
    assert "the-verdict.txt" in err and "model.safetensors" not in err


# --- hooks: time budget, metrics, grad_hook, is_main, batches of any structure ------------------

def test_max_seconds_stops_the_run_and_evaluates_and_saves_at_the_end(tmp_path):
    cfg = _cfg(max_steps=100_000, eval_freq=100_000, max_seconds=0.5, out_dir=str(tmp_path))
    result = train(GPT(MODEL), *_loaders(), cfg, progress=False)
    assert 0 < result.step < 100_000
    assert [e["step"] for e in result.evals] == [0, result.step]     # start and end
    assert read_record(tmp_path)["step"] == result.step               # the end is checkpointed


def _accuracy(model, x, y) -> float:
    """Next-token accuracy: the metric a classifier would report."""
    return float((model(x).data.argmax(-1) == y).mean())


def test_metrics_are_evaluated_logged_and_written_to_log_csv(tmp_path):
    messages = []
    result = train(GPT(MODEL), *_loaders(), _cfg(max_steps=2, out_dir=str(tmp_path)),
                   metrics={"accuracy": _accuracy}, log=messages.append, progress=False)
    rows = (tmp_path / "log.csv").read_text().splitlines()
    assert rows[0].split(",")[-2:] == ["train_accuracy", "val_accuracy"]
    assert all(0.0 <= e["val_accuracy"] <= 1.0 for e in result.evals)
    assert "| accuracy train " in messages[0]


def test_grad_hook_sees_summed_gradients_before_the_update():
    calls = []

    def zero_grads(params):                    # what an all-reduce would do, but to zeros
        calls.append(len(params))
        assert all(p.grad is not None for p in params)
        for p in params:
            p.grad[...] = 0.0

    model = GPT(replace(MODEL, dropout=0.0))
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    train(model, *_loaders(), _cfg(max_steps=3, accum=2, optimizer="sgd", weight_decay=0.0),
          grad_hook=zero_grads, progress=False)
    assert calls == [len(model.trainable_parameters())] * 3
    assert all(np.array_equal(before[n], p.data) for n, p in model.named_parameters())


def test_not_main_process_writes_and_logs_nothing(tmp_path):
    messages = []
    out = tmp_path / "run"
    train(GPT(MODEL), *_loaders(), _cfg(max_steps=2, sample_tokens=3, out_dir=str(out)),
          tokenizer=TOK, log=messages.append, is_main=False, progress=False)
    assert messages == [] and not out.exists()


def test_dict_batches_with_their_own_loss_and_token_count():
    class DictBatches:
        def __init__(self, loader):
            self.loader, self.rng = loader, loader.rng

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for x, y in self.loader:
                yield {"x": x, "y": y}

    train_data, val_data = _loaders()
    seen = []

    def loss_fn(model, batch):
        seen.append(sorted(batch))
        return default_loss(model, batch["x"], batch["y"])

    result = train(GPT(MODEL), DictBatches(train_data), DictBatches(val_data), _cfg(max_steps=2),
                   loss_fn=loss_fn, count_tokens=lambda b: b["x"].shape[0], progress=False)
    assert seen[0] == ["x", "y"] and result.tokens_seen == 2 * 4     # rows, as counted here


def test_train_eval_data_replaces_train_data_in_the_estimate():
    train_data, val_data = _loaders()
    fixed = [train_data.dataset.batch(np.arange(4))]
    model, steps = GPT(MODEL), []
    result = train(model, train_data, val_data, _cfg(max_steps=2), train_eval_data=fixed,
                   progress=False, on_eval=lambda row, r: steps.append(row["step"]))
    assert steps == [0, 2]
    assert result.evals[-1]["train_loss"] == estimate_loss(model, fixed, 1)


# --- freezing -----------------------------------------------------------------------------------

def _frozen_model(seed: int = 0) -> GPT:
    model = GPT(replace(MODEL, n_layer=2), seed=seed)
    model.requires_grad_(False)
    model.h[-1].requires_grad_(True)
    return model


def test_frozen_parameters_stay_put_and_stay_in_checkpoints(tmp_path):
    model = _frozen_model()
    trainable = {n for n, _ in model.named_trainable_parameters()}
    assert trainable and all(n.startswith("h.1.") for n in trainable)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    train(model, *_loaders(), _cfg(max_steps=3, out_dir=str(tmp_path)), progress=False)
    for name, p in model.named_parameters():
        assert np.array_equal(before[name], p.data) == (name not in trainable), name
    arrays, record = load_checkpoint(tmp_path)
    assert {k[6:] for k in arrays if k.startswith("model.")} == set(before)   # frozen ones too
    moments = {k.split(".", 2)[2] for k in arrays if k.startswith("optim.")}
    assert moments == trainable                          # optimizer state: trained ones only
    assert set(record["trainable"]) == trainable
    for name in set(before) - trainable:
        assert np.array_equal(arrays[f"model.{name}"], before[name])


def test_frozen_run_resumes_bit_identically(tmp_path):
    cfg = _cfg(max_steps=6, ckpt_freq=3)
    full = train(_frozen_model(), *_loaders(), replace(cfg, out_dir=str(tmp_path / "a")),
                 progress=False)
    out = str(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        train(_frozen_model(), *_loaders(), replace(cfg, out_dir=out),
              log=_stop_at_checkpoint(3), progress=False)
    resumed = train(_frozen_model(seed=99), *_loaders(seed=99), replace(cfg, out_dir=out),
                    progress=False, resume=True)
    assert resumed.losses == full.losses[3:] and resumed.evals == full.evals
    a, _ = load_checkpoint(tmp_path / "a")
    b, _ = load_checkpoint(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_resume_with_other_frozen_parameters_is_an_error(tmp_path):
    cfg = _cfg(max_steps=2, out_dir=str(tmp_path))
    train(_frozen_model(), *_loaders(), cfg, progress=False)
    with pytest.raises(ValueError, match="trained other parameters"):
        train(GPT(replace(MODEL, n_layer=2)), *_loaders(), replace(cfg, max_steps=3),
              progress=False, resume=True)


# --- every trained model works with every command -----------------------------------------------

def test_cli_pretrain_writes_a_model_that_generate_runs(tiny_run, tmp_path, capsys):
    out = tmp_path / "run1"
    assert cli.main(tiny_run[2] + ["--out", str(out)]) == 0
    assert {"model.safetensors", "config.json", "tinygpt-tokenizer.json"} <= \
        {p.name for p in out.iterdir()}
    capsys.readouterr()
    argv = ["generate", "--model", str(out), "--prompt", "the cat", "--max-new-tokens", "5"]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("the cat") and len(text) == len("the cat") + 5 + 1  # 5 chars, newline


def test_cli_generate_from_an_unfinished_run_says_resume(tiny_run, tmp_path, capsys):
    out = tmp_path / "run1"
    assert cli.main(tiny_run[2] + ["--out", str(out)]) == 0
    (out / "model.safetensors").unlink()                  # as if stopped before the end
    capsys.readouterr()
    err = _cli_error(["generate", "--model", str(out), "--prompt", "the"], capsys)
    assert "did not finish" in err and "--resume" in err


def test_cli_pretrain_accepts_a_hugging_face_config_json(tiny_run, tmp_path, capsys):
    from tinygpt.hub.gpt2 import config_to_hf
    _, model_json, argv = tiny_run
    hf = config_to_hf(GPTConfig(vocab_size=50257, block_size=64, n_layer=1, n_head=2, n_embd=16,
                                tie_weights=True))
    model_json.write_text(json.dumps(hf))                 # model_type gpt2, n_positions, n_ctx
    out = tmp_path / "run"
    assert cli.main(argv + ["--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert (saved["n_layer"], saved["n_embd"], saved["tie_word_embeddings"]) == (1, 16, True)
    assert saved["vocab_size"] == TOK.n_vocab and saved["n_positions"] == T   # from the data


def test_cli_pretrain_unknown_config_field_is_one_line(tiny_run, tmp_path, capsys):
    _, model_json, argv = tiny_run
    model_json.write_text(json.dumps({"n_layer": 1, "n_heads": 2}))
    err = _cli_error(argv + ["--out", str(tmp_path / "o")], capsys)
    assert str(model_json) in err and "n_heads" in err
