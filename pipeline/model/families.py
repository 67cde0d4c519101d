"""Model families as data: a Hugging Face model folder -> our Decoder (model/decoder.py) with its weights.

As llama.cpp's convert_hf_to_gguf.py does, each model_type is one small class that names its config
keys, the defaults transformers gives keys a config.json leaves out, the values we refuse (they would
change the math in a way we do not implement), and how its safetensors tensors map onto ours:

    tensors = {"h.{i}.attn.c_attn": ("model.layers.{i}.self_attn.q_proj", "...k_proj", "...v_proj")}

maps our module to theirs ({i}: the layer), with .weight/.bias appended; several of theirs are
concatenated along the output dimension (q, k, v into one matmul). Everything shared lives in Family.

Weights load from safetensors only (never a pickle); every tensor of the folder must be used, with
the shape the config implies, or the load is refused in one line.
"""
from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import UserError
from pipeline.exports import read_json
from pipeline.model.config import DecoderConfig, rope_kind

if TYPE_CHECKING:  # torch only where weights load: a folder's config is read and refused without it
    import torch

    from pipeline.model.decoder import Decoder

log = logging.getLogger(__name__)

FAMILIES: dict[str, type["Family"]] = {}

# Hugging Face activation names -> ours (gelu_new, gelu_fast and gelu_pytorch_tanh are one function)
ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
               "relu": "relu", "silu": "silu", "swish": "silu"}


def family(*model_types: str):
    def register(cls):
        cls.model_types = model_types
        for t in model_types:
            FAMILIES[t] = cls
        return cls
    return register


class Family:
    """What every family shares: config reading, refusals, the tensor mapping and loading."""
    model_types: tuple[str, ...] = ()
    title = ""
    prefix = "model."          # the base model's prefix: checkpoints of the bare base model omit it
    defaults: dict = {}        # transformers' defaults for keys a config.json may leave out
    refuse: dict = {}          # key -> the only value we implement
    tensors: dict = {}         # our module -> theirs, or several of theirs concatenated
    ignore = ()                # regexes: tensors of theirs that are buffers, not weights

    theta_key = "rope_theta"                   # where transformers 4 kept the RoPE base
    fraction_key = "partial_rotary_factor"     # ... and the rotated fraction of each head

    def __init__(self, config: dict, where: str):
        self.where = where  # before legacy_rope, whose refusals name it
        self.config = self.legacy_rope(config)
        for key, allowed in self.refuse.items():
            if self.get(key, allowed) != allowed:
                self.fail(f"{key} = {self.config[key]!r} changes the model in a way onnxgen does not implement "
                          f"(supported: {allowed!r})")

    def legacy_rope(self, config: dict) -> dict:
        """transformers 5 writes RoPE as one `rope_parameters` object (base, rotated fraction and scaling
        together; per layer type for Gemma 3) where transformers 4 wrote rope_theta, partial_rotary_factor
        and rope_scaling. The families read the 4.x keys, so a 5.x config is mapped onto them here, with
        transformers 5's precedence: a non-empty legacy rope_scaling replaces rope_parameters altogether, and
        otherwise rope_parameters' values override the top-level ones (but Phi-3's top-level
        original_max_position_embeddings)."""
        params = config.get("rope_parameters")
        if params is None or config.get("rope_scaling"):
            return config
        if not isinstance(params, dict):
            self.fail(f"rope_parameters must be an object, got {params!r}")
        config = dict(config)
        if params and set(params) <= {"full_attention", "sliding_attention"}:  # per layer type (Gemma 3)
            local = params.get("sliding_attention") or {}
            if rope_kind(local) != "default":
                self.fail(f"rope_parameters.sliding_attention: {rope_kind(local)!r} scaling on sliding layers "
                          "is not implemented (supported: 'default')")
            if "rope_theta" in local:
                config["rope_local_base_freq"] = local["rope_theta"]
            params = params.get("full_attention") or {}
        if "rope_theta" in params:
            config[self.theta_key] = params["rope_theta"]
        if "partial_rotary_factor" in params:
            config[self.fraction_key] = params["partial_rotary_factor"]
        if "original_max_position_embeddings" in params:
            config.setdefault("original_max_position_embeddings", params["original_max_position_embeddings"])
        scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
        config["rope_scaling"] = scaling if rope_kind(scaling) != "default" else None
        return config

    def fail(self, message: str):
        raise UserError(f"config {self.where}: {message}")

    def get(self, key: str, *fallback):
        """config[key] (null included: a null window means none), else the family's default, else fallback."""
        if key in self.config:
            return self.config[key]
        if key in self.defaults:
            return self.defaults[key]
        if fallback:
            return fallback[0]
        self.fail(f"has no {key!r} (model_type {self.config.get('model_type')!r} needs it)")

    def activation(self, key: str) -> str:
        name = self.get(key)
        if name not in ACTIVATIONS:
            self.fail(f"{key} {name!r} is not implemented (known: {', '.join(ACTIVATIONS)})")
        return ACTIVATIONS[name]

    def rope_scaling(self, key: str = "rope_scaling") -> dict | None:
        s = self.get(key, None)
        if s is not None and not isinstance(s, dict):
            self.fail(f"{key} must be an object, got {s!r}")
        return s

    def layer_types(self, window: int | None) -> tuple[str, ...] | None:
        """config's layer_types when it has them; sliding layers without a window are full ones."""
        types = self.config.get("layer_types") or self.derived_layer_types()
        if types is not None and window is None:
            types = ["full_attention"] * len(types)
        return None if types is None else tuple(types)

    def derived_layer_types(self) -> list[str] | None:
        return None  # every layer alike: sliding if there is a window

    def arch(self) -> DecoderConfig:
        return DecoderConfig(**self.fields(), extra={"model_type": self.config.get("model_type")})

    def fields(self) -> dict:
        raise NotImplementedError

    def theirs_of(self, pattern: str, suffix: str) -> list[str]:
        """Their tensor names (with {i}) for our parameter `pattern.suffix`: tensors[pattern] + suffix."""
        theirs = self.tensors.get(pattern)
        assert theirs is not None, f"{type(self).__name__} maps no tensor to {pattern}"
        return [t + "." + suffix for t in ((theirs,) if isinstance(theirs, str) else theirs)]

    def convert(self, ours: str, theirs: list[torch.Tensor]) -> torch.Tensor:
        """Their tensor(s) as our parameter `ours` (a name with {i}); by default concatenated."""
        import torch

        return theirs[0] if len(theirs) == 1 else torch.cat(theirs, dim=0)

    # ------------------------------------------------------------------------- weights

    def state_dict(self, model: Decoder, weights: "SafetensorsFolder") -> dict[str, torch.Tensor]:
        """Our state dict from their tensors, each checked against the shape the config implies."""
        names = weights.names(self.prefix)
        used, missing, wrong, state = set(), [], [], {}
        for ours, param in model.state_dict(keep_vars=True).items():
            if ours == "lm_head.weight" and model.arch.tied:
                continue
            module, suffix = ours.rsplit(".", 1)
            layer = re.match(r"h\.(\d+)\.", module)
            pattern = re.sub(r"^h\.\d+\.", "h.{i}.", module)
            theirs = [t.format(i=layer.group(1) if layer else "") for t in self.theirs_of(pattern, suffix)]
            absent = [t for t in theirs if t not in names]
            if absent:
                missing.extend(absent)
                continue
            used.update(theirs)
            tensor = self.convert(f"{pattern}.{suffix}", [weights.get(names[t]).float() for t in theirs])
            if tuple(tensor.shape) != tuple(param.shape):
                wrong.append(f"{'+'.join(theirs)} {tuple(tensor.shape)}, expected {tuple(param.shape)}")
                continue
            state[ours] = tensor
        unexpected = [n for n in names if n not in used and not any(re.search(p, n) for p in self.ignore)
                      and not (n == "lm_head.weight" and model.arch.tied)]
        if missing or wrong or unexpected:
            parts = [f"{what} {items[:4]}{' ...' if len(items) > 4 else ''}" for what, items in
                     [("missing", missing), ("wrong shapes", wrong), ("tensors onnxgen does not implement",
                                                                      unexpected)] if items]
            raise UserError(f"checkpoint {weights.folder}: does not match its config.json ({'; '.join(parts)})")
        if model.arch.tied:
            state["lm_head.weight"] = state["wte.weight"]
        return state


class SafetensorsFolder:
    """Every *.safetensors file of a folder (sharded or not), read lazily; never a pickle."""

    def __init__(self, folder: Path):
        from safetensors import SafetensorError, safe_open

        self.folder, self.files = folder, {}
        paths = sorted(folder.glob("*.safetensors"))
        if not paths:
            raise UserError(f"--hf {folder}: no *.safetensors weights (onnxgen loads safetensors only, never pickles)")
        for path in paths:
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = list(f.keys())
            except (SafetensorError, OSError) as e:
                raise UserError(f"checkpoint {path}: not a readable safetensors file ({e})") from None
            for k in keys:
                if k in self.files:
                    raise UserError(f"checkpoint {folder}: tensor {k} is in both {self.files[k].name} and {path.name}")
                self.files[k] = path

    def names(self, prefix: str) -> dict[str, str]:
        """Their canonical names (with the base model's prefix) -> the names in the files."""
        if any(k.startswith(prefix) for k in self.files):
            return {k: k for k in self.files}
        return {(k if k.startswith("lm_head.") else prefix + k): k for k in self.files}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt") as f:
            return f.get_tensor(name)


# ----------------------------------------------------------------------------- the families

def _layers(*modules: str) -> tuple[str, ...]:
    return tuple(f"model.layers.{{i}}.{m}" for m in modules)


@family("llama")
class Llama(Family):
    title = "Llama"
    defaults = dict(tie_word_embeddings=False, rms_norm_eps=1e-6, rope_theta=10000.0, attention_bias=False,
                    mlp_bias=False, hidden_act="silu", max_position_embeddings=2048, intermediate_size=11008)
    tensors = {
        "wte": "model.embed_tokens",
        "h.{i}.ln_1": _layers("input_layernorm")[0],
        "h.{i}.attn.c_attn": _layers("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "h.{i}.attn.c_proj": _layers("self_attn.o_proj")[0],
        "h.{i}.attn.q_norm": _layers("self_attn.q_norm")[0],
        "h.{i}.attn.k_norm": _layers("self_attn.k_norm")[0],
        "h.{i}.ln_2": _layers("post_attention_layernorm")[0],
        "h.{i}.mlp.c_fc": _layers("mlp.gate_proj", "mlp.up_proj"),
        "h.{i}.mlp.c_proj": _layers("mlp.down_proj")[0],
        "ln_f": "model.norm",
        "lm_head": "lm_head",
    }
    ignore = (r"rotary_emb\.inv_freq$",)

    def fields(self) -> dict:
        bias = self.get("attention_bias")
        window = self.get("sliding_window", None)
        return dict(
            vocab_size=self.get("vocab_size"), n_ctx=self.get("max_position_embeddings"),
            n_layer=self.get("num_hidden_layers"), n_head=self.get("num_attention_heads"),
            n_kv_head=self.get("num_key_value_heads", None), n_embd=self.get("hidden_size"),
            head_dim=self.get("head_dim", None), n_inner=self.get("intermediate_size"),
            norm="rmsnorm", norm_eps=self.get("rms_norm_eps"), positional="rope",
            rope_theta=self.get("rope_theta"), rope_scaling=self.rope_scaling(),
            rope_fraction=self.get("partial_rotary_factor", 1.0),
            qkv_bias=bias, out_bias=bias, activation=self.activation("hidden_act"), gated=True,
            mlp_bias=self.get("mlp_bias", False), tied=self.get("tie_word_embeddings"),
            sliding_window=window, layer_types=self.layer_types(window))


@family("mistral")
class Mistral(Llama):
    title = "Mistral"
    defaults = {**Llama.defaults, "sliding_window": 4096, "max_position_embeddings": 131072,
                "intermediate_size": 14336}
    refuse = {"attention_bias": False, "mlp_bias": False}


@family("smollm3")
class SmolLM3(Llama):
    """SmolLM3: Llama whose NoPE layers (no_rope_layers[i] = 0, by default every 4th) apply no rotary."""
    title = "SmolLM3"
    defaults = {**Llama.defaults, "tie_word_embeddings": True, "rope_theta": 2_000_000.0,
                "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": None,
                "no_rope_layer_interval": 4}

    def rope_flags(self) -> list:
        """transformers' no_rope_layers: 1 where a layer rotates, 0 where it does not (the name says the opposite)."""
        n = self.get("num_hidden_layers")
        flags = self.get("no_rope_layers", None)
        if flags is None:
            every = self.get("no_rope_layer_interval")
            flags = [int((i + 1) % every != 0) for i in range(n)]
        if not isinstance(flags, list) or len(flags) != n or set(flags) - {0, 1}:
            self.fail(f"no_rope_layers must be {n} flags of 0 or 1, got {flags!r}")
        return flags

    def fields(self) -> dict:
        return {**super().fields(), "rope_layers": tuple(bool(f) for f in self.rope_flags())}

    def derived_layer_types(self):
        # transformers' SmolLM3Config: the NoPE layers slide, when use_sliding_window
        slide = self.get("use_sliding_window") and self.get("sliding_window", None) is not None
        return ["sliding_attention" if slide and not f else "full_attention" for f in self.rope_flags()]


@family("granite")
class Granite(Llama):
    """Granite: Llama with multipliers on the embeddings, the attention scores and each residual branch,
    and the logits divided by logits_scaling."""
    title = "Granite"
    defaults = {**Llama.defaults, "embedding_multiplier": 1.0, "attention_multiplier": 1.0,
                "residual_multiplier": 1.0, "logits_scaling": 1.0}

    def fields(self) -> dict:
        def unless_one(key):
            value = float(self.get(key))
            return None if value == 1.0 else value
        return {**super().fields(), "embed_scale": unless_one("embedding_multiplier"),
                "attn_scale": float(self.get("attention_multiplier")),  # the scale itself, not a factor on it
                "residual_scale": unless_one("residual_multiplier"), "logit_divisor": unless_one("logits_scaling")}


@family("qwen2")
class Qwen2(Llama):
    """Qwen2: biases on q, k and v only; sliding windows only with use_sliding_window, from max_window_layers."""
    title = "Qwen2"
    defaults = {**Llama.defaults, "max_position_embeddings": 32768, "intermediate_size": 22016,
                "use_sliding_window": False, "sliding_window": 4096, "max_window_layers": 28}
    refuse = {"attention_bias": False, "mlp_bias": False}

    def fields(self) -> dict:
        window = self.get("sliding_window", None) if self.get("use_sliding_window") else None
        return {**super().fields(), "qkv_bias": True, "out_bias": False, "sliding_window": window,
                "layer_types": self.layer_types(window)}

    def derived_layer_types(self):
        first = self.get("max_window_layers")
        return ["sliding_attention" if i >= first else "full_attention" for i in range(self.get("num_hidden_layers"))]


@family("qwen3")
class Qwen3(Qwen2):
    """Qwen3: Qwen2 with RMSNorm on each head's q and k, and attention_bias instead of fixed biases."""
    title = "Qwen3"
    defaults = {**Qwen2.defaults, "head_dim": 128}
    refuse = {"mlp_bias": False}

    def fields(self) -> dict:
        bias = self.get("attention_bias")
        return {**super().fields(), "qk_norm": True, "qkv_bias": bias, "out_bias": bias}


@family("phi3")
class Phi3(Llama):
    """Phi-3: q, k, v in one tensor and gate, up in another (our layout already); longrope scaling."""
    title = "Phi-3"
    defaults = {**Llama.defaults, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
                "intermediate_size": 8192, "sliding_window": None}
    refuse = {"attention_bias": False, "mlp_bias": False}
    tensors = {**Llama.tensors, "h.{i}.attn.c_attn": _layers("self_attn.qkv_proj")[0],
               "h.{i}.mlp.c_fc": _layers("mlp.gate_up_proj")[0]}

    def rope_scaling(self, key: str = "rope_scaling") -> dict | None:
        s = super().rope_scaling(key)
        if s is not None and s.get("type") in ("su", "yarn") and "rope_type" not in s:
            s = {**s, "rope_type": "longrope"}  # what transformers' Phi3Config makes of the legacy names
        return s

    def fields(self) -> dict:
        original = self.get("original_max_position_embeddings", None)
        return {**super().fields(), "rope_original_ctx": original}


@family("gemma")
class Gemma(Llama):
    """Gemma: RMSNorm scales by (1 + w), embeddings scaled by sqrt(hidden), GeGLU, a head tied to them."""
    title = "Gemma"
    defaults = {**Llama.defaults, "tie_word_embeddings": True, "hidden_act": "gelu_pytorch_tanh",
                "head_dim": 256, "max_position_embeddings": 8192, "intermediate_size": 24576}
    refuse = {"mlp_bias": False}
    act_key = "hidden_act"

    def fields(self) -> dict:
        return {**super().fields(), "norm_offset": 1.0, "embed_scale": math.sqrt(self.get("hidden_size")),
                "activation": self.activation(self.act_key)}


@family("gemma2")
class Gemma2(Gemma):
    """Gemma 2: sandwich norms, soft-capped attention scores and logits, alternating sliding layers."""
    title = "Gemma 2"
    defaults = {**Gemma.defaults, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
                "sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                "intermediate_size": 9216}
    act_key = "hidden_activation"
    tensors = {**Llama.tensors,
               "h.{i}.post_ln_1": _layers("post_attention_layernorm")[0],
               "h.{i}.ln_2": _layers("pre_feedforward_layernorm")[0],
               "h.{i}.post_ln_2": _layers("post_feedforward_layernorm")[0]}

    def fields(self) -> dict:
        return {**super().fields(), "sandwich_norm": True, "attn_scale": self.get("query_pre_attn_scalar") ** -0.5,
                "attn_softcap": self.get("attn_logit_softcapping", None),
                "final_softcap": self.get("final_logit_softcapping", None)}

    def derived_layer_types(self):
        return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(self.get("num_hidden_layers"))]


@family("gemma3_text")
class Gemma3(Gemma2):
    """Gemma 3 (text): Gemma 2 plus q/k norms, and sliding layers with their own unscaled RoPE base."""
    title = "Gemma 3 (text)"
    defaults = {**Gemma2.defaults, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
                "attn_logit_softcapping": None, "final_logit_softcapping": None, "max_position_embeddings": 131072,
                "sliding_window_pattern": 6}
    refuse = {"mlp_bias": False, "use_bidirectional_attention": False}

    def fields(self) -> dict:
        return {**super().fields(), "qk_norm": True, "rope_local_theta": self.get("rope_local_base_freq")}

    def derived_layer_types(self):
        pattern = self.config.get("sliding_window_pattern") or self.config.get("_sliding_window_pattern") or 6
        return ["sliding_attention" if (i + 1) % pattern else "full_attention"
                for i in range(self.get("num_hidden_layers"))]


@family("olmo2")
class Olmo2(Llama):
    """OLMo 2: RMSNorm on each sublayer's output (none on its input), q and k norms over all heads at once."""
    title = "OLMo 2"
    defaults = {**Llama.defaults, "rms_norm_eps": 1e-5}
    refuse = {"mlp_bias": False}
    tensors = {**Llama.tensors,
               "h.{i}.post_ln_1": _layers("post_attention_layernorm")[0],
               "h.{i}.post_ln_2": _layers("post_feedforward_layernorm")[0]}

    def fields(self) -> dict:
        return {**super().fields(), "pre_norm": False, "sandwich_norm": True, "qk_norm": True, "qk_norm_full": True}


@family("olmo3")
class Olmo3(Olmo2):
    """OLMo 3: OLMo 2 with sliding-window layers (three in four by default), whose RoPE is never scaled."""
    title = "OLMo 3"
    # transformers 5's Olmo3Config gives the sliding layers default_theta when a legacy config names
    # rope_theta (it pops the key for the full layers first)
    defaults = {**Olmo2.defaults, "rope_theta": 500_000.0, "rope_local_base_freq": 500_000.0, "sliding_window": 4096}

    def fields(self) -> dict:
        return {**super().fields(), "rope_local_theta": float(self.get("rope_local_base_freq"))}

    def derived_layer_types(self):
        return ["sliding_attention" if (i + 1) % 4 else "full_attention" for i in range(self.get("num_hidden_layers"))]


class RoutedExperts:
    """What the mixture-of-experts families add to their base family: the router and experts fields, and
    their expert tensors in our Experts layout (model/decoder.py): fc1 (E, 2 * inner, C), each expert's
    gate and up rows interleaved, fc2 (E, C, inner). Checkpoints with one tensor per expert and projection
    (Mixtral, Qwen3-MoE) name them by `expert` (with {i}, {e} and the projection), `projections`
    their gate, up and down."""
    experts_key = "num_local_experts"
    expert = ""
    projections = ("gate_proj", "up_proj", "down_proj")

    def n_experts(self):
        # transformers 5 maps Qwen3-MoE's num_experts onto num_local_experts, and saves that name
        key = self.experts_key if self.experts_key in self.config else "num_local_experts"
        return self.get(key if key in self.config else self.experts_key)

    def moe_fields(self, inner_key: str) -> dict:
        n, k = self.n_experts(), self.get("num_experts_per_tok")
        if not isinstance(n, int) or not isinstance(k, int) or not 0 < k <= n:
            self.fail(f"{self.experts_key} = {n!r} and num_experts_per_tok = {k!r}: need 0 < per token <= experts")
        return dict(n_experts=n, n_experts_per_tok=k, moe_inner=self.get(inner_key))

    def theirs_of(self, pattern: str, suffix: str) -> list[str]:
        if pattern != "h.{i}.mlp" or suffix not in ("fc1", "fc2"):
            return super().theirs_of(pattern, suffix)
        gate, up, down = self.projections
        names = [gate, up] if suffix == "fc1" else [down]
        return [self.expert.format(i="{i}", e=e, p=p) + ".weight" for p in names
                for e in range(self.n_experts())]

    def convert(self, ours: str, theirs: list[torch.Tensor]) -> torch.Tensor:
        import torch

        if ours == "h.{i}.mlp.fc1":  # [gate_0..gate_E-1, up_0..up_E-1] -> (E, 2 * inner, C), rows interleaved
            E = len(theirs) // 2
            gate, up = torch.stack(theirs[:E]), torch.stack(theirs[E:])
            if gate.shape != up.shape:
                self.fail(f"expert gate {tuple(gate.shape)} and up {tuple(up.shape)} projections differ in shape")
            return torch.stack([gate, up], dim=2).reshape(E, -1, gate.shape[-1])
        if ours == "h.{i}.mlp.fc2":
            return torch.stack(theirs)
        return super().convert(ours, theirs)


@family("mixtral")
class Mixtral(RoutedExperts, Mistral):
    """Mixtral: Mistral whose MLP is num_local_experts SwiGLU experts, num_experts_per_tok of them per token."""
    title = "Mixtral"
    defaults = {**Mistral.defaults, "sliding_window": None, "rope_theta": 1e6, "max_position_embeddings": 4096 * 32,
                "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5}
    tensors = {**Mistral.tensors, "h.{i}.mlp.router": _layers("block_sparse_moe.gate")[0]}
    expert = "model.layers.{i}.block_sparse_moe.experts.{e}.{p}"
    projections = ("w1", "w3", "w2")

    def fields(self) -> dict:
        return {**super().fields(), **self.moe_fields("intermediate_size")}


@family("qwen3_moe")
class Qwen3Moe(RoutedExperts, Qwen3):
    """Qwen3-MoE: Qwen3 whose MLPs are routed experts (moe_intermediate_size wide), but in mlp_only_layers
    and off the decoder_sparse_step; the chosen weights renormalized only with norm_topk_prob."""
    title = "Qwen3-MoE"
    experts_key = "num_experts"
    defaults = {**Qwen3.defaults, "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [], "intermediate_size": 6144,
                "max_position_embeddings": 32768, "rope_theta": 10000.0, "sliding_window": None}
    tensors = {**Qwen3.tensors, "h.{i}.mlp.router": _layers("mlp.gate")[0]}
    expert = "model.layers.{i}.mlp.experts.{e}.{p}"

    def fields(self) -> dict:
        n, step, dense = self.get("num_hidden_layers"), self.get("decoder_sparse_step"), self.get("mlp_only_layers")
        if not isinstance(step, int) or step < 1 or not isinstance(dense, list):
            self.fail(f"decoder_sparse_step = {step!r} and mlp_only_layers = {dense!r}: need a step >= 1 and a list")
        moe = self.moe_fields("moe_intermediate_size")
        layers = tuple(moe["n_experts"] > 0 and i not in dense and (i + 1) % step == 0 for i in range(n))
        return {**super().fields(), **moe, "moe_layers": layers, "moe_renormalize": bool(self.get("norm_topk_prob"))}


@family("gpt_oss")
class GptOss(RoutedExperts, Llama):
    """gpt-oss: attention with biases and a learned sink logit per head, sliding layers beside full ones,
    YaRN; experts with biases whose SwiGLU clamps at swiglu_limit and adds 1 to the up half, routed by a
    softmax over the chosen experts' logits (the renormalized form). Its gate_up_proj (E, C, 2 * inner)
    is already interleaved, gate then up."""
    title = "gpt-oss"
    defaults = {**Llama.defaults, "num_local_experts": 128, "num_experts_per_tok": 4, "attention_bias": True,
                "rms_norm_eps": 1e-5, "rope_theta": 150000.0, "sliding_window": 128, "swiglu_alpha": 1.702,
                "swiglu_limit": 7.0, "max_position_embeddings": 131072, "intermediate_size": 2880, "head_dim": 64}
    refuse = {"mlp_bias": False}
    tensors = {**Llama.tensors, "h.{i}.attn": _layers("self_attn")[0], "h.{i}.mlp.router": _layers("mlp.router")[0]}
    gpt_oss_experts = {"fc1": "gate_up_proj", "fc1_bias": "gate_up_proj_bias", "fc2": "down_proj",
                       "fc2_bias": "down_proj_bias"}

    def __init__(self, config: dict, where: str):
        super().__init__(config, where)
        if self.config.get("quantization_config"):
            method = self.config["quantization_config"].get("quant_method", "?")
            self.fail(f"quantization_config ({method}) is not implemented: give onnxgen the bf16/fp32 checkpoint "
                      "(transformers' dequantize=True, saved with save_pretrained)")

    def fields(self) -> dict:
        return {**super().fields(), **self.moe_fields("intermediate_size"), "router_bias": True, "expert_bias": True,
                "swiglu_alpha": float(self.get("swiglu_alpha")), "swiglu_beta": 1.0,
                "swiglu_limit": float(self.get("swiglu_limit")), "attn_sinks": True}

    def derived_layer_types(self):
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(self.get("num_hidden_layers"))]

    def theirs_of(self, pattern: str, suffix: str) -> list[str]:
        if pattern == "h.{i}.mlp" and suffix in self.gpt_oss_experts:
            return [f"model.layers.{{i}}.mlp.experts.{self.gpt_oss_experts[suffix]}"]
        return Llama.theirs_of(self, pattern, suffix)

    def convert(self, ours: str, theirs: list[torch.Tensor]) -> torch.Tensor:
        if ours in ("h.{i}.mlp.fc1", "h.{i}.mlp.fc2"):  # (E, in, out) -> (E, out, in)
            return theirs[0].transpose(1, 2).contiguous()
        return Family.convert(self, ours, theirs)


@family("lfm2")
class Lfm2(Family):
    """LFM2: gated short-convolution layers beside GQA attention layers (q/k RMSNorm per head), pre-RMSNorm,
    SwiGLU whose width transformers adjusts (block_auto_adjust_ff_dim); its final norm is `embedding_norm`."""
    title = "LFM2"
    defaults = dict(vocab_size=65536, hidden_size=2560, intermediate_size=12288, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=128_000, norm_eps=1e-5,
                    tie_word_embeddings=True, rope_theta=1_000_000.0, conv_bias=False, conv_L_cache=3,
                    block_multiple_of=256, block_ffn_dim_multiplier=1.0, block_auto_adjust_ff_dim=True)
    tensors = {
        "wte": "model.embed_tokens",
        "h.{i}.ln_1": _layers("operator_norm")[0],
        "h.{i}.attn.c_attn": _layers("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "h.{i}.attn.c_proj": _layers("self_attn.out_proj")[0],
        "h.{i}.attn.q_norm": _layers("self_attn.q_layernorm")[0],
        "h.{i}.attn.k_norm": _layers("self_attn.k_layernorm")[0],
        "h.{i}.conv.c_in": _layers("conv.in_proj")[0],
        "h.{i}.conv.conv": _layers("conv.conv")[0],
        "h.{i}.conv.c_proj": _layers("conv.out_proj")[0],
        "h.{i}.ln_2": _layers("ffn_norm")[0],
        "h.{i}.mlp.c_fc": _layers("feed_forward.w1", "feed_forward.w3"),
        "h.{i}.mlp.c_proj": _layers("feed_forward.w2")[0],
        "ln_f": "model.embedding_norm",
        "lm_head": "lm_head",
    }
    ignore = (r"rotary_emb\.inv_freq$",)

    def ffn_width(self) -> int:
        """transformers' Lfm2MLP: 2/3 of intermediate_size, times the multiplier, up to block_multiple_of."""
        width = self.get("block_ff_dim", None) or self.get("intermediate_size")
        if self.get("block_auto_adjust_ff_dim"):
            width = int(2 * width / 3)
            if self.get("block_ffn_dim_multiplier") is not None:
                width = int(self.get("block_ffn_dim_multiplier") * width)
                every = self.get("block_multiple_of")
                width = every * ((width + every - 1) // every)
        return width

    def lfm2_layer_types(self) -> tuple[str, ...]:
        n = self.get("num_hidden_layers")
        types = self.config.get("layer_types")
        if types is None:
            full = self.config.get("full_attn_idxs")
            full = list(range(n)) if full is None else full
            types = ["full_attention" if i in full else "conv" for i in range(n)]
        if not isinstance(types, list) or len(types) != n or set(types) - {"full_attention", "conv"}:
            self.fail(f"layer_types must be {n} of 'full_attention' or 'conv', got {types!r}")
        return tuple(types)

    def fields(self) -> dict:
        tied = self.config.get("tie_embedding", self.get("tie_word_embeddings"))
        return dict(
            vocab_size=self.get("vocab_size"), n_ctx=self.get("max_position_embeddings"),
            n_layer=self.get("num_hidden_layers"), n_head=self.get("num_attention_heads"),
            n_kv_head=self.get("num_key_value_heads"), n_embd=self.get("hidden_size"),
            head_dim=self.get("head_dim", None), n_inner=self.ffn_width(),
            norm="rmsnorm", norm_eps=self.get("norm_eps"), positional="rope", qk_norm=True,
            rope_theta=self.get("rope_theta"), rope_scaling=self.rope_scaling(),
            qkv_bias=False, out_bias=False, activation="silu", gated=True, mlp_bias=False, tied=tied,
            layer_types=self.lfm2_layer_types(), conv_kernel=self.get("conv_L_cache"),
            conv_bias=bool(self.get("conv_bias")))


@family("granitemoehybrid")
class GraniteMoeHybrid(Granite):
    """Granite 4: Mamba-2 layers ("mamba") beside GQA attention layers ("attention"; RoPE only with
    position_embedding_type "rope"), routed SwiGLU experts (softmax over the top k logits: the renormalized
    form) plus a shared SwiGLU MLP in every layer (the shared MLP alone without experts), Granite's
    multipliers. Its experts' input_linear (E, 2 * inner, C) holds gate and up concatenated: interleaved on load."""
    title = "Granite 4"
    defaults = {**Granite.defaults, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "vocab_size": 32000,
                "intermediate_size": 11008, "num_local_experts": 8, "num_experts_per_tok": 2,
                "shared_intermediate_size": 1024, "position_embedding_type": None, "mamba_n_heads": 128,
                "mamba_n_groups": 1, "mamba_d_state": 256, "mamba_d_conv": 4,
                "mamba_expand": 2, "mamba_conv_bias": True, "mamba_proj_bias": False}
    refuse = {"attention_bias": False}
    # transformers' names for the layer types, old ("mamba", "attention") and new
    block_types = {"mamba": "mamba", "linear_attention": "mamba", "attention": "full_attention",
                   "full_attention": "full_attention"}
    tensors = {
        **{k: v for k, v in Llama.tensors.items() if ".mlp." not in k},
        "h.{i}.mlp.router": _layers("block_sparse_moe.router.layer")[0],
        "h.{i}.mlp": _layers("block_sparse_moe")[0],
        "h.{i}.shared_mlp.c_fc": _layers("shared_mlp.input_linear")[0],
        "h.{i}.shared_mlp.c_proj": _layers("shared_mlp.output_linear")[0],
        "h.{i}.mamba": _layers("mamba")[0],
        "h.{i}.mamba.in_proj": _layers("mamba.in_proj")[0],
        "h.{i}.mamba.conv1d": _layers("mamba.conv1d")[0],
        "h.{i}.mamba.norm": _layers("mamba.norm")[0],
        "h.{i}.mamba.out_proj": _layers("mamba.out_proj")[0],
    }

    def granite4_layer_types(self) -> tuple[str, ...]:
        n = self.get("num_hidden_layers")
        types = self.config.get("layer_types") or self.config.get("layers_block_type") or ["mamba"] * n
        if not isinstance(types, list) or len(types) != n or set(types) - set(self.block_types):
            self.fail(f"layer_types must be {n} of 'mamba' or 'attention', got {types!r}")
        return tuple(self.block_types[t] for t in types)

    def fields(self) -> dict:
        fields = super().fields()
        hidden, heads = self.get("hidden_size"), self.get("mamba_n_heads")
        inner = self.get("mamba_expand") * hidden
        head = self.get("mamba_d_head", "auto")  # not a default: transformers resolves "auto" in the config
        head = inner // heads if head == "auto" else head
        if not isinstance(heads, int) or heads <= 0 or head * heads != inner:
            self.fail(f"mamba_n_heads ({heads}) times mamba_d_head ({head}) must be mamba_expand * hidden_size ({inner})")
        limit = self.get("time_step_limit", None)
        if limit is not None and [float(v["__float__"]) if isinstance(v, dict) else float(v) for v in limit] \
                != [0.0, float("inf")]:
            self.fail(f"time_step_limit = {limit!r} is not implemented (supported: [0.0, inf])")
        if self.get("position_embedding_type") not in (None, "rope", "nope"):
            self.fail(f"position_embedding_type {self.get('position_embedding_type')!r} is not implemented "
                      "(supported: 'rope' or none)")
        n = fields["n_layer"]
        experts = self.get("num_local_experts") or 0
        shared = self.get("shared_intermediate_size")
        fields.update(layer_types=self.granite4_layer_types(), sliding_window=None,
                      rope_layers=(self.get("position_embedding_type") == "rope",) * n,
                      mamba_heads=heads, mamba_head_dim=head, mamba_groups=self.get("mamba_n_groups"),
                      mamba_state=self.get("mamba_d_state"), mamba_conv=self.get("mamba_d_conv"),
                      mamba_conv_bias=bool(self.get("mamba_conv_bias")),
                      mamba_proj_bias=bool(self.get("mamba_proj_bias")), mlp_bias=False)
        if experts:  # the router picks k experts; the shared MLP runs beside them
            k = self.get("num_experts_per_tok")
            if not isinstance(k, int) or not 0 < k <= experts:
                self.fail(f"num_local_experts = {experts!r} and num_experts_per_tok = {k!r}: need 0 < per token <= experts")
            fields.update(n_experts=experts, n_experts_per_tok=k, moe_inner=self.get("intermediate_size"),
                          shared_inner=shared, moe_renormalize=True)
        else:  # no experts: the shared MLP is the layer's MLP
            fields.update(n_inner=shared)
        return fields

    def theirs_of(self, pattern: str, suffix: str) -> list[str]:
        if pattern == "h.{i}.mlp" and suffix in ("fc1", "fc2"):
            return [_layers(f"block_sparse_moe.{'input_linear' if suffix == 'fc1' else 'output_linear'}")[0] + ".weight"]
        if pattern in ("h.{i}.mlp.c_fc", "h.{i}.mlp.c_proj"):  # no experts: the shared MLP in the MLP's place
            pattern = pattern.replace(".mlp.", ".shared_mlp.")
        return super().theirs_of(pattern, suffix)

    def convert(self, ours: str, theirs: list[torch.Tensor]) -> torch.Tensor:
        if ours == "h.{i}.mlp.fc1":  # (E, [gate; up], C) -> (E, 2 * inner, C), gate and up rows interleaved
            E, two_inner, C = theirs[0].shape
            return theirs[0].reshape(E, 2, two_inner // 2, C).transpose(1, 2).reshape(E, two_inner, C)
        return super().convert(ours, theirs)


@family("qwen3_5_text")
class Qwen3_5(Family):
    """Qwen3.5 (text): Gated DeltaNet linear-attention layers (by default three in four) beside gated
    full-attention layers (q/k RMSNorm per head, partial rotary, the output times sigmoid of a gate q_proj
    projects beside each head's q), every RMSNorm but the DeltaNet's zero-centered (1 + w), SwiGLU.
    For text the three mrope position streams are one, so its RoPE is the ordinary partial rotary."""
    title = "Qwen3.5"
    defaults = dict(vocab_size=248320, hidden_size=4096, intermediate_size=12288, num_hidden_layers=32,
                    num_attention_heads=16, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=32768,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0, partial_rotary_factor=0.25,
                    attention_bias=False, head_dim=256, linear_conv_kernel_dim=4, linear_key_head_dim=128,
                    linear_value_head_dim=128, linear_num_key_heads=16, linear_num_value_heads=32,
                    full_attention_interval=4)
    # the DeltaNet's convolution takes hidden_act too, and we implement it (and its gates) with SiLU
    refuse = {"hidden_act": "silu", "attention_bias": False}
    tensors = {
        "wte": "model.embed_tokens",
        "h.{i}.ln_1": _layers("input_layernorm")[0],
        "h.{i}.attn.c_attn": _layers("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "h.{i}.attn.c_proj": _layers("self_attn.o_proj")[0],
        "h.{i}.attn.q_norm": _layers("self_attn.q_norm")[0],
        "h.{i}.attn.k_norm": _layers("self_attn.k_norm")[0],
        "h.{i}.linear": _layers("linear_attn")[0],  # dt_bias, A_log
        "h.{i}.linear.c_qkv": _layers("linear_attn.in_proj_qkv")[0],
        "h.{i}.linear.c_z": _layers("linear_attn.in_proj_z")[0],
        "h.{i}.linear.c_b": _layers("linear_attn.in_proj_b")[0],
        "h.{i}.linear.c_a": _layers("linear_attn.in_proj_a")[0],
        "h.{i}.linear.conv": _layers("linear_attn.conv1d")[0],
        "h.{i}.linear.norm": _layers("linear_attn.norm")[0],
        "h.{i}.linear.c_proj": _layers("linear_attn.out_proj")[0],
        "h.{i}.ln_2": _layers("post_attention_layernorm")[0],
        "h.{i}.mlp.c_fc": _layers("mlp.gate_proj", "mlp.up_proj"),
        "h.{i}.mlp.c_proj": _layers("mlp.down_proj")[0],
        "ln_f": "model.norm",
        "lm_head": "lm_head",
    }
    ignore = (r"rotary_emb\.inv_freq$",)

    def qwen3_5_layer_types(self) -> tuple[str, ...]:
        n = self.get("num_hidden_layers")
        types = self.config.get("layer_types")
        if types is None:  # transformers' Qwen3_5TextConfig: every full_attention_interval-th layer is full
            every = self.get("full_attention_interval")
            types = ["linear_attention" if (i + 1) % every else "full_attention" for i in range(n)]
        if not isinstance(types, list) or len(types) != n or set(types) - {"full_attention", "linear_attention"}:
            self.fail(f"layer_types must be {n} of 'full_attention' or 'linear_attention', got {types!r}")
        return tuple(types)

    def fields(self) -> dict:
        return dict(
            vocab_size=self.get("vocab_size"), n_ctx=self.get("max_position_embeddings"),
            n_layer=self.get("num_hidden_layers"), n_head=self.get("num_attention_heads"),
            n_kv_head=self.get("num_key_value_heads"), n_embd=self.get("hidden_size"),
            head_dim=self.get("head_dim"), n_inner=self.get("intermediate_size"),
            norm="rmsnorm", norm_eps=self.get("rms_norm_eps"), norm_offset=1.0, positional="rope", qk_norm=True,
            rope_theta=self.get("rope_theta"), rope_fraction=self.get("partial_rotary_factor"),
            rope_scaling=self.rope_scaling(), qkv_bias=False, out_bias=False, attn_output_gate=True,
            activation="silu", gated=True, mlp_bias=False, tied=self.get("tie_word_embeddings"),
            layer_types=self.qwen3_5_layer_types(),
            linear_num_key_heads=self.get("linear_num_key_heads"),
            linear_num_value_heads=self.get("linear_num_value_heads"),
            linear_key_head_dim=self.get("linear_key_head_dim"),
            linear_value_head_dim=self.get("linear_value_head_dim"),
            linear_conv_kernel_dim=self.get("linear_conv_kernel_dim"))

    def convert(self, ours: str, theirs: list[torch.Tensor]) -> torch.Tensor:
        import torch

        if ours == "h.{i}.attn.c_attn.weight":  # q_proj holds each head's q then its gate: q, k, v, gate
            q_gate, k, v = theirs
            heads = q_gate.reshape(self.get("num_attention_heads"), 2, self.get("head_dim"), -1)
            return torch.cat([heads[:, 0].reshape(-1, q_gate.shape[-1]), k, v,
                              heads[:, 1].reshape(-1, q_gate.shape[-1])], dim=0)
        return Family.convert(self, ours, theirs)


@family("gpt_neox")
class GPTNeoX(Family):
    """GPT-NeoX (Pythia): parallel residual, partial rotary, q/k/v interleaved per head in one tensor."""
    title = "GPT-NeoX (Pythia)"
    prefix = "gpt_neox."
    defaults = dict(tie_word_embeddings=False, layer_norm_eps=1e-5, rotary_emb_base=10000, rotary_pct=0.25,
                    attention_bias=True, use_parallel_residual=True, hidden_act="gelu",
                    max_position_embeddings=2048, intermediate_size=24576)
    tensors = {
        "wte": "gpt_neox.embed_in",
        "h.{i}.ln_1": "gpt_neox.layers.{i}.input_layernorm",
        "h.{i}.attn.c_attn": "gpt_neox.layers.{i}.attention.query_key_value",
        "h.{i}.attn.c_proj": "gpt_neox.layers.{i}.attention.dense",
        "h.{i}.ln_2": "gpt_neox.layers.{i}.post_attention_layernorm",
        "h.{i}.mlp.c_fc": "gpt_neox.layers.{i}.mlp.dense_h_to_4h",
        "h.{i}.mlp.c_proj": "gpt_neox.layers.{i}.mlp.dense_4h_to_h",
        "ln_f": "gpt_neox.final_layer_norm",
        "lm_head": "embed_out",
    }
    ignore = (r"attention\.(masked_)?bias$", r"rotary_emb\.inv_freq$")
    theta_key, fraction_key = "rotary_emb_base", "rotary_pct"

    def fields(self) -> dict:
        bias = self.get("attention_bias")
        # transformers' GPTNeoXConfig sets rope_theta and partial_rotary_factor from these two keys
        return dict(
            vocab_size=self.get("vocab_size"), n_ctx=self.get("max_position_embeddings"),
            n_layer=self.get("num_hidden_layers"), n_head=self.get("num_attention_heads"),
            n_embd=self.get("hidden_size"), n_inner=self.get("intermediate_size"),
            norm="layernorm", norm_eps=self.get("layer_norm_eps"), positional="rope",
            rope_theta=self.get("rotary_emb_base"), rope_fraction=self.get("rotary_pct"),
            rope_scaling=self.rope_scaling(), qkv_bias=bias, out_bias=bias, activation=self.activation("hidden_act"),
            mlp_bias=True, parallel_residual=self.get("use_parallel_residual"), tied=self.get("tie_word_embeddings"))

    def convert(self, ours, theirs):
        t = theirs[0]
        if ours.startswith("h.{i}.attn.c_attn."):  # (heads, 3, head_dim, ...) -> (3, heads, head_dim, ...)
            H = self.get("num_attention_heads")
            t = t.reshape(H, 3, -1, *t.shape[1:]).transpose(0, 1).reshape(t.shape)
        return t


@family("phi")
class Phi(Family):
    """Phi-2: one LayerNorm feeds attention and MLP in parallel, partial rotary, biases everywhere (the head's too)."""
    title = "Phi-2"
    defaults = dict(tie_word_embeddings=False, layer_norm_eps=1e-5, rope_theta=10000.0, partial_rotary_factor=0.5,
                    hidden_act="gelu_new", max_position_embeddings=2048, intermediate_size=8192)
    refuse = {"qk_layernorm": False}
    tensors = {
        "wte": "model.embed_tokens",
        "h.{i}.ln_1": _layers("input_layernorm")[0],
        "h.{i}.attn.c_attn": _layers("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        "h.{i}.attn.c_proj": _layers("self_attn.dense")[0],
        "h.{i}.mlp.c_fc": _layers("mlp.fc1")[0],
        "h.{i}.mlp.c_proj": _layers("mlp.fc2")[0],
        "ln_f": "model.final_layernorm",
        "lm_head": "lm_head",
    }
    ignore = (r"rotary_emb\.inv_freq$",)

    def fields(self) -> dict:
        return dict(
            vocab_size=self.get("vocab_size"), n_ctx=self.get("max_position_embeddings"),
            n_layer=self.get("num_hidden_layers"), n_head=self.get("num_attention_heads"),
            n_kv_head=self.get("num_key_value_heads", None), n_embd=self.get("hidden_size"),
            n_inner=self.get("intermediate_size"), norm="layernorm", norm_eps=self.get("layer_norm_eps"),
            positional="rope", rope_theta=self.get("rope_theta"), rope_fraction=self.get("partial_rotary_factor"),
            rope_scaling=self.rope_scaling(), activation=self.activation("hidden_act"), parallel_residual=True,
            shared_norm=True, tied=self.get("tie_word_embeddings"), head_bias=True)


@family("gpt2")
class GPT2(Family):
    """GPT-2: our own GPT's architecture; its Conv1D weights are stored (in, out)."""
    title = "GPT-2"
    prefix = "transformer."
    defaults = dict(tie_word_embeddings=True, layer_norm_epsilon=1e-5, activation_function="gelu_new",
                    n_inner=None, n_positions=1024)
    refuse = {"scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False}
    tensors = {"wte": "transformer.wte", "wpe": "transformer.wpe", "ln_f": "transformer.ln_f", "lm_head": "lm_head",
               **{f"h.{{i}}.{m}": f"transformer.h.{{i}}.{m}"
                  for m in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")}}
    ignore = (r"attn\.(masked_)?bias$",)

    def fields(self) -> dict:
        return dict(
            vocab_size=self.get("vocab_size"), n_ctx=self.get("n_positions"), n_layer=self.get("n_layer"),
            n_head=self.get("n_head"), n_embd=self.get("n_embd"), n_inner=self.get("n_inner"),
            norm="layernorm", norm_eps=self.get("layer_norm_epsilon"), positional="learned",
            activation=self.activation("activation_function"), tied=self.get("tie_word_embeddings"))

    def convert(self, ours, theirs):
        t = theirs[0]
        conv1d = ours.endswith(".weight") and (".attn." in ours or ".mlp." in ours)
        return t.t().contiguous() if conv1d else t


@family("opt")
class OPT(Family):
    """OPT: learned positions from row 2, ReLU, pre-LayerNorm (opt-350m's post-LayerNorm is refused)."""
    title = "OPT"
    defaults = dict(tie_word_embeddings=True, activation_function="relu", enable_bias=True,
                    max_position_embeddings=2048, ffn_dim=3072)
    refuse = {"do_layer_norm_before": True, "_remove_final_layer_norm": False,
              "layer_norm_elementwise_affine": True}
    tensors = {
        "wte": "model.decoder.embed_tokens",
        "wpe": "model.decoder.embed_positions",
        "h.{i}.ln_1": "model.decoder.layers.{i}.self_attn_layer_norm",
        "h.{i}.attn.c_attn": tuple(f"model.decoder.layers.{{i}}.self_attn.{p}_proj" for p in "qkv"),
        "h.{i}.attn.c_proj": "model.decoder.layers.{i}.self_attn.out_proj",
        "h.{i}.ln_2": "model.decoder.layers.{i}.final_layer_norm",
        "h.{i}.mlp.c_fc": "model.decoder.layers.{i}.fc1",
        "h.{i}.mlp.c_proj": "model.decoder.layers.{i}.fc2",
        "ln_f": "model.decoder.final_layer_norm",
        "lm_head": "lm_head",
    }

    def fields(self) -> dict:
        hidden = self.get("hidden_size")
        if self.get("word_embed_proj_dim", hidden) != hidden:
            self.fail(f"word_embed_proj_dim {self.config['word_embed_proj_dim']} != hidden_size {hidden} "
                      "(project_in/project_out) is not implemented")
        bias = self.get("enable_bias")
        return dict(
            vocab_size=self.get("vocab_size"), n_ctx=self.get("max_position_embeddings"),
            n_layer=self.get("num_hidden_layers"), n_head=self.get("num_attention_heads"), n_embd=hidden,
            n_inner=self.get("ffn_dim"), norm="layernorm", norm_eps=1e-5, positional="learned", position_offset=2,
            qkv_bias=bias, out_bias=bias, mlp_bias=bias, activation=self.activation("activation_function"),
            tied=self.get("tie_word_embeddings"))


# ----------------------------------------------------------------------------- loading

def supported() -> str:
    return ", ".join(f"{t} ({cls.title})" for t, cls in FAMILIES.items())


def check_hf_folder(src: Path) -> dict:
    """A transformers model folder's config.json, after checking what an export needs of the folder: a
    model_type onnxgen (or its Optimum fallback) exports, safetensors weights, a fast tokenizer. No torch, no
    transformers: an unsupported folder is refused before anything heavy is imported."""
    src = Path(src)
    if not src.is_dir():
        raise UserError(f"--hf {src}: folder does not exist")
    if not (src / "config.json").is_file():
        raise UserError(f"--hf {src}: has no config.json (expected a transformers model folder)")
    config = read_json(src / "config.json", "config")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        why = optimum_exports(model_type)
        if why is not None:
            raise UserError(f"--hf {src}: model_type {model_type!r} is not supported; supported: {supported()} "
                            f"(and {why})")
        log.warning("%s: model_type %r is not one of onnxgen's families (%s); exporting it with optimum instead",
                    src, model_type, ", ".join(FAMILIES))
    if not any(src.glob("*.safetensors")):
        raise UserError(f"--hf {src}: no *.safetensors weights (onnxgen loads safetensors only, never pickles)")
    if not (src / "tokenizer.json").is_file():
        raise UserError(f"--hf {src}: no tokenizer.json (a fast tokenizer is needed: onnxruntime-genai, "
                        "transformers.js and onnxgen all read that file)")
    return config


def fp32_weight_bytes(folder: Path) -> int:
    """The bytes the folder's weights take in fp32 (what the export, its graph and the reference each hold),
    from the safetensors headers alone."""
    from safetensors import safe_open

    count = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                count += math.prod(f.get_slice(name).get_shape())
    return 4 * count


def optimum_exports(model_type) -> str | None:
    """None if optimum can export this model_type with a KV cache, else why not."""
    import importlib.util

    if importlib.util.find_spec("optimum") is None:  # no import at all: refusing stays instant
        return "optimum, the fallback for other types, is not installed: pip install -e '.[hf]'"
    try:
        import optimum.exporters.onnx.model_configs  # noqa: F401 (registers the ONNX configs with TasksManager)
        from optimum.exporters.tasks import TasksManager
    except ImportError:
        return "optimum, the fallback for other types, is not installed: pip install -e '.[hf]'"
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type, exporter="onnx", library_name="transformers")
    except (KeyError, ValueError):
        return "optimum does not export it either"
    return None if "text-generation-with-past" in tasks else "optimum does not export it with a KV cache"


def family_of(folder: Path) -> Family:
    """The family of a transformers model folder, from its config.json; unknown types are refused."""
    path = Path(folder) / "config.json"
    config = read_json(path, "config")
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"--hf {folder}: model_type {model_type!r} is not supported; supported: {supported()}")
    return FAMILIES[model_type](config, str(path))


def arch_of(folder: str | Path) -> DecoderConfig | None:
    """The decoder configuration of an export or model folder's config.json, None for a model_type
    outside the families (an Optimum fallback export)."""
    path = Path(folder) / "config.json"
    config = read_json(path, "config")
    family = FAMILIES.get(config.get("model_type"))
    return None if family is None else family(config, str(path)).arch()


def load_decoder(folder: str | Path) -> Decoder:
    """Our decoder with the folder's weights (safetensors only), fp32, in eval mode."""
    import torch

    from pipeline.model.decoder import Decoder

    folder = Path(folder)
    fam = family_of(folder)
    arch = fam.arch()
    weights = SafetensorsFolder(folder)
    with torch.device("meta"):  # no random init of weights about to be replaced
        model = Decoder(arch)
    model.load_state_dict(fam.state_dict(model, weights), strict=True, assign=True)
    if arch.tied:
        model.lm_head.weight = model.wte.weight
    return model.eval()
