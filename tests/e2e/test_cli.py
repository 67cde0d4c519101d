"""The whole pipeline through the real command line: train -> export -> parity -> run, and its errors."""
import json
import subprocess
import sys

import pytest

from conftest import onnxgen


@pytest.mark.slow
def test_train_export_parity_run(tmp_path, corpus):
    run, out = tmp_path / "run", tmp_path / "export"
    p = onnxgen("train", "--preset", "tiny", "--corpus", corpus, "--out", run, "--steps", "40")
    assert "val ppl" in p.stdout and (run / "checkpoint" / "model.safetensors").is_file()
    p = onnxgen("export", run, "--out", out)
    assert "greedy 64/64 identical" in p.stdout
    p = onnxgen("parity", out)
    assert "| fp32 |" in p.stdout and "pass" in p.stdout and "onnxgen run" in p.stdout  # the table, what next
    assert "# Parity report" in (out / "parity.md").read_text() and not p.stderr.strip()  # quiet
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] is True and report["variants"]["fp32"]["status"] == "pass"
    p = onnxgen("run", out, "import os", "--max-new-tokens", "16", "--temperature", "0")
    assert p.stdout.startswith("import os") and len(p.stdout) > len("import os\n")
    greedy_again = onnxgen("run", out, "import os", "--max-new-tokens", "16", "--temperature", "0").stdout
    assert greedy_again == p.stdout  # greedy is deterministic
    from_stdin = onnxgen("run", out, "-", "--max-new-tokens", "16", "--no-echo", "--temperature", "0",
                         input="import os").stdout
    assert "import os" + from_stdin == p.stdout
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_text("import os")
    assert onnxgen("run", out, "--prompt-file", prompt_file, "--max-new-tokens", "16",
                   "--temperature", "0").stdout == p.stdout
    sampled = onnxgen("run", out, "import os", "--temperature", "0.8", "--top-k", "40", "--top-p", "0.95",
                      "--seed", "3", "--max-new-tokens", "16").stdout
    assert sampled == onnxgen("run", out, "import os", "--temperature", "0.8", "--top-k", "40", "--top-p",
                              "0.95", "--seed", "3", "--max-new-tokens", "16").stdout


def _fails_cleanly(proc, *words):
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.slow
def test_user_errors_are_one_line_exit_2(tmp_path, tiny_export, tiny_run):
    cases = [
        (("train", "--preset", "tiny", "--corpus", tmp_path / "missing", "--out", tmp_path / "r1"), ["missing", "no such file"]),
        (("export", tmp_path / "nope", "--out", tmp_path / "e"), ["nope", "does not exist"]),
        (("export", tiny_run, "--out", tiny_export), ["exists", "--force"]),
        (("run", tiny_export, "x " * 400), ["tokens", "context is 128"]),
        (("run", tiny_export, "x", "--top-p", "1.5"), ["--top-p", "(0, 1]"]),
        (("run", tiny_export, "x", "--top-p", "0"), ["--top-p"]),
        (("run", tiny_export, "x", "--temperature", "-1"), ["--temperature", ">= 0"]),
        (("run", tiny_export, "x", "--top-k", "-5"), ["--top-k", ">= 0"]),
        (("run", tmp_path / "nowhere", "x"), ["nowhere", "does not exist"]),
    ]
    for args, words in cases:
        before = sorted(p.name for p in tmp_path.iterdir())
        _fails_cleanly(onnxgen(*args, check=False), *words)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, args  # nothing written


def test_empty_corpus_leaves_no_run_folder(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    proc = onnxgen("train", "--preset", "tiny", "--corpus", tmp_path / "empty.txt", "--out", tmp_path / "run", check=False)
    _fails_cleanly(proc, "empty")
    assert not (tmp_path / "run").exists()


def test_to_hf_writes_a_folder_transformers_loads(tmp_path, tiny_run):
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from pipeline.train.runs import load_model

    onnxgen("to-hf", tiny_run, "--out", tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tok.encode("import os\nfrom email import message")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, load_model(tiny_run)(ids)[0], atol=1e-5, rtol=1e-5)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary folder left behind
    assert hf.config.eos_token_id == hf.config.bos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")


def test_cli_starts_without_the_heavy_libraries():
    """`onnxgen` imports quantize's choices from its recipe module, and reads a --hf folder before anything
    heavy: the command line itself loads no onnx, NumPy, torch or transformers."""
    code = ("import sys, pipeline.cli; heavy = {'onnx', 'numpy', 'torch', 'transformers', 'onnxruntime'}; "
            "print(sorted(heavy & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
