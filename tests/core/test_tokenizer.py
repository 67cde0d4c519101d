"""Byte-level BPE: any text round-trips; the end-of-text token is one id; the corpus reader is honest."""
import numpy as np
import pytest

from pipeline.tokenizer import EOT
from pipeline.train.corpus import default_corpus_files, load_corpus
from pipeline.errors import UserError
from pipeline.tokenizer import encode_documents, eot_id, train_tokenizer

TEXTS = [
    "def parse_args(argv=None):\n    return argv\n",
    "    \t  trailing spaces   \n\n\n",
    "naïve café — 日本語 🙂 \u200b zero-width",
    "",
    "\x00\x01 control bytes \x7f",
]


@pytest.fixture(scope="module")
def tok():
    docs = ["import os\nimport sys\n\ndef main():\n    print('hello world')\n" * 20, "x = 1 + 2\n" * 50]
    return train_tokenizer(docs, vocab_size=300)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text


def test_vocab_and_end_of_text(tok):
    assert tok.get_vocab_size() <= 300
    assert tok.encode(EOT, add_special_tokens=False).ids == [eot_id(tok)]
    stream = encode_documents(tok, ["a b", "c"])
    assert (stream == eot_id(tok)).sum() == 2 and stream[-1] == eot_id(tok)
    assert stream.dtype == np.uint16


def test_learns_merges_from_the_corpus(tok):
    # a trained BPE needs fewer tokens than bytes on text like its corpus
    text = "import os\nimport sys\n"
    assert len(tok.encode(text).ids) < len(text.encode()) / 2


def test_vocab_size_too_small_is_a_user_error():
    with pytest.raises(UserError, match="at least 257"):
        train_tokenizer(["abc"], vocab_size=100)


def test_default_corpus_is_the_standard_library_without_tests():
    files = default_corpus_files()
    assert len(files) > 100
    assert all(f.suffix == ".py" for f in files)
    assert not any(part in ("test", "tests", "site-packages") for f in files for part in f.parts[-4:-1])


def test_corpus_replaces_invalid_utf8_and_counts_it(tmp_path, caplog):
    (tmp_path / "a.txt").write_bytes(b"hello \xff\xfe world, mostly fine text here " * 20)
    with caplog.at_level("WARNING"):
        corpus = load_corpus(str(tmp_path / "a.txt"))
    assert corpus.replaced == 40
    assert "40 bytes were not UTF-8" in caplog.text
    assert "\ufffd" in corpus.train[0]


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "no such file"),
    (lambda p: (p / "empty").mkdir(), "matched no text files"),
    (lambda p: (p / "e.txt").write_text("  \n"), "empty"),
    (lambda p: (p / "b.txt").write_bytes(bytes(range(128, 256)) * 10), "not UTF-8"),
])
def test_bad_corpus_is_a_user_error(tmp_path, setup, message):
    setup(tmp_path)
    target = {"no such file": "missing", "matched no text files": "empty"}.get(message)
    spec = tmp_path / target if target else next(tmp_path.iterdir())
    with pytest.raises(UserError, match=message):
        load_corpus(str(spec))


@pytest.mark.parametrize("kind", ["byte-level", "metaspace"])
def test_incremental_decoding_gives_the_whole_decode(kind):
    """Streaming decodes a window per token: joined, the pieces must be exactly the whole decode, for
    multi-byte characters split over tokens and for a decoder that treats the first token specially."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pipeline.run.text import StreamDecoder

    docs = ["naïve café — 日本語 🙂 def main():\n    return 1\n" * 5, "the quick brown fox jumps " * 20]
    if kind == "byte-level":
        tok = train_tokenizer(docs, vocab_size=300)
    else:  # sentencepiece-style (Llama): "▁" marks spaces, and the decoder drops a leading one
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(docs, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    text = "the quick brown fox: naïve café 日本語 🙂 done"
    ids = tok.encode(text, add_special_tokens=False).ids
    decoder = StreamDecoder(tok)
    pieces = [decoder.push(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)
    if kind == "byte-level":
        assert tok.decode(ids) == text and "" in pieces  # some character did span several tokens


def test_token_files_above_65536_tokens_read_back_as_written(tmp_path):
    """A vocabulary over 65,536 ids is written as uint32; every reader takes the dtype from the run's
    vocabulary (they read uint16, so --vocab-size 70000 trained on garbage without a word)."""
    import json

    from pipeline.tokenizer import token_dtype
    from pipeline.train.finetune import Split
    from pipeline.train.runs import read_tokens

    ids = np.array([0, 65535, 65536, 69999, 7], dtype=token_dtype(70000))
    assert ids.dtype == np.uint32 and token_dtype(8192) == np.uint16
    (tmp_path / "data").mkdir()
    ids.tofile(tmp_path / "data" / "valid.bin")
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 70000, "n_ctx": 64, "n_layer": 1, "n_head": 1,
                                                      "n_embd": 8}))
    assert read_tokens(tmp_path, "valid").tolist() == ids.tolist()
    assert Split.load(tmp_path / "data", "valid", token_dtype(70000)).ids.tolist() == ids.tolist()
