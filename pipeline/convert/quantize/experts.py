"""Routed experts in a quantized variant: each com.microsoft MoE node (model/decoder.py's Experts) becomes a
QMoE node with the same routing and activation attributes and its expert weights in 4 or 8 bits; the
router stays fp32 (E x C, a few kB a layer; a flipped choice of expert costs more than it saves).

QMoE's integer layout, per expert: codes (N, K) stored row by row with K packed (two 4-bit codes a byte,
low nibble first), symmetric around the op's default zero point 2^(bits - 1), one fp32 scale per row and
block of K (block_size, a power of two >= 16) or per row. No library writes this layout (onnxruntime's
quantizers emit MatMulNBits, not QMoE): round-to-nearest is done here by hand, checked against a NumPy
dequantization in tests/convert/test_quantize.py.

8-bit experts use one scale per row: measured on ONNX Runtime 1.32's CPU kernel, 8-bit with a block size
gives outputs 0.04 away (on a 6.6-wide output) from the same codes dequantized, where per-row 8-bit and
block-wise 4-bit agree to 1e-6.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

MOE_INPUTS = ("input", "router_probs", "fc1", "fc1_bias", "fc2", "fc2_bias")


def quantize_codes(w: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(E, N, K) fp32 -> packed codes (E, N, K * bits / 8) uint8 and scales (E, N, K / block), symmetric
    round-to-nearest; block = K: one scale per row."""
    E, N, K = w.shape
    qmax = 2 ** (bits - 1) - 1
    blocks = w.reshape(E, N, K // block, block)
    scales = np.abs(blocks).max(-1) / qmax
    scales[scales == 0] = 1.0
    codes = np.clip(np.rint(blocks / scales[..., None]), -qmax - 1, qmax).astype(np.int16) + 2 ** (bits - 1)
    codes = codes.reshape(E, N, K).astype(np.uint8)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return np.ascontiguousarray(codes, np.uint8), scales.astype(np.float32)


def dequantize_codes(codes: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """quantize_codes' inverse, (E, N, K) fp32: what QMoE computes with."""
    if bits == 4:
        codes = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)
    E, N, K = codes.shape
    values = codes.astype(np.float32) - 2 ** (bits - 1)
    blocks = scales.shape[-1] if scales.ndim == 3 else 1
    return (values.reshape(E, N, blocks, K // blocks) * scales.reshape(E, N, blocks, 1)).reshape(E, N, K)


def quantize_experts(model: onnx.ModelProto, bits: int, block_size: int) -> dict:
    """Every MoE node of `model` -> QMoE, in place; returns the manifest's details (empty without experts).
    4 bits: blocks of block_size along K where both of an expert's K (hidden, inner) divide by it, else a
    scale per row; 8 bits: a scale per row (see the module docstring)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    moes = [n for n in g.node if n.op_type == "MoE" and n.domain == "com.microsoft"]
    if not moes:
        return {}
    used: set[str] = set()
    blocks = set()
    for node in moes:
        ins = dict(zip(MOE_INPUTS, list(node.input) + [""] * (len(MOE_INPUTS) - len(node.input))))
        fc1, fc2 = (numpy_helper.to_array(inits[ins[k]]).astype(np.float32) for k in ("fc1", "fc2"))
        hidden, inner = fc1.shape[2], fc2.shape[2]
        block = block_size if bits == 4 and block_size >= 16 and hidden % block_size == 0 \
            and inner % block_size == 0 else 0
        blocks.add(block)
        new_inputs = list(node.input[:2])
        for name, w in (("fc1", fc1), ("fc2", fc2)):
            codes, scales = quantize_codes(w, bits, block or w.shape[2])
            if not block:
                scales = scales[..., 0]
            prefix = ins[name]
            g.initializer.extend([numpy_helper.from_array(codes, f"{prefix}_q{bits}"),
                                  numpy_helper.from_array(scales, f"{prefix}_scales")])
            new_inputs += [f"{prefix}_q{bits}", f"{prefix}_scales", ins[f"{name}_bias"]]
            used.add(prefix)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
        q = helper.make_node("QMoE", new_inputs, list(node.output), name=node.name.replace("MoE", "QMoE") or None,
                             domain="com.microsoft", expert_weight_bits=bits, **attrs,
                             **({"block_size": block} if block else {}))
        node.CopyFrom(q)
    still = {x for n in g.node for x in n.input}
    keep = [t for t in g.initializer if t.name not in used or t.name in still]
    del g.initializer[:]
    g.initializer.extend(keep)
    return {"experts": {"op": "QMoE", "bits": bits, "layers": len(moes),
                        "block_size": sorted(blocks)[0] if len(blocks) == 1 else sorted(blocks),
                        "router": "fp32"}}
