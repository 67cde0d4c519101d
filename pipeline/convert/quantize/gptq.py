from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper
from tqdm import tqdm

from pipeline.convert.quantize.graph import matmul_nbits, replace_matmul, stored
from pipeline.convert.quantize.recipe import Recipe
from pipeline.exports import initializer_array, is_state


def _grid(group: np.ndarray, bits: int, symmetric: bool, importance: np.ndarray | None = None,
          fp16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per column of `group` (rows of one block), the scale and zero point MLAS's round-to-nearest uses:
    symmetric, the value of largest magnitude maps to code 0 (scale may be negative, zero point 2^(bits-1));
    asymmetric, the range [min(w, 0), max(w, 0)] spread over every code.

    importance (rows,): search instead, per column, the range shrunk by one of GRID_SHRINK that rounds the
    block with the least importance-weighted squared error (the rows' Hessian diagonal: the energy of their
    inputs), as GPTQ's reference code (mse=True) and llama.cpp's importance-matrix quantizers do. Clipping
    the few largest weights buys a finer step for the rest.

    fp16: scales the file stores as fp16 (Recipe.scales), rounded so before the codes are chosen."""
    scale, zero = _range_grid(group, bits, symmetric, 1.0, fp16)
    if importance is None:
        return scale, zero
    maxq = (1 << bits) - 1

    def error(s, z):
        q = np.clip(np.round(group / s) + z, 0, maxq)
        return (importance[:, None] * (group - s * (q - z)) ** 2).sum(0)

    best = error(scale, zero)
    for shrink in GRID_SHRINK[1:]:
        s, z = _range_grid(group, bits, symmetric, shrink, fp16)
        err = error(s, z)
        better = err < best
        best, scale, zero = np.where(better, err, best), np.where(better, s, scale), np.where(better, z, zero)
    return scale, zero


GRID_SHRINK = np.linspace(1.0, 0.7, 13)  # the ranges _grid's search tries, as fractions of the full one (first)


def _range_grid(group: np.ndarray, bits: int, symmetric: bool, shrink: float,
                fp16: bool = False) -> tuple[np.ndarray, np.ndarray]:
    maxq = (1 << bits) - 1
    if symmetric:
        idx = np.abs(group).argmax(0)
        extreme = group[idx, np.arange(group.shape[1])] * shrink
        scale = stored(extreme / -(1 << (bits - 1)), fp16)
        scale[scale == 0] = 1.0
        return scale, np.full_like(scale, 1 << (bits - 1))
    lo, hi = np.minimum(group.min(0), 0) * shrink, np.maximum(group.max(0), 0) * shrink
    scale = stored((hi - lo) / maxq, fp16)
    scale[scale == 0] = 1.0
    return scale, np.clip(np.round(-lo / scale), 0, maxq)


GPTQ_BLOCK_BYTES = 256 << 20  # a float64 slice of a weight GPTQ solves at once
# the float64 Hessians calibrated and solved at once (hessian_groups): SmolLM2's 0.8 GB and Gemma 3 270M's 0.87 GB
# are one run; a 1.2B Llama-3.2 shape's 10 GB five or six
HESSIAN_BYTES = 2 << 30


def gptq_weight(W: np.ndarray, H: np.ndarray, bits: int, group: int, symmetric: bool,
                percdamp: float = 0.01, blocksize: int = 128, act_order: bool = False, grid_search: bool = False,
                fp16_scales: bool = False):
    """GPTQ (Frantar et al. 2022) of one (K, N) weight given the Hessian H = 2·XᵀX/n of its input X:
    rows (input channels) are quantized in order and each one's error is pushed onto the rows not yet
    quantized through the inverse Hessian's Cholesky factor. Written by hand: onnxruntime's gptq() does the
    same solve, but returns fake-quantized floats that gptq_quantize then re-rounds onto a fresh grid (for
    symmetric weights 16/15 of GPTQ's scale, undoing part of the gain); this returns the integer codes of
    the grid it solved on. Returns codes (N, K padded to blocks) uint8, scales (N, K/group) float32 and
    zero points (N, K/group) uint8.

    act_order: rows in order of decreasing Hessian diagonal (the inputs with the most energy first, while the
    most rows are left to absorb their error), GPTQ's "desc_act". A block's grid must still cover rows that
    are contiguous in the file (MatMulNBits' layout), so each grid is set once, from the weights before any
    update ("static groups").

    grid_search: each block's grid by _grid's search, weighted by the Hessian diagonal of its rows.
    fp16_scales: solve on the scales rounded as an fp16 file stores them (Recipe.scales)."""
    K, N = W.shape
    W, H = W.astype(np.float64).copy(), H.astype(np.float64).copy()
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    W[dead] = 0
    kb = -(-K // group)
    maxq = (1 << bits) - 1
    scales, zeros = np.ones((kb, N)), np.zeros((kb, N))
    codes = np.zeros((kb * group, N), np.uint8)
    order = np.arange(K)
    energy = np.diag(H).copy() if grid_search else None  # _grid's weights, in the file's row order
    if act_order:
        for b in range(kb):
            rows = slice(b * group, (b + 1) * group)
            scales[b], zeros[b] = _grid(W[rows], bits, symmetric, None if energy is None else energy[rows],
                                        fp16_scales)
        order = np.argsort(-np.diag(H), kind="stable")
        W, H = W[order], H[order][:, order]
    H[np.diag_indices(K)] += percdamp * np.mean(np.diag(H))
    Hinv = np.linalg.cholesky(np.linalg.inv(H)).T  # upper factor
    blocksize = max(group, blocksize - blocksize % group)  # a group never straddles two blocks
    for i1 in range(0, K, blocksize):
        i2 = min(i1 + blocksize, K)
        W1, Err1, Hinv1 = W[i1:i2].copy(), np.zeros((i2 - i1, N)), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            r = order[i1 + i]  # the row's place in the file
            if not act_order and r % group == 0:
                scales[r // group], zeros[r // group] = _grid(W1[i:i + group], bits, symmetric,
                                                              None if energy is None else energy[r:r + group],
                                                              fp16_scales)
            s, z = scales[r // group], zeros[r // group]
            q = np.clip(np.round(W1[i] / s) + z, 0, maxq)
            codes[r] = q
            err = (W1[i] - s * (q - z)) / Hinv1[i, i]
            W1[i:] -= np.outer(Hinv1[i, i:], err)  # row i of the upper factor
            Err1[i] = err
        W[i2:] -= Hinv[i1:i2, i2:].T @ Err1
    codes[K:] = zeros[-1].astype(np.uint8)  # padding rows of the last block: code = zero point, value 0
    return codes.T.copy(), scales.T.astype(np.float32), zeros.T.astype(np.uint8)


def hessians(src: Path, graph: onnx.ModelProto, activations: list[str], windows: np.ndarray, progress: bool,
             batch: int = 4) -> dict[str, np.ndarray]:
    """{activation: 2·XᵀX/n} over every token of `windows` (n, T), from one run per batch of `src`'s graph with
    the activations as extra outputs. `graph` is src loaded without its external data (its structure is all
    this needs). Written by hand: onnxruntime's gptq_quantize runs the whole model once per activation and per
    window (121 activations in SmolLM2-135M: 121x the forwards).

    Memory: the weights are read by ONNX Runtime alone. When src keeps them as external data (the optimize
    stage's graph), the calibration graph is the structure with other outputs, saved beside src so that its
    weights resolve to the same file; no Python copy of them exists while the session runs. A batch's
    activations are ~0.4 MB a token for SmolLM2 (121 outputs: 0.4 GB for 4 windows of 256), beside the fp64
    sums (0.64 GB)."""
    import os
    import tempfile

    import onnxruntime as ort
    from onnx.external_data_helper import uses_external_data

    calib = onnx.ModelProto()
    calib.CopyFrom(graph)
    del calib.graph.output[:]
    calib.graph.output.extend([helper.make_tensor_value_info(a, onnx.TensorProto.FLOAT, None) for a in activations])
    _keep_only_what_computes(calib.graph, activations)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    # no pre-packed second copy of the fp32 weights: calibration runs the graph a few dozen times, and on
    # SmolLM2 that copy is 0.5 GB of the quantize stage's peak (benchmarks/MEMORY.md)
    options.add_session_config_entry("session.disable_prepacking", "1")
    options.enable_cpu_mem_arena = False  # a batch's 121 outputs are freed, not kept in an arena for the next
    if any(uses_external_data(t) for t in calib.graph.initializer):
        fd, name = tempfile.mkstemp(prefix=".calibration-", suffix=".onnx", dir=Path(src).parent)
        os.close(fd)
        try:
            onnx.save(calib, name)
            del calib
            session = ort.InferenceSession(name, options, providers=["CPUExecutionProvider"])
        finally:
            os.unlink(name)
    else:
        session = ort.InferenceSession(calib.SerializeToString(), options, providers=["CPUExecutionProvider"])
        del calib
    past = [i for i in session.get_inputs() if i.name.startswith("past_key_values.") or is_state(i.name)]
    H = {a: None for a in activations}
    n = 0
    bar = tqdm(total=len(windows), desc="calibrating (GPTQ)", unit="window", disable=not progress)
    for start in range(0, len(windows), batch):
        ids = windows[start:start + batch].astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
                "position_ids": np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()}
        feed.update({p.name: np.zeros((len(ids), *p.shape[1:]) if is_state(p.name) else
                                      (len(ids), p.shape[1], 0, p.shape[3]), np.float32) for p in past})
        outs = session.run(activations, feed)
        for a, x in zip(activations, outs):
            x = x.reshape(-1, x.shape[-1])
            xx = (x.T @ x).astype(np.float64)  # fp32 products (BLAS), summed per batch into fp64
            H[a] = xx if H[a] is None else H[a] + xx
        del outs
        n += ids.size
        bar.update(len(ids))
    bar.close()
    del session
    for a, h in H.items():  # in place: a second set of fp64 matrices would be 0.64 GB more for SmolLM2
        h *= 2
        h /= n
    return H


def _keep_only_what_computes(g, outputs: list[str]) -> None:
    """Drop the nodes and initializers of `g` that the `outputs` do not depend on, in place. ONNX Runtime runs
    every node of a graph, wanted or not: without this, calibration computed the logits of each batch (4 x 256
    positions x 262k for Gemma 3: 1.07 GB) and loaded the head's weight, for outputs it never asked for.
    Written by hand: onnx.utils.Extractor runs shape inference over the whole model first."""
    needed = set(outputs)
    kept = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(node.input)
            for a in node.attribute:  # a subgraph's outer-scope names
                for sub in [a.g] * (a.type == onnx.AttributeProto.GRAPH) + list(a.graphs):
                    needed.update(i for n in sub.node for i in n.input)
    del g.node[:]
    g.node.extend(reversed(kept))
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)


def gptq_hessians(src: Path, graph: onnx.ModelProto, nodes: list[str], windows: np.ndarray, progress: bool,
                  hessian_cache: dict | None = None) -> dict[str, np.ndarray]:
    """The Hessians of the inputs of the MatMuls `nodes` of `graph` (src's structure, see hessians).
    hessian_cache: a dict kept by a caller that quantizes the same graph on the same windows again."""
    import hashlib

    by_name = {n.name: n for n in graph.graph.node}
    acts = sorted({by_name[n].input[0] for n in nodes})
    key = (hashlib.sha256(windows.astype(np.int64).tobytes()).hexdigest(), tuple(acts))
    if hessian_cache is not None and key in hessian_cache:
        return hessian_cache[key]
    H = hessians(src, graph, acts, windows, progress)
    if hessian_cache is not None:
        hessian_cache.clear()
        hessian_cache[key] = H
    return H


def hessian_groups(graph: onnx.ModelProto, nodes: list[str], budget: int | None = None) -> list[list[str]]:
    """`nodes` (in order) in runs whose input Hessians fit `budget` bytes together (HESSIAN_BYTES): K x K float64
    for each distinct input of K features, MatMuls that read one input (q, k, v) sharing it. Each run is
    calibrated and solved before the next, so the Hessians of a 1B model (10 GB for a Llama-3.2-1B shape, the
    8192-wide down projections 0.5 GB each) are never all held; a model whose Hessians fit is one run, as
    before. Each run costs one pass over the calibration windows."""
    budget = HESSIAN_BYTES if budget is None else budget
    by_name = {n.name: n for n in graph.graph.node}
    dims = {t.name: list(t.dims) for t in graph.graph.initializer}
    groups: list[list[str]] = []
    held: set[str] = set()
    size = 0
    for name in nodes:
        act, weight = by_name[name].input[0], by_name[name].input[1]
        if act not in held:
            need = 8 * dims[weight][0] ** 2
            if not groups or (size and size + need > budget):  # a new run (an input past the budget: one alone)
                groups.append([])
                held, size = set(), 0
            held.add(act)
            size += need
        groups[-1].append(name)
    return groups


def gptq_quantize(model: onnx.ModelProto, nodes: list[str], H: dict[str, np.ndarray], recipe: "Recipe",
                  progress: bool, head: str | None = None, src: Path | None = None) -> None:
    """Replace each MatMul in `nodes` by a MatMulNBits holding its GPTQ solution (in place), `H` the Hessians of
    their inputs (gptq_hessians); `head`, when one of them, is solved symmetric at recipe.head_block_size (see
    Recipe.head). `src`: the file of a graph read by read_graph_only, each weight read from it when solved."""
    g = model.graph
    by_name = {n.name: n for n in g.node}
    inits = {i.name: i for i in g.initializer}
    bits = recipe.bits
    for name in tqdm(nodes, desc="GPTQ", unit="matmul", disable=not progress):
        node = by_name[name]
        W = initializer_array(inits[node.input[1]], src)
        group, symmetric = (recipe.head_block_size, True) if name == head else (recipe.block_size, recipe.symmetric)
        # output columns are independent in GPTQ (each is solved against the same Hessian of the shared input),
        # so a wide matrix is solved a slice of columns at a time: its float64 working copies stay near
        # GPTQ_BLOCK_BYTES (a 262k-vocabulary head's were 1.3 GB each, benchmarks/MEMORY_NOTES.md)
        cols = max(1, GPTQ_BLOCK_BYTES // (8 * W.shape[0]))
        parts = [gptq_weight(W[:, j:j + cols], H[node.input[0]], bits, group, symmetric, act_order=recipe.act_order,
                             grid_search=recipe.grid_search, fp16_scales=recipe.scales == "fp16")
                 for j in range(0, W.shape[1], cols)]
        codes, scales, zeros = (np.concatenate(x) if len(parts) > 1 else x[0] for x in zip(*parts))
        del parts
        q_node, new = matmul_nbits(node, W.shape, codes, scales, None if symmetric else zeros,
                                   bits, group, recipe.accuracy_level)
        replace_matmul(g, node, [q_node], new, inits)
