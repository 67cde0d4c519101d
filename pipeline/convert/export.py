"""Export: a trained run folder -> exports/NAME/ with onnx/model.onnx (fp32), Hugging Face style
configs, tokenizer files, parity report and manifest. Built in a temporary folder beside the
target and renamed into place only once the graph passes onnx.checker and parity."""
from __future__ import annotations

import json
import logging
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import onnx
import torch

from pipeline import manifest
from pipeline.convert.genai import write_genai_config
from pipeline.check.parity import ParityReport, parity_for_run
from pipeline.errors import ParityError, UserError
from pipeline.exports import (GENAI_CONFIG, INLINE_BYTES, INPUTS, VARIANTS, cache_names, check_structure,
                              declare_external, is_state, release_memory, save_graph_streamed, staging, tensor_header,
                              transformers_js_config, write_json)
from pipeline.tokenizer import EOT, load_tokenizer, write_hf_tokenizer_files
from pipeline.model.decoder import Decoder
from pipeline.train.runs import checkpoint_dir, load_model, source_details

log = logging.getLogger(__name__)

OPSET = 17  # LayerNormalization is a standard op from 17


TABLE, HEAD = "model.wte.weight", "model.lm_head.MatMul.weight"  # the embedding table, the head's (C, V) matrix


class _CacheGraph(torch.nn.Module):
    """Flat inputs and outputs in the contract's order, for the exporter; the embedding table and the head's
    matrix come last, as inputs (_Tables)."""

    def __init__(self, model: Decoder, tables: _Tables):
        super().__init__()
        self.model, self.tables = model, tables

    def forward(self, input_ids, attention_mask, position_ids, *rest):
        *past, self.tables.table, self.tables.head = rest
        layers = self.model.split_cache(past)  # each layer's entries (K and V, or one state)
        logits, presents = self.model.forward_with_cache(input_ids, attention_mask, position_ids, layers)
        return (logits, *[t for entries in presents for t in entries])


class _Tables:
    """The embedding table and the LM head's matrix, traced as inputs of the graph rather than as parameters
    (write() makes them its initializers, as every other weight). The TorchScript exporter's per-node ONNX
    shape inference copies each parameter a node reads into a one-node model, three times over for a moment:
    for Gemma 3's 262k x 640 table (0.67 GB) that was 2 GB above the decoder, measured from outside the process
    (an input is only its shape and type there). The graph is the same: Gather(table, input_ids) and
    MatMul(hidden, head), the head as the exporter folded Transpose(lm_head.weight)."""
    table: torch.Tensor
    head: torch.Tensor

    @staticmethod
    @contextmanager
    def swapped(model: Decoder):
        tables = _Tables()
        wte, lm_head = model.wte, model.lm_head
        model.wte, model.lm_head = _Lookup(tables), _Project(tables, lm_head.bias)
        try:
            yield tables
        finally:
            model.wte, model.lm_head = wte, lm_head


class _Lookup(torch.nn.Module):
    def __init__(self, tables: _Tables):
        super().__init__()
        self.tables = tables

    @property
    def weight(self):  # the decoder reads its dtype
        return self.tables.table

    def forward(self, ids):
        return torch.nn.functional.embedding(ids, self.tables.table)


class _Project(torch.nn.Module):
    def __init__(self, tables: _Tables, bias):
        super().__init__()
        self.tables, self.bias = tables, bias

    def forward(self, x):
        y = torch.matmul(x, self.tables.head)
        return y if self.bias is None else y + self.bias


def export_graph(model: Decoder, path: Path) -> list[str]:
    """torch.onnx.export to the graph contract (trace_graph, then TracedGraph.write). Returns the files
    written beside `path`: the graph, then its external-data chunks if it is over 2 GB."""
    with trace_graph(model, path) as traced:
        return traced.write()


@dataclass
class TracedGraph:
    """A decoder traced without its weights; write() puts the graph with them at `path`. The decoder can be
    dropped between the two: `weights` holds what the graph needs of it."""
    graph: onnx.ModelProto  # as the exporter wrote it, each weight a graph input
    path: Path
    states: dict[str, tuple]  # a state output -> its fixed dims after batch (_fixed_states)
    weights: dict  # initializer name -> its array, in the graph's order (the exporter's constant-folded values)

    def write(self) -> list[str]:
        """Returns the files written beside `path`: the graph, then its external-data chunks if it is over
        2 GB (named as transformers.js expects, exports.save_graph_streamed; the exporter's own layout is a
        file per tensor). The weights go from their arrays into the file one at a time (the exporter would
        serialize the whole graph three times over in memory: benchmarks/MEMORY_NOTES.md)."""
        graph = _fixed_states(_kept_inputs(self.graph), self.states)
        kept = [i for i in graph.graph.input if i.name not in self.weights]  # the weights become initializers
        graph.graph.ClearField("input")
        graph.graph.input.extend(kept)
        # onnx.checker's full check (shape inference included) in memory: checking the written file would parse
        # it whole, twice the graph's size (1.3 GB for SmolLM2's 0.65 GB); ONNX Runtime reads it in parity, next
        check_structure(_declared(graph, self.weights), full_check=True)
        names = save_graph_streamed(graph, self.weights, self.path)
        self.weights.clear()
        release_memory()
        return names


def _declared(graph: onnx.ModelProto, weights: dict) -> onnx.ModelProto:
    """A copy of the graph with its initializers declared but not read: small ones whole (shape inference reads
    a shape's or an axis' values), the weight matrices as external data."""
    import numpy as np

    declared = onnx.ModelProto()
    declared.CopyFrom(graph)
    for name, array in weights.items():
        header = tensor_header(name, array)
        if array.nbytes < INLINE_BYTES:
            header.raw_data = np.ascontiguousarray(array).tobytes()
        else:
            declare_external(header, "weights", 0, array.nbytes)
        declared.graph.initializer.append(header)
    return declared


@contextmanager
def trace_graph(model: Decoder, path: Path):
    """torch.onnx.export to the graph contract: symbolic batch and sequence dims, fixed heads and head size.
    Any configuration of the decoder: our trained GPT, or a Hugging Face family (convert/hf_import.py).
    Yields a TracedGraph, whose write() puts the graph at `path`.

    The TorchScript exporter (dynamo=False) is used on purpose: it names the symbolic dims as the
    contract does from `dynamic_axes`, constant-folds what depends on the weights alone, and handles past = 0;
    the dynamo exporter cannot express total = past + sequence for a flat list of caches by name.
    Example sizes are >= 2 everywhere: the exporter would specialize a dim of size 0 or 1.
    """
    c = model.arch
    B, T, P = 2, 3, 2
    ids = torch.randint(0, c.vocab_size, (B, T))
    mask = torch.ones(B, P + T, dtype=torch.int64)
    pos = torch.arange(P, P + T).repeat(B, 1)
    past = [torch.zeros(B, *(P if d is None else d for d in shape))
            for i in range(c.n_layer) for shape in c.cache_shapes(i)]
    pasts, presents = cache_names(c.layer_types)
    ins, outs = list(INPUTS) + pasts, ["logits"] + presents
    axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
            "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
            "position_ids": {0: "batch_size", 1: "sequence_length"},
            "logits": {0: "batch_size", 1: "sequence_length"}}
    # K/V grow along the sequence; any other state is fixed but for batch (docs/contract.md part 3)
    axes.update({n: {0: "batch_size"} if is_state(n) else {0: "batch_size", 2: "past_sequence_length"}
                 for n in pasts})
    axes.update({n: {0: "batch_size"} if is_state(n) else {0: "batch_size", 2: "total_sequence_length"}
                 for n in presents})
    states = {q: tuple(t.shape[1:]) for t, p, q in zip(past, pasts, presents) if is_state(p)}
    weights = {}
    deduplicate = torch._C._jit_pass_onnx_deduplicate_initializers

    def keep(graph, params, training):  # the exporter's last word on its initializers (torch 2.13)
        params = deduplicate(graph, params, training)
        weights.update(params)
        return params

    table, head = model.wte.weight.detach(), model.lm_head.weight.detach().t()
    with tempfile.TemporaryDirectory(prefix="onnxgen-export-", dir=path.parent) as work:
        traced = Path(work) / path.name
        with warnings.catch_warnings(), mock.patch.object(torch._C, "_jit_pass_onnx_deduplicate_initializers", keep), \
                _Tables.swapped(model) as tables:
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(_CacheGraph(model, tables).eval(), (ids, mask, pos, *past, table, head), str(traced),
                              input_names=[*ins, TABLE, HEAD], output_names=outs, dynamic_axes=axes,
                              opset_version=OPSET, dynamo=False, do_constant_folding=True, export_params=False)
        graph = onnx.load(str(traced))  # the structure alone: the exporter wrote no weights
    assert weights, "the exporter's initializers were not seen: its passes changed (torch.onnx.utils)"
    weights.update({TABLE: table, HEAD: head})
    order = [i.name for i in graph.graph.input if i.name in weights]
    order = [TABLE, *(n for n in order if n not in (TABLE, HEAD)), HEAD]  # where the exporter put them
    weights = {name: weights[name].detach().numpy() for name in order}  # views of the decoder's tensors
    del model, c, ids, mask, pos, past, table, head  # this frame would keep the decoder alive past the trace
    yield TracedGraph(graph, path, states, weights)


def _kept_inputs(graph: onnx.ModelProto) -> onnx.ModelProto:
    """position_ids back among the inputs where no op reads it (Granite 4.0-H: no layer rotates, no learned
    positions), at its place in the contract: the exporter drops unused inputs, and the runtimes feed it."""
    names = [i.name for i in graph.graph.input]
    if "position_ids" not in names:
        value = onnx.helper.make_tensor_value_info("position_ids", onnx.TensorProto.INT64, ["batch_size", "sequence_length"])
        graph.graph.input.insert(names.index("attention_mask") + 1, value)
    return graph


def _fixed_states(graph: onnx.ModelProto, states: dict[str, tuple]) -> onnx.ModelProto:
    """A state output's dims after batch as the fixed integers of its input: the exporter names the sizes
    it cannot infer through a slice of a symbolic length (transformers.js would read those as 0)."""
    for value in graph.graph.output:
        if value.name in states:
            for d, size in zip(value.type.tensor_type.shape.dim[1:], states[value.name], strict=True):
                d.Clear()
                d.dim_value = size
    return graph


def hf_config(model, eot: int) -> dict:
    """config.json as transformers' GPT2Config writes it, so transformers.js and optimum read it."""
    c = model.config
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": c.vocab_size, "n_positions": c.n_ctx, "n_ctx": c.n_ctx, "n_embd": c.n_embd,
        "n_layer": c.n_layer, "n_head": c.n_head, "n_inner": 4 * c.n_embd,
        "activation_function": "gelu_new" if c.activation == "gelu" else "relu",
        "layer_norm_epsilon": c.layer_norm_epsilon, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "initializer_range": 0.02, "scale_attn_weights": True, "tie_word_embeddings": True, "use_cache": True,
        "bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot,
        "onnxgen": {"positional": c.positional, "bias": c.bias, "source": "onnxgen"},
    }


def generation_config(eot: int, n_ctx: int) -> dict:
    """Sampling by default: greedy decoding of a small model repeats itself (`os.path.join(os.path.path`);
    `onnxgen run` reads these as transformers' generate() does, and --temperature 0 is greedy. No
    repetition penalty: transformers and transformers.js would apply it to greedy decoding as well."""
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": eot, "do_sample": True,
            "max_length": n_ctx, "temperature": 0.8, "top_k": 50, "top_p": 0.95}


def publish_parity(tmp: Path, out: Path, report: ParityReport) -> ParityReport:
    """Write the fp32 parity report into the staged folder and its manifest; refuse to publish a miss."""
    manifest.record(tmp, "parity", report.write(tmp), parity=report.to_dict())
    if not report.passed:
        failures = "; ".join(f for r in report.results for f in r.failures)
        raise ParityError(f"export {out}: parity failed ({failures}); nothing was published")
    return report


def export(checkpoint: str | Path, out: str | Path, force: bool = False) -> ParityReport:
    run, out = Path(checkpoint), Path(out)
    if out.exists() and not force:
        raise UserError(f"--out {out}: exists; pass --force to replace it")
    model = load_model(run)  # a LoRA fine-tune: base + adapter, merged (peft's merge_and_unload)
    tok = load_tokenizer(run)
    if tok.get_vocab_size() != model.config.vocab_size:
        raise UserError(f"tokenizer {run / 'tokenizer.json'}: {tok.get_vocab_size()} tokens but the model "
                        f"has vocab_size {model.config.vocab_size}")
    eot = tok.token_to_id(EOT)
    config, n_ctx = hf_config(model, eot), model.config.n_ctx
    with staging(out, force) as tmp:
        (tmp / "onnx").mkdir()
        t0 = time.time()
        with trace_graph(model, tmp / "onnx" / VARIANTS["fp32"]) as traced:
            del model  # parity loads the reference itself; the graph is rewritten without the model beside it
            release_memory()
            graph_files = traced.write()
        log.info("exported onnx/%s in %.1fs", VARIANTS["fp32"], time.time() - t0)
        # a graph over 2 GB: config.json tells transformers.js how many external-data chunks it has
        write_json(tmp / "config.json", transformers_js_config(config, {VARIANTS["fp32"]: len(graph_files) - 1}))
        write_json(tmp / "generation_config.json", generation_config(eot, n_ctx))
        write_hf_tokenizer_files(tok, tmp, n_ctx)
        write_genai_config(tmp)  # onnxruntime-genai runs the folder as it stands
        ckpt = checkpoint_dir(run)
        source = {"checkpoint": str(run.resolve()), "step": json.loads((ckpt / "state.json").read_text())["step"],
                  "kind": "onnxgen"}
        if (ckpt / "model.safetensors").is_file():  # a LoRA fine-tune has an adapter instead
            source["model_sha256"] = manifest.sha256(ckpt / "model.safetensors")
        source.update(source_details(run))  # a fine-tune's base checkpoint and adapter (sha256)
        files = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", GENAI_CONFIG, *[f"onnx/{n}" for n in graph_files]]
        manifest.record(tmp, "export", files, source=source, opset=OPSET)
        log.info("checking parity against PyTorch")
        report = publish_parity(tmp, out, parity_for_run(tmp, run, ["fp32"]))
    return report
