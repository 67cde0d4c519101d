"""What is checked about an export folder before ONNX Runtime opens it.

An export folder is untrusted input: it may come from anywhere, and ONNX Runtime is a large C++
parser that reads wherever a graph's external-data entries point. So, before a session is made:

1. the device asked for exists in this onnxruntime build (a CPU build would otherwise fall back
   to the CPU silently, with a warning nobody reads);
2. (unless the user opts out, unsafely) every file the variant needs matches the sha256 and size
   that manifest.json records: the configs, the tokenizer, the graph, and its external data;
3. every external-data location in the graph is a relative path that stays inside the export
   folder (no `..`, no absolute path, no symlink out), names a file that exists, and the
   (offset, length) it reads fit in that file;
4. the sizes the runtime takes from config.json and generation_config.json are possible and agree
   with the graph (context length, vocab_size = the logits' width, eos/pad ids inside the vocabulary).

The graph is read without its weights (exports.read_graph_only): its structure only, never the weights'
bytes (inside the file or in the data files it points to), and only after its own sha256 has been checked.
"""
from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from pipeline import manifest
from pipeline.errors import UserError
from pipeline.exports import read_graph_only, read_json, variant_path

# The files every variant needs besides its graph; the runtime reads all three.
SHARED_FILES = ("config.json", "generation_config.json", "tokenizer.json")


def preflight(folder: str | Path, variant: str, provider: str = "cpu", verify: bool = True,
              path: str | Path | None = None) -> None:
    """Raise UserError unless `variant` of the export in `folder` is safe to hand to ONNX Runtime.
    `path`: the graph file that will be opened, when it is not the variant's own (e.g. a fused twin)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"export {folder}: folder does not exist")
    check_device(provider)
    path = variant_path(folder, variant) if path is None else Path(path)
    for f in SHARED_FILES:
        if not (folder / f).is_file():
            raise UserError(f"export {folder}: {f} does not exist (an export needs {', '.join(SHARED_FILES)})")
        inside(folder, folder / f, f)
    if not path.is_file():
        raise UserError(f"--variant {variant}: {path} does not exist in this export")
    inside(folder, path, f"--variant {variant}")
    rel = path.resolve().relative_to(folder.resolve()).as_posix()
    if verify:  # hash the graph before parsing it: a parser is attack surface too
        manifest.verify(folder, [*SHARED_FILES, rel])
    model = read_graph(path)
    data_files = external_data_files(folder, path, model)
    if verify and data_files:
        manifest.verify(folder, data_files)
    check_config(folder, model)


def check_config(folder: Path, model) -> None:
    """The sizes the runtime reads from config.json and generation_config.json are possible, and
    agree with the graph (an edited or foreign config would otherwise fail mid-generation)."""
    config = read_json(folder / "config.json", "config")
    gen = read_json(folder / "generation_config.json", "generation config")
    context = [config[k] for k in ("n_positions", "max_position_embeddings", "n_ctx") if k in config]
    if not context or not _positive_int(context[0]):
        raise UserError(f"config {folder / 'config.json'}: expected a positive integer context length "
                        f"(n_positions or max_position_embeddings), got {context[0] if context else 'none'}")
    vocab = config.get("vocab_size")
    if not _positive_int(vocab):
        raise UserError(f"config {folder / 'config.json'}: expected a positive integer vocab_size, got {vocab!r}")
    logits = [o for o in model.graph.output if o.name == "logits"]
    if logits:
        dims = logits[0].type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value != vocab:
            raise UserError(f"config {folder / 'config.json'}: vocab_size {vocab}, but the graph's logits have "
                            f"{dims[-1].dim_value} (config and model are from different exports?)")
    for key in ("eos_token_id", "pad_token_id"):
        ids = gen.get(key)
        ids = ids if isinstance(ids, list) else [ids]  # a list of eos ids in some models (Llama 3, Qwen2.5)
        if gen.get(key) is not None and not (ids and all(_id_below(i, vocab) for i in ids)):
            raise UserError(f"generation config {folder / 'generation_config.json'}: {key} {gen[key]!r}, "
                            f"expected an id (or a list of ids) in [0, {vocab})")
    if "eos_token_id" not in gen:
        raise UserError(f"generation config {folder / 'generation_config.json'}: has no eos_token_id")


def _id_below(x, vocab: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < vocab


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def read_graph(path: Path):
    """The graph's protobuf only: weights stay unread, in the file or beside it (exports.read_graph_only)."""
    try:
        model = read_graph_only(path)
    except Exception as e:  # the protobuf parser raises several types for a file that is not a model
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"model {path}: not a readable ONNX file ({first})") from None
    if not model.graph.node:
        raise UserError(f"model {path}: not a readable ONNX file (no graph nodes; empty or truncated?)")
    return model


def check_device(provider: str) -> None:
    if provider == "cpu":
        return
    import onnxruntime as ort

    wanted = {"cuda": "CUDAExecutionProvider"}.get(provider)
    if wanted is None:
        raise UserError(f"--device {provider}: unknown; expected cpu or cuda")
    available = ort.get_available_providers()
    if wanted not in available:
        raise UserError(f"--device {provider}: this onnxruntime has no {wanted} (it has "
                        f"{', '.join(available)}); install onnxruntime-gpu on a machine with an NVIDIA GPU, "
                        "or use --device cpu")


def inside(folder: Path, path: Path, what: str) -> None:
    """`path`, symlinks resolved, must lie within `folder`."""
    root = folder.resolve()
    if not path.resolve().is_relative_to(root):
        raise UserError(f"{what}: {path} resolves to {path.resolve()}, outside the export folder {folder}")


def external_data_files(folder: Path, path: Path, model) -> list[str]:
    """The external-data files the graph at `path` reads, relative to `folder`; each location checked."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors  # every tensor: initializers, attributes, subgraphs

    needed: dict[str, int] = {}  # relative location -> bytes the tensors read from it
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        what = f"model {path}: tensor {tensor.name!r} external data location {location!r}"
        if (not location or "\x00" in location or PurePosixPath(location).is_absolute()
                or PureWindowsPath(location).is_absolute() or PureWindowsPath(location).drive
                or ".." in PurePosixPath(location.replace("\\", "/")).parts):
            raise UserError(f"{what}: expected a relative path inside the export folder (no '..', not absolute)")
        data = path.parent / location
        inside(folder, data, what)
        if not data.is_file():
            raise UserError(f"{what}: file {data} does not exist")
        try:
            offset, length = int(info.get("offset", 0)), int(info.get("length", 0))
        except ValueError:
            raise UserError(f"{what}: offset/length are not integers") from None
        if offset < 0 or length < 0:
            raise UserError(f"{what}: negative offset {offset} or length {length}")
        end = offset + length
        rel = data.resolve().relative_to(folder.resolve()).as_posix()
        needed[rel] = max(needed.get(rel, 0), end)
    for rel, end in needed.items():
        size = os.path.getsize(folder / rel)
        if size < end:
            raise UserError(f"external data {folder / rel}: {size} bytes, but the graph reads up to byte {end} "
                            "(truncated?)")
    own = path.resolve().relative_to(folder.resolve()).as_posix()  # read_graph_only's weights inside the graph
    return sorted(rel for rel in needed if rel != own)


# The peak of `onnxgen export --hf/--gguf` (export, then parity against the transformers reference), from the
# fp32 weights W, measured (benchmarks/MEMORY.md): the trace holds the decoder (W) and the exporter's graph, the
# weights go from the decoder's tensors into the file one at a time, then parity holds one model at a time: the
# reference, then the graph's session (W, and a tied head's second copy: Gemma 3 270M's graph is 1.6 W) with at
# most 256 MB of logits a call. SmolLM2-135M (W 0.54 GB) 2.24 GB, Gemma 3 270M (W 1.07 GB) 3.08 GB, a 1.2B
# Llama-3.2-shaped model (W 4.94 GB) 6.74 GB: 2 W + 1.3 GB covers each (the exporter no longer serializes the
# graph in memory, so sizes under 2 GiB need no regime of their own).
EXPORT_PEAK = (2.0, 1.3e9)


def export_peak(fp32_bytes: int) -> float:
    a, b = EXPORT_PEAK
    return a * fp32_bytes + b


def check_stage_memory(folder: Path, stage: str, skip: bool = False) -> None:
    """quantize, fuse and parity of an export, refused before any work as export is (check_memory), on the same
    estimate taken over the fp32 graph's bytes G (what these stages load). G is at least the weights W (a tied
    head is stored twice), so export_peak(G) >= export_peak(W), which every peak of these stages in
    benchmarks/MEMORY.json stays under (tested). An export without its fp32 graph is left to the stage to
    refuse."""
    from pipeline.exports import variant_files

    files = [Path(folder) / name for name in variant_files(folder, "fp32")]
    if not files[0].is_file():
        return
    graph = sum(f.stat().st_size for f in files)
    size = f"{graph / 1e9:.2f} GB" if graph >= 1e8 else f"{graph / 1e6:.1f} MB"
    check_memory(export_peak(graph), f"{stage} {folder} ({size} fp32 graph)", skip=skip)


def check_memory(need: float, what: str, skip: bool = False) -> None:
    """Refuse, before any work, a stage whose estimated peak `need` (bytes) passes the memory this machine has
    free now: one line naming both, rather than the kernel's OOM killer halfway (`skip`: go on anyway)."""
    import psutil

    free = psutil.virtual_memory().available
    if need > free and not skip:
        raise UserError(f"{what}: needs about {need / 1e9:.1f} GB of memory at its peak and {free / 1e9:.1f} GB is "
                        f"free (pass --no-memory-check to try anyway)")
