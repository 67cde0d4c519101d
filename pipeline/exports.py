"""The export folder (exports/NAME/, docs/contract.md): what its files are called, how its configs read,
and how it is written so that a reader never sees half of it.

Every stage that reads or writes an export asks this module:
    variant_path / fused_path     file names of the variants and of their fused-attention twins
    read_json / read_config       config.json of any model family, normalized into one ModelShape
    generation_ids                eos/pad/bos from generation_config.json
    chat_template                 the chat template and the special tokens it may name
    write_chat_template           a chat template into both places it is read from
    atomic_write / atomic_file    one file: written beside its target, renamed over it when whole
    staging                       a whole folder: built beside its target, renamed into place when whole
    save_graph                    a graph, whole or with its weights in transformers.js-named chunks
    detach_weights                a graph's weights to one file beside it, the graph kept without them
    read_graph_only / load_graph  a graph's structure without its weights / whole, each weight read once
    StoredArray / held_apart      a weight left in its file until save_graph_streamed writes it
    release_memory                freed buffers handed back to the kernel between the large steps of a stage
    transformers_js_config        config.json's `transformers.js_config` for the graphs that have chunks
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pipeline.errors import UserError

log = logging.getLogger(__name__)

# variant -> file under onnx/; the names are transformers.js's (its `dtype` option picks them)
VARIANTS = {
    "fp32": "model.onnx",
    "fp16": "model_fp16.onnx",
    "int8": "model_quantized.onnx",
    "int4": "model_q4.onnx",
}
# variant -> transformers.js's `dtype` option, which picks the file above
TRANSFORMERS_JS_DTYPES = {"fp32": "fp32", "fp16": "fp16", "int8": "q8", "int4": "q4"}
INPUTS = ("input_ids", "attention_mask", "position_ids")
GENAI_CONFIG = "genai_config.json"
# onnxgen fuse writes each variant's twin beside it: onnx/model_q4.onnx -> onnx/model_q4_gqa.onnx; its
# past/present share one buffer whose length is this symbolic dimension
FUSED_SUFFIX = "_gqa"
MAX_LEN = "max_sequence_length"
# the fused twin's optional input (default 1): how many positions, ending at each row's last token, get logits
# (transformers' name for the same choice); speculative decoding checks its drafts with n > 1
LOGITS_TO_KEEP = "logits_to_keep"
# the chat template lives in both places (docs/contract.md): transformers >= 4.47 writes the file and reads
# it first; transformers.js and onnxruntime-genai read tokenizer_config.json's "chat_template"
CHAT_TEMPLATE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
# the special tokens transformers hands every chat template, by these names
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def past_names(n_layer: int) -> list[str]:
    return [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


def present_names(n_layer: int) -> list[str]:
    return [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]


# ----------------------------------------------------------------------------- the cache, layer by layer
# docs/contract.md part 3. An attention layer carries K/V that grow along the sequence; any other layer type
# carries fixed-size state (all dims but batch fixed integers), fed back as the K/V cache is. The names are
# transformers.js's (its getPastKeyValues maps present_conv.* back onto past_conv.*, and so on): a new family
# adds its layer type here ("mamba": past_ssm/past_conv, "linear_attention": past_recurrent, ...).
ATTENTION_TYPES = ("full_attention", "sliding_attention")
STATE_PREFIXES = ("past_conv.", "past_ssm.", "past_recurrent.")  # inputs of fixed-size state
STATE_NAMES = {  # layer type -> the state it carries, "{i}" the layer: (input, output)
    "conv": [("past_conv.{i}", "present_conv.{i}")],  # LFM2's short convolution: (batch, hidden, L_cache - 1)
    # Granite 4's Mamba-2: the conv over x B C (batch, conv_dim, d_conv - 1), the SSM (batch, heads, head, d_state), fp32
    "mamba": [("past_conv.{i}", "present_conv.{i}"), ("past_ssm.{i}", "present_ssm.{i}")],
    # Qwen3.5's Gated DeltaNet: its convolution's (batch, conv channels, kernel - 1) and its recurrent state
    # (batch, value heads, key head size, value head size), always float32
    "linear_attention": [("past_conv.{i}", "present_conv.{i}"), ("past_recurrent.{i}", "present_recurrent.{i}")],
}


def layer_cache_names(layer_type: str, i: int) -> list[tuple[str, str]]:
    """One layer's cache entries as (graph input, graph output) names, in the graph's order."""
    if layer_type in ATTENTION_TYPES:
        return [(f"past_key_values.{i}.{kv}", f"present.{i}.{kv}") for kv in ("key", "value")]
    if layer_type not in STATE_NAMES:
        raise UserError(f"layer type {layer_type!r} has no cache names (known: {', '.join(ATTENTION_TYPES)}, "
                        f"{', '.join(STATE_NAMES)})")
    return [(p.format(i=i), q.format(i=i)) for p, q in STATE_NAMES[layer_type]]


def cache_names(layer_types) -> tuple[list[str], list[str]]:
    """Every layer's cache inputs and outputs, flat, in layer order: past_names/present_names of a model
    whose layers are not all attention."""
    pairs = [pair for i, kind in enumerate(layer_types) for pair in layer_cache_names(kind, i)]
    return [p for p, _ in pairs], [q for _, q in pairs]


def is_state(name: str) -> bool:
    """A graph input (or output, present_*) of fixed-size state rather than K/V, which grows along the sequence."""
    return name.startswith(STATE_PREFIXES) or name.startswith(tuple(p.replace("past", "present", 1)
                                                                    for p in STATE_PREFIXES))


def present_of(past: str) -> str:
    """The output fed back into `past` (transformers.js's getPastKeyValues, the other way round)."""
    if past.startswith("past_key_values."):
        return "present." + past[len("past_key_values."):]
    return "present_" + past[len("past_"):]


def variant_path(folder: str | Path, variant: str) -> Path:
    if variant not in VARIANTS:
        raise UserError(f"--variant {variant}: unknown; expected one of {', '.join(VARIANTS)}")
    return Path(folder) / "onnx" / VARIANTS[variant]


def fused_path(folder: str | Path, variant: str) -> Path:
    """onnx/model.onnx -> onnx/model_gqa.onnx; onnx/model_q4.onnx -> onnx/model_q4_gqa.onnx."""
    stem = variant_path(folder, variant).name.removesuffix(".onnx")
    return Path(folder) / "onnx" / f"{stem}{FUSED_SUFFIX}.onnx"


def present_variants(folder: str | Path) -> list[str]:
    return [v for v in VARIANTS if variant_path(folder, v).is_file()]


# ----------------------------------------------------------------------------- graphs over 2 GB
# A protobuf holds at most 2 GB, so a larger graph keeps its weights in external data. transformers.js
# finds them only by name: onnx/model.onnx reads onnx/model.onnx_data, model.onnx_data_1, ... (as many as
# config.json's `transformers.js_config.use_external_data_format` says for that file), and a browser loads
# each chunk whole into one ArrayBuffer, so a chunk stays under 2 GB (a single larger tensor gets its own).
PROTOBUF_LIMIT = (1 << 31) - (1 << 26)   # 64 MB short of 2 GiB: room for the graph's own nodes
CHUNK_BYTES = (1 << 31) - (1 << 20)
INLINE_BYTES = 1024  # a tensor smaller than this stays inside the graph when its weights go to chunks
TRANSFORMERS_JS_CONFIG = "transformers.js_config"


def external_data_names(graph_name: str, chunks: int) -> list[str]:
    """transformers.js's names for a graph's chunks: model.onnx -> model.onnx_data, model.onnx_data_1, ..."""
    return [f"{graph_name}_data" + (f"_{i}" if i else "") for i in range(chunks)]


def variant_files(folder: str | Path, variant: str) -> list[str]:
    """The variant's graph and its external-data chunks, relative to the folder."""
    graph = variant_path(folder, variant)
    names = [graph.name]
    for name in external_data_names(graph.name, 100):
        if not (graph.parent / name).is_file():
            break
        names.append(name)
    return [f"onnx/{n}" for n in names]


def save_graph(model, path: str | Path, limit: int = PROTOBUF_LIMIT, chunk_bytes: int = CHUNK_BYTES) -> list[str]:
    """Write an onnx.ModelProto (weights in memory) at `path`: one file when it fits `limit`, else the graph
    plus its weights in chunks of at most `chunk_bytes`, named as transformers.js expects. Returns the names
    written (beside `path`); len(names) - 1 is the chunk count for transformers_js_config."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, set_external_data, uses_external_data

    path = Path(path)
    _clear_chunks(path)
    sized = [(t, len(t.raw_data)) for t in _get_all_tensors(model) if t.HasField("raw_data")]
    assert not any(uses_external_data(t) for t in _get_all_tensors(model)), "load the weights before saving"
    # the weights' bytes first: protobuf cannot even size a message past 2 GiB (ByteSize raises EncodeError)
    if sum(n for _, n in sized) <= limit and model.ByteSize() <= limit:
        onnx.save_model(model, str(path))
        return [path.name]
    locations, chunks = _chunk_locations(path.name, [n for _, n in sized], chunk_bytes)
    for (t, _), location in zip(sized, locations):
        if location is not None:
            set_external_data(t, location)
    onnx.save_model(model, str(path))  # writes each tensor's raw_data into its location
    return [path.name, *external_data_names(path.name, chunks)]


def _clear_chunks(path: Path) -> None:
    """The graph at `path` and its chunks removed before they are written: onnx appends a tensor to its location
    (an old file would grow, not be replaced), and a file hard-linked from another export (exports.staging's
    copies) must be replaced, never written into."""
    path.unlink(missing_ok=True)
    for stale in path.parent.glob(glob.escape(path.name) + "_data*"):
        stale.unlink()


def _chunk_locations(graph_name: str, sizes: list[int], chunk_bytes: int) -> tuple[list[str | None], int]:
    """Where each tensor of these sizes goes when a graph's weights go to chunks: None for one that stays in
    the graph (under INLINE_BYTES), else its chunk's name (transformers.js's); a chunk holds at most
    `chunk_bytes` unless one tensor alone is larger. Also returns the number of chunks."""
    locations, chunk, filled = [], 0, 0
    for n in sizes:
        if n < INLINE_BYTES:
            locations.append(None)
            continue
        if filled and filled + n > chunk_bytes:
            chunk, filled = chunk + 1, 0
        locations.append(external_data_names(graph_name, chunk + 1)[-1])
        filled += n
    return locations, chunk + 1


def save_graph_streamed(model, weights: dict, path: str | Path, limit: int = PROTOBUF_LIMIT,
                        chunk_bytes: int = CHUNK_BYTES) -> list[str]:
    """save_graph for a graph held without its weights: `weights` maps each initializer to add, in order, to its
    array (numpy, any strides), and each is written from that memory into the file, one at a time, so the
    weights are never serialized whole in memory beside the model they come from. The layout is save_graph's:
    one file when it fits `limit` (the initializers as raw_data inside it), else chunks. Returns the names
    written beside `path`.

    Written by hand: protobuf and onnx serialize a message whole in memory, and onnx.save of external data takes
    each tensor's bytes from a TensorProto (a copy). A message is its fields in any order and a repeated field
    is its entries one after the other, so the file is the model without its graph, then the graph's field:
    the graph without initializers, then one initializer field per tensor, each a TensorProto's header (dims,
    type, name) followed by its raw_data field, the bytes straight from the array."""
    import numpy as np
    import onnx

    assert sys.byteorder == "little", "raw_data is little-endian"
    path = Path(path)
    _clear_chunks(path)
    headers = [(tensor_header(name, array), array) for name, array in weights.items()]
    total = sum(array.nbytes for _, array in headers)
    if total + model.ByteSize() <= limit:
        graph = model.graph.SerializeToString()
        fields = [(h.SerializeToString() + _tag(9) + _varint(a.nbytes), a) for h, a in headers]
        sizes = [len(head) + a.nbytes for head, a in fields]
        rest = onnx.ModelProto()
        rest.CopyFrom(model)
        rest.ClearField("graph")
        with open(path, "wb") as f:
            f.write(rest.SerializeToString())
            f.write(_tag(7) + _varint(len(graph) + sum(len(_tag(5) + _varint(n)) + n for n in sizes)))
            f.write(graph)
            for (head, array), n in zip(fields, sizes):
                f.write(_tag(5) + _varint(n) + head)
                f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
        return [path.name]
    locations, chunks = _chunk_locations(path.name, [a.nbytes for _, a in headers], chunk_bytes)
    files = {}
    try:
        for (header, array), name in zip(headers, locations):
            if name is None:
                header.raw_data = np.ascontiguousarray(array).tobytes()
                continue
            f = files.get(name) or files.setdefault(name, open(path.parent / name, "wb"))
            offset = f.tell()
            f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
            declare_external(header, name, offset, array.nbytes)
    finally:
        for f in files.values():
            f.close()
    model.graph.initializer.extend(h for h, _ in headers)
    onnx.save_model(model, str(path))
    return [path.name, *external_data_names(path.name, chunks)]


def read_graph_only(path: str | Path, min_bytes: int = INLINE_BYTES):
    """The model at `path` without reading its weights: each initializer of `min_bytes` or more whose bytes are
    inside the file comes back declared as external data at its place in that same file (location: the file's
    own name, its offset and length), so onnx's external-data helpers still read it where it lies; a tensor
    already external stays as it is. The graph's structure (nodes, inputs, outputs, value_info) is whole.

    Written by hand: protobuf parses a message whole, and onnx.load(load_external_data=False) still reads
    weights stored inside the file, twice over in memory (3.5 GB to learn the input names of Gemma 3 270M's
    1.74 GB graph). Over a memory map of the file, only the fields kept are touched: the wire format gives each
    field's length, and a tensor's raw_data is skipped by it. Malformed input raises ValueError or IndexError
    (or protobuf's DecodeError) like a malformed file given to onnx.load."""
    import mmap

    import onnx

    path = Path(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        model, graph, tensors = bytearray(), bytearray(), []
        for field, wire, at, start, end in _fields(mm, 0, len(mm)):
            if (field, wire) != (7, 2):  # ModelProto.graph
                model += mm[at:end]
                continue
            for gfield, gwire, gat, gstart, gend in _fields(mm, start, end):
                if (gfield, gwire) != (5, 2):  # GraphProto.initializer
                    graph += mm[gat:gend]
                elif gend - gstart < min_bytes:
                    tensors.append(onnx.TensorProto.FromString(mm[gstart:gend]))
                else:
                    header, raw = bytearray(), None
                    for tfield, twire, tat, tstart, tend in _fields(mm, gstart, gend):
                        if (tfield, twire) == (9, 2):  # TensorProto.raw_data
                            raw = (tstart, tend - tstart)
                        else:
                            header += mm[tat:tend]
                    tensor = onnx.TensorProto.FromString(bytes(header))
                    if raw is not None:
                        declare_external(tensor, path.name, *raw)
                    tensors.append(tensor)
    out = onnx.ModelProto.FromString(bytes(model))
    out.graph.ParseFromString(bytes(graph))
    out.graph.initializer.extend(tensors)
    return out


def load_graph(path: str | Path):
    """onnx.load, with each weight's bytes read once: onnx.load reads the whole file into memory and then parses
    it, the graph twice over for a moment (3.5 GB for Gemma 3 270M's 1.74 GB graph); this reads the structure
    (read_graph_only), then each tensor's bytes into it from where they lie: inside the file, read here (onnx's
    loader refuses a file with several hard links, which a staged export's graph has), or beside it, through
    onnx's loader and its checks of each location."""
    import onnx

    path = Path(path)
    model = read_graph_only(path)
    with open(path, "rb") as f:
        for t in model.graph.initializer:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                materialize(t, path, f)
    return model


def materialize(tensor, path: Path, f=None) -> None:
    """An initializer declared as external data by read_graph_only (`path`: that graph's file) given its bytes,
    in place, as onnx.load leaves a tensor (tensor_bytes)."""
    tensor.raw_data = tensor_bytes(tensor, Path(path), f)
    tensor.ClearField("data_location")
    del tensor.external_data[:]


def held_apart(model, src: Path) -> tuple:
    """(model without the initializers still declared external in `src`'s files by read_graph_only, those as
    StoredArrays), in place: for save_graph_streamed, which then writes them from the file one at a time."""
    import onnx

    weights = {t.name: StoredArray(onnx.TensorProto.FromString(t.SerializeToString()), src)
               for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    kept = [t for t in model.graph.initializer if t.name not in weights]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    return model, weights


def initializer_array(tensor, path: Path):
    """An initializer's values, from the tensor or, declared external by read_graph_only, from its file."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return np.asarray(StoredArray(tensor, path))
    return numpy_helper.to_array(tensor)


def tensor_bytes(tensor, path: Path, f=None) -> bytes:
    """The bytes of an initializer declared as external data by read_graph_only (`path`: that graph's file):
    read here when they lie inside the graph's own file (`f`: it, open), else through onnx's loader and its
    checks of the location (a file beside the graph, never outside its folder)."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_tensor

    info = {e.key: e.value for e in tensor.external_data}
    if info.get("location") == path.name:  # read_graph_only's: at its place in this very file
        if f is None:
            with open(path, "rb") as own:
                return tensor_bytes(tensor, path, own)
        f.seek(int(info["offset"]))
        return f.read(int(info["length"]))
    staged = _staged_chunk(path.parent, info.get("location", ""))
    if staged is not None:
        return _read_staged(staged, tensor.name, int(info.get("offset", 0)), info.get("length"))
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    try:
        load_external_data_for_tensor(copy, str(path.parent))
    except onnx.checker.ValidationError as e:  # a location outside the folder, a link: one line, no traceback
        raise UserError(f"{path}: the weights of {tensor.name}: {e}") from None
    return copy.raw_data


def _staged_chunk(folder: Path, location: str) -> Path | None:
    """The file `location` names beside a graph in `folder` when it is a copy that staging() hard-linked, else
    None. onnx's loader refuses a file with several hard links (a link planted in a folder can point at a file
    its owner never meant to share), and a staged export's chunks have two: the export's and staging's. So
    these are read here, after the checks onnx makes: a plain name (no folder, no '..'), a regular file that
    is not a symlink, and the very file staging linked (its device and inode, two links)."""
    import stat

    if not location or Path(location).name != location or location in (".", ".."):
        return None
    target = folder / location
    try:
        st = os.lstat(target)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 2 or (st.st_dev, st.st_ino) not in _STAGED_LINKS:
        return None
    return target


def _read_staged(target: Path, name: str, offset: int, length: str | None) -> bytes:
    with open(target, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_nlink != 2 or (st.st_dev, st.st_ino) not in _STAGED_LINKS:  # replaced or linked since checked
            raise UserError(f"{target}: changed while it was read (tensor {name})")
        size = st.st_size - offset if length is None else int(length)
        if offset < 0 or size < 0 or offset + size > st.st_size:
            raise UserError(f"{target}: tensor {name} lies past the end of the file")
        f.seek(offset)
        return f.read(size)


class StoredArray:
    """An initializer of a graph read by read_graph_only, its bytes left where they lie until numpy asks for
    them (np.asarray): save_graph_streamed then writes a graph of these holding one tensor in memory at a
    time. `convert` maps the stored array to the one written, of `dtype`, slice by slice along the first axis
    (an elementwise conversion: fp32 -> fp16)."""

    SLICE_BYTES = 64 << 20

    def __init__(self, tensor, path: Path, dtype=None, convert=None):
        import numpy as np
        from onnx.helper import tensor_dtype_to_np_dtype

        self.tensor, self.path, self.convert = tensor, Path(path), convert
        self.stored = np.dtype(tensor_dtype_to_np_dtype(tensor.data_type))
        self.dtype = np.dtype(dtype or self.stored)
        self.shape = tuple(tensor.dims)
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        import numpy as np

        stored = np.frombuffer(tensor_bytes(self.tensor, self.path), dtype=self.stored).reshape(self.shape)
        if self.convert is None:
            return stored
        out = np.empty(self.shape, self.dtype)
        flat_in, flat_out = stored.reshape(-1), out.reshape(-1)
        step = max(1, self.SLICE_BYTES // self.stored.itemsize)
        for i in range(0, flat_in.size, step):
            flat_out[i:i + step] = self.convert(flat_in[i:i + step])
        return out


def check_structure(model, full_check: bool = False) -> None:
    """onnx.checker on a graph whose weights were not read (read_graph_only): each initializer declared as
    external data is checked as the typed input it stands for (the checker would look for its file from the
    working directory), everything else as it is."""
    import onnx

    checked = onnx.ModelProto()
    checked.CopyFrom(model)
    g = checked.graph
    aside = [t for t in g.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    names = {t.name for t in aside}
    kept = [t for t in g.initializer if t.name not in names]
    g.ClearField("initializer")
    g.initializer.extend(kept)
    g.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in aside
                   if t.name not in {i.name for i in g.input})
    onnx.checker.check_model(checked, full_check=full_check)


def _fields(buf, start: int, end: int):
    """Each protobuf field in buf[start:end]: (number, wire type, where it starts, where its payload starts,
    where it ends)."""
    i = start
    while i < end:
        key, j = _read_varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, k = _read_varint(buf, j)
        elif wire == 1:
            k = j + 8
        elif wire == 2:
            n, j = _read_varint(buf, j)
            k = j + n
        elif wire == 5:
            k = j + 4
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {i}")
        if k > end:
            raise ValueError(f"a protobuf field at byte {i} runs past its message (byte {end})")
        yield key >> 3, wire, i, j, k
        i = k


def _read_varint(buf, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[i]
        n |= (b & 0x7F) << shift
        i += 1
        if b < 0x80:
            return n, i
        shift += 7
        if shift > 63:
            raise ValueError(f"a protobuf varint at byte {i} is longer than 10 bytes")


def tensor_header(name: str, array):
    """A TensorProto with the array's name, dims and type, and no data."""
    import onnx
    from onnx.helper import np_dtype_to_tensor_dtype

    return onnx.TensorProto(name=name, dims=array.shape, data_type=np_dtype_to_tensor_dtype(array.dtype))


def declare_external(tensor, location: str, offset: int, length: int) -> None:
    """Point a TensorProto (with no data) at its bytes in an external-data file (onnx's set_external_data
    wants the bytes in the tensor first)."""
    import onnx

    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        tensor.external_data.add(key=key, value=value)


def _tag(field: int) -> bytes:
    return _varint(field << 3 | 2)  # a length-delimited field


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def detach_weights(model, folder: str | Path, data_name: str, min_bytes: int = 1 << 16):
    """Write the weight matrices of `model` (initializers of two or more dims and at least `min_bytes`) to
    folder/data_name (one file, ONNX external data) and return a copy of the graph that points to it, holding
    no weights. The caller drops `model`: protobuf (upb) keeps a message's bytes in its arena until the whole
    message goes, so clearing the fields of `model` would free nothing. The copy is what the graph-only work
    of a stage runs on (fusions, shape inference), each of which copies the model it is given; saved in
    `folder`, it is a graph with external data that onnx.load and ONNX Runtime read whole. Vectors stay in
    the graph: shape inference reads the values of a norm's weight (benchmarks/MEMORY_NOTES.md)."""
    import onnx
    from onnx.external_data_helper import set_external_data, write_external_data_tensors

    assert not (Path(folder) / data_name).exists(), f"{data_name} exists: its tensors would be appended to it"
    for t in model.graph.initializer:
        if len(t.dims) >= 2 and t.HasField("raw_data") and len(t.raw_data) >= min_bytes:
            set_external_data(t, data_name)
    write_external_data_tensors(model, str(folder))
    light = onnx.ModelProto()
    light.CopyFrom(model)
    return light


def release_memory() -> None:
    """Collect garbage, then hand the heap's free pages back to the kernel (glibc's malloc_trim). A stage's
    large buffers (a parsed graph, a session's weights, a call's logits) are freed into malloc's arenas, which
    otherwise keep them resident: the next step's peak would stand on top of the last one's."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): the allocator keeps its own pages
        pass


def transformers_js_config(config: dict, chunks: dict[str, int]) -> dict:
    """config.json with `transformers.js_config.use_external_data_format` giving each graph's chunk count
    ({"model.onnx": 2, ...}). chunks: graph file name -> chunks it has now (0: none). Other graphs' entries and
    other keys are kept; a count transformers.js already infers (0) is not written; an empty section goes."""
    config = json.loads(json.dumps(config))
    section = config.get(TRANSFORMERS_JS_CONFIG) or {}
    counts = section.get("use_external_data_format")
    if not isinstance(counts, dict):  # a bare true/number applies to every graph: spell it out per file
        counts = {name: int(counts) for name in VARIANTS.values()} if counts else {}
    counts.update(chunks)
    counts = {name: int(n) for name, n in sorted(counts.items()) if int(n) > 0}
    section = {**section, "use_external_data_format": counts} if counts else \
        {k: v for k, v in section.items() if k != "use_external_data_format"}
    if section:
        config[TRANSFORMERS_JS_CONFIG] = section
    else:
        config.pop(TRANSFORMERS_JS_CONFIG, None)
    return config


# ----------------------------------------------------------------------------- reading

def read_json(path: Path, what: str) -> dict:
    """A JSON object from a file a user handed us: a missing file or bad JSON is one line."""
    try:
        d = json.loads(Path(path).read_text())
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise UserError(f"{what} {path}: file does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{what} {path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{what} {path}: expected a JSON object")
    return d


# Each family spells the same size its own way (optimum's NormalizedTextConfig does the same): the first
# key present wins. GPT-2 (ours and imported), Llama/Qwen/Phi/Mistral/Gemma, GPT-NeoX, OPT.
_KEYS = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "heads": ("num_attention_heads", "n_head", "num_heads"),
    "kv_heads": ("num_key_value_heads", "multi_query_group_num"),
    "hidden": ("hidden_size", "n_embd", "d_model"),
    "context": ("max_position_embeddings", "n_positions", "n_ctx"),
    "vocab": ("vocab_size",),
}


@dataclass(frozen=True)
class ModelShape:
    """config.json of any family, normalized: what the runtime, fuse, quantize, genai and bench need."""
    model_type: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    context: int
    vocab: int


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


def shape_of(config: dict, where: str = "config.json") -> ModelShape:
    found = {}
    for field_, keys in _KEYS.items():
        value = next((config[k] for k in keys if k in config), None)
        if value is None and field_ == "kv_heads":
            value = found["heads"]  # no key: multi-head attention, as many kv heads as heads
        if not _positive_int(value):
            raise UserError(f"config {where}: expected a positive integer {field_} "
                            f"({' or '.join(keys)}), got {value!r}")
        found[field_] = value
    head_dim = config.get("head_dim") or found["hidden"] // found["heads"]
    return ModelShape(model_type=str(config.get("model_type", "")), head_dim=int(head_dim), **found)


def read_config(folder: str | Path) -> ModelShape:
    path = Path(folder) / "config.json"
    return shape_of(read_json(path, "config"), str(path))


def first_id(ids) -> int:
    """generation_config's eos_token_id: an id, or a list of them in some imported models (Llama 3,
    Qwen2.5); the first is the one to emit and pad with."""
    return int(ids[0] if isinstance(ids, list) else ids)


SAMPLING_KEYS = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty")


@dataclass(frozen=True)
class GenerationIds:
    eos: tuple[int, ...]   # every id that ends a generation
    pad: int
    bos: int | None
    sampling: dict         # the sampling defaults generation_config.json gives (SAMPLING_KEYS present)


def generation_ids(folder: str | Path) -> GenerationIds:
    path = Path(folder) / "generation_config.json"
    gen = read_json(path, "generation config")
    if gen.get("eos_token_id") is None:
        raise UserError(f"generation config {path}: has no eos_token_id")
    eos = gen["eos_token_id"]
    eos = tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
    pad = gen.get("pad_token_id")
    return GenerationIds(eos=eos, pad=eos[0] if pad is None else int(pad), bos=gen.get("bos_token_id"),
                         sampling={k: gen[k] for k in SAMPLING_KEYS if gen.get(k) is not None})


@dataclass(frozen=True)
class ChatTemplate:
    source: str              # jinja text
    special_tokens: dict     # bos_token, eos_token, ... -> their strings, as the template sees them


def template_text(value, where: str) -> str | None:
    """tokenizer_config's chat_template: a string, or a list of named ones ({"name", "template"}), of
    which transformers uses "default"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise UserError(f"{where}: chat_template is neither a string nor a list with a \"default\" template")


def _token_text(value):
    """A special token as tokenizer_config writes it: a string, or an AddedToken ({"content": ...})."""
    return value.get("content") if isinstance(value, dict) else value


def chat_template(folder: str | Path) -> ChatTemplate | None:
    """The export's chat template (chat_template.jinja first, as transformers reads it, then
    tokenizer_config.json's), or None when the model has none."""
    folder = Path(folder)
    config_path = folder / TOKENIZER_CONFIG
    config = read_json(config_path, "tokenizer config") if config_path.is_file() else {}
    jinja = folder / CHAT_TEMPLATE
    try:
        source = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    except UnicodeDecodeError:
        raise UserError(f"chat template {jinja}: not UTF-8 text") from None
    source = source if source is not None else template_text(config.get("chat_template"), str(config_path))
    if not source:
        return None
    special_path = folder / SPECIAL_TOKENS_MAP
    special = read_json(special_path, "special tokens map") if special_path.is_file() else {}
    tokens = {}
    for name in SPECIAL_TOKENS:  # special_tokens_map.json wins, as in transformers' from_pretrained
        value = _token_text(special.get(name) or config.get(name))
        if isinstance(value, str):
            tokens[name] = value
    return ChatTemplate(source=source, special_tokens=tokens)


# ----------------------------------------------------------------------------- writing

@contextmanager
def atomic_file(path: str | Path):
    """Yields a temporary path beside `path` (same filesystem); it replaces `path` only if the block
    finishes. A kill or an error leaves the old file untouched (os.replace is atomic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2) + "\n")


def publish(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished folder into place; with force, the old one goes only after the new is whole."""
    if out.exists():
        if not force:
            raise UserError(f"--out {out}: exists; pass --force to replace it")
        trash = out.with_name(f".{out.name}.old-{os.getpid()}-{int(time.time())}")
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)


def clear_interrupted(out: Path) -> None:
    """Tidy what a stage killed by a signal left beside `out` (kill -9 runs no cleanup).

    Its hidden temporary folder goes; an old folder it had moved aside in the instant before the
    new one was renamed in comes back. Only folders of processes that are gone are touched: their
    names carry the pid (a reused pid only means a folder is kept a while longer)."""
    import psutil

    for leftover in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*")):
        kind, _, rest = leftover.name[len(out.name) + 2:].partition("-")
        pid = rest.split("-")[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or psutil.pid_exists(int(pid)):
            continue
        if kind == "old" and not out.exists():
            log.warning("restoring %s, which an interrupted stage had moved aside", out)
            leftover.rename(out)
        else:
            shutil.rmtree(leftover, ignore_errors=True)


@contextmanager
def staging(out: Path, force: bool, copy_from: Path | None = None):
    """A temporary folder beside `out` (same filesystem) that becomes `out` only if the block finishes:
    on any error or signal it is removed, and an existing `out` is untouched. copy_from: start from a
    copy of that folder (hard links where possible: a stage that rewrites a file replaces it, never
    writes into it, so the original stays intact)."""
    if out.exists() and not force:
        raise UserError(f"--out {out}: exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    clear_interrupted(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    linked: set[tuple[int, int]] = set()
    try:
        if copy_from is not None:
            tmp.rmdir()
            shutil.copytree(copy_from, tmp, copy_function=partial(_link_or_copy, linked=linked))
            _STAGED_LINKS.update(linked)
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
        publish(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:  # the staged copy is gone: a second link to one of these files now is nobody's we know
        _STAGED_LINKS.difference_update(linked)


# (device, inode) of the files a staging() block hard-linked from a file that had one link, while the block
# runs: the second link is ours, and tensor_bytes reads their weights, which onnx's loader refuses for a file of
# several links
_STAGED_LINKS: set[tuple[int, int]] = set()


def _link_or_copy(src: str, dst: str, linked: set) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
        return
    st = os.lstat(dst)
    if st.st_nlink == 2:
        linked.add((st.st_dev, st.st_ino))


def write_chat_template(folder: str | Path, source: str) -> list[str]:
    """Put `source` in chat_template.jinja and in tokenizer_config.json's "chat_template" (transformers.js and
    onnxruntime-genai read it there); returns the files written, for the manifest."""
    folder = Path(folder)
    atomic_write(folder / CHAT_TEMPLATE, source)
    config_path = folder / TOKENIZER_CONFIG
    config = read_json(config_path, "tokenizer config") if config_path.is_file() else {}
    config["chat_template"] = source
    write_json(config_path, config)
    return [CHAT_TEMPLATE, TOKENIZER_CONFIG]
