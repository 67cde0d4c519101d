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
