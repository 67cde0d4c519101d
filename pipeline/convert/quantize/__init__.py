"""Quantize: an export folder's onnx/model.onnx (fp32) -> one more variant beside it.

    quantize("exports/default", "int4")          # onnx/model_q4.onnx, recorded in manifest.json
    quantize("exports/default", "all")           # int8, int4 and fp16
    quantize("exports/default", "int4", {"method": "rtn", "block_size": 64})   # Recipe fields replaced

The package, by concern (optimum's and onnxruntime-genai's split: what to do apart from doing it):
    recipe.py       Recipe, the one settings object, its defaults per variant and presets, checked once
    graph.py        graph surgery: which MatMuls, MatMulNBits nodes, the quantized embedding, fp16 scales
    gptq.py         GPTQ's maths: Hessians from one pass of the graph, the error-compensating solve
    calibration.py  calibration windows: text, a corpus, a run's tokens
    variants.py     one builder per variant: int8 (three methods), int4, fp16
    stage.py        the stage: optimize once, build each variant, write it whole, record it

Every variant starts from the optimized graph (`convert/optimize.py`: fused SkipLayerNormalization and
FastGelu, constant LM head):
    int8   onnx/model_quantized.onnx  three methods (`int8_mode`), measured on tiny and small (docs/variants.md);
           numbers below are tiny's (small: blockwise 99.6%, dynamic 97.5%, static 95.6%):
           blockwise (default): MatMulNBits with 8 bits, block 32, accuracy_level 4: the kernel quantizes
             activations per block of 32 per row, so one outlier channel costs its block only and a row's
             result does not depend on its batch. top-1 99.7%, Δppl +0.004%.
           dynamic: DynamicQuantizeMatMul, weights int8 per output channel, activations per tensor at
             run time (the method transformers.js's own q8 files use). top-1 94.8%: misses the 99%
             threshold, mostly at the LM head (the final LayerNorm's output has outlier channels, and
             one scale for the whole batch loses the rest); batched rows also change each other's logits.
           static: QDQ, activation ranges calibrated (MinMax) on held-out windows of the source run that
             the parity windows do not touch. top-1 94.3%: misses for the same per-tensor reason.
    int4   onnx/model_q4.onnx         weight-only MatMulNBits, 4 bits (a `Recipe`: method, block size, zero
           points, accuracy_level, which tensors get 8 bits). LM head (`head`): int8 by default (same accuracy
           as an fp32 head at a quarter of its size; an int4 head misses top-1 97%).
    fp16   onnx/model_fp16.onnx       everything fp16 (past/present too, as the contract allows)
           except the logits, which stay an fp32 output.
The embedding lookup is a GatherBlockQuantized reading the tied head's MatMulNBits table (one copy), or
its own 4-bit table when the head is not tied or kept fp32 (compact_embedding).

Recipes (issue 13; benchmarks/QUANT.md, measured on SmolLM2-135M-Instruct against its own fp32 graph):
    DEFAULT_RECIPES holds one per variant for models trained here (set on tiny/small, whose thresholds they
    pass: RTN symmetric, block 32, accuracy_level 4, first/last blocks 8-bit) and one for imports.
    method rtn   onnxruntime's MatMulNBitsQuantizer (MLAS round to nearest; integer zero points if asymmetric)
           hqq   onnxruntime's HQQ: float zero points (+1 bit a weight at block 32) that MLAS has no fast
                 kernel for: decode 6-9x slower on CPU
           gptq  written here (gptq_weight/hessians): onnxruntime 1.32's own gptq() propagates no error
                 (it reads a column of the upper Cholesky factor, all zeros below the diagonal: its
                 result equals round-to-nearest's), and gptq_quantize runs the model once per activation
                 per window. Calibrated on `--calibration` text (default: the export's corpus).
    accuracy_level 4 (int8 activations per block inside the kernel) costs int8 most of its KL on SmolLM2
    (4.4e-3 vs 1.4e-3 at level 0, but level 0 decodes 6x slower); smaller blocks quantize the activations
    in smaller blocks too: block 16 gives 2.7e-3 at full speed. int4 loses almost nothing to it (0.2145 vs
    0.2116): its weights dominate.

A variant is written to a temporary file in onnx/ and renamed over the old one only when whole
(os.replace is atomic on one filesystem): a kill leaves the previous variant untouched.

onnx/model.onnx stays the plain (unfused) graph, on purpose. Measured on the `small` shape (4 layers,
256 wide, 8192 vocab; benchmarks/variants_cpu.py, 1 thread, plain and fused runs interleaved): prefill
of 128 tokens 34.7 vs 35.8 ms, one decode step 1.36 vs 1.41 ms (best of 150), i.e. no gain within the
noise: the MatMuls dominate and the fusions only remove a few cheap element-wise ops. The plain graph
uses only standard opset-17 ops, so every runtime that loads model.onnx (onnxruntime-genai,
transformers.js in the browser, other execution providers) runs it, while the fused graph's
com.microsoft ops (SkipLayerNormalization, FastGelu) are only in some builds. The quantized variants
carry contrib ops anyway (MatMulNBits, DynamicQuantizeMatMul), so they are built from the fused graph.
So is the fp32 twin of `onnxgen fuse` (convert/fuse.py), which only onnxgen's runtime loads: there, with the
attention in one kernel and the cache in place, the element-wise ops are a larger share of a step (small
preset, batch 1: 103 kernels -> 56, ~8% faster).
"""
from pipeline.convert.quantize.recipe import (DEFAULT_INT8_MODE, DEFAULT_RECIPES, QUANTIZED, RECIPE_PRESETS,  # noqa: F401
                                              Recipe, recipe_for)


def __getattr__(name: str):
    """`quantize` on first use: the stage imports onnx and onnxruntime, and `onnxgen`'s start-up imports the
    recipe's choices from this package (PEP 562)."""
    if name == "quantize":
        from pipeline.convert.quantize.stage import quantize

        return quantize
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
