"""Hugging Face import: a local transformers causal-LM folder -> exports/NAME/, the same folder an
onnxgen-trained model gets (graph contract, configs, tokenizer, genai_config.json, manifest, parity).

    onnxgen export --hf path/to/hf_model --out exports/NAME

The families onnxgen knows (model/families.py: gpt2, llama, mistral, smollm3, granite, qwen2, qwen3, phi3,
gemma, gemma2, gemma3_text, olmo2, olmo3, gpt_neox, phi, opt) are built as our own decoder from the folder's safetensors and exported by
the exporter the trained model uses (convert/export.py): one decoder, one graph, whatever the family.
Any other model_type falls back to Optimum's exporter when it is installed (the `hf` extra) and knows
the type; we then conform what it leaves different from the contract: GPT-2's input order, and the
symbolic dimension it calls "past_sequence_length + sequence_length" becomes "total_sequence_length".
Either way parity is against the transformers PyTorch model (not ours) driven through the same contract,
on held-out windows of a corpus (the standard library by default) tokenized with the model's own tokenizer.

    onnxgen export --gguf model.gguf --out exports/NAME

A GGUF file (llama.cpp's) is first written out as a transformers folder in a temporary folder (model/gguf.py:
dequantized fp32 safetensors, config.json, tokenizer.json from its metadata), then exported as above; the
manifest names the GGUF as the source, so `onnxgen parity` stages it again.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import onnx

from pipeline import manifest
from pipeline.check.parity import ParityReport, parity_for_run
from pipeline.convert.export import OPSET, publish_parity, trace_graph
from pipeline.convert.genai import unsupported, write_genai_config
from pipeline.errors import UserError
from pipeline.exports import (
    CHUNK_BYTES,
    GENAI_CONFIG,
    INPUTS,
    SPECIAL_TOKENS,
    SPECIAL_TOKENS_MAP,
    VARIANTS,
    chat_template,
    first_id,
    past_names,
    present_names,
    read_json,
    release_memory,
    save_graph,
    staging,
    transformers_js_config,
    variant_files,
    write_chat_template,
    write_json,
)
from pipeline.model.families import FAMILIES, check_hf_folder, load_decoder
from pipeline.model.gguf import stage_gguf
from pipeline.model.reference import load_hf_model

log = logging.getLogger(__name__)

# model_type -> what it is: the families our decoder implements (tests/model/test_families.py checks each
# against transformers; tests/convert/test_hf_import.py exports, runs and parity-checks them)
SUPPORTED = {t: cls.title for t, cls in FAMILIES.items()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
TOTAL = "total_sequence_length"


# ----------------------------------------------------------------------------- the optimum fallback

def _dims(value) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]


def conform_graph(path: Path, n_layer: int) -> None:
    """Check optimum's graph against the contract and fix the two cosmetic differences in place.

    Names are checked, not assumed: a family whose graph lacks position_ids (or anything else)
    fails here with the missing names rather than later in a runtime. Only the graph proto is
    rewritten; weights stored beside it (model.onnx_data) are referenced, not loaded.
    """
    model = onnx.load(str(path), load_external_data=False)
    g = model.graph
    want_in = list(INPUTS) + past_names(n_layer)
    want_out = ["logits"] + present_names(n_layer)
    have_in = {i.name: i for i in g.input}
    have_out = {o.name: o for o in g.output}
    missing = [n for n in want_in if n not in have_in] + [n for n in want_out if n not in have_out]
    extra = [n for n in have_in if n not in want_in]
    if missing or extra:
        raise UserError(f"model {path}: the exported graph does not follow the contract "
                        f"(missing {missing}, unexpected inputs {extra})")
    for name in INPUTS:
        assert have_in[name].type.tensor_type.elem_type == onnx.TensorProto.INT64, name
    for name in past_names(n_layer):
        _, heads, _, head_dim = _dims(have_in[name])
        if not (isinstance(heads, int) and isinstance(head_dim, int)):
            raise UserError(f"model {path}: {name} has symbolic heads/head size {heads}, {head_dim}; "
                            "transformers.js needs fixed integers")
    # the contract's input order (optimum's GPT-2 puts the cache before attention_mask)
    ordered = [have_in[n] for n in want_in]
    del g.input[:]
    g.input.extend(ordered)
    # the contract's dimension names, wherever optimum's sum expression appears
    for value in list(g.input) + list(g.output) + list(g.value_info):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param.replace(" ", "") == "past_sequence_length+sequence_length":
                d.dim_param = TOTAL
    onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path))


def export_with_optimum(model, n_layer: int, onnx_dir: Path, work: Path) -> list[str]:
    """optimum's ONNX export of the loaded model into `work`, moved to onnx/model.onnx (+ model.onnx_data).
    Returns the files written in onnx_dir: the graph, then its external-data chunks (graphs over 2 GB)."""
    from optimum.exporters.onnx import onnx_export_from_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's tracer warnings
        onnx_export_from_model(model, work, task="text-generation-with-past", do_validation=False)
    graph = work / "model.onnx"
    if not graph.is_file():
        raise AssertionError(f"optimum wrote no model.onnx in {work}: {sorted(p.name for p in work.iterdir())}")
    onnx_dir.mkdir(exist_ok=True)
    shutil.move(str(graph), onnx_dir / VARIANTS["fp32"])
    data = work / "model.onnx_data"  # only for graphs over 2 GB; the graph refers to it by this name
    if data.is_file():
        shutil.move(str(data), onnx_dir / "model.onnx_data")
    path = onnx_dir / VARIANTS["fp32"]
    conform_graph(path, n_layer)
    # optimum's one data file is transformers.js's first chunk by name; a browser loads a chunk whole into one
    # ArrayBuffer, so one over the chunk size is split into model.onnx_data, model.onnx_data_1, ...
    data = onnx_dir / "model.onnx_data"
    if data.is_file() and data.stat().st_size > CHUNK_BYTES:
        save_graph(onnx.load(str(path)), path)
        onnx.checker.check_model(str(path))
    return [Path(f).name for f in variant_files(onnx_dir.parent, "fp32")]


# ----------------------------------------------------------------------------- the other files

def generation_config(src: Path, config: dict) -> dict:
    """The source's generation_config.json with bos/eos/pad filled in (pad defaults to eos)."""
    path = src / "generation_config.json"
    gen = json.loads(path.read_text()) if path.is_file() else {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if gen.get(key) is None and config.get(key) is not None:
            gen[key] = config[key]
    if gen.get("eos_token_id") is None:
        raise UserError(f"--hf {src}: neither generation_config.json nor config.json gives an eos_token_id")
    if gen.get("pad_token_id") is None:
        gen["pad_token_id"] = first_id(gen["eos_token_id"])
    gen.setdefault("do_sample", False)
    return gen


def export_gguf(src: str | Path, out: str | Path, force: bool = False, corpus: str | None = None) -> ParityReport:
    """The `export --gguf` stage: the file as a transformers folder in a temporary folder, then `export --hf`."""
    src, out = Path(src), Path(out)
    if out.exists() and not force:
        raise UserError(f"--out {out}: exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # beside --out, on its disk, named as staging() names its folders: one a kill -9 leaves is tidied next time
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-{os.getpid()}-gguf-", dir=out.parent) as tmp:
        t0 = time.time()
        gguf = stage_gguf(src, tmp)
        log.info("staged %s (%s) as a transformers folder in %.1fs", src, gguf["quant_types"], time.time() - t0)
        source = {"checkpoint": str(src.resolve()), "kind": "gguf", **gguf}
        return export_hf(tmp, out, force=force, corpus=corpus, source=source)


def export_hf(src: str | Path, out: str | Path, force: bool = False, corpus: str | None = None,
              source: dict | None = None) -> ParityReport:
    """The `export --hf` stage: import, conform, write the folder, check parity, publish atomically.
    source: what the manifest records as the source, when `src` is only a staging of it (a GGUF)."""
    src, out = Path(src), Path(out)
    if out.exists() and not force:
        raise UserError(f"--out {out}: exists; pass --force to replace it")
    config = check_hf_folder(src)
    t0 = time.time()
    ours = load_decoder(src) if config["model_type"] in SUPPORTED else None  # refusals before the heavy load
    # the reference loads once ours is exported and freed (parity loads it, and frees it once its logits are
    # on disk): the two models are never held at once
    model = None if ours is not None else load_hf_model(src)
    with staging(out, force) as tmp:
        if ours is not None:
            log.info("exporting %s (%s) through onnxgen's decoder", src, SUPPORTED[config["model_type"]])
            (tmp / "onnx").mkdir()
            with trace_graph(ours, tmp / "onnx" / VARIANTS["fp32"]) as traced:
                del ours  # the traced graph is rewritten without the decoder beside it
                release_memory()
                graph_files = traced.write()
            exporter = {"exporter": "onnxgen", "opset": OPSET}
        else:
            graph_files = export_with_optimum(model, model.config.num_hidden_layers, tmp / "onnx", tmp / "optimum")
            shutil.rmtree(tmp / "optimum")
            exporter = {"exporter": "optimum"}
        log.info("exported onnx/%s in %.1fs", VARIANTS["fp32"], time.time() - t0)
        if len(graph_files) > 1:  # external data: config.json tells transformers.js how many chunks
            write_json(tmp / "config.json", transformers_js_config(config, {VARIANTS["fp32"]: len(graph_files) - 1}))
        else:
            shutil.copyfile(src / "config.json", tmp / "config.json")  # byte for byte: transformers.js reads it
        write_json(tmp / "generation_config.json", generation_config(src, config))
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        if not (tmp / "tokenizer_config.json").is_file():  # onnxruntime-genai and transformers.js need one
            write_json(tmp / "tokenizer_config.json",
                       {"model_max_length": config.get("max_position_embeddings", config.get("n_positions"))})
        if not (tmp / SPECIAL_TOKENS_MAP).is_file():  # transformers 5 no longer writes one; the contract has it
            tokenizer_config = read_json(tmp / "tokenizer_config.json", "tokenizer config")
            write_json(tmp / SPECIAL_TOKENS_MAP, {k: tokenizer_config[k] for k in SPECIAL_TOKENS
                                                  if tokenizer_config.get(k) is not None})
        template = chat_template(src)  # chat_template.jinja or tokenizer_config's: the export keeps both
        templated = write_chat_template(tmp, template.source) if template else []
        genai = [] if unsupported(tmp / "onnx" / VARIANTS["fp32"]) else [GENAI_CONFIG]  # Granite 4: not in 0.18
        if genai:
            write_genai_config(tmp)
        weights = sorted(src.glob("*.safetensors"))
        source = {**(source or {"checkpoint": str(src.resolve()), "kind": "hf",
                                "model_sha256": {p.name: manifest.sha256(p) for p in weights}}),
                  "model_type": config["model_type"], "corpus": corpus}
        files = ["config.json", "generation_config.json", *[n for n in TOKENIZER_FILES if (tmp / n).is_file()],
                 *[n for n in templated if n not in TOKENIZER_FILES], *genai, *[f"onnx/{n}" for n in graph_files]]
        manifest.record(tmp, "export", files, source=source, **exporter)
        log.info("checking parity against the transformers model")
        report = publish_parity(tmp, out, parity_for_run(tmp, src, ["fp32"], model=model))
    return report
