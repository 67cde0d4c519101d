"""A real model, batch-1 greedy decode: onnxgen's graphs against onnxruntime-genai's model builder.

    python benchmarks/real_model_speed.py --ours exports/smollm2 --genai /tmp/genai-int4 [--rounds 7]
        -> benchmarks/REAL_MODEL.md, benchmarks/real_model.png

Issue 12's measurement: 128 new tokens after a 32-token prompt, greedy, batch 1, at 1 and at 2 threads.
Every engine gets the same prompt ids and generates exactly 128 tokens (no early end-of-text).
Decode rate = (N - 1) / (t(N) - t(1)), as `onnxgen bench` measures it: a 1-token run removes the prefill.
Rounds are interleaved (each round runs every engine once, at each thread count) and medians reported,
so a noisy neighbour slows every engine in its round rather than one engine's whole measurement.

Making the peer, in the project's own venv (the builder needs transformers 5 and onnx-ir: `make install`
brings both):
    python -m onnxruntime_genai.models.builder -i HF_FOLDER -o /tmp/genai-int4 -p int4 -e cpu -c /tmp/cache
Ours: onnxgen export --hf HF_FOLDER --out exports/smollm2; onnxgen quantize exports/smollm2 --variant int4;
onnxgen fuse exports/smollm2.
llama.cpp as a peer (issue 12's longer goal), `--llama-cpp GGUF --llama-python VENV/bin/python`: llama-cpp-python
compiles llama.cpp from its sdist, so it gets a side environment:
    python -m venv /tmp/llama && CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_CURL=OFF" /tmp/llama/bin/pip install llama-cpp-python
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import manifest  # noqa: E402
from pipeline.check.bench import (_onnxgen_loader, _timed, graph_bytes, machine, read_bandwidth,  # noqa: E402
                                  versions)

PROMPT, NEW = 32, 128


def genai_folder_loader(folder: Path, threads: int):
    """onnxruntime-genai on the builder's own folder, its config pointed at `threads`."""
    import onnxruntime_genai as og

    config = json.loads((folder / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    where = Path(tempfile.mkdtemp(prefix="onnxgen-genai-"))
    for f in folder.iterdir():
        if f.name != "genai_config.json":
            (where / f.name).symlink_to(f.resolve())
    (where / "genai_config.json").write_text(json.dumps(config))
    model = og.Model(og.Config(str(where)))

    def gen(ids, n):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + n, min_length=ids.shape[1] + n, batch_size=1,
                                  do_sample=False)
        generator = og.Generator(model, params)
        generator.append_tokens(ids.astype(np.int32))
        while not generator.is_done():
            generator.generate_next_token()
    return gen


# llama.cpp (llama-cpp-python) runs in its own environment, one fresh process per round and thread count: it
# prints the decode rate of the same measurement, (N-1) / (t(N) - t(1)), greedy, after a warm-up.
LLAMA_CPP = """
import json, sys, time
from llama_cpp import Llama
path, threads, ids, new = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
def timed(n):
    t = time.perf_counter()
    for k, _ in enumerate(llm.generate(ids, top_k=1, temp=0.0, reset=True), 1):  # ends at n, eos or not
        if k == n:
            break
    return time.perf_counter() - t
timed(8)
print((new - 1) / (timed(new) - timed(1)))
"""


def llama_cpp_rate(python: str, gguf: Path, threads: int, ids: np.ndarray) -> float:
    import subprocess

    out = subprocess.run([python, "-c", LLAMA_CPP, str(gguf), str(threads), json.dumps(ids[0].tolist()), str(NEW)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def recipe_label(export: Path) -> str:
    """The int4 recipe an export's manifest records, in a few words (head bits, block, 8-bit tensors, scales;
    exports made before fp16 scales record none and hold fp32)."""
    stage = next(s for s in reversed(manifest.load(export)["stages"]) if s.get("stage") == "quantize:int4")
    eight = "+".join(stage.get("eight_bit") or []) or "none"
    head_block = stage.get("lm_head_block", stage["block_size"])
    preset = f"--recipe {stage['preset']}: " if stage.get("preset", "default") != "default" else ""
    return (f"{preset}{stage['lm_head']} head ({stage.get('lm_head_method', 'rtn')}, block {head_block}), block "
            f"{stage['block_size']}, 8-bit {eight}, {stage.get('scales', 'fp32')} scales")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ours", type=Path, required=True, help="an onnxgen export with int4 and its fused twin")
    ap.add_argument("--genai", type=Path, required=True, help="onnxruntime-genai builder output (int4)")
    ap.add_argument("--also", type=Path, action="append", default=[],
                    help="another onnxgen export of the same model (another int4 recipe): its fused int4 is "
                         "measured too, named by its recipe")
    ap.add_argument("--llama-cpp", type=Path, action="append", default=[], metavar="GGUF",
                    help="a GGUF of the same model, run by llama.cpp (llama-cpp-python) as a peer")
    ap.add_argument("--llama-python", default="python",
                    help="the Python that has llama-cpp-python (a side environment: it compiles llama.cpp)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("REAL_MODEL.md"))
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    size = graph_bytes
    fused, plain = args.ours / "onnx/model_q4_gqa.onnx", args.ours / "onnx/model_q4.onnx"
    engines = {  # onnxgen as `onnxgen run` runs it (threads spinning), and not spinning (as `onnxgen serve` does)
        "onnxgen int4, fused (GroupQueryAttention, shared buffer)": (
            lambda t: _onnxgen_loader(args.ours, "int4", True, t), size(fused)),
        "onnxgen int4, fused, threads not spinning": (
            lambda t: _onnxgen_loader(args.ours, "int4", True, t, spin=False), size(fused)),
        "onnxgen int4, plain graph": (
            lambda t: _onnxgen_loader(args.ours, "int4", False, t), size(plain)),
    }
    for extra in args.also:
        engines[f"onnxgen int4, fused, {recipe_label(extra)}"] = (
            lambda t, e=extra: _onnxgen_loader(e, "int4", True, t), size(extra / "onnx/model_q4_gqa.onnx"))
    engines["onnxruntime-genai builder int4"] = (
        lambda t: genai_folder_loader(args.genai, t), size(args.genai / "model.onnx"))
    vocab = json.loads((args.ours / "config.json").read_text())["vocab_size"]
    ids = np.random.default_rng(0).integers(100, vocab - 100, (1, PROMPT))
    loaded = {(name, t): load(t) for name, (load, _) in engines.items() for t in threads}
    for gen in loaded.values():  # warm-up: first-run allocations and kernel selection
        gen(ids, 8)
    llama = {f"llama.cpp {g.stem.rsplit('.', 1)[-1]} (llama-cpp-python)": g for g in args.llama_cpp}
    for name, gguf in llama.items():
        engines[name] = (None, gguf.stat().st_size)
    rates: dict = {k: [] for k in [*loaded, *((name, t) for name in llama for t in threads)]}
    bandwidth: dict = {t: [] for t in threads}
    for r in range(args.rounds):
        for t in threads:
            bandwidth[t].append(read_bandwidth(t) / 1e9)  # GB/s
        for key, gen in loaded.items():
            one, full = _timed(gen, ids, 1), _timed(gen, ids, NEW)
            rates[key].append((NEW - 1) / (full - one))
        for name, gguf in llama.items():
            for t in threads:
                rates[(name, t)].append(llama_cpp_rate(args.llama_python, gguf, t, ids))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in rates.items()}
    bw = {t: statistics.median(v) for t, v in bandwidth.items()}
    peer = "onnxruntime-genai builder int4"
    lines = [f"# {args.ours.name}: batch-1 greedy decode, onnxgen vs onnxruntime-genai's builder", "",
             f"Machine: {machine()}. Versions: {', '.join(f'{k} {v}' for k, v in versions().items())}.",
             f"{PROMPT}-token prompt, {NEW} new tokens, greedy, batch 1; {args.rounds} interleaved rounds, medians; "
             "decode tok/s = (N-1) / (t(N) - t(1)).", "",
             "| engine | file MB | " + " | ".join(f"{t} thread{'s' * (t > 1)} tok/s | vs genai" for t in threads) + " |",
             "|---|---|" + "---|---|" * len(threads)]
    for name, (_, nbytes) in engines.items():
        cells = " | ".join(f"{med[(name, t)]:.1f} | {med[(name, t)] / med[(peer, t)]:.2f}x" for t in threads)
        lines.append(f"| {name} | {nbytes / 1e6:.1f} | {cells} |")
    lines += ["", "**Against the memory-bandwidth limit.** A batch-1 step reads every weight once (a tied head reads "
              "the whole table), so the limit is read bandwidth over the graph's bytes. Read bandwidth, measured in "
              "each round (check/bench.py's read_bandwidth: np.sum over 512 MiB, one slice per thread, best of 5; "
              "median of rounds): "
              + ", ".join(f"{bw[t]:.1f} GB/s at {t} thread{'s' * (t > 1)}" for t in threads) + ".", "",
              "| engine | " + " | ".join(f"{t} thread{'s' * (t > 1)}: limit tok/s | reached" for t in threads) + " |",
              "|---|" + "---|---|" * len(threads)]
    for name, (_, nbytes) in engines.items():
        cells = " | ".join(f"{bw[t] * 1e9 / nbytes:.0f} | {med[(name, t)] / (bw[t] * 1e9 / nbytes):.0%}"
                           for t in threads)
        lines.append(f"| {name} | {cells} |")
    lines += ["", "Per-round rates (tok/s):", ""]
    for key, v in rates.items():
        lines.append(f"- {key[0]}, {key[1]} thread(s): {', '.join(f'{x:.1f}' for x in v)}")
    args.out.write_text("\n".join(lines) + "\n")
    _chart(engines, threads, med, args.out.with_suffix(".png").with_name("real_model.png"), args.ours.name)
    print("\n".join(lines[:8 + len(engines)]))


def _chart(engines, threads, med, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    width = 0.8 / len(engines)
    for i, name in enumerate(engines):
        xs = [j + i * width for j in range(len(threads))]
        ax.bar(xs, [med[(name, t)] for t in threads], width, label=name)
    ax.set_xticks([j + width * (len(engines) - 1) / 2 for j in range(len(threads))])
    ax.set_xticklabels([f"{t} thread{'s' * (t > 1)}" for t in threads])
    ax.set_ylabel("decode tok/s (median)")
    ax.set_title(f"{title}: batch-1 greedy decode, int4")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
