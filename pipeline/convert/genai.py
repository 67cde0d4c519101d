"""genai_config.json: what onnxruntime-genai needs to run an export folder as it stands.

onnxruntime-genai is driven by this one file next to the model; everything in it is read from the
folder itself (the graph's cache shapes, config.json, generation_config.json), so an onnxgen export
and a Hugging Face import get it the same way. Measured facts that shape it:
  - "type" is "llama" for every graph that follows our contract: genai's "gpt2" type expects one
    combined past tensor per layer and fails on separate key/value inputs; "llama" is its plain
    decoder-only path (input_ids, attention_mask, position_ids, past/present per layer), and the graph
    does all the model-specific math, so the architecture's real name does not matter to it.
  - position_ids must be listed among the decoder inputs, or genai does not feed them.
  - past_present_share_buffer is false for the plain graphs: they concatenate the cache (present = past +
    new). A fused twin (onnxgen fuse: GroupQueryAttention over one max-length buffer, as genai's own
    builder makes them) takes true; `onnxgen genai --fused` points the config at one. genai pads a batch
    of prompts as the twin expects: a batch gives each row the tokens it gets alone (tested).
  - genai's tokenizer reads tokenizer.json and needs tokenizer_config.json beside it (export writes both).
"""
from __future__ import annotations

from pathlib import Path


from pipeline import manifest
from pipeline.errors import UserError
from pipeline.exports import (GENAI_CONFIG, first_id, fused_path, generation_ids, read_config, read_graph_only,
                              read_json, variant_path, write_json)
from pipeline.run.sampling import SamplingConfig


def _conv_layers(model_path: Path) -> dict[int, int]:
    """LFM2's conv layers in the graph: layer -> its state's width (past_conv.{i}: batch, hidden, width)."""
    graph = read_graph_only(model_path).graph
    return {int(i.name.split(".")[1]): i.type.tensor_type.shape.dim[2].dim_value for i in graph.input
            if i.name.startswith("past_conv.")}


def unsupported(model_path: Path) -> str | None:
    """Why onnxruntime-genai cannot run this graph, or None: 0.18 carries LFM2's conv state but has no Mamba-2
    SSM state (Granite 4's past_ssm.*: its granitemoehybrid builder knows only attention layers)."""
    graph = read_graph_only(model_path).graph
    if any(i.name.startswith("past_ssm.") for i in graph.input):
        return ("onnxruntime-genai (0.18) has no Mamba-2 state (past_ssm.*): no genai_config.json for this export; "
                "onnxgen run and transformers.js run it")
    return None


def _recurrent_layers(model_path: Path) -> set[int]:
    """Qwen3.5's linear_attention layers in the graph (past_recurrent.{i})."""
    graph = read_graph_only(model_path).graph
    return {int(i.name.split(".")[1]) for i in graph.input if i.name.startswith("past_recurrent.")}


def _cache_shape(model_path: Path) -> tuple[int, int, int, int]:
    """(layers, kv heads, head size, vocab) from the graph's declared inputs and outputs; weights not loaded."""
    graph = read_graph_only(model_path).graph

    def dims(v):
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]

    keys = [i for i in graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key")]
    logits = [o for o in graph.output if o.name == "logits"]
    if not keys or not logits:
        raise UserError(f"model {model_path}: not a decoder with KV cache (no past_key_values.*.key inputs or logits)")
    _, heads, _, head_size = dims(keys[0])
    vocab = dims(logits[0])[-1]
    if not all(isinstance(x, int) and x > 0 for x in (heads, head_size, vocab)):
        raise UserError(f"model {model_path}: cache heads/head size/vocab must be fixed integers, got "
                        f"{heads}, {head_size}, {vocab}")
    return len(keys), heads, head_size, vocab


def genai_config(folder: str | Path, variant: str = "fp32", fused: bool = False) -> dict:
    """The config for `variant` (its file under onnx/ becomes the decoder's filename); fused: its twin."""
    folder = Path(folder)
    config = read_json(folder / "config.json", "config")
    shape = read_config(folder)
    gen = read_json(folder / "generation_config.json", "generation config")
    graph = fused_path(folder, variant) if fused else variant_path(folder, variant)
    rel = f"onnx/{graph.name}"
    why = unsupported(graph)
    if why:
        raise UserError(f"genai {folder}: {why}")
    layers, kv_heads, head_size, vocab = _cache_shape(graph)
    n_ctx = shape.context
    conv = _conv_layers(graph)
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    if eos is None:
        raise UserError(f"generation config {folder / 'generation_config.json'}: has no eos_token_id")
    first_eos = first_id(eos)
    pad = gen.get("pad_token_id", config.get("pad_token_id"))
    result = {
        "model": {
            "type": "llama",
            "bos_token_id": gen.get("bos_token_id", config.get("bos_token_id", first_eos)),
            "eos_token_id": eos,
            "pad_token_id": first_eos if pad is None else pad,
            "context_length": n_ctx,
            "vocab_size": vocab,
            "decoder": {
                "filename": rel,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "num_hidden_layers": layers,
                "num_attention_heads": shape.heads,
                "num_key_value_heads": kv_heads,
                "head_size": head_size,
                "hidden_size": shape.hidden,
                "inputs": {
                    "input_ids": "input_ids",
                    "attention_mask": "attention_mask",
                    "position_ids": "position_ids",
                    "past_key_names": "past_key_values.%d.key",
                    "past_value_names": "past_key_values.%d.value",
                },
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
            },
        },
        "search": {
            "num_beams": 1, "num_return_sequences": 1, "max_length": n_ctx, "min_length": 0,
            **_sampling(folder), "length_penalty": 1.0,
            "no_repeat_ngram_size": 0, "diversity_penalty": 0.0, "early_stopping": True,
            "past_present_share_buffer": fused,
        },
    }
    recurrent = _recurrent_layers(graph)
    if recurrent:  # Qwen3.5: genai's qwen3_5_text type (its builder's keys, our names; not run in genai yet)
        decoder = result["model"]["decoder"]
        layers = layers + len(recurrent)
        result["model"]["type"] = "qwen3_5_text"
        decoder["num_hidden_layers"] = layers
        decoder["layer_types"] = ["linear_attention" if i in recurrent else "full_attention" for i in range(layers)]
        decoder["inputs"].update(past_conv_names="past_conv.%d", past_recurrent_names="past_recurrent.%d")
        decoder["outputs"].update(present_conv_names="present_conv.%d", present_recurrent_names="present_recurrent.%d")
    elif conv:  # LFM2: genai's "lfm2" type carries the conv state (its builder's keys, our names)
        decoder = result["model"]["decoder"]
        layers = layers + len(conv)
        result["model"]["type"] = "lfm2"
        decoder["num_hidden_layers"] = layers
        decoder["layer_types"] = ["conv" if i in conv else "full_attention" for i in range(layers)]
        decoder["conv_cache_size"] = next(iter(conv.values()))
        decoder["inputs"]["past_conv_names"] = "past_conv.%d"
        decoder["outputs"]["present_conv_names"] = "present_conv.%d"
    return result


def _sampling(folder: Path) -> dict:
    """generation_config.json's sampling defaults, read as `onnxgen run` and transformers read them
    (run/sampling.py), so a genai user gets the decoding the model's authors chose: a trained export samples
    (do_sample, temperature 0.8, top-k 50, top-p 0.95), most imports are greedy."""
    s = SamplingConfig.from_defaults(generation_ids(folder).sampling)
    if s.greedy:
        return {"do_sample": False, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
                "repetition_penalty": s.repetition_penalty}
    return {"do_sample": True, "temperature": s.temperature, "top_k": s.top_k, "top_p": s.top_p,
            "repetition_penalty": s.repetition_penalty}


def write_genai_config(folder: str | Path, variant: str = "fp32", fused: bool = False) -> Path:
    """Write genai_config.json into `folder` (atomically) and return its path."""
    folder = Path(folder)
    return write_json(folder / GENAI_CONFIG, genai_config(folder, variant, fused))


def use_variant(folder: str | Path, variant: str, fused: bool = False) -> Path:
    """The `genai` stage: point genai_config.json at another variant (e.g. int4 for a small device), or at
    its fused twin, and record the change in the manifest, so `manifest verify` still holds."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"export {folder}: folder does not exist")
    if not variant_path(folder, variant).is_file():
        raise UserError(f"--variant {variant}: {variant_path(folder, variant)} does not exist in this export")
    if fused and not fused_path(folder, variant).is_file():
        raise UserError(f"--fused: {fused_path(folder, variant)} does not exist (onnxgen fuse {folder} "
                        f"--variant {variant} writes it)")
    path = write_genai_config(folder, variant, fused)
    manifest.record(folder, "genai", [GENAI_CONFIG], variant=variant, fused=fused)
    return path


def named_graph(folder: str | Path) -> str | None:
    """The graph genai_config.json names (a path relative to the folder), None without a readable config."""
    try:
        return read_json(Path(folder) / GENAI_CONFIG, "genai config")["model"]["decoder"]["filename"]
    except (UserError, KeyError, TypeError):
        return None


def follow_replaced_twin(folder: str | Path, variant: str) -> bool:
    """After `quantize` replaced `variant` and removed its now stale twin: when genai_config.json named that
    twin, point it at the new plain graph instead, so onnxruntime-genai never meets a missing file
    (`onnxgen fuse` and `onnxgen genai --fused` bring the twin back). True when it rewrote the config."""
    folder = Path(folder)
    twin = fused_path(folder, variant)
    if named_graph(folder) != f"onnx/{twin.name}" or twin.is_file():
        return False
    write_genai_config(folder, variant)
    manifest.record(folder, "genai", [GENAI_CONFIG], variant=variant, fused=False)
    return True
