"""A decoder's shape and math as data (model/decoder.py builds the network from it). No torch here: a
folder's config is read and refused before anything heavy is imported."""
from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.errors import UserError

ACTIVATION_NAMES = ("gelu", "gelu_tanh", "relu", "silu")  # model/decoder.py's ACTIVATIONS implement them
# rope_scaling types we implement; anything else in a config is refused, not ignored
ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")
# conv: LFM2's gated short convolution; mamba: Granite 4's Mamba-2 mixer (a causal conv over x, B, C, then
# the SSD recurrence); linear_attention: Qwen3.5's Gated DeltaNet
LAYER_TYPES = ("full_attention", "sliding_attention", "conv", "mamba", "linear_attention")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")  # the layers whose cache is K/V


@dataclass
class DecoderConfig:
    vocab_size: int
    n_ctx: int                        # context length: the largest position id + 1
    n_layer: int
    n_head: int
    n_embd: int
    n_kv_head: int | None = None      # None: as many as n_head (MHA); fewer: GQA; 1: MQA
    head_dim: int | None = None       # None: n_embd // n_head (Gemma's is its own)
    n_inner: int | None = None        # the MLP's width; None: 4 * n_embd
    # normalization
    norm: str = "layernorm"           # "layernorm" or "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True            # LayerNorm's bias
    norm_offset: float = 0.0          # RMSNorm scales by (offset + w): Gemma stores w - 1
    pre_norm: bool = True             # normalize each sublayer's input (OLMo 2: no, its outputs only)
    sandwich_norm: bool = False       # Gemma 2/3, OLMo 2: normalize each sublayer's output
    qk_norm: bool = False             # Qwen3, Gemma 3: RMSNorm of each head's q and k
    qk_norm_full: bool = False        # OLMo 2: one RMSNorm over all heads' q (and k), not one per head
    # positions
    positional: str = "learned"       # "learned", "sinusoidal" (a fixed table) or "rope"
    position_offset: int = 0          # OPT: its learned table starts at row 2
    rope_theta: float = 10000.0
    rope_fraction: float = 1.0        # partial rotary: only the first fraction of each head turns
    rope_scaling: dict | None = None  # Hugging Face's rope_scaling, validated below
    rope_original_ctx: int | None = None  # longrope: the pretraining context (short vs long factors)
    rope_local_theta: float | None = None  # Gemma 3: sliding layers' own base, unscaled
    rope_layers: tuple[bool, ...] | None = None  # per layer, whether it rotates; None: all (SmolLM3: NoPE layers)
    # attention
    qkv_bias: bool = True
    out_bias: bool = True
    attn_scale: float | None = None   # None: head_dim ** -0.5
    attn_softcap: float | None = None  # Gemma 2: cap * tanh(scores / cap)
    sliding_window: int | None = None  # a query sees itself and the window - 1 keys before it
    layer_types: tuple[str, ...] | None = None  # per layer, LAYER_TYPES; None: all sliding if a window
    # short convolution (LFM2's "conv" layers, in place of attention)
    conv_kernel: int = 3              # transformers' conv_L_cache: the causal depthwise kernel's width
    conv_bias: bool = False           # biases on in_proj, the convolution and out_proj
    # Mamba-2 (Granite 4's "mamba" layers, in place of attention): in_proj -> [z, x B C, dt], a causal depthwise
    # conv (mamba_conv wide, silu) over x B C, the SSD recurrence per head, + D x, RMSNorm gated by z, out_proj
    mamba_heads: int = 0
    mamba_head_dim: int = 0
    mamba_groups: int = 1             # B and C are shared by mamba_heads / mamba_groups heads each
    mamba_state: int = 0              # d_state
    mamba_conv: int = 4               # d_conv
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False
    attn_output_gate: bool = False    # Qwen3.5: attention's output times sigmoid(a gate projected with q)
    # Gated DeltaNet (Qwen3.5's "linear_attention" layers, in place of attention)
    linear_num_key_heads: int = 0     # q and k heads (each serves linear_num_value_heads / this v heads)
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4   # the causal depthwise convolution over q, k and v
    # MLP
    activation: str = "gelu_tanh"
    gated: bool = False               # GLU: act(gate) * up (SwiGLU, GeGLU)
    mlp_bias: bool = True
    parallel_residual: bool = False   # GPT-NeoX: x + attn(ln_1(x)) + mlp(ln_2(x))
    shared_norm: bool = False         # Phi-2: parallel sublayers read one norm, x + attn(ln_1(x)) + mlp(ln_1(x))
    residual_scale: float | None = None  # Granite: x + scale * sublayer(...)
    # routed experts (Mixtral, Qwen3-MoE, gpt-oss): a router picks n_experts_per_tok of n_experts gated MLPs
    n_experts: int = 0                # 0: every layer has the dense MLP
    n_experts_per_tok: int = 0
    moe_inner: int | None = None      # an expert's width; None: n_inner
    moe_layers: tuple[bool, ...] | None = None  # per layer, experts or the dense MLP; None: experts everywhere
    shared_inner: int = 0             # Granite 4: a dense SwiGLU MLP this wide beside the experts (0: none)
    moe_renormalize: bool = True      # the chosen experts' softmax weights rescaled to sum to 1
    router_bias: bool = False         # gpt-oss
    expert_bias: bool = False         # gpt-oss
    swiglu_alpha: float = 1.0         # gpt-oss's experts: clamp(g, max=limit) * sigmoid(alpha g) * (clamp(u, +-limit) + beta)
    swiglu_beta: float = 0.0
    swiglu_limit: float | None = None
    attn_sinks: bool = False          # gpt-oss: a learned logit per head in each softmax's denominator
    # embeddings and head
    tied: bool = True                 # lm_head shares wte's weight
    embed_scale: float | None = None  # Gemma: sqrt(n_embd)
    final_softcap: float | None = None  # Gemma 2: on the logits
    logit_divisor: float | None = None  # Granite: logits divided by it
    head_bias: bool = False           # Phi-2: lm_head has a bias
    dropout: float = 0.0
    extra: dict = field(default_factory=dict)  # unused by the math: where the config came from

    def __post_init__(self):
        self.n_kv_head = self.n_kv_head or self.n_head
        self.head_dim = self.head_dim or self.n_embd // self.n_head
        self.n_inner = self.n_inner or 4 * self.n_embd
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window else "full_attention"
            self.layer_types = (kind,) * self.n_layer
        self.layer_types = tuple(self.layer_types)
        if self.rope_layers is None:
            self.rope_layers = (self.positional == "rope",) * self.n_layer
        self.rope_layers = tuple(bool(r) for r in self.rope_layers)
        self.moe_inner = self.moe_inner or self.n_inner
        if self.moe_layers is None:
            self.moe_layers = (self.n_experts > 0,) * self.n_layer
        self.moe_layers = tuple(bool(m) for m in self.moe_layers)
        rope_type = rope_kind(self.rope_scaling)
        checks = [
            (min(self.vocab_size, self.n_ctx, self.n_layer, self.n_head, self.n_embd) > 0,
             "sizes must be positive"),
            (self.n_head % self.n_kv_head == 0,
             f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})"),
            (self.norm in ("layernorm", "rmsnorm"), f"unknown norm {self.norm!r}"),
            (self.positional in ("learned", "sinusoidal", "rope"), f"unknown positional {self.positional!r}"),
            (self.activation in ACTIVATION_NAMES,
             f"activation {self.activation!r} is not implemented (known: {', '.join(ACTIVATION_NAMES)})"),
            (rope_type in ROPE_TYPES,
             f"rope_scaling type {rope_type!r} is not implemented (known: {', '.join(ROPE_TYPES)})"),
            (len(self.layer_types) == self.n_layer and set(self.layer_types) <= set(LAYER_TYPES),
             f"layer_types must be {self.n_layer} of {LAYER_TYPES}, got {self.layer_types}"),
            (len(self.rope_layers) == self.n_layer and (self.positional == "rope" or not any(self.rope_layers)),
             f"rope_layers must be {self.n_layer} flags (any true only with positional 'rope'), got {self.rope_layers}"),
            (not self.shared_norm or self.parallel_residual, "shared_norm needs parallel_residual"),
            (self.pre_norm or (self.sandwich_norm and not self.parallel_residual),
             "without pre_norm a block needs sandwich_norm and a sequential residual"),
            (0 < self.rope_fraction <= 1, f"rope fraction must be in (0, 1], got {self.rope_fraction}"),
            (len(self.moe_layers) == self.n_layer and (self.n_experts > 0 or not any(self.moe_layers)),
             f"moe_layers must be {self.n_layer} flags (any true only with experts), got {self.moe_layers}"),
            (self.n_experts == 0 or 0 < self.n_experts_per_tok <= self.n_experts,
             f"experts per token must be in 1..{self.n_experts}, got {self.n_experts_per_tok}"),
            # ONNX Runtime's MoE op runs SwiGLU experts (its CPU kernel no other activation with gated experts)
            (self.n_experts == 0 or (self.gated and self.activation == "silu"),
             f"experts must be SwiGLU (gated silu), got gated={self.gated} {self.activation!r}"),
            (self.conv_kernel >= 2 or "conv" not in self.layer_types,
             f"conv_kernel (conv_L_cache) must be at least 2, got {self.conv_kernel}"),
            ("mamba" not in self.layer_types or (min(self.mamba_heads, self.mamba_head_dim, self.mamba_state) > 0
                                                 and self.mamba_conv >= 2 and self.mamba_groups > 0
                                                 and self.mamba_heads % self.mamba_groups == 0),
             f"mamba layers need heads, head size and state > 0, d_conv >= 2 and heads a multiple of groups, got "
             f"{self.mamba_heads} heads of {self.mamba_head_dim}, state {self.mamba_state}, d_conv {self.mamba_conv}, "
             f"{self.mamba_groups} groups"),
            (self.shared_inner == 0 or self.n_experts > 0, "a shared MLP (shared_inner) goes beside routed experts"),
            (self.linear_checks() is None, self.linear_checks()),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"model config: {message}")

    @property
    def mamba_inner(self) -> int:
        return self.mamba_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        return self.mamba_inner + 2 * self.mamba_groups * self.mamba_state
    def linear_checks(self) -> str | None:
        """What is wrong with the Gated DeltaNet sizes (None: nothing, or no linear_attention layer)."""
        if "linear_attention" not in self.layer_types:
            return None
        sizes = (self.linear_num_key_heads, self.linear_num_value_heads, self.linear_key_head_dim,
                 self.linear_value_head_dim)
        if min(sizes) <= 0:
            return f"linear_attention layers need positive linear head counts and sizes, got {sizes}"
        if self.linear_num_value_heads % self.linear_num_key_heads:
            return (f"linear_num_value_heads ({self.linear_num_value_heads}) must be a multiple of "
                    f"linear_num_key_heads ({self.linear_num_key_heads})")
        if self.linear_conv_kernel_dim < 2:
            return f"linear_conv_kernel_dim must be at least 2, got {self.linear_conv_kernel_dim}"
        return None

    @property
    def linear_conv_dim(self) -> int:
        """The Gated DeltaNet convolution's channels: q, k (key heads) and v (value heads)."""
        return (2 * self.linear_num_key_heads * self.linear_key_head_dim
                + self.linear_num_value_heads * self.linear_value_head_dim)

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def cache_shapes(self, layer: int) -> list[tuple]:
        """The shapes of one layer's cache entries after batch (exports.layer_cache_names names them): K and V
        (kv heads, None: the sequence, head size), or a conv layer's state (hidden, conv_kernel - 1): the
        last conv_kernel - 1 inputs of the convolution, as onnxruntime-genai's builder sizes it; a Gated DeltaNet
        layer's convolution state (conv channels, kernel - 1) and its recurrent state (value heads, key head
        size, value head size): transformers' layout and ONNX Runtime's LinearAttention's (docs/contract.md part 3)."""
        if self.layer_types[layer] == "linear_attention":
            return [(self.linear_conv_dim, self.linear_conv_kernel_dim - 1),
                    (self.linear_num_value_heads, self.linear_key_head_dim, self.linear_value_head_dim)]
        if self.layer_types[layer] == "conv":
            return [(self.n_embd, self.conv_kernel - 1)]
        if self.layer_types[layer] == "mamba":  # conv over x B C: (conv_dim, d_conv - 1); SSM: (heads, head, state)
            return [(self.mamba_conv_dim, self.mamba_conv - 1),
                    (self.mamba_heads, self.mamba_head_dim, self.mamba_state)]
        return [(self.n_kv_head, None, self.head_dim)] * 2


def rope_kind(scaling: dict | None) -> str:
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
