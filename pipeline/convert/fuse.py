"""Fused attention: rewrite an exported decoder so each layer's attention is one com.microsoft
GroupQueryAttention node that reads and writes a preallocated max-length KV buffer in place.

    onnxgen fuse exports/default          # onnx/model.onnx -> onnx/model_gqa.onnx (and each variant)

The plain graph (docs/contract.md) concatenates past and new keys every step: the whole cache is
copied per layer per token, and ~25 small kernels build the mask and run the attention. The fused
graph keeps the contract's names and dtypes, so onnxruntime-genai runs it as it runs its own builder's
graphs (`past_present_share_buffer: true`), but:
  - past_key_values.{i}.* and present.{i}.* are the same (B, H, max_length, D) buffer: bind one
    OrtValue to both and GroupQueryAttention writes the new position in place (no Concat copy);
  - attention_mask (B, total) only counts tokens: seqlens_k = sum(mask) - 1 per row. Prompts are
    RIGHT-padded (GroupQueryAttention's convention), each row has its own length;
  - logits are (B, 1, V): the hidden state of each row's last real token goes through the LM head,
    not every position's (at a 256-token prompt the head is as big as the rest of the model).

The rewrite is structural, not by node names, so it works on any variant whose weight MatMuls were
quantized (MatMulNBits, MatMulInteger) as long as the attention itself is our decoder's pattern
(model/decoder.py, every family): for layer i, present.{i}.key = Concat(past, f(Split(qkv)[1])) where f is
a Reshape, a Transpose and, in RoPE families, the rotation; the attention output is the first Reshape
downstream of present.{i}.value that reads a Transpose (a GQA model's key/value repetition is a Reshape
of an Expand). What the attention does beyond softmax(q k^T / sqrt(d)) v comes from the model's config
(the same DecoderConfig that built the graph), as GroupQueryAttention attributes:
  - RoPE: do_rotary (not on SmolLM3's NoPE layers) with cos/sin caches of the decoder's own Rotary for positions 0..n_ctx-1 (linear,
    llama3 and yarn scalings are tables; dynamic NTK equals the plain base within n_ctx); the rotated
    width (partial rotary) is the caches' width. GroupQueryAttention rotates position past + i, which is
    what right-padded rows with positions 0..len-1 carry. Longrope (Phi-3 128k, Phi-4-mini) has two tables,
    short and long factors, and each call takes one by its longest row as the plain graph does
    (max(position_ids) + 1 > the original context: long); a Where picks the caches GroupQueryAttention reads;
  - sliding-window layers: local_window_size; Gemma 2's score cap: softcap; a configured scale: scale.
  - q/k norms (Qwen3, Gemma 3, OLMo 2 and 3): q, k and v go in separately, q and k after their norms;
    Gemma 3's and OLMo 3's sliding layers get caches of their own base, unscaled.
LFM2's short-convolution layers: each Concat(past_conv.{i}, B*x) -> Conv, Slice -> present_conv.{i} becomes one
com.microsoft CausalConvWithState node (ONNX Runtime's CPU kernel), whose state past_conv.{i} and present_conv.{i}
a runtime binds to one fixed-size OrtValue as it binds the K/V buffer; the layer's padding mask goes (prompts are
right-padded here, and the runtime prefills a batch with state row by row: run/lm.py).
Granite 4's mamba layers stay as exported (CausalConvWithState and GatedDeltaNet already), less their padding masks.
What is not attention (post-norms, residual multipliers, a head bias or divisor) stays as exported.
Refused with the reason (the plain graph still runs): head sizes ONNX Runtime's rotary kernel does not take.
onnxruntime.transformers' fusions do not cover this: they emit MultiHeadAttention/Attention, which
on CPU cannot share the past and present buffer.
"""
from __future__ import annotations

import logging
import tempfile
from collections import deque
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.transformers.onnx_model import OnnxModel

from pipeline import manifest
from pipeline.convert.optimize import optimize_export
from pipeline.check.parity import parity_of, source_checkpoint, source_of
from pipeline.errors import ParityError, UserError
from pipeline.exports import (LOGITS_TO_KEEP, MAX_LEN, fused_path, held_apart, present_variants, read_graph_only,
                              read_json, release_memory, save_graph_streamed, staging, variant_path)
from pipeline.model.decoder import DecoderConfig, Rotary, rope_kind
from pipeline.model.families import arch_of

log = logging.getLogger(__name__)


def _upstream_split(name: str, producers) -> onnx.NodeProto:
    """Walk back from present.{i}.key's new half to the Split of the packed q/k/v."""
    for _ in range(24):  # Reshape, Transpose, the rotation (a partial one slices and concatenates), a q/k norm
        node = producers.get(name)
        if node is None:
            break
        if node.op_type == "Split":
            return node
        name = node.input[0]
    raise UserError(f"graph: no Split of the packed q/k/v upstream of {name} (not an onnxgen export?)")


def _downstream_transpose(name: str, consumers) -> onnx.NodeProto:
    """The first Transpose downstream of `name`: (B, T, heads, D) -> (B, heads, T, D)."""
    queue, seen = deque([name]), {name}
    while queue:
        for node in consumers.get(queue.popleft(), []):
            if node.op_type == "Transpose":
                return node
            for o in node.output:
                if o not in seen:
                    seen.add(o)
                    queue.append(o)
    raise UserError(f"graph: no Transpose downstream of {name} (not an onnxgen export?)")


def _downstream_reshape(name: str, consumers, producers) -> str:
    """The attention output (B, T, C): the first Reshape downstream of present.{i}.value that reads a
    Transpose, (B, H, T, D) -> (B, T, H, D); a GQA model repeats key and value with Expand and Reshape."""
    queue, seen = deque([name]), {name}
    while queue:
        for node in consumers.get(queue.popleft(), []):
            source = producers.get(node.input[0]) if node.input else None
            if node.op_type == "Reshape" and source is not None and source.op_type == "Transpose":
                return node.output[0]
            for o in node.output:
                if o not in seen:
                    seen.add(o)
                    queue.append(o)
    raise UserError(f"graph: no attention output downstream of {name} (not an onnxgen export?)")


def _sinks(key: str, consumers, producers, initializers: dict) -> np.ndarray:
    """gpt-oss's sink logits of one layer, (heads,): the plain graph concatenates them, expanded from a
    (1, heads, 1, 1) constant, onto the scores before the first Softmax downstream of present.{i}.key."""
    queue, seen = deque([key]), {key}
    while queue:
        for node in consumers.get(queue.popleft(), []):
            if node.op_type == "Softmax":
                concat = producers.get(node.input[0])
                while concat is not None and concat.op_type == "Cast":
                    concat = producers.get(concat.input[0])
                expand = producers.get(concat.input[-1]) if concat is not None and concat.op_type == "Concat" else None
                if expand is None or expand.op_type != "Expand" or expand.input[0] not in initializers:
                    break
                return numpy_helper.to_array(initializers[expand.input[0]]).reshape(-1)
            for o in node.output:
                if o not in seen:
                    seen.add(o)
                    queue.append(o)
    raise UserError(f"graph: no attention sinks downstream of {key} (not an onnxgen export?)")


def _head_input(producers, initializers: set[str]) -> tuple[onnx.NodeProto, str]:
    """The node reading the hidden states the LM head turns into logits, and that input: back from the
    logits past position-wise ops with one non-constant input (Phi-2's head bias, Granite's divisor, Gemma 2's
    soft-cap), to the head's MatMul. Where an op has two (an int8 head's dequantizing Mul), its first input."""
    node = producers["logits"]
    while True:
        data = [x for x in node.input if x and x not in initializers
                and not (x in producers and producers[x].op_type == "Constant")]
        if node.op_type in ("Add", "Sub", "Mul", "Div", "Tanh") and len(data) == 1 and data[0] in producers:
            node = producers[data[0]]
            continue
        return node, data[0] if len(data) == 1 else node.input[0]


def _from_mask(name: str, producers) -> bool:
    """Whether `name` is the attention mask, sliced, unsqueezed or cast (a conv layer's padding mask)."""
    for _ in range(6):
        if name == "attention_mask":
            return True
        node = producers.get(name)
        if node is None or node.op_type not in ("Cast", "Unsqueeze", "Slice"):
            return False
        name = node.input[0]
    return False


def _unmask_conv(i: int, producers, consumers) -> None:
    """Layer i's short convolution without its padding mask (a Mul of its input by attention_mask's last
    columns): in the fused graph the mask counts each row's tokens, prompts are right-padded and a row's
    decode step may sit left of the mask's last column, so that Mul would zero real inputs. The runtime
    prefills a batch with state row by row instead (run/lm.py), so no padding ever reaches the state."""
    concat = next((n for n in consumers.get(f"past_conv.{i}", []) if n.op_type == "Concat"), None)
    name = concat.input[1] if concat is not None else ""
    for _ in range(16):  # b * x, the split, its transpose, the in-projection (and its bias), the mask
        node = producers.get(name)
        if node is None:
            break
        masks = [x for x in node.input if _from_mask(x, producers)]
        if node.op_type == "Mul" and len(masks) == 1:
            data = next(x for x in node.input if x != masks[0])
            for reader in consumers.get(node.output[0], []):
                for j, x in enumerate(reader.input):
                    if x == node.output[0]:
                        reader.input[j] = data
            return
        name = next((x for x in node.input if x in producers), "")  # past a bias or a weight to the data
    raise UserError(f"graph: no padding mask upstream of past_conv.{i}'s convolution (not an onnxgen export?)")


def _conv_with_state(i: int, producers, consumers) -> tuple[onnx.NodeProto, set[str]]:
    """Layer i's Concat(past_conv.{i}, B*x) -> Conv -> output and Slice -> present_conv.{i} as one com.microsoft
    CausalConvWithState node (ONNX Runtime's CPU kernel: no concatenated copy, no slice). Returns the node and
    the outputs it replaces."""
    concat = next((n for n in consumers.get(f"past_conv.{i}", []) if n.op_type == "Concat"), None)
    conv = next((n for n in consumers.get(concat.output[0], []) if n.op_type == "Conv"), None) if concat else None
    state = producers.get(f"present_conv.{i}")
    if conv is None or state is None or state.op_type != "Slice" or state.input[0] != concat.output[0]:
        raise UserError(f"graph: past_conv.{i} does not feed a Concat, Conv and Slice (not an onnxgen export?)")
    node = helper.make_node("CausalConvWithState",
                            [concat.input[1], conv.input[1], conv.input[2] if len(conv.input) > 2 else "",
                             f"past_conv.{i}"], [conv.output[0], f"present_conv.{i}"],
                            name=f"/h.{i}/conv/CausalConvWithState", domain="com.microsoft", activation="none")
    return node, {conv.output[0], f"present_conv.{i}", concat.output[0]}


def _unmask_mamba(i: int, producers, consumers) -> None:
    """Layer i's Mamba-2 mixer without its two padding masks (Muls by attention_mask's last columns: one on the
    in-projection's input, one on the convolution's output), for _unmask_conv's reason: the fused runtime
    prefills a batch with state row by row, so no padding ever reaches the conv or SSM state."""
    conv = next((n for n in consumers.get(f"past_conv.{i}", []) if n.op_type == "CausalConvWithState"), None)
    if conv is None:
        raise UserError(f"graph: past_conv.{i} does not feed a CausalConvWithState (not an onnxgen export?)")

    def bypass(node, mask):
        data = next(x for x in node.input if x != mask)
        for reader in consumers.get(node.output[0], []):
            for j, x in enumerate(reader.input):
                if x == node.output[0]:
                    reader.input[j] = data

    name, found = conv.input[0], 0
    for _ in range(16):  # upstream: the transpose, the split, the in-projection (and its bias), the mask
        node = producers.get(name)
        if node is None:
            break
        masks = [x for x in node.input if _from_mask(x, producers)]
        if node.op_type == "Mul" and len(masks) == 1:
            bypass(node, masks[0])
            found += 1
            break
        name = next((x for x in node.input if x in producers), "")
    frontier = [conv.output[0]]
    for _ in range(4):  # downstream: the transpose, then the mask
        nodes = [n for x in frontier for n in consumers.get(x, [])]
        hit = [(n, m) for n in nodes if n.op_type == "Mul" for m in n.input if _from_mask(m, producers)]
        if hit:
            bypass(*hit[0])
            found += 1
            break
        frontier = [o for n in nodes if n.op_type in ("Transpose", "Reshape", "Cast") for o in n.output]
    if found != 2:
        raise UserError(f"graph: no padding masks around layer {i}'s mamba convolution (not an onnxgen export?)")


def attention_of(folder: Path) -> DecoderConfig:
    """The decoder configuration the export's graph was built from (its config.json, read by its family),
    refused in one line when GroupQueryAttention cannot do its attention (see the module docstring)."""
    arch = arch_of(folder)
    model_type = read_json(folder / "config.json", "config").get("model_type")
    if arch is None:
        raise UserError(f"fuse {folder}: model_type {model_type!r} was exported by optimum, not onnxgen's decoder; "
                        "only the plain graph runs it")
    reasons = [why for bad, why in [
        # Qwen3.5: GroupQueryAttention has no output gate, and its DeltaNet layers' ops are in the plain graph already
        (arch.attn_output_gate, "a gated attention output (Qwen3.5's sigmoid gate between attention and o_proj)"),
        # ONNX Runtime's rotary kernels: "head_size shall be a multiple of 16", "cos_cache dimension 1 must
        # be <= head_size / 2 and a multiple of 8"
        (arch.positional == "rope" and arch.head_dim % 16, f"RoPE with head size {arch.head_dim} (not a multiple "
                                                           "of 16)"),
        (arch.positional == "rope" and int(arch.head_dim * arch.rope_fraction) % 16,
         f"a rotated width of {int(arch.head_dim * arch.rope_fraction)} (not a multiple of 16)")] if bad]
    if reasons:
        raise UserError(f"fuse {folder}: {model_type} has {'; '.join(reasons)}: not fused yet, the plain graph "
                        "runs it")
    return arch


def rotary_caches(arch: DecoderConfig, local_theta: float | None = None,
                  long: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin (n_ctx, rotated / 2) for GroupQueryAttention, from the decoder's own Rotary: the same
    frequencies and attention factor as the plain graph (whose rotate_half layout repeats each half).
    local_theta: Gemma 3's sliding layers' own base, without the scaling. long: longrope's long factors
    (else its short ones; Rotary picks one per call by the sequence length, here every position gets it)."""
    rot = Rotary(arch.head_dim, arch.rope_fraction, arch.rope_theta, arch.rope_scaling, arch.n_ctx,
                 arch.rope_original_ctx) if local_theta is None else \
        Rotary(arch.head_dim, arch.rope_fraction, local_theta, None, arch.n_ctx)
    positions = torch.arange(arch.n_ctx)[None]
    with torch.no_grad():
        if rot.kind == "longrope":  # Rotary.forward's arithmetic with the table fixed
            freqs = positions[:, :, None].float() * (rot.long_inv_freq if long else rot.inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)
            cos, sin = emb.cos() * rot.attention_factor, emb.sin() * rot.attention_factor
        else:
            cos, sin = rot(positions)
    half = rot.dim // 2
    return cos[0, :, :half].numpy(), sin[0, :, :half].numpy()


def _longrope_caches(g: onnx.GraphProto, arch: DecoderConfig, np_dtype, name: str) -> list[onnx.NodeProto]:
    """Both longrope tables as initializers, and the nodes that make `name`_cos/_sin the one this call
    uses: long when its longest row (max tokens of attention_mask, which is max(position_ids) + 1 for
    rows at positions 0..len-1) is past the original context, as Rotary.forward decides."""
    original = arch.rope_original_ctx or arch.n_ctx  # Rotary's rule
    for long in (False, True):
        cos, sin = rotary_caches(arch, long=long)
        suffix = "_long" if long else "_short"
        g.initializer.extend([numpy_helper.from_array(cos.astype(np_dtype), name + suffix + "_cos"),
                              numpy_helper.from_array(sin.astype(np_dtype), name + suffix + "_sin")])
    g.initializer.append(helper.make_tensor(name + "_original", TensorProto.INT64, [], [original]))
    return [helper.make_node("ReduceMax", ["fuse/mask_sum"], [name + "_seq_len"], keepdims=0),
            helper.make_node("Greater", [name + "_seq_len", name + "_original"], [name + "_is_long"]),
            *[helper.make_node("Where", [name + "_is_long", f"{name}_long_{f}", f"{name}_short_{f}"],
                               [f"{name}_{f}"]) for f in ("cos", "sin")]]


def fuse_graph(model: onnx.ModelProto, arch: DecoderConfig, last_logits: bool = True) -> onnx.ModelProto:
    """Rewrite in place and return `model` (see the module docstring)."""
    g = model.graph
    graph = OnnxModel(model)  # onnxruntime.transformers' graph helpers: producers, consumers, sort, prune
    producers, consumers = graph.output_name_to_node(), graph.input_name_to_nodes()
    inputs = {i.name: i for i in g.input}
    # the attention layers (LFM2's conv layers become CausalConvWithState below: their state is fixed-size)
    layers = [i for i in range(arch.n_layer) if arch.layer_types[i] not in ("conv", "mamba")]
    first = f"past_key_values.{layers[0]}.key" if layers else ""
    if "attention_mask" not in inputs or first not in inputs:
        raise UserError(f"graph: not a decoder with KV cache (no attention_mask / {first or 'past_key_values.*'})")
    kv_heads = inputs[first].type.tensor_type.shape.dim[1].dim_value
    replaced: set[str] = set()
    new: list[onnx.NodeProto] = []
    for i in range(arch.n_layer):
        if arch.layer_types[i] == "conv":
            _unmask_conv(i, producers, consumers)
            node, outputs = _conv_with_state(i, producers, consumers)
            new.append(node)
            replaced |= outputs
        elif arch.layer_types[i] == "mamba":  # Granite 4: its conv and SSD are one node each already
            _unmask_mamba(i, producers, consumers)

    # seqlens_k (B,) int32 = tokens per row - 1; total_sequence_length () int32 = mask width
    new += [
        helper.make_node("ReduceSum", ["attention_mask", "fuse/one_axis"], ["fuse/mask_sum"], keepdims=0),
        helper.make_node("Sub", ["fuse/mask_sum", "fuse/one"], ["fuse/seqlens_k64"]),
        helper.make_node("Cast", ["fuse/seqlens_k64"], ["fuse/seqlens_k"], to=TensorProto.INT32),
        helper.make_node("Shape", ["attention_mask"], ["fuse/mask_shape"]),
        helper.make_node("Gather", ["fuse/mask_shape", "fuse/one"], ["fuse/total64"], axis=0),
        helper.make_node("Cast", ["fuse/total64"], ["fuse/total"], to=TensorProto.INT32),
    ]
    g.initializer.extend([helper.make_tensor("fuse/one_axis", TensorProto.INT64, [1], [1]),
                          helper.make_tensor("fuse/one", TensorProto.INT64, [], [1]),
                          helper.make_tensor("fuse/zero", TensorProto.INT64, [], [0]),
                          helper.make_tensor("fuse/flat", TensorProto.INT64, [3], [0, 0, -1])])
    caches, attrs = {}, {}
    if arch.positional == "rope":
        dtype = inputs[first].type.tensor_type.elem_type  # fp16 variants: fp16 caches
        np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        for kind in set(arch.layer_types) - {"conv", "mamba"}:
            # Gemma 3's and OLMo 3's sliding layers: their own base, unscaled (OLMo 3's may equal the full one's)
            local = kind == "sliding_attention" and arch.rope_local_theta is not None
            name = "fuse/local" if local else "fuse/rope"
            if not any(name + "_cos" in names for names in caches.values()):  # a table once, for its layers
                if not local and rope_kind(arch.rope_scaling) == "longrope":
                    new.extend(_longrope_caches(g, arch, np_dtype, name))
                else:
                    cos, sin = rotary_caches(arch, arch.rope_local_theta if local else None)
                    g.initializer.extend([numpy_helper.from_array(cos.astype(np_dtype), name + "_cos"),
                                          numpy_helper.from_array(sin.astype(np_dtype), name + "_sin")])
            caches[kind] = [name + "_cos", name + "_sin"]
    if arch.attn_scale is not None:
        attrs["scale"] = float(arch.attn_scale)
    if arch.attn_softcap is not None:
        attrs["softcap"] = float(arch.attn_softcap)
    initializers = {t.name: t for t in g.initializer}
    for i in layers:
        split = _upstream_split(producers[f"present.{i}.key"].input[1], producers)
        if arch.qk_norm:  # q and k after their norms, (B, T, heads, D) -> (B, T, heads * D); v as split
            qkv = []
            for j, part in enumerate(("q", "k")):
                normed = _downstream_transpose(split.output[j], consumers).input[0]
                new.append(helper.make_node("Reshape", [normed, "fuse/flat"], [f"fuse/{i}/{part}"]))
                qkv.append(f"fuse/{i}/{part}")
            qkv.append(split.output[2])
        else:  # the packed projection, split inside the kernel
            qkv = [split.input[0], "", ""]
        out = _downstream_reshape(f"present.{i}.value", consumers, producers)
        replaced.update([f"present.{i}.key", f"present.{i}.value", out])
        window, rotary = arch.window(i), arch.rope_layers[i]  # SmolLM3's NoPE layers: no rotary
        optional = list(caches[arch.layer_types[i]]) if rotary else []
        if arch.attn_sinks:  # inputs 7-10 (cos, sin, position_ids, attention_bias) before head_sink
            sinks = _sinks(f"present.{i}.key", consumers, producers, initializers)
            g.initializer.append(numpy_helper.from_array(sinks, f"fuse/{i}/sinks"))
            optional = (optional or ["", ""]) + ["", "", f"fuse/{i}/sinks"]
        new.append(helper.make_node(
            "GroupQueryAttention",
            [*qkv, f"past_key_values.{i}.key", f"past_key_values.{i}.value", "fuse/seqlens_k", "fuse/total",
             *optional],
            [out, f"present.{i}.key", f"present.{i}.value"],
            name=f"/h.{i}/attn/GroupQueryAttention", domain="com.microsoft",
            num_heads=arch.n_head, kv_num_heads=kv_heads, **attrs,
            **({"do_rotary": 1, "rotary_interleaved": 0} if rotary else {}),
            **({} if window is None else {"local_window_size": window})))
    keep = [n for n in g.node if not any(o in replaced for o in n.output)]

    if last_logits:
        # hidden (B, S, C) -> (B, n, C): the n positions up to each row's last real token, n = logits_to_keep
        # (an input with a default of 1, so a runtime that does not know it gets (B, 1, V)). The last index
        # is seqlens_k - past, where past = total - S, clamped to [0, S-1] (a decode step has S = 1, index 0).
        # n > 1 is speculative decoding's check of n tokens in one call (run/speculative.py): the LM head runs
        # on those positions only, where the plain graph's runs on every position it is fed.
        head, hidden = _head_input(producers, {t.name for t in g.initializer})
        keep.extend([
            helper.make_node("Shape", ["input_ids"], ["fuse/ids_shape"]),
            helper.make_node("Gather", ["fuse/ids_shape", "fuse/one"], ["fuse/S"], axis=0),
            helper.make_node("Sub", ["fuse/total64", "fuse/S"], ["fuse/past"]),
            helper.make_node("Sub", ["fuse/seqlens_k64", "fuse/past"], ["fuse/idx0"]),
            helper.make_node("Sub", ["fuse/S", "fuse/one"], ["fuse/S1"]),
            helper.make_node("Min", ["fuse/idx0", "fuse/S1"], ["fuse/idx1"]),
            helper.make_node("Max", ["fuse/idx1", "fuse/zero"], ["fuse/idx2"]),
            helper.make_node("Unsqueeze", ["fuse/idx2", "fuse/one_axis"], ["fuse/last_idx"]),   # (B, 1)
            helper.make_node("Sub", ["fuse/one", LOGITS_TO_KEEP], ["fuse/first_offset"]),       # 1 - n
            helper.make_node("Range", ["fuse/first_offset", "fuse/one", "fuse/one"], ["fuse/offsets"]),  # (n,)
            helper.make_node("Add", ["fuse/last_idx", "fuse/offsets"], ["fuse/idx3"]),          # (B, n)
            helper.make_node("Max", ["fuse/idx3", "fuse/zero"], ["fuse/idx4"]),
            helper.make_node("Unsqueeze", ["fuse/idx4", "fuse/minus_one_axis"], ["fuse/idx"]),  # (B, n, 1)
            helper.make_node("GatherND", [hidden, "fuse/idx"], ["fuse/kept"], batch_dims=1),  # (B, n, C)
        ])
        for j, name in enumerate(head.input):
            if name == hidden:
                head.input[j] = "fuse/kept"
        g.initializer.extend([helper.make_tensor(LOGITS_TO_KEEP, TensorProto.INT64, [], [1]),
                              helper.make_tensor("fuse/minus_one_axis", TensorProto.INT64, [1], [-1])])
        g.input.append(helper.make_tensor_value_info(LOGITS_TO_KEEP, TensorProto.INT64, []))
        logits = next(o for o in g.output if o.name == "logits")
        # declared 1, the default's: onnxruntime-genai sizes its logits buffer (B, 1, V) only when the session
        # reports a static 1 there ((B, S, V) otherwise, which the graph's (B, 1, V) does not fill); a runtime
        # that asks for n > 1 binds its own (B, n, V) buffer (ONNX Runtime checks the declared shape only in a
        # warning)
        logits.type.tensor_type.shape.dim[1].dim_value = 1
    del g.node[:]
    g.node.extend(new + keep)
    # topological order: the new nodes read only graph inputs and each other, except the GQA nodes,
    # which read the qkv tensors; then drop the old mask and attention subgraphs nobody reads now
    graph.topological_sort(is_deterministic=True)
    graph.prune_graph(allow_remove_graph_inputs=False)
    for v in list(g.input) + list(g.output):
        if v.name.startswith(("past_key_values.", "present.")):
            v.type.tensor_type.shape.dim[2].dim_param = MAX_LEN
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    del g.value_info[:]  # stale shapes of removed tensors
    return model


def fuse_file(src: Path, dst: Path, arch: DecoderConfig, last_logits: bool = True) -> list[str]:
    """src graph -> dst graph with GroupQueryAttention, fused on src's structure (read_graph_only) and written
    with each weight read from src's files as it goes (save_graph_streamed): one file, or chunks past 2 GiB.
    Written in place: fuse_export works in a staged copy of the export. Returns the names written."""
    model = read_graph_only(src)
    fuse_graph(model, arch, last_logits)
    return save_graph_streamed(*held_apart(model, src), dst)


def fuse_export(folder: str | Path, variants: list[str] | None = None, progress: bool = False,
                check: bool = True) -> list[str]:
    """The `fuse` stage: write the fused twin of each variant present in the export; returns the files
    written. Each twin is judged against the PyTorch source like its variant (check/parity.py: same windows,
    same thresholds) before anything is published: the stage works in a copy of the export that replaces
    it only when every twin passed, so a miss or a kill leaves the export exactly as it was. check=False
    (benchmarks of untrained weights only; not on the command line) skips the judging."""
    from tqdm import tqdm

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"export {folder}: folder does not exist")
    arch = attention_of(folder)
    variants = variants or present_variants(folder)
    for v in variants:
        if not variant_path(folder, v).is_file():
            raise UserError(f"--variant {v}: {variant_path(folder, v)} does not exist in this export")
    # before any work: a missing source is the user's to fix. The reference itself loads after the graphs are
    # fused (the optimize step copies graphs; the model held beside it was 0.6 GB of SmolLM2's fuse peak)
    checkpoint = source_checkpoint(folder) if check else None
    written = []
    with staging(folder, force=True, copy_from=folder) as tmp, tempfile.TemporaryDirectory(prefix="onnxgen-fuse-") as work:
        for v in tqdm(variants, desc="fuse", unit="graph", disable=not progress, leave=False):
            src = variant_path(tmp, v)
            if v == "fp32":
                # the quantized variants were built from optimize.py's graph (SkipLayerNormalization, FastGelu,
                # biases folded); model.onnx stays the plain contract graph, but its twin is ours to fuse
                # further: the small preset's decode step goes from 103 kernels to 56 (convert/optimize.py)
                optimize_export(tmp, src, Path(work) / "model_optimized.onnx")
                src = Path(work) / "model_optimized.onnx"
            written += [f"onnx/{name}" for name in fuse_file(src, fused_path(tmp, v), arch)]
        if not check:
            manifest.record(tmp, "fuse", written, fused="not judged")
            return written
        release_memory()
        report = parity_of(tmp, variants, source_of(folder, checkpoint), kinds=("fused",), progress=progress,
                           release=True)
        for r in report.results:
            log.info("fused %s: KL %.2e, same top-1 %.2f%% over %d tokens, max |Δlogit| %.2e: %s", r.variant,
                     r.kl_mean, 100 * r.top1, r.scored, r.max_abs, r.status)
        if not report.passed:
            failures = "; ".join(f"{r.variant}: {f}" for r in report.results for f in r.failures)
            raise ParityError(f"fuse {folder}: {failures}; the export was left as it was")
        manifest.record(tmp, "fuse", written, fused=report.to_dict())
    return written
