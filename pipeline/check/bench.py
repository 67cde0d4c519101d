"""`onnxgen bench`: generation speed of onnxgen's variants against PyTorch eager, Optimum's
ORTModelForCausalLM and onnxruntime-genai, on the same export, threads and token ids.

    onnxgen bench exports/default --rounds 5      # -> benchmarks/RESULTS.md, benchmarks/results.png

Every engine generates exactly N new tokens greedily (no early eos) from the same random prompt ids.
Decode rate = B * (N - 1) / (t(N) - t(1)): subtracting a one-token run removes the prefill, the same
way for every engine, including those whose generate() cannot be timed per step. Rounds are
interleaved (round r runs every engine once) and the median is reported, so a noisy neighbour on a
shared CPU slows every engine in that round rather than one engine's whole measurement.
Peak RSS is each engine alone in a fresh child process (load + batch 1 and batch 16 generation).
The memory-bandwidth limit is weight bytes read per decode step / measured read bandwidth.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np

from pipeline import manifest
from pipeline.check.sources import open_source
from pipeline.errors import UserError
from pipeline.exports import (GENAI_CONFIG, VARIANTS, fused_path, generation_ids, read_config, read_graph_only,
                              read_json)
from pipeline.run.lm import OnnxLM

log = logging.getLogger(__name__)

PREFILL = 256


@dataclass
class Engine:
    name: str      # who runs it
    variant: str   # which graph
    kind: str      # torch, optimum, genai, onnxgen
    file: str = ""   # the ONNX file under onnx/ (empty for torch)
    fused: bool = False
    spin: bool | None = None  # onnxgen only: None spins as `onnxgen run` does, False as `onnxgen serve` does


@dataclass
class Row:
    engine: Engine
    decode: dict = field(default_factory=dict)   # batch -> [tok/s per round]
    prefill: list = field(default_factory=list)  # seconds per round
    rss_mb: float = float("nan")
    error: str = ""


# ---------------------------------------------------------------------------------------- engines
# Each loader returns gen(ids (B, T) int64, n): generate exactly n new tokens greedily.

def _torch_loader(folder: Path, threads: int):
    """The export's own PyTorch source (an onnxgen run or a transformers folder), through the graph contract."""
    import torch

    checkpoint = (manifest.load(folder).get("source") or {}).get("checkpoint")
    if not checkpoint or not Path(checkpoint).is_dir():
        raise UserError(f"export {folder}: its source checkpoint ({checkpoint}) is not on this machine")
    if threads:
        torch.set_num_threads(threads)
    source = open_source(folder, Path(checkpoint), n_windows=1, length=2)

    @torch.inference_mode()
    def gen(ids, n):
        x = torch.from_numpy(ids)
        B, T = x.shape
        mask = torch.ones(B, T, dtype=torch.int64)
        pos = torch.arange(T).repeat(B, 1)
        past = [torch.from_numpy(p) for p in source.empty_past(B)]
        logits, past = source.reference(x, mask, pos, past)
        for _ in range(n - 1):
            x = logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.int64)], 1)
            pos = pos[:, -1:] + 1
            logits, past = source.reference(x, mask, pos, past)
    return gen


def _optimum_loader(folder: Path, file: str, threads: int):
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(folder, subfolder="onnx", file_name=file, use_cache=True,
                                                session_options=options, provider="CPUExecutionProvider")
    pad = model.config.pad_token_id

    def gen(ids, n):
        x = torch.from_numpy(ids)
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=pad)
    return gen


def genai_config(folder: Path, file: str, shared_buffer: bool, threads: int) -> dict:
    """The export's own genai_config.json (convert/genai.py wrote it), pointed at one graph of the export."""
    config = read_json(folder / GENAI_CONFIG, "genai config")
    decoder = config["model"]["decoder"]
    decoder["filename"] = f"onnx/{file}"
    if threads:
        decoder["session_options"]["intra_op_num_threads"] = threads
    config["search"]["past_present_share_buffer"] = shared_buffer
    return config


def _genai_loader(folder: Path, file: str, fused: bool, threads: int):
    import onnxruntime_genai as og

    # a config per graph and thread count, beside the export's onnx/ (a link, no copy): the export's own
    # genai_config.json (issue 5) describes only its default variant
    where = Path(tempfile.mkdtemp(prefix="onnxgen-genai-"))
    (where / "onnx").symlink_to((folder / "onnx").resolve())
    (where / "genai_config.json").write_text(json.dumps(genai_config(folder, file, fused, threads)))
    model = og.Model(og.Config(str(where)))

    def gen(ids, n):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=ids.shape[1] + n, min_length=ids.shape[1] + n, batch_size=ids.shape[0],
                                  do_sample=False)  # greedy, as onnxgen here (the export may sample by default)
        generator = og.Generator(model, params)
        generator.append_tokens(ids.astype(np.int32))
        while not generator.is_done():
            generator.generate_next_token()
    return gen


def _onnxgen_loader(folder: Path, variant: str, fused: bool, threads: int, spin: bool | None = None):
    lm = OnnxLM(folder, variant, threads=threads, fused=fused, spin=spin)

    def gen(ids, n):
        for _ in lm.generate(ids.tolist(), n, stop_at_eos=False):
            pass
    return gen


def load_engine(e: Engine, folder: Path, threads: int):
    if e.kind == "torch":
        return _torch_loader(folder, threads)
    if e.kind == "optimum":
        return _optimum_loader(folder, e.file, threads)
    if e.kind == "genai":
        return _genai_loader(folder, e.file, e.fused, threads)
    return _onnxgen_loader(folder, e.variant, e.fused, threads, e.spin)


def engines_for(folder: Path, kinds: list[str] | None = None) -> list[Engine]:
    """The engines to compare; by default every one whose package is installed (optimum, in the hf extra,
    needs transformers < 4.58, so a transformers 5 environment has no Optimum peer). Engines asked for by
    name must exist and be installed."""
    known = ["torch", "optimum", "genai", "onnxgen"]
    asked = kinds is not None
    kinds = list(known) if kinds is None else kinds
    if not kinds:
        raise UserError(f"--engines: no engine named; expected some of {', '.join(known)}, comma-separated")
    for kind in kinds:
        if kind not in known:
            raise UserError(f"--engines {','.join(kinds)}: unknown engine {kind!r}; expected some of {', '.join(known)}")
    for kind, module, extra in (("optimum", "optimum.onnxruntime", "hf"), ("genai", "onnxruntime_genai", "bench")):
        if kind not in kinds:
            continue
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # its parent package is absent
            found = False
        if not found and asked:
            raise UserError(f"--engines {kind}: {module} is not installed (pip install -e '.[{extra}]')")
        if not found:
            log.warning("bench: %s is not installed; its engine is left out", module)
            kinds.remove(kind)
    have = [v for v in ("fp32", "int8", "int4") if (folder / "onnx" / VARIANTS[v]).is_file()]
    fused = [v for v in have if fused_path(folder, v).is_file()]
    out = []
    if "torch" in kinds:
        out.append(Engine("PyTorch eager (KV cache)", "fp32", "torch"))
    if "optimum" in kinds:
        out += [Engine("Optimum ORTModelForCausalLM", v, "optimum", VARIANTS[v]) for v in have if v != "int8"]
    if "genai" in kinds:
        out += [Engine("onnxruntime-genai", v, "genai", VARIANTS[v]) for v in have if v != "int8"]
        out += [Engine("onnxruntime-genai, fused graph", v, "genai", fused_path(folder, v).name, True)
                for v in fused if v == "int4"]
    if "onnxgen" in kinds:
        out += [Engine("onnxgen, plain graph", v, "onnxgen", VARIANTS[v]) for v in have]
        out += [Engine("onnxgen, fused graph", v, "onnxgen", fused_path(folder, v).name, True) for v in fused]
        # the same graph as `onnxgen serve` runs it: idle threads sleep (run/lm.py's make_session says why)
        out += [Engine("onnxgen, fused graph, threads not spinning", v, "onnxgen", fused_path(folder, v).name, True,
                       spin=False) for v in fused if v == "int4"]
    if not out:  # nothing to measure: the report is not rewritten
        raise UserError(f"export {folder}: no engine to measure ({', '.join(kinds)} run none of its graphs under onnx/: "
                        f"{', '.join(have) or 'no fp32, int8 or int4'})")
    return out


# ---------------------------------------------------------------------------------------- measuring
def _timed(gen, ids, n) -> float:
    t = time.perf_counter()
    gen(ids, n)
    return time.perf_counter() - t


def _rss_child(e: Engine, folder: str, threads: int, prompt: np.ndarray, batches: list[int], n: int, queue) -> None:
    try:
        gen = load_engine(e, Path(folder), threads)
        for b in batches:
            gen(np.repeat(prompt, b, 0), n)
        # VmHWM, not getrusage's ru_maxrss: the latter survives exec and would report the parent's peak
        hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        queue.put(int(hwm.split()[1]) / 1024)  # kB -> MiB
    except Exception as ex:  # reported in the table, not fatal
        queue.put(f"{type(ex).__name__}: {ex}")


def peak_rss(e: Engine, folder: Path, threads: int, prompt, batches, n) -> float | str:
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: nothing of the other engines
    queue = ctx.Queue()
    p = ctx.Process(target=_rss_child, args=(e, str(folder), threads, prompt, batches, n, queue))
    p.start()
    try:
        return queue.get(timeout=600)
    finally:
        p.join(timeout=10)


def read_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Bytes/s that `threads` threads reach summing a buffer much larger than any cache (best of repeats)."""
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or os.cpu_count() or 1
    data = np.ones(mib * (1 << 20) // 8, dtype=np.float64)
    chunks = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:  # numpy's sum releases the GIL on large arrays
        for _ in range(repeats):
            t = time.perf_counter()
            list(pool.map(np.sum, chunks))
            best = max(best, data.nbytes / (time.perf_counter() - t))
    return best


def graph_bytes(path: Path) -> int:
    """An ONNX file's size with its external data."""
    return sum(f.stat().st_size for f in path.parent.glob(path.name + "*"))


def weight_bytes_per_step(path: Path) -> int:
    """Initializer bytes a decode step reads: all of them except tables read one row at a time (Gather)."""
    import onnx

    model = read_graph_only(path)
    readers: dict[str, set] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            readers.setdefault(name, set()).add((node.op_type, i))
    total = 0
    for t in model.graph.initializer:
        if readers.get(t.name, set()) <= {("Gather", 0)} and t.name in readers:
            continue  # an embedding table: one row per token
        size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize * int(np.prod(t.dims))
        total += size
    return total


def versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("onnxruntime", "onnxruntime-gpu", "onnxruntime-genai", "optimum", "optimum-onnx", "torch",
                 "transformers", "numpy", "onnx"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def machine() -> str:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import psutil

    return (f"{model}, {os.cpu_count()} logical cores, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}")


def bench(folder: str | Path, out: str | Path = "benchmarks/RESULTS.md", rounds: int = 5, tokens: int = 128,
          threads: int = 0, batches: list[int] | None = None, engines: list[str] | None = None,
          rss: bool = True, title: str | None = None, chart: str | Path | None = None,
          prefill: int = PREFILL) -> dict:
    """Measure, then write `out` (markdown) and a PNG chart beside it. Returns the numbers."""
    from tqdm import tqdm

    folder, out = Path(folder), Path(out)
    if not (folder / "config.json").is_file():
        raise UserError(f"export {folder}: no config.json (not an export folder)")
    batches = batches or [1, 16]
    shape = read_config(folder)
    rng = np.random.default_rng(0)
    eos = generation_ids(folder).eos
    vocab = np.array([t for t in range(shape.vocab) if t not in eos])
    prompt = rng.choice(vocab, size=(1, 16)).astype(np.int64)
    if prefill < 1:
        raise UserError(f"--prefill {prefill}: expected a prompt length of at least 1 token")
    n_prefill = min(prefill, shape.context - 1)  # one slot left for the generated token
    long_prompt = rng.choice(vocab, size=(1, n_prefill)).astype(np.int64)
    tokens = min(tokens, shape.context - prompt.shape[1])

    rows = [Row(e) for e in engines_for(folder, engines)]
    gens = {}
    for row in tqdm(rows, desc="loading engines", unit="engine"):
        try:
            gens[id(row)] = load_engine(row.engine, folder, threads)
            gens[id(row)](prompt, 2)  # warm-up: first-run allocations and kernel selection
        except Exception as ex:  # an engine that cannot run this export is reported, not fatal
            row.error = f"{type(ex).__name__}: {str(ex).strip().splitlines()[0][:160] if str(ex).strip() else ''}"
            log.warning("%s %s: %s", row.engine.name, row.engine.variant, row.error)
    live = [r for r in rows if not r.error]
    for _ in tqdm(range(rounds), desc="interleaved rounds", unit="round"):
        for row in live:
            gen = gens[id(row)]
            for b in batches:
                ids = np.repeat(prompt, b, 0)
                t_n, t_1 = _timed(gen, ids, tokens), _timed(gen, ids, 1)
                row.decode.setdefault(b, []).append(b * (tokens - 1) / max(t_n - t_1, 1e-9))
            row.prefill.append(_timed(gen, long_prompt, 1))
    gens.clear()
    if rss:
        for row in tqdm(live, desc="peak RSS (one child process each)", unit="engine"):
            got = peak_rss(row.engine, folder, threads, prompt, batches, min(tokens, 32))
            if isinstance(got, str):
                row.error = got
            else:
                row.rss_mb = got
    bandwidth = read_bandwidth(threads)
    result = {"rows": rows, "bandwidth": bandwidth, "batches": batches, "tokens": tokens, "rounds": rounds,
              "threads": threads or os.cpu_count(), "n_prefill": n_prefill, "config": shape, "folder": folder}
    out.parent.mkdir(parents=True, exist_ok=True)
    md = report(result, title=title, chart=chart or out.with_name(out.stem.lower() + ".png"))  # RESULTS.md: results.png
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(md)
    tmp.replace(out)
    return result


def interleaved(graphs: dict, threads: int, rounds: int, measure, warm) -> dict[str, list]:
    """Each graph's session at `threads` intra-op threads; `warm(session)` once each, then `rounds` rounds of
    `measure(session)` taking every graph in turn (so a noisy neighbour slows them alike). {name: samples}."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    sessions = {k: ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for k, p in graphs.items()}
    for s in sessions.values():
        warm(s)
    samples = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            samples[k].append(measure(s))
    return samples


def _median(values) -> float:
    return statistics.median(values) if values else float("nan")


def report(r: dict, title: str | None = None, chart: Path | None = None) -> str:
    """The markdown for RESULTS.md (one section per model), and the PNG chart."""
    c, folder, rows, b1 = r["config"], r["folder"], r["rows"], r["batches"][0]
    bn = r["batches"][-1]
    params = c.layers * 12 * c.hidden ** 2 + (c.vocab + c.context) * c.hidden  # GPT-2's count, roughly
    lines = [f"## {title or folder.name}: {c.layers} layers, {c.heads} heads ({c.kv_heads} kv), {c.hidden} wide, "
             f"vocab {c.vocab}, context {c.context} (~{params / 1e6:.1f}M parameters)", "",
             f"- machine: {machine()}", "- versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
             f"- {r['threads']} intra-op threads for every engine; {r['rounds']} interleaved rounds, median; "
             f"{r['tokens']} new tokens after a 16-token prompt; prefill = one token after a {r['n_prefill']}-token "
             f"prompt; greedy, no early stop", ""]
    head = (f"| engine | variant | decode tok/s, batch {b1} | decode tok/s, batch {bn} (all rows) | "
            f"batch {bn} / batch {b1} | prefill {r['n_prefill']} tokens, ms | peak RSS, MiB |")
    lines += [head, "|" + " --- |" * 7]
    for row in rows:
        e = row.engine
        if row.error and not row.decode:
            lines.append(f"| {e.name} | {e.variant} | failed: {row.error} | | | | |")
            continue
        d1, dn = _median(row.decode.get(b1, [])), _median(row.decode.get(bn, []))
        lines.append(f"| {e.name} | {e.variant} | {d1:,.0f} | {dn:,.0f} | {dn / d1:.1f}x | "
                     f"{1000 * _median(row.prefill):.1f} | {row.rss_mb:,.0f} |")

    # memory-bandwidth limit at batch 1: every weight byte is read once per token
    bw = r["bandwidth"]
    lines += ["", f"Measured read bandwidth ({r['threads']} threads summing 512 MiB): {bw / 1e9:.1f} GB/s.", "",
              "| variant | weight bytes per decode step | bandwidth limit, tok/s | best onnxgen batch 1 | of the limit |",
              "| --- | --- | --- | --- | --- |"]
    for v in ("fp32", "int8", "int4"):
        path = folder / "onnx" / VARIANTS[v]
        if not path.is_file():
            continue
        wb = weight_bytes_per_step(fused_path(folder, v) if fused_path(folder, v).is_file() else path)
        limit = bw / wb
        best = max((_median(x.decode.get(b1, [])) for x in rows
                    if x.engine.kind == "onnxgen" and x.engine.variant == v and x.decode), default=float("nan"))
        lines.append(f"| {v} | {wb / 2**20:.1f} MiB | {limit:,.0f} | {best:,.0f} | {100 * best / limit:.0f}% |")

    # the targets, computed, never asserted
    def rate(kind, variant, batch, fused=None):
        got = [_median(x.decode.get(batch, [])) for x in rows if x.engine.kind == kind and not x.engine.spin and
               x.engine.variant == variant and x.decode and (fused is None or x.engine.fused == fused)]
        return max(got, default=float("nan"))
    ours = rate("onnxgen", "int4", b1)
    lines += ["", "Targets (from the issue):", ""]
    for label, value, goal in [
            ("onnxgen int4 / onnxruntime-genai int4, same plain export, batch 1", ours / rate("genai", "int4", b1, False), 1.2),
            ("onnxgen int4 / onnxruntime-genai int4 on onnxgen's fused graph, batch 1", ours / rate("genai", "int4", b1, True), 1.2),
            ("onnxgen int4 / PyTorch eager, batch 1", ours / rate("torch", "fp32", b1), 8.0),
            (f"onnxgen int4 batch {bn} / batch {b1} throughput", rate("onnxgen", "int4", bn) / ours, 8.0)]:
        verdict = "n/a" if value != value else ("met" if value >= goal else f"missed by {100 * (1 - value / goal):.0f}%")
        lines.append(f"- {label}: {value:.2f}x (target >= {goal}x): {verdict}")
    if chart:
        _chart(rows, b1, bn, Path(chart), title or folder.name)
        lines += ["", f"![decode tokens/s]({Path(chart).name})"]
    return "\n".join(lines) + "\n"


def _chart(rows, b1, bn, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if r.decode]
    labels = [f"{r.engine.name}\n{r.engine.variant}" for r in done]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.45 * len(done) + 1.5), sharey=True)
    for ax, b in zip(axes, (b1, bn)):
        values = [_median(r.decode.get(b, [])) for r in done]
        colors = ["tab:green" if r.engine.kind == "onnxgen" else "tab:gray" for r in done]
        ax.barh(range(len(done)), values, color=colors)
        ax.set_title(f"{title}: decode tokens/s, batch {b}")
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:,.0f}", va="center", fontsize=8)
    axes[0].set_yticks(range(len(done)), labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
