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


# ----------------------------------------------------------------------------- prompts as transformers encodes them

PROMPTS = ["The capital of France is", "def parse_args(", "", " leading space", "<|im_start|>user\nhi"]
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<bos>", "<eos>", "<|begin_of_text|>"]


def _folder(root, name, template: str | None, config: dict):
    """A tokenizer folder: a byte-level BPE with SPECIALS, its post-processor `template` ("<bos> $A": a
    TemplateProcessing; None: none at all), and tokenizer_config.json `config`."""
    import json

    from tokenizers import processors

    tok = train_tokenizer(["The capital of France is Paris. def parse_args(argv):\n    return argv\n" * 30], 400)
    tok.add_special_tokens(SPECIALS)
    if template is None:
        tok.post_processor = None
    else:
        specials = [(t, tok.token_to_id(t)) for t in SPECIALS if t in template]
        tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False),
                                                  processors.TemplateProcessing(single=template, special_tokens=specials)])
    folder = root / name
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "model_max_length": 128, **config}))
    return folder


# name -> (post-processor template, tokenizer_config.json, what transformers adds around the text)
CASES = {
    # SmolLM2 as transformers saves it: add_bos_token and a template that puts <|im_start|> first
    "smollm2": ("<|im_start|> $A", {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "add_bos_token": True},
                ["<|im_start|>"], []),
    # Llama 3: the template alone (no add_bos_token in the config)
    "llama3": ("<|begin_of_text|> $A", {"bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>"},
               ["<|begin_of_text|>"], []),
    # Gemma: add_bos_token and the template
    "gemma": ("<bos> $A", {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True, "add_eos_token": False},
              ["<bos>"], []),
    # a template that appends the EOS too: transformers puts it at the end of the prompt, and so do we
    "bos_eos": ("<bos> $A <eos>", {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True,
                                   "add_eos_token": True}, ["<bos>"], ["<eos>"]),
    # transformers 5 reads the template, not the flags: a flag without a template adds nothing, a false flag
    # does not remove the template's BOS
    "flags_only": (None, {"bos_token": "<bos>", "add_bos_token": True, "add_eos_token": True}, [], []),
    "flag_off": ("<bos> $A", {"bos_token": "<bos>", "add_bos_token": False}, ["<bos>"], []),
    # onnxgen's own GPT: no template, no flags
    "plain": (None, {"bos_token": "<|endoftext|>"}, [], []),
}


@pytest.mark.parametrize("case", CASES)
def test_prompts_get_the_special_tokens_transformers_adds(case, tmp_path):
    """prompt_tokenizer's ids are AutoTokenizer's, special tokens included, for each way a folder declares them."""
    from transformers import AutoTokenizer

    from pipeline.tokenizer import prompt_prefix, prompt_tokenizer

    template, config, before, after = CASES[case]
    folder = _folder(tmp_path, case, template, config)
    ours, theirs = prompt_tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    for text in PROMPTS:
        want = theirs(text)["input_ids"]
        assert ours.encode(text).ids == want, (case, text)
        bare = ours.encode(text, add_special_tokens=False).ids
        assert want == [ours.token_to_id(t) for t in before] + bare + [ours.token_to_id(t) for t in after]
    assert prompt_prefix(ours) == [ours.token_to_id(t) for t in before]


def test_trained_tokenizer_adds_nothing(tiny_export):
    """The trained `small`'s folder (add_bos_token false): prompts are the bare text, as transformers has them."""
    from transformers import AutoTokenizer

    from pipeline.tokenizer import prompt_tokenizer

    ours, theirs = prompt_tokenizer(tiny_export), AutoTokenizer.from_pretrained(str(tiny_export))
    for text in PROMPTS:
        assert ours.encode(text).ids == theirs(text)["input_ids"] == ours.encode(text, add_special_tokens=False).ids
