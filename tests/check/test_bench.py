"""The benchmark's plumbing (not its speed): what it counts and what it writes."""
from __future__ import annotations

import numpy as np
import onnx

from pipeline.check.bench import bench, weight_bytes_per_step
from pipeline.exports import fused_path


def test_weight_bytes_leave_out_the_embedding_tables(tiny_fused_export):
    path = fused_path(tiny_fused_export, "fp32")
    model = onnx.load(str(path))
    sizes = {t.name: onnx.numpy_helper.to_array(t).nbytes for t in model.graph.initializer}
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input[0] in sizes}
    assert gathered  # wte and wpe
    assert weight_bytes_per_step(path) == sum(sizes.values()) - sum(sizes[g] for g in gathered)


def test_bench_writes_a_row_per_engine_and_a_chart(tiny_fused_export, tmp_path):
    out = tmp_path / "RESULTS.md"
    result = bench(tiny_fused_export, out, rounds=1, tokens=8, batches=[1, 2], engines=["onnxgen"], rss=False)
    text = out.read_text()
    assert [r.engine.fused for r in result["rows"]] == [False, True]
    assert all(not r.error and np.isfinite(r.decode[2][0]) for r in result["rows"])
    assert "onnxgen, fused graph | fp32 |" in text and "bandwidth" in text
    assert (tmp_path / "results.png").stat().st_size > 1000


def test_bench_runs_an_imported_llama_with_its_pytorch_source(hf_exports, tmp_path):
    """bench reads every family's config (it read GPT-2's n_positions only: KeyError on a Llama import),
    and its PyTorch row runs the export's own source, a transformers model here."""
    import pytest

    pytest.importorskip("transformers")
    out = tmp_path / "RESULTS.md"
    result = bench(hf_exports["llama"], out, rounds=1, tokens=8, batches=[1], engines=["torch", "onnxgen"], rss=False)
    assert [r.engine.kind for r in result["rows"]] == ["torch", "onnxgen"]
    assert all(not r.error and np.isfinite(r.decode[1][0]) for r in result["rows"]), [r.error for r in result["rows"]]
    assert "2 layers, 4 heads (2 kv)" in out.read_text()


def test_bench_takes_the_prefill_length_and_charts_beside_its_own_report(tiny_fused_export, tmp_path):
    """--prefill sets the timed prompt (bounded by the context less one), and a report not named RESULTS.md
    gets its own chart instead of overwriting results.png."""
    import pytest

    from pipeline.errors import UserError

    out = tmp_path / "SMOL_BENCH.md"
    result = bench(tiny_fused_export, out, rounds=1, tokens=8, batches=[1], engines=["onnxgen"], rss=False, prefill=40)
    assert result["n_prefill"] == 40 and "prefill 40 tokens, ms" in out.read_text()
    assert (tmp_path / "smol_bench.png").is_file() and not (tmp_path / "results.png").exists()
    result = bench(tiny_fused_export, out, rounds=1, tokens=8, batches=[1], engines=["onnxgen"], rss=False,
                   prefill=10 ** 6)
    assert result["n_prefill"] == result["config"].context - 1
    with pytest.raises(UserError, match="--prefill 0"):
        bench(tiny_fused_export, out, rounds=1, tokens=8, batches=[1], engines=["onnxgen"], rss=False, prefill=0)


def test_bench_refuses_engines_it_does_not_know_and_writes_nothing(tiny_fused_export, tmp_path):
    """`--engines foo` ran no engine and overwrote the report with an empty table; now it is one line, exit 2."""
    from conftest import onnxgen

    out = tmp_path / "RESULTS.md"
    for engines, said in (("onnxgen,foo", "unknown engine 'foo'"), (",", "no engine named")):
        proc = onnxgen("bench", tiny_fused_export, "--engines", engines, "--out", out, "--rounds", 1, check=False)
        assert proc.returncode == 2 and said in proc.stderr and "torch, optimum, genai, onnxgen" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not out.exists() and not (tmp_path / "results.png").exists()
