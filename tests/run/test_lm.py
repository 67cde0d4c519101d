"""OnnxLM's prompts: text is encoded as transformers encodes it (tokenizer.json's template), ids as given."""
from __future__ import annotations

import shutil

from conftest import onnxgen
from pipeline import manifest
from pipeline.run.lm import Generation, OnnxLM


def test_text_prompts_get_the_tokenizers_bos(tiny_export, tmp_path):
    """A folder whose tokenizer.json puts a BOS first: OnnxLM and `onnxgen run` feed it, as transformers does;
    special_tokens=False / --no-special-tokens feed the bare text; token ids are taken as given."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer

    folder = tmp_path / "bos"
    shutil.copytree(tiny_export, folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eot)])
    tok.save(str(folder / "tokenizer.json"))
    manifest.record(folder, "test: a tokenizer with a BOS", ["tokenizer.json"])

    prompt = "import os\ndef "
    lm, bare = OnnxLM(folder), OnnxLM(folder, special_tokens=False)
    want = AutoTokenizer.from_pretrained(str(folder))(prompt)["input_ids"]
    assert lm.encode(prompt) == want == [eot, *bare.encode(prompt)]

    for flag, ids in (("--special-tokens", want), ("--no-special-tokens", want[1:])):
        result = Generation()
        expected = "".join(lm.stream(ids, max_new_tokens=8, result=result))  # ids: taken as they are
        out = onnxgen("run", folder, prompt, "--temperature", 0, "--max-new-tokens", 8, "--no-echo", flag).stdout
        assert out[:-1] == expected, (flag, out, expected)
