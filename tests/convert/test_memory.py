"""The memory moves of the stages (benchmarks/MEMORY.md) change no result: the graph-only work on a graph whose
weights were detached to a file, and GPTQ's calibration read through that file, give what the whole graph in
memory gave."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from pipeline.convert.optimize import optimize_export
from pipeline.convert.quantize.gptq import gptq_hessians, gptq_weight
from pipeline.convert.quantize.graph import weight_matmuls
from pipeline.exports import (CHUNK_BYTES, PROTOBUF_LIMIT, detach_weights, load_graph, read_graph_only, save_graph,
                              save_graph_streamed, variant_path)


def test_detached_weights_leave_a_graph_without_them_that_reads_back_whole(tiny_export, tmp_path):
    whole = onnx.load(str(variant_path(tiny_export, "fp32")))
    values = {t.name: numpy_helper.to_array(t) for t in whole.graph.initializer}
    light = detach_weights(whole, tmp_path, "graph.onnx.data", min_bytes=1024)
    matrices = [t for t in light.graph.initializer if len(t.dims) >= 2 and values[t.name].nbytes >= 1024]
    assert matrices and all(not t.HasField("raw_data") for t in matrices)
    # vectors stay in the graph: shape inference reads a norm's weight
    assert all(t.HasField("raw_data") for t in light.graph.initializer if len(t.dims) < 2)
    assert light.ByteSize() < sum(v.nbytes for v in values.values()) / 4
    onnx.save(light, str(tmp_path / "graph.onnx"))
    back = onnx.load(str(tmp_path / "graph.onnx"))
    assert {t.name for t in back.graph.initializer} == set(values)
    for t in back.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), values[t.name])


def test_calibration_through_detached_weights_gives_the_same_hessians(tiny_export, tmp_path):
    """GPTQ's Hessians from a graph whose weights ONNX Runtime reads from the data file (what the quantize stage
    does now: no Python copy of them beside the session) equal those of the same graph held whole."""
    optimize_export(tiny_export, variant_path(tiny_export, "fp32"), tmp_path / "opt.onnx")
    whole = onnx.load(str(tmp_path / "opt.onnx"))
    onnx.save(whole, str(tmp_path / "inline.onnx"))
    (tmp_path / "ext").mkdir()
    light = detach_weights(whole, tmp_path / "ext", "opt.onnx.data", min_bytes=1024)
    onnx.save(light, str(tmp_path / "ext" / "opt.onnx"))
    nodes = weight_matmuls(light)
    windows = np.random.default_rng(0).integers(0, 200, (6, 32))
    inline = gptq_hessians(tmp_path / "inline.onnx", onnx.load(str(tmp_path / "inline.onnx")), nodes, windows, False)
    ext = tmp_path / "ext" / "opt.onnx"
    detached = gptq_hessians(ext, onnx.load(str(ext), load_external_data=False), nodes, windows, False)
    assert inline.keys() == detached.keys() and len(inline) > 1
    for a in inline:
        np.testing.assert_array_equal(detached[a], inline[a])
    assert sorted(p.name for p in (tmp_path / "ext").iterdir()) == ["opt.onnx", "opt.onnx.data"]  # no leftovers


def test_weights_streamed_into_the_file_read_back_as_save_graph_wrote_them(tiny_export, tmp_path):
    """export writes the weights from the decoder's own arrays into the file (save_graph_streamed), not through a
    serialized copy of the graph: the file reads back as the graph save_graph writes, in one file and in
    chunks (a small limit stands in for 2 GB), and the chunks are byte for byte save_graph's."""
    whole = onnx.load(str(variant_path(tiny_export, "fp32")))
    weights = {t.name: numpy_helper.to_array(t) for t in whole.graph.initializer}
    matrix = next(k for k, v in weights.items() if v.ndim == 2)
    weights[matrix] = np.ascontiguousarray(weights[matrix].T).T  # strided, as the exporter's folded transposes are
    light = onnx.ModelProto()
    light.CopyFrom(whole)
    light.graph.ClearField("initializer")
    total = sum(v.nbytes for v in weights.values())
    for limit, chunk in ((PROTOBUF_LIMIT, CHUNK_BYTES), (total // 2, total // 3)):
        ours, theirs = tmp_path / f"streamed-{limit}", tmp_path / f"saved-{limit}"
        ours.mkdir(), theirs.mkdir()
        graph = onnx.ModelProto()
        graph.CopyFrom(light)
        names = save_graph_streamed(graph, weights, ours / "model.onnx", limit=limit, chunk_bytes=chunk)
        expected = save_graph(onnx.load(str(variant_path(tiny_export, "fp32"))), theirs / "model.onnx",
                              limit=limit, chunk_bytes=chunk)
        assert names == expected and (len(names) == 1) == (limit == PROTOBUF_LIMIT)
        assert _read(ours / "model.onnx") == _read(theirs / "model.onnx") == whole
        for name in names[1:]:
            assert (ours / name).read_bytes() == (theirs / name).read_bytes()


def _read(path):
    """The graph with its external data loaded, as it was before saving (onnx's loader marks each tensor it
    read back as stored in the graph, a field the graph never had)."""
    graph = onnx.load(str(path))
    for t in graph.graph.initializer:
        t.ClearField("data_location")
    return graph


def test_a_graph_read_without_its_weights_keeps_its_structure_and_finds_them_where_they_lie(tiny_export, tmp_path):
    """read_graph_only (preflight, genai's config, parity's sources): the structure whole, each weight inside the
    file declared as external data at its own place there, which onnx's helpers read back as the weight; a graph
    whose weights are already beside it reads as onnx.load(load_external_data=False) reads it."""
    path = variant_path(tiny_export, "fp32")
    whole, light = onnx.load(str(path)), read_graph_only(path)
    for field in ("node", "input", "output", "value_info"):
        assert getattr(light.graph, field) == getattr(whole.graph, field)
    assert light.opset_import == whole.opset_import and light.ir_version == whole.ir_version
    assert [t.name for t in light.graph.initializer] == [t.name for t in whole.graph.initializer]
    declared = [t for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert declared and {e.value for t in declared for e in t.external_data if e.key == "location"} == {path.name}
    for mine, theirs in zip(light.graph.initializer, whole.graph.initializer):
        np.testing.assert_array_equal(numpy_helper.to_array(mine, str(path.parent)), numpy_helper.to_array(theirs))
    assert light.ByteSize() < whole.ByteSize() / 20
    save_graph(whole, tmp_path / "model.onnx", limit=1 << 16, chunk_bytes=1 << 16)
    assert read_graph_only(tmp_path / "model.onnx") == onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)


def test_gptq_solves_a_matrix_a_slice_of_columns_at_a_time_as_it_solves_it_whole():
    """gptq_quantize solves a wide matrix (a 262k-vocabulary head) in slices of output columns: GPTQ's columns
    are independent, so the codes, scales and zero points are the whole matrix's, bit for bit."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((96, 300)).astype(np.float32)
    X = rng.standard_normal((500, 96))
    H = 2 * X.T @ X / len(X)
    for options in (dict(symmetric=True), dict(symmetric=False, act_order=True, grid_search=True)):
        whole = gptq_weight(W, H, 4, 32, **options)
        parts = [gptq_weight(W[:, j:j + 70], H, 4, 32, **options) for j in range(0, W.shape[1], 70)]
        for a, b in zip(whole, (np.concatenate(x) for x in zip(*parts))):
            np.testing.assert_array_equal(a, b)


def test_a_graph_loaded_a_weight_at_a_time_is_what_onnx_load_reads(tiny_export):
    """load_graph (optimize, quantize, fuse) reads each weight's bytes once; the model is onnx.load's."""
    path = variant_path(tiny_export, "fp32")
    assert load_graph(path) == onnx.load(str(path))


def test_fp16_converted_weight_by_weight_equals_the_converter_on_the_graph_in_memory(tiny_export, tmp_path):
    """The fp16 variant is converted from the graph's structure, each weight read and converted as it is written
    (convert_fp16): the same nodes and the same fp16 (or kept fp32) values as onnxruntime's converter gives on
    the whole graph in memory with the same options."""
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    from pipeline.convert.quantize.graph import drop_duplicate_casts
    from pipeline.convert.quantize.variants import FP32_OPS, convert_fp16

    optimize_export(tiny_export, variant_path(tiny_export, "fp32"), tmp_path / "opt.onnx")
    details = convert_fp16(tmp_path / "opt.onnx", tmp_path / "fp16.onnx")
    ours = onnx.load(str(tmp_path / "fp16.onnx"))
    whole = OnnxModel(onnx.load(str(tmp_path / "opt.onnx")))  # the conversion as it was, in memory
    whole.initialize(convert_float_to_float16(whole.model, disable_shape_infer=True, keep_io_types=["logits"],
                                              op_block_list=list(FP32_OPS)))
    whole.remove_cascaded_cast_nodes()
    whole.remove_useless_cast_nodes()
    drop_duplicate_casts(whole.model.graph)
    ref = whole.model
    assert details["fp32_ops"] == list(FP32_OPS)
    assert sorted(n.op_type for n in ours.graph.node) == sorted(n.op_type for n in ref.graph.node)
    mine = {t.name: numpy_helper.to_array(t) for t in ours.graph.initializer}
    theirs = {t.name: numpy_helper.to_array(t) for t in ref.graph.initializer}
    assert mine.keys() == theirs.keys()
    kinds = {str(v.dtype) for v in mine.values()}
    assert {"float16", "float32"} <= kinds  # weights turned, norms kept
    for name, value in theirs.items():
        assert mine[name].dtype == value.dtype, name
        np.testing.assert_array_equal(mine[name], value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fp16.onnx", "opt.onnx", "opt.onnx.data"]  # fp16: one file


def test_a_variant_past_the_protobuf_limit_lands_with_its_chunks_and_a_smaller_one_takes_them_away(
        tiny_export, tmp_path, monkeypatch):
    """A variant whose graph goes to chunks (the fp16 of a 1B model is past 2 GiB; here a small limit stands in)
    is built in a folder of its own and moved in with its chunks, recorded with them, and loads; rebuilt in one
    file, the old chunks go."""
    import functools
    import shutil

    from pipeline import manifest
    from pipeline.convert.quantize import quantize, variants
    from pipeline.exports import save_graph_streamed as streamed

    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    quantize(folder, "fp16", progress=False)

    def logits():
        from pipeline.run.lm import OnnxLM

        lm = OnnxLM(folder, "fp16")
        ids = np.array([[5, 6, 7, 8]], np.int64)
        return lm.forward(ids, np.ones_like(ids), np.arange(4)[None], lm.empty_past(1))[0]

    ref = logits()
    monkeypatch.setattr(variants, "save_graph_streamed", functools.partial(streamed, limit=4096, chunk_bytes=1 << 16))
    quantize(folder, "fp16", progress=False)
    chunks = sorted(p.name for p in (folder / "onnx").glob("model_fp16.onnx_data*"))
    assert len(chunks) >= 2
    assert not list((folder / "onnx").glob(".model_fp16*"))  # no build folder left
    files = manifest.load(folder)["files"]
    assert all(files[f"onnx/{c}"]["stage"] == "quantize:fp16" for c in ["model_fp16.onnx", *chunks])
    np.testing.assert_array_equal(logits(), ref)
    monkeypatch.undo()
    quantize(folder, "fp16", progress=False)
    assert not list((folder / "onnx").glob("model_fp16.onnx_data*"))


def test_gptq_a_run_of_hessians_at_a_time_solves_what_all_at_once_does(tiny_export, tmp_path, monkeypatch):
    """GPTQ calibrates and solves its MatMuls in runs whose Hessians fit HESSIAN_BYTES (a 1B model's do not fit
    at once): with a budget of one Hessian a run, the graph is the one a single run gives, bit for bit."""
    from pipeline.convert.quantize import gptq
    from pipeline.convert.quantize.recipe import recipe_for
    from pipeline.convert.quantize.variants import quantize_weights

    optimize_export(tiny_export, variant_path(tiny_export, "fp32"), tmp_path / "opt.onnx")
    recipe = recipe_for(tiny_export, "int4", method="gptq", head="int4")
    windows = np.random.default_rng(0).integers(0, 200, (6, 32))
    structure = read_graph_only(tmp_path / "opt.onnx")
    assert len(gptq.hessian_groups(structure, weight_matmuls(structure))) == 1  # the default: one run
    quantize_weights(tmp_path / "opt.onnx", tmp_path / "one.onnx", recipe, calibration=windows)
    monkeypatch.setattr(gptq, "HESSIAN_BYTES", 1)
    runs = gptq.hessian_groups(structure, weight_matmuls(structure))
    acts = {n.name: n.input[0] for n in structure.graph.node if n.input}
    assert len(runs) == len({acts[n] for n in weight_matmuls(structure)}) > 2  # one input's MatMuls a run
    quantize_weights(tmp_path / "opt.onnx", tmp_path / "runs.onnx", recipe, calibration=windows)
    one, runs = onnx.load(str(tmp_path / "one.onnx")), onnx.load(str(tmp_path / "runs.onnx"))
    assert [n.SerializeToString() for n in one.graph.node] == [n.SerializeToString() for n in runs.graph.node]
    a = {t.name: numpy_helper.to_array(t) for t in one.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in runs.graph.initializer}
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_fuse_reads_a_staged_export_whose_graph_lies_in_chunks(tiny_export, tmp_path):
    """A graph past 2 GiB keeps its weights in chunks beside it (a 1B model's fp32; here a small limit stands in).
    fuse works in a staged copy whose files are hard links to the export's, and onnx's loader refuses a file of
    several links: the staged chunks are read as staging linked them, the twin lands and gives the plain graph's
    logits. A chunk hard-linked by anyone else is still refused."""
    import os
    import shutil

    import pytest

    from pipeline import manifest
    from pipeline.convert.fuse import fuse_export
    from pipeline.errors import UserError
    from pipeline.exports import tensor_bytes
    from pipeline.run.lm import OnnxLM

    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    graph = folder / "onnx" / "model.onnx"
    names = save_graph(load_graph(graph), graph, limit=4096, chunk_bytes=1 << 16)
    assert len(names) > 2
    manifest.record(folder, "export", [f"onnx/{n}" for n in names])
    fuse_export(folder, ["fp32"])
    ids = np.array([[5, 6, 7, 8, 9]], np.int64)
    plain = OnnxLM(folder, "fp32")
    want = plain.forward(ids, np.ones_like(ids), np.arange(5)[None], plain.empty_past(1))[0][0, -1]
    fused = OnnxLM(folder, "fp32", fused=True)
    np.testing.assert_allclose(fused.start([list(ids[0])], budget=4).logits[0], want, atol=1e-4)

    os.link(folder / "onnx" / names[1], tmp_path / "planted")  # a second link nobody staged
    chunked = read_graph_only(graph)
    tensor = next(t for t in chunked.graph.initializer
                  if any(e.key == "location" and e.value == names[1] for e in t.external_data))
    with pytest.raises(UserError, match="hard link"):
        tensor_bytes(tensor, graph)
