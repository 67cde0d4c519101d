"""Byte-level BPE with the `tokenizers` library, GPT-2 style: any byte string round-trips."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from pipeline.errors import UserError

EOT = "<|endoftext|>"


def train_tokenizer(documents, vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
    if vocab_size < 257:
        raise UserError(f"--vocab-size {vocab_size}: must be at least 257 (256 bytes + {EOT})")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return tok


def load_tokenizer(path: str | Path, require_eot: bool = True) -> Tokenizer:
    """require_eot: onnxgen's own tokenizers end documents with EOT; an imported model's need not."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise UserError(f"tokenizer {path}: file does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # the library raises a bare Exception for malformed JSON
        raise UserError(f"tokenizer {path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    if require_eot and tok.token_to_id(EOT) is None:
        raise UserError(f"tokenizer {path}: has no {EOT} token")
    return tok


def prompt_tokenizer(folder: str | Path) -> Tokenizer:
    """An export's tokenizer for prompts: `prompt_tokenizer(folder).encode(text).ids` is what transformers'
    AutoTokenizer(folder)(text) gives, special tokens included; add_special_tokens=False gives the bare text.

    The one rule, transformers 5's and transformers.js's tokenizer call's: tokenizer.json's post-processor
    declares the special tokens a text gets (SmolLM2's puts <|im_start|> first, Llama 3's <|begin_of_text|>,
    Gemma's <bos>; one that also appends an EOS gets it at the end of the prompt, as transformers gives it;
    onnxgen's own GPT has none). tokenizer_config.json's add_bos_token/add_eos_token are not read: transformers 5
    drops them when a tokenizer.json exists (transformers 4's Llama and Gemma classes rebuilt the template from
    them; real folders declare the same in both places). Chat templates write their own special tokens and are
    encoded with add_special_tokens=False."""
    return load_tokenizer(Path(folder) / "tokenizer.json", require_eot=False)


def prompt_prefix(tok: Tokenizer) -> list[int]:
    """The ids a text prompt starts with before its text under `tok`'s post-processor (a BOS, or none)."""
    full, bare = tok.encode("a").ids, tok.encode("a", add_special_tokens=False).ids
    starts = [i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare]
    return full[:starts[0]] if starts else []


def check_text(text: str, what: str = "prompt") -> str:
    """`text` if the tokenizer can take it. Bad bytes on stdin or in argv arrive as lone surrogates
    (Python's surrogateescape), which are not Unicode text and which `tokenizers` rejects with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what}: not UTF-8 text (character {e.start} is {text[e.start]!r})") from None
    return text


def eot_id(tok: Tokenizer) -> int:
    return tok.token_to_id(EOT)


def encode_documents(tok: Tokenizer, documents: list[str]) -> np.ndarray:
    """All documents as one stream of ids, each followed by the end-of-text token."""
    eot = eot_id(tok)
    ids: list[int] = []
    for enc in tok.encode_batch(documents, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eot)
    return np.asarray(ids, dtype=token_dtype(tok.get_vocab_size()))


def token_dtype(vocab_size: int):
    """The dtype of token files (data/*.bin): uint16 holds ids below 65,536, larger vocabularies need uint32."""
    return np.uint16 if vocab_size <= 65536 else np.uint32


def write_hf_tokenizer_files(tok: Tokenizer, folder: Path, n_ctx: int) -> None:
    """tokenizer.json plus the two small files transformers.js and onnxruntime-genai also require."""
    tok.save(str(folder / "tokenizer.json"))
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": n_ctx,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **special,
        "added_tokens_decoder": {
            str(eot_id(tok)): {"content": EOT, "lstrip": False, "normalized": False, "rstrip": False,
                               "single_word": False, "special": True},
        },
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
