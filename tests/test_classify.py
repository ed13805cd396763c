"""The chapter 6 classifier: the book's counts, padding that cannot change a prediction, the
frozen-prefix cache, a short run that learns, saving and loading, the commands, the download.

Real data (../shared/data/SMSSpamCollection) by path through the `shared` fixture; models are
tiny (1-2 layers, width 16-32) except where only parameter counts of the real sizes are checked
(those are built without initialising their weights). Downloads go to a server on 127.0.0.1.
"""
import importlib.util
import io
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from tinygpt.commands.cli import main as cli_main
from tinygpt.commands import classify as cmd
from tinygpt.finetune import classify as C
from tinygpt.finetune import classify_data as D
from tinygpt.models.llama import Llama, LlamaConfig
from tinygpt.models.gpt import GPT, GPTConfig
from tinygpt.text.tokenizer import CharTokenizer, GPT2Tokenizer
from tinygpt.hub.pretrained import save_pretrained

SMS = "data/SMSSpamCollection"
GGUF = "fixtures/smollm2-135m-instruct/model.gguf"


def tiny_gpt(vocab_size=50257, **kw) -> GPT:
    cfg = dict(vocab_size=vocab_size, block_size=128, n_layer=2, n_head=2, n_embd=16,
               qkv_bias=True, tie_weights=True)
    return GPT(GPTConfig(**{**cfg, **kw}), seed=1)


def tiny_llama(vocab_size=1024) -> Llama:
    return Llama(LlamaConfig(vocab_size=vocab_size, block_size=128, n_layer=2, n_head=4,
                             n_kv_head=2, n_embd=16, n_inner=32), seed=1)


def batch(lengths, vocab_size=100, pad_id=7, seed=0):
    rng = np.random.default_rng(seed)
    ds = C.ClassificationDataset([list(rng.integers(0, vocab_size, n)) for n in lengths],
                                 [k % 2 for k in range(len(lengths))], pad_id)
    return ds.batch(np.arange(len(lengths)))


# --- data exactly as the book --------------------------------------------------------------------

def test_sms_collection_reads_as_pandas_does(shared):
    data = C.read_labelled(shared / SMS)
    # the book's df["Label"].value_counts(): 4,825 ham, 747 spam (a plain tab split: 5,574 rows)
    assert len(data.texts) == 5572
    assert (data.labels.count("ham"), data.labels.count("spam")) == (4825, 747)
    assert data.label_names() == ["ham", "spam"]


def test_book_balance_split_and_padding(shared):
    splits = C.spam_splits(C.read_labelled(shared / SMS), GPT2Tokenizer(), 50256)
    sizes = [len(s.dataset) for s in (splits.train, splits.val, splits.test)]
    assert sizes == [1045, 149, 300]                  # the book's train/validation/test.csv
    assert splits.max_length == 120                   # the book's train_dataset.max_length
    assert len(splits.train) == 130                   # 1,045 // 8, drop_last
    ids, lengths, labels = splits.train.dataset.batch(np.arange(1045))
    assert ids.shape == (1045, 120) and lengths.max() == 120
    assert np.all(ids[np.arange(120)[None, :] >= lengths[:, None]] == 50256)
    counts = np.bincount(np.concatenate([s.dataset.labels for s in
                                         (splits.train, splits.val, splits.test)]))
    assert counts.tolist() == [747, 747]              # balanced: ham cut down to spam's 747


def test_balance_draws_each_big_class_with_the_seed_and_keeps_the_smallest():
    labels = np.array([0] * 9 + [1] * 3 + [2] * 5)
    rows = C.balance(labels, seed=123)
    assert len(rows) == 9 and len(set(rows.tolist())) == 9
    assert np.bincount(labels[rows]).tolist() == [3, 3, 3]
    assert rows[:3].tolist() == np.random.RandomState(123).choice(9, 3, replace=False).tolist()
    assert rows[3:6].tolist() == [9, 10, 11]          # the smallest class whole, in file order
    train, val, test = C.split(np.arange(10))
    assert (len(train), len(val), len(test)) == (7, 1, 2)
    assert sorted([*train, *val, *test]) == list(range(10))


def test_quoted_fields_run_to_their_closing_quote(tmp_path):
    path = tmp_path / "sms"
    path.write_text('ham\t"a\ttab and\na newline"\nspam\t"quoted" then more\n\n'
                    'ham\tsays "hi" mid-field\n', encoding="utf-8")
    data = C.read_labelled(path)
    assert data.texts == ["a\ttab and\na newline", "quoted then more", 'says "hi" mid-field']
    assert data.labels == ["ham", "spam", "ham"]


@pytest.mark.parametrize("content, message", [
    ("ham\tfine\nspam no tab here\n", "row 2 has no tab"),
    ("ham\tfine\nspam\t \n", "row 2 has an empty or missing text"),
    ("ham\tone\nham\ttwo\n", "at least two classes"),
    ("ham\ta\tb\n", "row 1 has 3 tab-separated fields"),
])
def test_bad_rows_are_one_line_errors_naming_file_and_row(tmp_path, content, message):
    path = tmp_path / "sms"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message) as e:
        C.read_labelled(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_csv_and_jsonl_with_named_columns_and_three_classes(tmp_path):
    (tmp_path / "t.csv").write_text('Label,Text\nb,"x, y"\na,z\nc,w\n', encoding="utf-8")
    data = C.read_labelled(tmp_path / "t.csv")                 # text/label match Text/Label
    assert data.texts == ["x, y", "z", "w"] and data.label_names() == ["a", "b", "c"]
    rows = [{"msg": "hello", "y": 1}, {"msg": "bye", "y": 0}]
    (tmp_path / "t.jsonl").write_text("\n".join(map(json.dumps, rows)), encoding="utf-8")
    data = C.read_labelled(tmp_path / "t.jsonl", text_col="msg", label_col="y")
    assert data.texts == ["hello", "bye"] and data.labels == ["1", "0"]
    with pytest.raises(ValueError, match="no text column 'text'.*columns are msg, y"):
        C.read_labelled(tmp_path / "t.jsonl")


# --- the model -----------------------------------------------------------------------------------

def test_parameter_counts_of_the_real_sizes():
    gpt2 = GPT(GPTConfig.preset("gpt2", qkv_bias=True, tie_weights=True), init=False)
    model = C.Classifier(gpt2, 2)
    C.set_trainable(model, "last-block")
    # the book: 124,441,346 parameters with the 2-class head; last block + ln_f + head train
    assert model.num_parameters() == 124_441_346
    assert model.num_parameters(trainable_only=True) == 7_090_946
    smollm2 = C.Classifier(Llama(LlamaConfig.preset("smollm2-135m"), init=False), 2)
    C.set_trainable(smollm2, "last-block")
    # 30th block 3,540,096 + final RMSNorm 576 + head 576 x 2 + 2 (the figure)
    assert smollm2.num_parameters(trainable_only=True) == 3_541_826
    C.set_trainable(smollm2, "head")
    assert smollm2.num_parameters(trainable_only=True) == 1154
    C.set_trainable(smollm2, "all")
    assert smollm2.num_parameters(trainable_only=True) == smollm2.num_parameters()


def test_all_leaves_an_untied_vocabulary_head_frozen():
    model = C.Classifier(tiny_gpt(vocab_size=100, tie_weights=False, n_layer=3), 2)
    C.set_trainable(model, "all")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["backbone.lm_head.weight"]
    C.set_trainable(model, "last-two-blocks")
    trained = {".".join(n.split(".")[:3]) for n, _ in model.named_trainable_parameters()}
    assert trained == {"backbone.h.1", "backbone.h.2", "backbone.ln_f.weight",
                       "backbone.ln_f.bias", "head.weight", "head.bias"}


@pytest.mark.parametrize("make", [lambda: tiny_gpt(vocab_size=100), lambda: tiny_llama(100)])
def test_last_real_mean_and_first_do_not_depend_on_padding(make):
    backbone = make()
    ids, lengths, _ = batch([5, 9, 3, 12])
    more = np.concatenate([ids, np.full((4, 20), 7)], axis=1)
    other_pad = np.where(np.arange(more.shape[1]) < lengths[:, None], more, 3)
    for pos in ("last-real", "mean", "first"):
        model = C.Classifier(backbone, 3, pos)
        a = model(ids, lengths).data
        np.testing.assert_allclose(model(more, lengths).data, a, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(model(other_pad, lengths).data, a, rtol=1e-5, atol=1e-6)
    book = C.Classifier(backbone, 3, "last")                 # reads a pad: the book's behaviour
    assert np.abs(book(more, lengths).data - book(ids, lengths).data).max() > 1e-3


@pytest.mark.parametrize("make", [lambda: tiny_gpt(vocab_size=100), lambda: tiny_llama(100)])
def test_frozen_prefix_cache_gives_the_same_loss_and_gradients(make):
    ids, lengths, labels = batch([5, 9, 3, 12, 7])
    results = []
    for cache in (False, True, True):
        model = C.Classifier(make(), 2, "last-real", cache_frozen=cache)
        C.set_trainable(model, "last-block")
        assert model._frozen_blocks() == (1 if cache else 0)
        for _ in range(2):                                   # the second pass reads the cache
            loss = C.classification_loss(model, ids, lengths, labels)
            model.zero_grad()
            loss.backward()
        results.append((float(loss.data), {n: p.grad.copy() for n, p in
                                           model.named_trainable_parameters()}))
        assert len(model.frozen_states) == (5 if cache else 0)
    (loss0, grads0), (loss1, grads1) = results[0], results[1]
    assert loss1 == pytest.approx(loss0, rel=1e-6)
    assert grads0.keys() == grads1.keys() and len(grads0) > 2
    for name in grads0:
        np.testing.assert_allclose(grads1[name], grads0[name], rtol=1e-4, atol=1e-7)


def test_warmed_cache_gives_what_the_forward_pass_computes():
    ids, lengths, labels = batch([5, 9, 3, 12, 7, 1])
    data = C.ClassificationDataset([row[:n] for row, n in zip(ids, lengths)], labels, 7)
    plain = C.Classifier(tiny_llama(100), 2)
    cached = C.Classifier(tiny_llama(100), 2, cache_frozen=True)
    C.set_trainable(cached, "last-block")
    assert cached.warm_cache([data], batch_size=4) == 6
    np.testing.assert_allclose(cached(ids, lengths).data, plain(ids, lengths).data,
                               rtol=1e-5, atol=1e-6)
    assert len(cached.frozen_states) == 6                    # nothing new computed


def test_no_cache_for_the_book_position_or_a_trained_embedding():
    model = C.Classifier(tiny_gpt(vocab_size=100), 2, "last", cache_frozen=True)
    C.set_trainable(model, "last-block")
    assert model._frozen_blocks() == 0
    model = C.Classifier(tiny_gpt(vocab_size=100), 2, "last-real", cache_frozen=True)
    C.set_trainable(model, "all")
    assert model._frozen_blocks() == 0
    C.set_trainable(model, "head")
    assert model._frozen_blocks() == 2


def test_lora_adapts_every_linear_as_the_book(tmp_path):
    pytest.importorskip("tinygpt.finetune.lora")
    gpt2 = GPT(GPTConfig.preset("gpt2", qkv_bias=True, tie_weights=True), init=False)
    model = C.Classifier(gpt2, 2)
    C.set_trainable(model, "lora", lora_rank=16, lora_alpha=16.0)
    # the book's appendix E: replace_linear_with_lora(model, rank=16, alpha=16) on the classifier
    assert model.num_parameters(trainable_only=True) == 2_666_528
    small = C.Classifier(tiny_gpt(vocab_size=100), 2)
    C.set_trainable(small, "lora", lora_rank=2, lora_alpha=4.0)
    ids, lengths, labels = batch([4, 6, 3])
    for p in small.trainable_parameters():            # B starts at 0: make the adapters matter
        p.data += 0.1
    before = small(ids, lengths).data
    C.save_classifier(small, tmp_path, GPT2Tokenizer(), ["a", "b"], 50256, 8)
    loaded, _, _ = C.load_classifier(tmp_path)           # merged into plain weights on save
    assert not any("lora" in n for n, _ in loaded.named_parameters())
    np.testing.assert_allclose(loaded(ids, lengths).data, before, rtol=1e-4, atol=1e-5)


# --- training, saving, the commands --------------------------------------------------------------

def _run(argv, capsys):
    rc = cli_main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.slow
def test_a_short_run_learns_spam_well_above_the_majority_class(shared, tmp_path, capsys):
    base = tmp_path / "base"
    save_pretrained(tiny_gpt(), base, GPT2Tokenizer())
    out = tmp_path / "clf"
    rc, stdout, err = _run(["finetune-classifier", "--model", str(base), "--data",
                            str(shared / SMS), "--out", str(out), "--trainable", "all", "--lr",
                            "2e-3", "--max-steps", "40", "--eval-freq", "20", "--eval-iter", "2",
                            "--quiet"], capsys)
    assert rc == 0, err
    results = json.loads((out / "results.json").read_text())
    assert (results["train_n"], results["val_n"], results["test_n"]) == (1040, 149, 300)
    test_labels = C.spam_splits(C.read_labelled(shared / SMS), GPT2Tokenizer(),
                                50256).test.dataset.labels
    majority = np.bincount(test_labels).max() / len(test_labels)     # about 0.5: balanced
    assert results["before_test_accuracy"] < majority + 0.15          # a random head guesses
    assert results["test_accuracy"] > majority + 0.3
    header, *rows = (out / "log.csv").read_text().splitlines()
    assert "test_accuracy" in header.split(",") and len(rows) == 3   # steps 0, 20, 40
    predictions, labels = np.array(results["test_predictions"]), np.array(results["test_labels"])
    assert len(labels) == 300 and np.mean(predictions == labels) == results["test_accuracy"]
    if importlib.util.find_spec("matplotlib"):                       # the test split, drawn
        assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((out / "classifier.json").read_text())
    assert info["label_names"] == ["ham", "spam"] and info["max_length"] == 120
    # the classifier's folder is also a GPT-2 hub folder: every command can load the backbone
    from tinygpt.hub.pretrained import load_pretrained
    backbone, tok = load_pretrained(out)
    assert isinstance(tok, GPT2Tokenizer) and backbone.config.n_embd == 16

    rc, stdout, err = _run(["classify", "--model", str(out), "Hi, see you at 6 then",
                            "URGENT! You have WON a £1000 prize. Txt CLAIM to 81010 now"], capsys)
    assert rc == 0, err
    lines = [line.split("\t") for line in stdout.splitlines()]
    assert [line[0] for line in lines] == ["ham", "spam"]
    assert all(0.5 <= float(line[1]) <= 1.0 for line in lines)
    # the same predictions as the model in memory, read back from disk
    model, tok, info = C.load_classifier(out)
    probs = C.predict(model, [tok.encode(line[2]) for line in lines], info["pad_id"])
    np.testing.assert_allclose(probs.max(axis=1), [float(line[1]) for line in lines], atol=1e-4)


def test_classifier_with_a_llama_backbone_saves_its_tokenizer_and_loads_back(shared, tmp_path):
    from tinygpt.formats.gguf import read_gguf
    from tinygpt.text.hf_tokenizer import HFTokenizer
    tok = HFTokenizer.from_gguf_metadata(read_gguf(shared / GGUF)[0])
    model = C.Classifier(tiny_llama(vocab_size=tok.n_vocab), 3, "mean")
    C.save_classifier(model, tmp_path, tok, ["a", "b", "c"], C.pad_id_of(tok), 64)
    loaded, tok2, info = C.load_classifier(tmp_path)
    texts = ["Free entry in 2 a wkly comp", "ok lar... joking wif u oni  1 2"]
    ids = [tok.encode(t) for t in texts]
    assert [tok2.encode(t) for t in texts] == ids and tok2.eos_id == tok.eos_id == 2
    assert info["pad_id"] == 2 and info["token_pos"] == "mean" and loaded.token_pos == "mean"
    np.testing.assert_allclose(C.predict(loaded, ids, 2), C.predict(model, ids, 2), rtol=1e-5)


def test_classify_refuses_a_folder_without_a_head(tmp_path, capsys):
    save_pretrained(tiny_gpt(vocab_size=100), tmp_path, GPT2Tokenizer())
    rc = cli_main(["classify", "--model", str(tmp_path), "hello"])
    err = capsys.readouterr().err
    assert rc == 2 and "no classifier.json" in err and len(err.strip().splitlines()) == 1


def test_classify_warns_and_truncates_a_text_longer_than_the_context(shared, tmp_path):
    model = C.Classifier(tiny_gpt(block_size=8), 2)
    C.save_classifier(model, tmp_path, GPT2Tokenizer(), ["ham", "spam"], 50256, 8)
    warnings = []
    preds = cmd.classify_texts(str(tmp_path), ["short", " word" * 20], warn=warnings.append)
    assert [p.truncated for p in preds] == [False, True]
    assert len(warnings) == 1 and "text 2 has 20 tokens" in warnings[0]
    book = C.Classifier(tiny_gpt(), 2, "last")          # pads to its training length, as trained
    C.save_classifier(book, tmp_path / "book", GPT2Tokenizer(), ["ham", "spam"], 50256, 12)
    [pred] = cmd.classify_texts(str(tmp_path / "book"), ["a short one"], warn=warnings.append)
    ids = np.full((1, 12), 50256)
    ids[0, :3] = GPT2Tokenizer().encode("a short one")
    probs = np.exp(book(ids, np.array([3])).data)
    assert pred.probability == pytest.approx(probs.max() / probs.sum(), rel=1e-5)


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--lr", "0"], "--lr must be a finite number > 0"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0"),
    (["--max-seconds", "-1"], "--max-seconds must be"),
    (["--epochs", "0"], "--epochs must be >= 1"),
])
def test_bad_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    rc, out, err = _run(["finetune-classifier", "--random-init", "--model", "gpt-mini",
                         "--out", str(tmp_path / "o"), *flags], capsys)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()                    # nothing written


def test_book_position_needs_a_pad_token(tmp_path, capsys):
    tok = CharTokenizer.from_text("abc ")
    save_pretrained(tiny_gpt(vocab_size=tok.n_vocab), tmp_path / "m", tok)
    (tmp_path / "sms").write_text("ham\tab c\nspam\tcab\n", encoding="utf-8")
    rc, out, err = _run(["finetune-classifier", "--model", str(tmp_path / "m"), "--token-pos",
                         "last", "--data", str(tmp_path / "sms"), "--out", str(tmp_path / "o")],
                        capsys)
    assert rc == 2 and "--token-pos last" in err and "no padding token" in err


# --- the default download ------------------------------------------------------------------------

class _ZipHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        body = self.server.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def zip_server(shared):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("readme", "the UCI zip holds a readme too")
        z.writestr(C.SMS_FILE, (shared / SMS).read_bytes())
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ZipHandler)
    server.files = {"/backup.zip": buf.getvalue()}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def empty_places(tmp_path, monkeypatch):
    monkeypatch.setenv("TINYGPT_SHARED", str(tmp_path / "no-shared"))
    monkeypatch.setenv("TINYGPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_default_data_falls_back_to_the_backup_url_and_is_checked(zip_server, empty_places):
    urls = (f"{zip_server}/missing.zip", f"{zip_server}/backup.zip")
    path = C.sms_spam_file(urls, progress=False)
    assert path == empty_places / C.SMS_FILE
    assert len(C.read_labelled(path).texts) == 5572
    assert C.sms_spam_file(("http://127.0.0.1:9/never",), progress=False) == path  # cached


def test_offline_default_data_is_one_line_saying_to_pass_data(empty_places, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setattr(D, "SMS_URLS", ("http://127.0.0.1:9/sms.zip",))   # nothing listens
    with pytest.raises(C.DownloadError, match="SMSSpamCollection is not in"):
        C.sms_spam_file(progress=False)
    rc, out, err = _run(["finetune-classifier", "--random-init", "--model", "gpt-mini",
                         "--out", str(tmp_path / "o"), "--quiet"], capsys)
    assert rc == 2 and "pass --data FILE" in err and len(err.strip().splitlines()) == 1


# --- the demo ------------------------------------------------------------------------------------

def _demo():
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "demos" / "spam_classifier.py"
    spec = importlib.util.spec_from_file_location("spam_classifier", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_demo_reports_epochs_accuracy_time_and_memory(shared, tmp_path, capsys):
    base = tmp_path / "base"
    save_pretrained(tiny_gpt(), base, GPT2Tokenizer())
    rc = _demo().main(["--model", str(base), "--data", str(shared / SMS), "--max-steps", "3",
                       "--out", str(tmp_path / "out"), "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "split 1045/149/300, padded to 120 tokens with id 50256" in out
    assert "trainable (last-block)" in out
    assert "final: train" in out and "peak RSS" in out
    assert (tmp_path / "out" / "classifier.json").is_file()


def test_demo_offline_says_to_pass_data(empty_places, monkeypatch, capsys):
    monkeypatch.setattr(D, "SMS_URLS", ("http://127.0.0.1:9/sms.zip",))
    assert _demo().main(["--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--data" in err and len(err.strip().splitlines()) == 1
