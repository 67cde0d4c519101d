"""A GGUF file (llama.cpp's format) -> a Hugging Face model folder that the families read (model/families.py).

    stage_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", folder)   # config.json, model.safetensors, tokenizer files

The `gguf` package reads the file and dequantizes its tensors (to fp32), `tokenizers` builds tokenizer.json and
`safetensors` writes the weights. What is written here by hand is what no library does without transformers:
GGUF metadata -> config.json keys, GGUF tensor names -> Hugging Face names, undoing the row permutation
llama.cpp's converter applies to Llama's q and k, and the tokenizer's pieces (pre-tokenizer, BOS/EOS) from
metadata. transformers has its own GGUF loader, but in 4.57 it swaps eos for bos and adds a BOS the file says
not to add; we read both from the metadata.

Only what onnxgen implements is accepted: architectures llama and qwen2, byte-level BPE tokenizers ("gpt2")
with a known pre-tokenizer; anything else is refused in one line naming the file.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from pipeline import manifest
from pipeline.errors import UserError
from pipeline.exports import SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, write_chat_template, write_json

GGUF_MAGIC = b"GGUF"

# general.architecture -> the Hugging Face family, and whether llama.cpp permuted q/k rows when converting
ARCHITECTURES = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], permute_qk=True),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], permute_qk=False),
}

# GGUF tensor -> Hugging Face tensor ({i}: the layer), .weight/.bias carried over
TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj",
    "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj",
    "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}

# tokenizer.ggml.pre -> the split llama.cpp applies before byte-level BPE (llama-vocab.cpp's regex_exprs)
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("gpt2", "smollm", "llama-bpe", "qwen2")


class GGUFFile:
    """The metadata and tensors of one GGUF file (memory-mapped by gguf.GGUFReader)."""

    def __init__(self, path: str | Path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"--gguf {self.path}: file does not exist")
        with open(self.path, "rb") as f:
            if f.read(4) != GGUF_MAGIC:
                raise UserError(f"--gguf {self.path}: not a GGUF file (it does not start with 'GGUF')")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except (ValueError, OSError, IndexError) as e:
            raise UserError(f"--gguf {self.path}: not a readable GGUF file, truncated or corrupt ({e})") from None
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = self.get("general.architecture")
        if self.arch not in ARCHITECTURES:
            raise UserError(f"--gguf {self.path}: architecture {self.arch!r} is not supported; supported: "
                            f"{', '.join(ARCHITECTURES)}")

    def get(self, key: str, *default):
        field = self.reader.fields.get(key.format(arch=getattr(self, "arch", "")))
        if field is None:
            if default:
                return default[0]
            raise UserError(f"--gguf {self.path}: has no {key.format(arch=getattr(self, 'arch', ''))!r} metadata")
        value = field.contents()
        if isinstance(value, float):  # stored as float32: its shortest decimal, 1e-05 not 9.999999747378752e-06
            value = float(str(np.float32(value)))
        return value

    def quant_types(self) -> dict[str, int]:
        """How many tensors of each GGML type the file holds, e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1}."""
        return dict(sorted(Counter(t.tensor_type.name for t in self.reader.tensors).items()))

    def tensor(self, name: str) -> np.ndarray:
        """The tensor dequantized to fp32, in Hugging Face's (out, in) order."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        try:
            return np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except NotImplementedError:
            raise UserError(f"--gguf {self.path}: tensor {name} is {t.tensor_type.name}, which the gguf package "
                            "cannot dequantize") from None


# ----------------------------------------------------------------------------- config

def hf_config(g: GGUFFile) -> dict:
    """config.json for the file's family, from the {arch}.* metadata llama.cpp writes."""
    n_head = g.get("{arch}.attention.head_count")
    hidden = g.get("{arch}.embedding_length")
    head_dim = g.get("{arch}.attention.key_length", hidden // n_head)
    if g.get("{arch}.rope.dimension_count", head_dim) != head_dim:
        raise UserError(f"--gguf {g.path}: rotary on {g.get('{arch}.rope.dimension_count')} of {head_dim} head "
                        "dimensions is not supported")
    if "rope_freqs.weight" in g.tensors:
        raise UserError(f"--gguf {g.path}: per-frequency rope factors (rope_freqs, Llama 3.1 scaling) are not supported")
    scaling = g.get("{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise UserError(f"--gguf {g.path}: rope scaling {scaling!r} is not supported (none, linear)")
    tokens = g.get("tokenizer.ggml.tokens")
    bos, eos = g.get("tokenizer.ggml.bos_token_id", None), g.get("tokenizer.ggml.eos_token_id")
    family = ARCHITECTURES[g.arch]
    return {
        "architectures": family["architectures"], "model_type": family["model_type"],
        "vocab_size": len(tokens), "hidden_size": hidden,
        "intermediate_size": g.get("{arch}.feed_forward_length"),
        "num_hidden_layers": g.get("{arch}.block_count"),
        "num_attention_heads": n_head,
        "num_key_value_heads": g.get("{arch}.attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "max_position_embeddings": g.get("{arch}.context_length"),
        "rms_norm_eps": g.get("{arch}.attention.layer_norm_rms_epsilon"),
        "rope_theta": g.get("{arch}.rope.freq_base", 10000.0),
        "rope_scaling": ({"rope_type": "linear", "factor": g.get("{arch}.rope.scaling.factor")}
                         if scaling == "linear" else None),
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in g.tensors,
        "bos_token_id": bos, "eos_token_id": eos,
        "pad_token_id": g.get("tokenizer.ggml.padding_token_id", eos),
        "torch_dtype": "float32",
    }


# ----------------------------------------------------------------------------- weights

def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's LlamaModel.permute (convert_hf_to_gguf.py): it interleaves the two rotary halves
    of each head's rows, (head, 2, d/2) -> (head, d/2, 2); this puts them back (as transformers'
    reverse_permute_weights does)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_name(name: str, where: Path) -> str:
    stem, _, suffix = name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3:
        pattern, layer = f"blk.{{i}}.{parts[2]}", parts[1]
    else:
        pattern, layer = stem, ""
    if pattern not in TENSORS or suffix not in ("weight", "bias"):
        raise UserError(f"--gguf {where}: tensor {name!r} is not one onnxgen maps (known: {', '.join(TENSORS)})")
    return TENSORS[pattern].format(i=layer) + "." + suffix


def hf_weights(g: GGUFFile, config: dict):
    """(Hugging Face name, fp32 array) for every tensor of the file, q/k rows un-permuted for Llama."""
    permute = ARCHITECTURES[g.arch]["permute_qk"]
    for name in g.tensors:
        w = g.tensor(name)
        if permute and ".attn_q." in name:
            w = unpermute(w, config["num_attention_heads"])
        elif permute and ".attn_k." in name:
            w = unpermute(w, config["num_key_value_heads"])
        yield hf_name(name, g.path), w


# ----------------------------------------------------------------------------- tokenizer

def build_tokenizer(g: GGUFFile):
    """A `tokenizers` byte-level BPE from tokenizer.ggml.*: vocabulary, merges, control tokens as special
    added tokens, llama.cpp's pre-tokenizer split, and a BOS/EOS template only where the file asks for one."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = g.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UserError(f"--gguf {g.path}: tokenizer {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    pre = g.get("tokenizer.ggml.pre", "gpt2")
    if pre not in PRE_TOKENIZERS:
        raise UserError(f"--gguf {g.path}: pre-tokenizer {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)})")
    tokens = g.get("tokenizer.ggml.tokens")
    types = g.get("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = [tuple(m.split(" ", 1)) for m in g.get("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre in ("gpt2", "smollm"))
    tok.pre_tokenizer = {
        "gpt2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), "isolated"), byte_level]),
        "qwen2": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_REGEX), "isolated"), byte_level]),
    }[pre]
    tok.decoder = decoders.ByteLevel()
    control, user = 3, 4  # gguf.TokenType.CONTROL, USER_DEFINED
    tok.add_tokens([AddedToken(tokens[i], normalized=False, special=False) for i, t in enumerate(types) if t == user])
    tok.add_special_tokens([AddedToken(tokens[i], normalized=False, special=True)
                            for i, t in enumerate(types) if t == control])
    specials = special_tokens(g, tokens)
    add_bos, add_eos = g.get("tokenizer.ggml.add_bos_token", False), g.get("tokenizer.ggml.add_eos_token", False)
    steps = [processors.ByteLevel(trim_offsets=False)]
    if add_bos or add_eos:
        bos = [specials["bos_token"]] if add_bos else []
        eos = [specials["eos_token"]] if add_eos else []
        steps.append(processors.TemplateProcessing(
            single=" ".join([*bos, "$A", *eos]), pair=" ".join([*bos, "$A", *eos, *bos, "$B:1", *eos]),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(bos + eos)]))
    tok.post_processor = processors.Sequence(steps) if len(steps) > 1 else steps[0]
    return tok, specials, bool(add_bos), bool(add_eos)


def special_tokens(g: GGUFFile, tokens: list[str]) -> dict[str, str]:
    """bos/eos/unk/pad token strings from the file's ids (pad defaults to eos)."""
    out = {}
    eos = g.get("tokenizer.ggml.eos_token_id")
    for name, key, default in (("bos_token", "bos_token_id", None), ("eos_token", "eos_token_id", None),
                               ("unk_token", "unknown_token_id", None), ("pad_token", "padding_token_id", eos)):
        i = g.get(f"tokenizer.ggml.{key}", default)
        if i is not None:
            if not 0 <= i < len(tokens):
                raise UserError(f"--gguf {g.path}: tokenizer.ggml.{key} {i} is outside the vocabulary of {len(tokens)}")
            out[name] = tokens[i]
    return out


# ----------------------------------------------------------------------------- the folder

def stage_gguf(path: str | Path, folder: str | Path) -> dict:
    """Write `folder` as a Hugging Face model folder made from the GGUF at `path` (fp32 safetensors);
    returns what the manifest records about the source."""
    from safetensors.numpy import save_file

    g, folder = GGUFFile(path), Path(folder)
    config = hf_config(g)
    tok, specials, add_bos, add_eos = build_tokenizer(g)  # refusals before the heavy part
    weights = dict(hf_weights(g, config))
    if "model.embed_tokens.weight" not in weights:
        raise UserError(f"--gguf {g.path}: has no token_embd.weight")
    if weights["model.embed_tokens.weight"].shape[0] != config["vocab_size"]:
        raise UserError(f"--gguf {g.path}: {weights['model.embed_tokens.weight'].shape[0]} embeddings for "
                        f"{config['vocab_size']} tokens")
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del weights
    write_json(folder / "config.json", config)
    generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
    write_json(folder / "generation_config.json", {**generation, "do_sample": False})
    tok.save(str(folder / "tokenizer.json"))
    write_json(folder / TOKENIZER_CONFIG, {
        "tokenizer_class": "PreTrainedTokenizerFast", **specials, "add_bos_token": add_bos, "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False, "model_max_length": config["max_position_embeddings"]})
    write_json(folder / SPECIAL_TOKENS_MAP, specials)
    template = g.get("tokenizer.chat_template", None)
    if template:
        write_chat_template(folder, template)
    return {"gguf": g.path.name, "gguf_sha256": manifest.sha256(g.path), "architecture": g.arch,
            "gguf_name": g.get("general.name", None), "quant_types": g.quant_types()}


def fp32_weight_bytes(path: str | Path) -> int:
    """The bytes the file's tensors take dequantized to fp32 (as export --gguf stages them)."""
    g = GGUFFile(path)
    return 4 * sum(int(t.n_elements) for t in g.reader.tensors)


def is_gguf(path: str | Path) -> bool:
    """A file that starts with GGUF's magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False

