"""The fused-attention graph and the generation loops: same tokens as the plain graph, rows of a
batch the same as alone, the shared KV buffer written in place, sampling processors, batch CLI."""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from pipeline.errors import UserError
from pipeline.exports import fused_path
from pipeline.run.lm import Generation, OnnxLM
from pipeline.run.text import read_prompts
from pipeline.run.sampling import Sampler, SamplingConfig
from conftest import onnxgen

PROMPTS = ["def parse_args(argv):\n    ", "import os", "class Message(object):\n    \"\"\"A message.\"\"\"\n"]


def _tokens(lm, prompts, n=24, **kw):
    result = Generation()
    for _ in lm.generate(prompts, n, result=result, **kw):
        pass
    return result


def test_fused_graph_is_gqa_with_the_contract_names(tiny_fused_export):
    model = onnx.load(str(fused_path(tiny_fused_export, "fp32")))
    ops = [n.op_type for n in model.graph.node]
    n_layer = json.loads((tiny_fused_export / "config.json").read_text())["n_layer"]
    assert ops.count("GroupQueryAttention") == n_layer
    assert "Softmax" not in ops  # the attention is all inside the fused op
    produced = {o: n.op_type for n in model.graph.node for o in n.output}
    assert all(produced[f"present.{i}.key"] == "GroupQueryAttention" for i in range(n_layer))  # no Concat copy
    names = [i.name for i in model.graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert model.graph.input[3].type.tensor_type.shape.dim[2].dim_param == "max_sequence_length"
    # the twin is built from optimize.py's graph, as the quantized variants are: residual + LayerNorm and the
    # MLP's GELU fused (the plain model.onnx keeps standard ops only)
    assert ops.count("SkipLayerNormalization") == 2 * n_layer + 1 and ops.count("FastGelu") == n_layer
    assert "Tanh" not in ops and "LayerNormalization" not in ops
    plain = [n.op_type for n in onnx.load(str(tiny_fused_export / "onnx" / "model.onnx")).graph.node]
    assert "SkipLayerNormalization" not in plain and "FastGelu" not in plain


def test_fused_twin_is_judged_against_pytorch(tiny_fused_export):
    """fuse judges each twin like its variant: against the PyTorch model, on parity's windows, with the
    fp32 bound; the result is in the manifest."""
    recorded = json.loads((tiny_fused_export / "manifest.json").read_text())["stages"][-1]
    assert recorded["stage"] == "fuse"
    twin = recorded["fused"]["variants"]["fp32 fused"]
    assert twin["status"] == "pass" and twin["scored"] >= 8192
    assert twin["max_abs"] < 1e-4 and twin["top1"] == 1.0 and twin["greedy_match"] == twin["greedy_tokens"]


def test_a_twins_window_in_one_call_scores_what_its_steps_score(tiny_fused_export):
    """Parity's two ways through a fused twin (check/parity.py): a right-padded batch teacher-forced one token a
    step, and each row alone with the rest of its window in one call (logits_to_keep). The same positions are
    scored, and their logits agree to the fp32 bound's atol: the one-call way judges the twin as the steps do."""
    from pipeline.check.parity import _extended, _teacher_forced

    lm = OnnxLM(tiny_fused_export, fused=True)
    assert lm.keeps_logits and not lm.has_state
    ids = lm.encode("".join(PROMPTS) * 8)
    windows = np.stack([ids[i:i + 40] for i in range(0, 9 * 5, 5)])  # prefills 1..8 and 1 again: a batch of 9
    stepped, stepped_valid = _teacher_forced(lm, windows)
    one_call, valid = _extended(lm, windows)
    assert (valid == stepped_valid).all() and valid.sum() == sum(40 - k for k in 1 + np.arange(9) % 8)
    assert np.abs(one_call[valid] - stepped[valid]).max() < 1e-4
    assert not one_call[~valid].any()


@pytest.mark.parametrize("fused", [False, True])
def test_batch_rows_give_the_same_tokens_as_alone(tiny_fused_export, fused):
    lm = OnnxLM(tiny_fused_export, fused=fused)
    ids = [lm.encode(p) for p in PROMPTS]
    batch = _tokens(lm, ids)
    for b, p in enumerate(ids):
        assert batch.tokens[b] == _tokens(lm, [p]).tokens[0], f"row {b}"


@pytest.mark.parametrize("fused", [False, True])
def test_a_row_that_ends_early_leaves_the_others_as_alone(tiny_fused_export, fused):
    """Rows that end (at an end-of-text id, here one of row 0's own tokens) stop growing and receive the pad
    id, while the rest of the batch runs on as if alone (generate's bookkeeping while some rows are done)."""
    lm = OnnxLM(tiny_fused_export, fused=fused)
    ids = [lm.encode(p) for p in PROMPTS]
    # the tiny model's greedy text repeats one id; a repetition penalty (deterministic, per row) varies it
    greedy = SamplingConfig(temperature=0, repetition_penalty=1.5)
    free = [_tokens(lm, [p], sampling=greedy).tokens[0] for p in ids]
    for end in dict.fromkeys(free[0]):  # the first of row 0's ids that ends the rows at different steps
        lm.eos_ids = np.array([end])
        alone = [_tokens(lm, [p], sampling=greedy) for p in ids]
        if len({len(r.tokens[0]) for r in alone}) > 1:
            break
    reasons = [r.stop_reason[0] for r in alone]
    assert reasons[0] == "eos" and len({len(r.tokens[0]) for r in alone}) > 1, (reasons, free)
    batch = _tokens(lm, ids, sampling=greedy)
    assert batch.stop_reason == reasons
    assert batch.stop_reason == reasons
    for b in range(len(ids)):
        assert batch.tokens[b] == alone[b].tokens[0], f"row {b}"


def test_fused_and_plain_loops_agree_when_sampling(tiny_fused_export):
    plain, fused = OnnxLM(tiny_fused_export), OnnxLM(tiny_fused_export, fused=True)
    ids = [plain.encode(p) for p in PROMPTS]
    s = SamplingConfig(temperature=0.9, top_k=40, top_p=0.95, seed=7, repetition_penalty=1.3)
    assert _tokens(plain, ids, sampling=s).tokens == _tokens(fused, ids, sampling=s).tokens


def test_shared_buffer_is_written_in_place(tiny_fused_export):
    lm = OnnxLM(tiny_fused_export, fused=True)
    state = lm.start([lm.encode("import os")], 8)
    key = state.cache[0]  # the OrtValue bound as both past_key_values.0.key and present.0.key
    filled = (key.numpy()[0, 0].any(-1)).sum()
    assert filled == len(lm.encode("import os"))  # the prompt's keys, in place, nothing beyond
    state.step(np.array([5]), np.zeros(1, bool))
    assert (key.numpy()[0, 0].any(-1)).sum() == filled + 1


def _huge_page_advised(address: int) -> bool:
    """Whether the mapping holding `address` was madvised for transparent huge pages ("hg" in VmFlags)."""
    start = None
    for line in open("/proc/self/smaps"):
        head = line.split()[0]
        if "-" in head and ":" not in head:  # a mapping's first line: "start-end perms ..."
            lo, hi = (int(x, 16) for x in head.split("-"))
            start = lo if lo <= address < hi else None
        elif start is not None and line.startswith("VmFlags:"):
            return "hg" in line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="reads the mapping's flags in Linux's /proc")
def test_kv_caches_are_not_advised_for_huge_pages(tiny_fused_export):
    # NumPy madvises arrays of 4 MB and more for huge pages, whose first touch can wait on the kernel's memory
    # compaction (a SmolLM2 chat's first prefill: up to 1.1 s instead of ~60 ms); the caches come from
    # lm.os_zeros instead. The control shows the check can see the advice.
    from pipeline.run.batching import BatchEngine

    size = 8 << 20  # NumPy advises from 4 MB, on the 2 MB-aligned part of an array: its middle is in it
    control = np.zeros(size, np.uint8)
    if not _huge_page_advised(control.ctypes.data + size // 2):
        pytest.skip("this kernel takes no huge-page advice (transparent huge pages off), so nothing can stall")
    lm = OnnxLM(tiny_fused_export, fused=True)
    rows = size // (lm.n_kv_heads * lm.n_ctx * lm.head_dim * 4) + 1  # caches of 8 MB or more
    state = lm.start([lm.encode("import os")] * rows, lm.n_ctx)
    assert state.cache[0].numpy().nbytes >= size
    assert not _huge_page_advised(state.cache[0].data_ptr() + size // 2)
    engine = BatchEngine(lm, capacity=rows)
    cache = engine.cache[0]
    assert cache.nbytes >= size and not _huge_page_advised(cache.ctypes.data + size // 2)
    assert not cache.any() and cache.flags.writeable and cache.flags.c_contiguous


def test_repetition_penalty_matches_a_per_row_loop():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 50)).astype(np.float32)
    seen = rng.random((3, 50)) < 0.3
    got = Sampler(SamplingConfig(repetition_penalty=1.5))(logits, seen)
    want = []
    for row, s in zip(logits.copy(), seen):
        for t in np.flatnonzero(s):
            row[t] = row[t] / 1.5 if row[t] > 0 else row[t] * 1.5
        want.append(row.argmax())
    assert got.tolist() == want
    with pytest.raises(UserError, match="--repetition-penalty"):
        SamplingConfig(repetition_penalty=0)


def test_stop_strings_cut_the_completion(tiny_fused_export):
    lm = OnnxLM(tiny_fused_export, fused=True)
    free = lm.complete(PROMPTS[:1], 24)[0]
    stop = free[len(free) // 2:len(free) // 2 + 2]
    assert stop, free
    result = Generation()
    cut = lm.complete(PROMPTS[:1], 24, stop=[stop], result=result)[0]
    assert cut == free[:free.find(stop)] and result.stop_reason == ["stop"]
    assert "".join(lm.stream(PROMPTS[0], 24, stop=[stop])) == cut


def test_read_prompts(tmp_path):
    (tmp_path / "p.txt").write_text("a\n\nb c\n")
    assert read_prompts(tmp_path / "p.txt") == ["a", "b c"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "x\\ny"}\n"z"\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["x\ny", "z"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": 3}\n')
    with pytest.raises(UserError, match="line 1"):
        read_prompts(tmp_path / "bad.jsonl")


@pytest.mark.slow
def test_cli_runs_a_batch_of_prompts(tiny_fused_export, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    proc = onnxgen("-q", "run", tiny_fused_export, "--prompts", path, "--max-new-tokens", 16, "--temperature", 0)
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    lm = OnnxLM(tiny_fused_export, fused=True)
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["completion"] for r in rows] == [lm.complete([p], 16)[0] for p in PROMPTS]


def test_run_stats_count_the_tokens_it_streamed(tiny_fused_export):
    """--stats: one stderr line with the graph, its load time and the tokens generated (what
    benchmarks/cli_speed.py counts tokens by); the completion on stdout is what run prints without it."""
    args = ("-q", "run", tiny_fused_export, PROMPTS[0], "--no-echo", "--max-new-tokens", 12, "--temperature", 0)
    with_stats, plain = onnxgen(*args, "--stats"), onnxgen(*args)
    assert with_stats.stdout == plain.stdout
    result = Generation()
    for _ in OnnxLM(tiny_fused_export, fused=True).stream(PROMPTS[0], 12, result=result):
        pass
    line = with_stats.stderr.strip().splitlines()[-1]
    assert line.startswith("onnxgen: fp32 fused loaded in ") and f"; {len(result.tokens[0])} tokens" in line


def _has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(_has_cuda(), reason="this onnxruntime has CUDA")
def test_cuda_without_cuda_is_one_clear_line(tiny_export):
    proc = onnxgen("run", tiny_export, "x", "--device", "cuda", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --device cuda: this onnxruntime has no CUDA")


@pytest.fixture
def fp16_fused_export(tiny_fused_export, tmp_path):
    """The fp16 variant (what --device cuda runs by default) and its fused twin, made here with
    onnxruntime.transformers (pipeline.convert.quantize, issue 3, makes the real one)."""
    import shutil

    from onnxruntime.transformers.float16 import convert_float_to_float16

    from pipeline.convert.fuse import fuse_export
    from pipeline.exports import VARIANTS

    out = tmp_path / "fp16"
    shutil.copytree(tiny_fused_export, out)
    model = convert_float_to_float16(onnx.load(str(out / "onnx" / VARIANTS["fp32"])),
                                     keep_io_types=["input_ids", "attention_mask", "position_ids", "logits"])
    onnx.save(model, str(out / "onnx" / VARIANTS["fp16"]))
    fuse_export(out, ["fp16"])
    return out


@pytest.mark.cuda
@pytest.mark.skipif(not _has_cuda(), reason="needs onnxruntime-gpu and a GPU")
def test_cuda_fp16_fused_gives_the_cpu_tokens(fp16_fused_export):
    # the cache lives on the GPU (IO binding), the logits come back; CPU runs the same fp16 graphs
    for fused in (False, True):
        cpu = OnnxLM(fp16_fused_export, "fp16", fused=fused)
        gpu = OnnxLM(fp16_fused_export, "fp16", provider="cuda", fused=fused)
        assert gpu.session.get_providers()[0] == "CUDAExecutionProvider" and gpu.fused == fused
        ids = [cpu.encode(p) for p in PROMPTS]
        got, want = _tokens(gpu, ids, 12).tokens, _tokens(cpu, ids, 12).tokens
        # fp16 kernels differ between devices: allow a late divergence, not an early one
        assert all(g[:4] == w[:4] for g, w in zip(got, want)), (fused, got, want)


def test_a_plain_graph_posing_as_fused_is_refused(tiny_export, tmp_path):
    import shutil

    out = tmp_path / "fake"
    shutil.copytree(tiny_export, out)
    shutil.copy(out / "onnx" / "model.onnx", fused_path(out, "fp32"))
    with pytest.raises(UserError, match="not a fused graph"):
        OnnxLM(out, fused=True)


def test_fuse_that_misses_leaves_the_export_as_it_was(tiny_export, tmp_path, monkeypatch):
    """`run` uses a fused twin by default, so one that misses its bound must not be left behind: a forced
    threshold miss makes fuse exit with a parity error and the folder is exactly what it was."""
    import shutil

    import pipeline.check.parity as parity
    import pipeline.convert.fuse as fuse
    from conftest import snapshot
    from pipeline.errors import ParityError

    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    before = snapshot(folder)
    monkeypatch.setitem(parity.THRESHOLDS, "fp32", parity.Thresholds(atol=1e-12))
    with pytest.raises(ParityError, match="fp32 fused.*left as it was"):
        fuse.fuse_export(folder, ["fp32"])
    assert snapshot(folder) == before and not list(tmp_path.glob(".export.*"))
    monkeypatch.undo()
    assert fuse.fuse_export(folder, ["fp32"]) == ["onnx/model_gqa.onnx"]  # the real twin passes
    assert OnnxLM(folder, fused="auto", verify=True).fused


@pytest.mark.slow
def test_fuse_killed_midway_leaves_a_folder_that_runs(tiny_export, tmp_path):
    """SIGKILL at several moments of `onnxgen fuse`: the folder is either as it was or fully fused, its
    manifest lists exactly what is there, and `onnxgen run` runs it."""
    import shutil
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT, onnxgen
    from pipeline import manifest

    for delay in (1.5, 3.0, 4.5):
        folder = tmp_path / f"export-{delay}"
        shutil.copytree(tiny_export, folder)
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "fuse", str(folder)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        manifest.verify(folder)
        listed = set(manifest.load(folder)["files"])
        on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} - {"manifest.json"}
        assert listed == on_disk, (delay, listed ^ on_disk)
        out = onnxgen("run", folder, "import os", "--max-new-tokens", "4")
        assert out.stdout.startswith("import os")


def test_run_samples_with_the_exports_generation_config_by_default():
    """As transformers' generate(): do_sample in generation_config.json means sampling with its
    temperature/top-k/top-p; an option the user gives wins; temperature 0 is greedy."""
    defaults = {"do_sample": True, "temperature": 0.8, "top_k": 50, "top_p": 0.95, "repetition_penalty": 1.1}
    c = SamplingConfig.from_defaults(defaults)
    assert (c.temperature, c.top_k, c.top_p, c.repetition_penalty) == (0.8, 50, 0.95, 1.1)
    assert SamplingConfig.from_defaults(defaults, temperature=0).greedy
    assert SamplingConfig.from_defaults(defaults, temperature=0).repetition_penalty == 1.1  # as transformers
    assert SamplingConfig.from_defaults(defaults, top_k=5).top_k == 5
    greedy_file = {"do_sample": False, "temperature": 0.7, "top_k": 50}
    assert SamplingConfig.from_defaults(greedy_file).greedy
    assert not SamplingConfig.from_defaults(greedy_file, top_p=0.9).greedy  # asking for top-p means sampling


def test_fuse_of_an_export_whose_source_is_gone_is_refused_before_any_work(tiny_export, tmp_path):
    """The reference loads only after the graphs are fused (memory), but a missing source is still the user's to
    fix before any work: one line, exit 2, no twin written."""
    import shutil

    out = tmp_path / "moved"
    shutil.copytree(tiny_export, out)
    m = json.loads((out / "manifest.json").read_text())
    m["source"]["checkpoint"] = str(tmp_path / "gone")
    (out / "manifest.json").write_text(json.dumps(m))
    proc = onnxgen("fuse", out, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"its source checkpoint {tmp_path / 'gone'} does not exist" in proc.stderr.strip().splitlines()[-1]
    assert not fused_path(out, "fp32").exists()
