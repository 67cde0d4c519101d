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


def test_long_prompts_prefill_in_chunks_as_they_would_whole(tiny_export, monkeypatch):
    """The plain graph returns every position's logits (1 MB a token at a 262k vocabulary): a prompt past
    PREFILL_LOGITS is prefilled in chunks through the cache. Left-padded rows get the logits and the greedy
    tokens the whole prompt gets."""
    import numpy as np

    from pipeline.run import lm as lm_module

    lm = OnnxLM(tiny_export)
    prompts = [lm.encode("import os\nimport sys\n\ndef main(argv):\n    return argv\n" * 3), lm.encode("class A:\n")]
    whole = lm.start(prompts, 8).logits.copy()
    greedy = [t.tolist() for t in lm.generate(prompts, 8, stop_at_eos=False)]
    monkeypatch.setattr(lm_module, "PREFILL_LOGITS", 16 * 2 * lm.vocab_size * 4)  # chunks of 16 tokens
    state = lm.start(prompts, 8)
    np.testing.assert_allclose(state.logits, whole, atol=1e-4, rtol=1e-4)
    assert len(prompts[0]) > 3 * 16 and state._logits.shape()[1] <= 16  # chunked: one chunk's logits held
    assert [t.tolist() for t in lm.generate(prompts, 8, stop_at_eos=False)] == greedy
