"""The catalogue of bad inputs (README.md, "Errors"): each one runs the real CLI and checks
exit code 2, exactly one line on stderr that names the input and says what was expected, no
traceback, and that no file was written or changed (paths, sizes, mtimes and contents)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from conftest import ROOT, assert_user_error, onnxgen, snapshot

from pipeline import manifest


# ----------------------------------------------------------------------------- export folders to spoil

def copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, copy_function=shutil.copy2)
    return dst


def externalize(folder: Path) -> Path:
    """Move the fp32 graph's weights to onnx/model.onnx_data, as big models are shipped; re-record the manifest."""
    path = folder / "onnx" / "model.onnx"
    model = onnx.load(str(path))
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx_data", size_threshold=0)
    manifest.record(folder, "test", ["onnx/model.onnx", "onnx/model.onnx_data"])
    return folder


def set_location(folder: Path, location: str) -> None:
    """Point every external tensor at `location`, and re-record the manifest as a forger would."""
    path = folder / "onnx" / "model.onnx"
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    path.write_bytes(model.SerializeToString())
    manifest.record(folder, "test", ["onnx/model.onnx"])


def corrupt(path: Path) -> None:
    """Garbage over the protobuf's first fields (garbage inside a weight would still parse: that is
    what the manifest's sha256 is for)."""
    data = bytearray(path.read_bytes())
    data[:64] = b"\xff" * 64
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def bigger_tokenizer(folder: Path) -> None:
    """A tokenizer with 100 more tokens than the model has logits for, recorded in the manifest."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_tokens([f"<extra_{i}>" for i in range(100)])
    tok.save(str(folder / "tokenizer.json"))
    manifest.record(folder, "test", ["tokenizer.json"])


def edit_json(folder: Path, name: str, **changes) -> None:
    """Change a config file and re-record the manifest: a folder that is consistent but wrong."""
    path = folder / name
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    manifest.record(folder, "test", [name])


@pytest.fixture(scope="module")
def external_export(tiny_export, tmp_path_factory) -> Path:
    return externalize(copy_export(tiny_export, tmp_path_factory.mktemp("ext") / "ext"))


# (id, external weights?, how to spoil the folder, extra CLI args, words the error line must hold)
RUN_CASES = [
    ("corrupt-onnx", False, lambda f: corrupt(f / "onnx/model.onnx"), [], ["model.onnx", "sha256 does not match"]),
    ("corrupt-onnx-unverified", False, lambda f: corrupt(f / "onnx/model.onnx"), ["--unsafe-skip-verify"],
     ["model.onnx", "ONNX"]),
    ("truncated-onnx", False, lambda f: truncate(f / "onnx/model.onnx"), [], ["model.onnx", "sha256 does not match"]),
    ("truncated-onnx-unverified", False, lambda f: truncate(f / "onnx/model.onnx"), ["--unsafe-skip-verify"],
     ["model.onnx", "ONNX"]),
    ("missing-external-data", True, lambda f: (f / "onnx/model.onnx_data").unlink(), [],
     ["model.onnx_data", "does not exist"]),
    ("missing-external-data-unverified", True, lambda f: (f / "onnx/model.onnx_data").unlink(),
     ["--unsafe-skip-verify"], ["model.onnx_data", "does not exist"]),
    ("truncated-external-data", True, lambda f: truncate(f / "onnx/model.onnx_data"), [],
     ["model.onnx_data", "truncated"]),
    ("truncated-external-data-unverified", True, lambda f: truncate(f / "onnx/model.onnx_data"),
     ["--unsafe-skip-verify"], ["model.onnx_data", "truncated"]),
    ("external-data-dotdot", True, lambda f: set_location(f, "../../outside.bin"), [],
     ["../../outside.bin", "inside the export folder"]),
    ("external-data-dotdot-unverified", True, lambda f: set_location(f, "../../outside.bin"),
     ["--unsafe-skip-verify"], ["../../outside.bin", "inside the export folder"]),
    ("external-data-absolute", True, lambda f: set_location(f, str(f.parent / "outside.bin")),
     ["--unsafe-skip-verify"], ["outside.bin", "not absolute"]),
    ("external-data-symlink-out", True,
     lambda f: ((f / "onnx/model.onnx_data").unlink(), (f / "onnx/model.onnx_data").symlink_to(f.parent / "outside.bin")),
     ["--unsafe-skip-verify"], ["model.onnx_data", "outside the export folder"]),
    ("manifest-mismatch", False, lambda f: (f / "tokenizer.json").write_text((f / "tokenizer.json").read_text() + " "),
     [], ["tokenizer.json", "sha256 does not match"]),
    ("manifest-missing", False, lambda f: (f / "manifest.json").unlink(), [], ["manifest", "--unsafe-skip-verify"]),
    ("manifest-not-json", False, lambda f: (f / "manifest.json").write_text("{"), [], ["manifest", "not valid JSON"]),
    ("missing-tokenizer", False, lambda f: (f / "tokenizer.json").unlink(), [], ["tokenizer.json", "does not exist"]),
    ("missing-config", False, lambda f: (f / "config.json").unlink(), [], ["config.json", "does not exist"]),
    ("tokenizer-vocab-mismatch", False, bigger_tokenizer, [], ["tokenizer.json", "612 tokens", "vocab_size 512"]),
    ("config-zero-context", False, lambda f: edit_json(f, "config.json", n_positions=0), [],
     ["config.json", "positive integer context length"]),
    ("config-text-context", False, lambda f: edit_json(f, "config.json", n_positions="128"), [],
     ["config.json", "positive integer context length"]),
    ("config-vocab-not-the-graphs", False, lambda f: edit_json(f, "config.json", vocab_size=1000), [],
     ["config.json", "vocab_size 1000", "logits have 512"]),
    ("config-not-json", False, lambda f: (f / "config.json").write_text("{"), ["--unsafe-skip-verify"],
     ["config.json", "not valid JSON"]),
    ("eos-outside-vocab", False, lambda f: edit_json(f, "generation_config.json", eos_token_id=99999), [],
     ["generation_config.json", "eos_token_id 99999", "[0, 512)"]),
]


def onnxgen_in_process(*args) -> subprocess.CompletedProcess:
    """The same CLI through click's runner: for cases where a subprocess would only add its start-up
    (a second for `run`, ~3 s with torch). A crash shows as exit 1 with the exception, not as exit 2."""
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


# Options only: no file is involved, so in-process.
OPTION_CASES = [
    ("variant-unknown", ["--variant", "int9"], ["--variant int9", "fp32, fp16, int8, int4"]),
    ("variant-absent", ["--variant", "int4"], ["--variant int4", "model_q4.onnx", "does not exist"]),
    ("temperature-negative", ["--temperature", "-1"], ["--temperature -1", ">= 0"]),
    ("temperature-nan", ["--temperature", "nan"], ["--temperature nan", ">= 0"]),
    ("top-p-zero", ["--top-p", "0"], ["--top-p 0", "(0, 1]"]),
    ("top-p-above-one", ["--top-p", "1.5"], ["--top-p 1.5", "(0, 1]"]),
    ("top-k-negative", ["--top-k", "-1"], ["--top-k -1", ">= 0"]),
    ("top-k-not-int", ["--top-k", "abc"], ["--top-k", "not a valid integer"]),
    ("seed-negative", ["--seed", "-1", "--temperature", "1"], ["--seed -1", ">= 0"]),
    ("max-new-tokens-zero", ["--max-new-tokens", "0"], ["--max-new-tokens", "x>=1"]),
    ("threads-negative", ["--threads", "-2"], ["--threads", "x>=0"]),
]


@pytest.mark.parametrize("case", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_run_rejects_bad_option(case, tiny_export):
    _, args, words = case
    before = snapshot(tiny_export)
    assert_user_error(onnxgen_in_process("run", tiny_export, "def f(", "--max-new-tokens", "4", *args), *words)
    assert snapshot(tiny_export) == before


@pytest.mark.parametrize("case", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_rejects_bad_export_folder(case, tiny_export, external_export, tmp_path):
    _, external, spoil, args, words = case
    folder = copy_export(external_export if external else tiny_export, tmp_path / "exp")
    (tmp_path / "outside.bin").write_bytes((folder / "onnx" / "model.onnx").read_bytes())  # bait for escapes
    if spoil:
        spoil(folder)
    before = snapshot(tmp_path)
    proc = onnxgen("run", folder, "def f(", "--max-new-tokens", "4", *args, check=False)
    assert_user_error(proc, *words)
    assert snapshot(tmp_path) == before


def test_run_accepts_external_data_inside_the_folder(external_export):
    """The checks above must not reject what a well-formed big-model export looks like."""
    proc = onnxgen("run", external_export, "def f(", "--max-new-tokens", "4", check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("def f(")


def test_run_rejects_prompts_and_places_that_cannot_work(tiny_export, tmp_path):
    from pipeline.tokenizer import load_tokenizer

    n_ctx = json.loads((tiny_export / "config.json").read_text())["n_positions"]
    tok = load_tokenizer(tiny_export)
    long_prompt = "import os\n" * n_ctx
    n = len(tok.encode(long_prompt, add_special_tokens=False).ids)
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00\x81 binary")
    before = snapshot(tiny_export, tmp_path)
    cases = [
        (["run", tiny_export, long_prompt], ["prompt", f"{n} tokens", f"context is {n_ctx}"]),
        (["run", tiny_export, "--prompt-file", tmp_path / "binary.txt"], ["--prompt-file", "binary.txt", "not UTF-8"]),
        (["run", tiny_export, os.fsdecode(b"caf\xe9")], ["prompt", "not UTF-8"]),   # Latin-1 bytes in argv
        (["run", tmp_path / "nowhere", "x"], ["nowhere", "does not exist"]),
    ]
    for args, words in cases:
        assert_user_error(onnxgen(*args, "--max-new-tokens", "2", check=False), *words)
    # bytes that are not UTF-8 on stdin (onnxgen() sends text, so this one goes by hand)
    stdin = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(tiny_export), "-"], input=b"\xff\xfeabc",
                           capture_output=True, cwd=ROOT)
    stdin.stderr = stdin.stderr.decode("utf-8", "replace")
    assert_user_error(stdin, "prompt", "not UTF-8")
    assert snapshot(tiny_export, tmp_path) == before


def test_device_cuda_without_a_gpu(tiny_export):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the case is a machine without it")
    before = snapshot(tiny_export)
    proc = onnxgen("run", tiny_export, "x", "--device", "cuda", check=False)
    assert_user_error(proc, "--device cuda", "CUDAExecutionProvider", "onnxruntime-gpu")
    assert snapshot(tiny_export) == before


# ----------------------------------------------------------------------------- training and export inputs

def test_train_rejects_bad_corpus_and_impossible_configs(tiny_run, tmp_path):
    """The first case runs the real command; the others go in-process (each subprocess would load
    torch again, ~3 s). Each still checks its own one line."""
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binary.bin").write_bytes(os.urandom(20000))
    (tmp_path / "heads.json").write_text(json.dumps({"model": {"n_ctx": 64, "n_layer": 1, "n_head": 3, "n_embd": 64}}))
    (tmp_path / "block.json").write_text(json.dumps({"model": {"n_ctx": 32, "n_layer": 1, "n_head": 2, "n_embd": 64},
                                                     "train": {"block_size": 64}}))
    run = shutil.copytree(tiny_run, tmp_path / "run", copy_function=shutil.copy2)  # an existing run to keep
    (tmp_path / "empty_out").mkdir()
    before = snapshot(tmp_path)
    cases = [
        (["--preset", "tiny", "--corpus", tmp_path / "empty.txt", "--out", tmp_path / "a"], ["corpus", "empty.txt", "empty"]),
        (["--preset", "tiny", "--corpus", tmp_path / "binary.bin", "--out", tmp_path / "empty_out"],
         ["corpus", "binary.bin", "not UTF-8", "expected text"]),
        (["--preset", tmp_path / "heads.json", "--out", tmp_path / "a"], ["n_embd (64) must be divisible by n_head (3)"]),
        (["--preset", tmp_path / "block.json", "--out", tmp_path / "a"], ["block_size 64", "n_ctx 32"]),
        (["--preset", "tiny", "--lr", "nan", "--out", tmp_path / "a"], ["lr", "finite number"]),
        (["--preset", "tiny", "--steps", "0", "--out", tmp_path / "a"], ["steps must be positive"]),
        (["--preset", "tiny", "--vocab-size", "100", "--corpus", tmp_path / "empty.txt", "--out", tmp_path / "a"],
         ["vocab_size 100", "257"]),
        # --force must not cost the run it would replace when the new one cannot even start
        (["--preset", "tiny", "--corpus", tmp_path / "no-such-dir", "--out", run, "--force"], ["corpus", "no-such-dir"]),
        (["--preset", "nope", "--out", run, "--force"], ["preset nope", "not found"]),
    ]
    assert_user_error(onnxgen("-q", "train", *cases[0][0], check=False), *cases[0][1])  # -q: no progress lines
    for args, words in cases[1:]:
        assert_user_error(onnxgen_in_process("train", *args), *words)
    assert snapshot(tmp_path) == before


def test_checkpoint_from_another_architecture(tiny_run, tmp_path):
    """A run folder whose weights were trained with other sizes: export and --resume both refuse it."""
    from safetensors.torch import save_file

    from pipeline.model.gpt import GPT, GPTConfig

    run = shutil.copytree(tiny_run, tmp_path / "run", copy_function=shutil.copy2)
    other = GPT(GPTConfig(vocab_size=512, n_ctx=128, n_layer=2, n_head=2, n_embd=32))
    weights = {k: v.contiguous() for k, v in other.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, run / "checkpoint" / "model.safetensors")
    before = snapshot(tmp_path)
    proc = onnxgen("-q", "export", run, "--out", tmp_path / "exp", check=False)
    assert_user_error(proc, "model.safetensors", "does not match its config.json")
    proc = onnxgen_in_process("train", "--out", run, "--resume")
    assert_user_error(proc, "model.safetensors", "does not match its config.json")
    assert snapshot(tmp_path) == before
    (run / "checkpoint" / "model.safetensors").write_bytes(b"\x80\x04 not a safetensors file (a pickle?)")
    before = snapshot(tmp_path)
    proc = onnxgen_in_process("export", run, "--out", tmp_path / "exp")
    assert_user_error(proc, "model.safetensors", "not a readable safetensors file")
    assert snapshot(tmp_path) == before


def test_weights_load_only_from_safetensors_or_weights_only():
    """Pickle runs code: no torch.load without weights_only=True, no pickle, no allow_pickle anywhere."""
    import ast

    src = ROOT / "pipeline"
    offenders = []
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n in ("pickle", "dill", "cloudpickle", "joblib") for n in names):
                    offenders.append(f"{path.name}:{node.lineno} imports pickle")
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            kwargs = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name.endswith("torch.load") or name == "load" and "weights_only" in kwargs:
                if kwargs.get("weights_only") != "True":
                    offenders.append(f"{path.name}:{node.lineno} {name} without weights_only=True")
            if kwargs.get("allow_pickle") == "True" or kwargs.get("trust_remote_code") == "True":
                offenders.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    assert not offenders, offenders


def test_preflight_checks_the_graph_file_that_will_be_opened(tiny_export, tmp_path):
    """A runtime that opens another file than the variant's own (a fused twin) passes it as `path`."""
    from pipeline.errors import UserError
    from pipeline.preflight import preflight

    folder = copy_export(tiny_export, tmp_path / "exp")
    preflight(folder, "fp32", verify=True, path=folder / "onnx" / "model.onnx")
    shutil.copy(folder / "onnx" / "model.onnx", tmp_path / "model.onnx")
    with pytest.raises(UserError, match="outside the export folder"):
        preflight(folder, "fp32", verify=False, path=tmp_path / "model.onnx")
    shutil.copy(folder / "onnx" / "model.onnx", folder / "onnx" / "model_twin.onnx")
    with pytest.raises(UserError, match="model_twin.onnx: not listed in the manifest"):
        preflight(folder, "fp32", verify=True, path=folder / "onnx" / "model_twin.onnx")
    manifest.record(folder, "test", ["onnx/model_twin.onnx"])
    preflight(folder, "fp32", verify=True, path=folder / "onnx" / "model_twin.onnx")


def test_output_that_cannot_be_written(tiny_export):
    """Not bad input but a bad place to write: a full disk is one line (exit 1); a reader that went
    away (`| head`) ends the run quietly, as Unix tools do (exit 141 = 128 + SIGPIPE)."""
    root = ROOT
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(tiny_export), "import os", "--max-new-tokens", "50"]
    with open("/dev/full", "w") as full:
        proc = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, cwd=root)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: output: No space left on device"]
    reader_gone = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root)
    reader_gone.stdout.close()
    assert reader_gone.wait() == 141
    assert reader_gone.stderr.read() == ""


def test_preflight_takes_a_list_of_eos_ids_inside_the_vocabulary(tiny_export, tmp_path):
    """Some models (Llama 3, Qwen2.5) list several eos ids; each must be a token of the model."""
    from pipeline.errors import UserError
    from pipeline.preflight import preflight

    folder = copy_export(tiny_export, tmp_path / "exp")
    edit_json(folder, "generation_config.json", eos_token_id=[7, 0])
    preflight(folder, "fp32", verify=True)
    edit_json(folder, "generation_config.json", eos_token_id=[7, 512])
    with pytest.raises(UserError, match=r"eos_token_id \[7, 512\]"):
        preflight(folder, "fp32", verify=True)


def test_an_export_that_cannot_fit_in_memory_is_refused_before_it_starts(hf_models, tmp_path, monkeypatch):
    """export --hf estimates its peak from the folder's fp32 weights (safetensors headers) and refuses, in one
    line naming the estimate and what is free, a model that would not fit, before anything heavy runs."""
    from pipeline import preflight

    monkeypatch.setattr(preflight, "EXPORT_PEAK", (1e9, 0.0))  # as if the tiny model were a giant one
    out = tmp_path / "out"
    line = assert_user_error(onnxgen_in_process("export", "--hf", hf_models["llama"], "--out", out),
                             "needs about", "GB of memory", "free", "--no-memory-check")
    assert "fp32 weights" in line and not out.exists()


@pytest.mark.parametrize("stage", ["quantize", "fuse", "parity"])
def test_a_stage_that_cannot_fit_in_memory_is_refused_before_it_starts(tiny_export, stage, monkeypatch):
    """quantize, fuse and parity estimate their peak from the fp32 graph's bytes and refuse, in one line, an
    export that would not fit, before any work (the export is left as it was); --no-memory-check goes on."""
    from pipeline import preflight

    before = snapshot(tiny_export)
    monkeypatch.setattr(preflight, "EXPORT_PEAK", (1e9, 0.0))
    line = assert_user_error(onnxgen_in_process(stage, tiny_export), "needs about", "GB of memory", "free",
                             "--no-memory-check")
    assert line.startswith(f"error: {stage} ") and "fp32 graph" in line
    assert snapshot(tiny_export) == before
    # let through, the stage goes on to its own checks (a variant that is not there, refused before any work)
    line = assert_user_error(onnxgen_in_process(stage, tiny_export, "--no-memory-check", "--variant", "int2"),
                             "int2")
    assert "memory" not in line and snapshot(tiny_export) == before


def test_the_memory_estimate_covers_every_peak_measured():
    """The refusals stand on an estimate: it must be at least every export, quantize, fuse and parity peak
    benchmarks/memory.py measured (an import under 2 GiB and one past it), or it would let through a model that
    then gets killed. quantize, fuse and parity take it over the fp32 graph's bytes, never fewer than the
    weights' (check_stage_memory), so holding it over the weights holds theirs."""
    from pipeline.preflight import export_peak

    rows = [r for r in json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "MEMORY.json").read_text())
            if r["stage"] != "run" and r["status"] == 0 and r["weights"]]
    assert {r["weights"] >= 1 << 31 for r in rows if r["stage"] == "export"} == {False, True}, "both regimes"
    assert {r["stage"] for r in rows} == {"export", "quantize", "fuse", "parity"}
    for r in rows:
        assert export_peak(r["weights"]) >= r["peak"], (r["model"], r["stage"])
