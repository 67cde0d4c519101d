"""`onnxgen export --gguf`: a tiny random-weight transformers model written as llama.cpp writes a GGUF
(q/k rows permuted for Llama, Q8_0 matrices, byte-level BPE in the metadata) comes back as an export whose
logits are the original model's, and whose tokenizer tokenizes as the original's did."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TEST_CORPUS, assert_user_error, onnxgen, smollm2_gguf, snapshot
from pipeline import manifest
from pipeline.run.lm import OnnxLM

gguf = pytest.importorskip("gguf")

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0)
TEXT = "def parse_header(line):\n    return line.split(': ', 1)  # 2024 <|im_end|>"


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp applies it to q and k."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    for theirs, ours in (("model.embed_tokens", "token_embd"), ("model.norm", "output_norm"), ("lm_head", "output"),
                         ("model.layers.", "blk."), (".input_layernorm", ".attn_norm"),
                         (".post_attention_layernorm", ".ffn_norm"), (".self_attn.o_proj", ".attn_output"),
                         (".self_attn.q_proj", ".attn_q"), (".self_attn.k_proj", ".attn_k"),
                         (".self_attn.v_proj", ".attn_v"), (".mlp.gate_proj", ".ffn_gate"),
                         (".mlp.up_proj", ".ffn_up"), (".mlp.down_proj", ".ffn_down")):
        hf = hf.replace(theirs, ours)
    return hf


def vocab_of(tok_json: dict) -> dict[str, int]:
    """token -> id, the added tokens included (a GGUF lists them all in one array)."""
    return {**tok_json["model"]["vocab"], **{t["content"]: t["id"] for t in tok_json["added_tokens"]}}


def tokenizer_metadata(w, add_bos: bool, tok_json: dict) -> None:
    vocab = vocab_of(tok_json)
    tokens = sorted(vocab, key=vocab.get)
    specials = {t["content"] for t in tok_json["added_tokens"] if t["special"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok_json["model"]["merges"]])
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(add_bos)
    w.add_chat_template(TEMPLATE)


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> dict:
    """A byte-level BPE trained here, with ChatML's two control tokens added."""
    from tokenizers import AddedToken

    from pipeline.tokenizer import train_tokenizer
    from pipeline.train.corpus import load_corpus

    tok = train_tokenizer(load_corpus(str(TEST_CORPUS)).train, 510)
    tok.add_special_tokens([AddedToken("<|im_start|>", special=True), AddedToken("<|im_end|>", special=True)])
    return json.loads(tok.to_str())


def write_gguf(path: Path, arch: str, model, tok_json: dict, add_bos: bool = False) -> None:
    """`model`'s weights as llama.cpp writes them: Q8_0 matrices, F32 norms and biases, q/k permuted for llama."""
    c = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") else c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    tokenizer_metadata(w, add_bos, tok_json)
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp writes no output.weight for a tied head
        a = t.float().numpy()
        if arch == "llama" and ".q_proj." in name:
            a = llama_cpp_permute(a, c.num_attention_heads)
        elif arch == "llama" and ".k_proj." in name:
            a = llama_cpp_permute(a, c.num_attention_heads, c.num_key_value_heads)
        if a.ndim == 2:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def quantized_like_the_file(model):
    """The model with each matrix replaced by its Q8_0 round trip: what the GGUF holds, unpermuted."""
    q8 = gguf.GGMLQuantizationType.Q8_0
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), q8), q8)))
    return model


@pytest.fixture(scope="module")
def sources(tokenizer_json, tmp_path_factory) -> dict:
    """arch -> (GGUF path, the transformers model its dequantized weights are)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gguf")
    vocab = len(vocab_of(tokenizer_json))
    out = {}
    for arch in ("llama", "qwen2"):
        config = AutoConfig.for_model(arch, **SIZES, vocab_size=vocab, tie_word_embeddings=arch == "qwen2",
                                      initializer_range=0.2)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # biases the initializer leaves at 0 would hide a mapping error
            for name, p in model.named_parameters():
                if name.endswith(".bias"):
                    p.normal_(0, 0.2)
        write_gguf(root / f"{arch}.gguf", arch, model, tokenizer_json)
        out[arch] = (root / f"{arch}.gguf", quantized_like_the_file(model))
    return out


@pytest.fixture(scope="module")
def exports(sources, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gguf_exports")
    out = {}
    for arch, (path, _) in sources.items():
        out[arch] = root / arch
        proc = onnxgen("export", "--gguf", path, "--out", out[arch], "--corpus", TEST_CORPUS)
        assert "fp32 max |Δlogit|" in proc.stdout
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_export_has_the_original_models_logits(sources, exports, arch):
    """Against the transformers model the GGUF was written from (not the staged folder parity used):
    a q/k permutation left in place, or a tensor mapped to the wrong place, is far off here."""
    _, model = sources[arch]
    lm = OnnxLM(exports[arch])
    ids = np.asarray([lm.encode(TEXT)], dtype=np.int64)
    n = ids.shape[1]
    got, _ = lm.forward(ids, np.ones_like(ids), np.arange(n)[None], lm.empty_past(1))
    with torch.no_grad():
        want = model(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    source = manifest.load(exports[arch])["source"]
    path, _ = sources[arch]
    assert source["kind"] == "gguf" and source["checkpoint"] == str(path) and source["gguf"] == path.name
    assert source["gguf_sha256"] == manifest.sha256(path)
    assert source["quant_types"] == ({"F32": 5, "Q8_0": 16} if arch == "llama" else {"F32": 11, "Q8_0": 15})
    assert not [p.name for p in exports[arch].parent.iterdir() if p.name.startswith(".")]  # no staging left


@pytest.mark.slow
def test_tokenizer_and_chat_template_come_from_the_metadata(tokenizer_json, exports):
    """tokenizer.json tokenizes as the tokenizer the GGUF was written from, control tokens included; eos and
    bos are the file's (not transformers 4.57's swap), no BOS is added, and the chat template is in both places."""
    from tokenizers import Tokenizer

    folder = exports["llama"]
    want = Tokenizer.from_str(json.dumps(tokenizer_json)).encode(TEXT).ids
    got = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(TEXT).ids
    assert got == want and got[-1] == vocab_of(tokenizer_json)["<|im_end|>"]
    generation = json.loads((folder / "generation_config.json").read_text())
    vocab = vocab_of(tokenizer_json)
    assert (generation["eos_token_id"], generation["bos_token_id"]) == (vocab["<|im_end|>"], vocab["<|im_start|>"])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["chat_template"] == TEMPLATE
    assert (folder / "chat_template.jinja").read_text() == TEMPLATE


def test_add_bos_token_decides_whether_a_bos_is_added(tokenizer_json, tmp_path):
    from pipeline.model.gguf import GGUFFile, build_tokenizer

    bos = vocab_of(tokenizer_json)["<|im_start|>"]
    for add_bos in (False, True):
        path = tmp_path / f"bos{add_bos}.gguf"
        w = gguf.GGUFWriter(str(path), "llama")
        tokenizer_metadata(w, add_bos, tokenizer_json)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        tok = build_tokenizer(GGUFFile(path))[0]
        assert (tok.encode("hello").ids[0] == bos) == add_bos
        assert tok.decode(tok.encode(TEXT).ids, skip_special_tokens=False) == ("<|im_start|>" if add_bos else "") + TEXT


def test_bad_inputs_are_one_line_and_write_nothing(sources, tmp_path):
    """README "Errors": a missing file, a non-GGUF, a truncated GGUF, another architecture."""
    out = tmp_path / "out"
    (tmp_path / "text.gguf").write_text("not a model\n")
    (tmp_path / "truncated.gguf").write_bytes(sources["llama"][0].read_bytes()[:4000])
    w = gguf.GGUFWriter(str(tmp_path / "falcon.gguf"), "falcon")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    before = snapshot(tmp_path)
    for name, words in [("nonesuch.gguf", ["does not exist"]), ("text.gguf", ["not a GGUF file"]),
                        ("truncated.gguf", ["not a readable GGUF file, truncated or corrupt"]),
                        ("falcon.gguf", ["architecture 'falcon' is not supported", "llama, qwen2"])]:
        proc = onnxgen("export", "--gguf", tmp_path / name, "--out", out, check=False)
        assert_user_error(proc, name, *words)
    proc = onnxgen("export", tmp_path, "--gguf", tmp_path / "falcon.gguf", "--out", out, check=False)
    assert_user_error(proc, "one of them")
    assert snapshot(tmp_path) == before and not out.exists()


@pytest.mark.slow
def test_smollm2_transformers_folder_runs_as_transformers_generates(smollm2_bos):
    """SmolLM2's transformers folder as issue 38 found it: its tokenizer puts <|im_start|> (the BOS) before every
    prompt. `onnxgen run` encodes the prompt as transformers does, so its greedy text is transformers' own,
    token for token; --no-special-tokens gives the bare text's, again as transformers does from the bare ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(smollm2_bos))
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    prompt = "The capital of France is"
    ids = tok(prompt)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and ids[1:] == tok(prompt, add_special_tokens=False)["input_ids"]
    for special, prompt_ids in (("--special-tokens", ids), ("--no-special-tokens", ids[1:])):
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                                  max_new_tokens=16, do_sample=False)[0, len(prompt_ids):].tolist()
        out = onnxgen("run", smollm2_bos, prompt, "--temperature", 0, "--max-new-tokens", 16, "--no-echo", "--plain",
                      special).stdout
        assert out[:-1] == tok.decode([t for t in want if t != 2]), (special, out, tok.decode(want))


@pytest.mark.slow
def test_smollm2_from_its_gguf_to_the_fast_path(smollm2):
    """A real model end to end, as a user runs it (the `smollm2` fixture): the GGUF imported (30 layers, Q4_1
    and Q8_0 tensors, tied embeddings, the 'smollm' pre-tokenizer; fp32 judged against transformers on the
    same weights), quantized to int4 by the import recipe (GPTQ) and fused (the twin judged too); then a chat on the fused int4 graph."""
    out, export_stdout = smollm2
    assert "greedy 64/64 identical" in export_stdout, export_stdout
    generation = json.loads((out / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    proc = onnxgen("run", out, "The capital of France is", "--temperature", 0, "--max-new-tokens", 10,
                   "--no-echo", "--plain")
    assert proc.stdout.lstrip().startswith("Paris"), proc.stdout

    record = manifest.load(out)
    assert record["stages"][-1]["fused"]["variants"]["int4 fused"]["status"] == "pass"
    # an import's int4 recipe: GPTQ with zero points, calibrated on the recorded corpus (its hash kept), the
    # head 4-bit at block 16, the outer blocks' down projections 8-bit, fp16 scales
    recipe = next(s for s in record["stages"] if s.get("stage") == "quantize:int4")
    assert (recipe["method"], recipe["symmetric"], recipe["lm_head"], recipe["lm_head_block"], recipe["act_order"],
            recipe["scales"]) == ("gptq", False, "int4", 16, True, "fp16"), recipe
    assert set(recipe["eight_bit"]) == {"first_last", "qkv", "down:outer"}, recipe
    assert len(recipe["calibration"]["sha256"]) == 64 and recipe["calibration"]["windows"] > 0
    # issue 13's goal, <= 95 MB (94.5): the embedding reads the tied head's 4-bit table (an fp32 copy alone
    # would be 113 MB), and every scale is stored as fp16
    assert record["files"]["onnx/model_q4.onnx"]["bytes"] <= 95e6, record["files"]["onnx/model_q4.onnx"]
    messages = json.dumps([{"role": "user", "content": "What is the capital of France?"}])
    proc = onnxgen("run", out, "--chat", "-", "--variant", "int4", "--fused", "--temperature", 0,
                   "--max-new-tokens", 16, input=messages)
    assert "Paris" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_smollm2_speculation_gives_its_greedy_tokens(smollm2):
    """Prompt lookup on the real model, on a rewrite whose answer repeats the prompt: fp32 (the plain graph;
    the fused twin in benchmarks/SPECULATIVE.md) gives token for token what one token a call gives; int4
    (MatMulNBits rounds a multi-token check otherwise) does not speculate unless asked, so its default tokens
    are its own too."""
    from pipeline.run.chat import ChatFormat
    from pipeline.run.lm import Generation

    out, _ = smollm2
    doc = ("The Lindqvist Bridge spans the Ume River at Norrfors. It was opened in 1962, is 412 metres long and "
           "carries two lanes of road traffic and a footpath. In 2019 the footpath was widened to three metres.")
    for variant, fused in (("fp32", False), ("int4", True)):  # the fixture fuses int4 only
        lm = OnnxLM(out, variant=variant, fused=fused)
        ids = ChatFormat.of(lm).encode([{"role": "user", "content": "Repeat this text, replacing 'bridge' with "
                                         f"'crossing':\n\n{doc}"}])
        runs = {}
        for speculate in (False, None, True):
            runs[speculate] = Generation()
            for _ in lm.generate([ids], 64, speculate=speculate, result=runs[speculate]):
                pass
        assert runs[None].tokens == runs[False].tokens, variant
        if variant == "fp32":
            assert runs[None].speculation.accepted >= 16, (variant, runs[None].speculation)
        else:
            assert runs[None].speculation is None and runs[True].speculation.accepted >= 16, runs[True].speculation
