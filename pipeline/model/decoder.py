"""One decoder for every family, read top-down: config, norms, positions, attention, MLP, block, model.

Our own GPT (model/gpt.py) is one configuration of it; Llama, Mistral, SmolLM3, Granite, Qwen, Phi-3,
Gemma, OLMo 2 and 3, GPT-NeoX, Phi-2, OPT and GPT-2 checkpoints are others (model/families.py maps their configs and tensor names onto it).
Parameter names are GPT-2's (wte, wpe, h.N.attn.c_attn, ...), whatever the family: q, k and v are one
Linear (c_attn), a gated MLP's gate and up are one Linear (c_fc), so each is one MatMul in the graph.
LFM2's conv layers have a ShortConv (h.N.conv.c_in, .conv, .c_proj) where the others have attention, Qwen3.5's
linear_attention layers a GatedDeltaNet (h.N.linear.c_qkv, .conv, .norm, .c_proj, ...); the cache is per layer: K/V for attention, a fixed-size state for a conv layer (DecoderConfig.cache_shapes).
"""
from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.errors import UserError
from pipeline.model.config import (ACTIVATION_NAMES, ATTENTION_LAYER_TYPES, DecoderConfig,  # noqa: F401
                                   rope_kind)  # rope_kind: re-exported

ACTIVATIONS = {
    "gelu": F.gelu,                                          # exact (erf)
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),    # GPT-2's and Gemma's approximation
    "relu": F.relu,
    "silu": F.silu,
}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES
STATE_LAYERS = ("conv", "mamba", "linear_attention")  # layer types whose cache is fixed-size state, not K/V


# ----------------------------------------------------------------------------- normalization

class RMSNorm(nn.Module):
    """x / rms(x) * (offset + w), in float32. Gemma stores w - 1 (offset 1); Llama and the rest w (offset 0)."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        w = self.weight.float() + self.offset if self.offset else self.weight.float()
        return (y * w).type_as(x)


def make_norm(c: DecoderConfig, dim: int) -> nn.Module:
    if c.norm == "rmsnorm":
        return RMSNorm(dim, c.norm_eps, c.norm_offset)
    return nn.LayerNorm(dim, eps=c.norm_eps, bias=c.norm_bias)


# ----------------------------------------------------------------------------- positions

def sinusoidal_table(n_ctx: int, n_embd: int) -> torch.Tensor:
    """(n_ctx, n_embd) fixed position encodings of 'Attention Is All You Need', sin/cos interleaved."""
    pos = torch.arange(n_ctx, dtype=torch.float64)[:, None]
    inv_freq = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float64) * (-math.log(10000.0) / n_embd))
    table = torch.zeros(n_ctx, n_embd, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv_freq)
    table[:, 1::2] = torch.cos(pos * inv_freq)[:, : n_embd // 2]
    return table.float()


def _need(scaling: dict, *keys: str) -> list:
    missing = [k for k in keys if scaling.get(k) is None]
    if missing:
        raise UserError(f"model config: rope_scaling {rope_kind(scaling)!r} needs {missing}")
    return [scaling[k] for k in keys]


def _yarn(inv_freq: torch.Tensor, dim: int, theta: float, s: dict, n_ctx: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate the low frequencies, keep the high ones, ramp between (arXiv 2309.00071)."""
    (factor,) = _need(s, "factor")
    original = s.get("original_max_position_embeddings") or n_ctx

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention_factor = float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))
    low, high = correction_dim(s.get("beta_fast") or 32), correction_dim(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / ((high + 0.001 if low == high else high) - low))
    keep = 1 - ramp.clamp(0, 1)  # 1: extrapolate (keep the frequency), 0: interpolate (divide by factor)
    return inv_freq / factor * (1 - keep) + inv_freq * keep, attention_factor


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by factor, short ones kept, a smooth blend between."""
    factor, low, high, original = _need(s, "factor", "low_freq_factor", "high_freq_factor",
                                        "original_max_position_embeddings")
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """RoPE's cos and sin for given positions, (B, T, rot), rot = the rotated part of a head.

    Scaling as transformers computes it. "dynamic" (NTK) and "longrope" depend on the sequence length,
    here max(position_ids) + 1 of each call: computed in the graph, so one export serves any length
    (transformers keeps the longest length seen so far; the two agree for lengths within n_ctx)."""

    def __init__(self, head_dim: int, fraction: float, theta: float, scaling: dict | None, n_ctx: int,
                 original_ctx: int | None = None):
        super().__init__()
        self.dim = dim = int(head_dim * fraction)
        self.kind, s = rope_kind(scaling), scaling or {}
        self.theta, self.n_ctx = theta, n_ctx
        # explicit device: a model built on the meta device (to load weights into) still gets real tables
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        inv_freq = 1.0 / (theta ** exponents)
        self.attention_factor = 1.0
        if self.kind == "linear":
            inv_freq = inv_freq / _need(s, "factor")[0]
        elif self.kind == "llama3":
            inv_freq = _llama3(inv_freq, s)
        elif self.kind == "yarn":
            inv_freq, self.attention_factor = _yarn(inv_freq, dim, theta, s, n_ctx)
        elif self.kind == "dynamic":
            self.factor = float(_need(s, "factor")[0])
        elif self.kind == "longrope":
            short, long = _need(s, "short_factor", "long_factor")
            if len(short) != dim // 2 or len(long) != dim // 2:
                raise UserError(f"model config: rope_scaling longrope factors must have {dim // 2} entries")
            self.original = original_ctx or n_ctx
            factor = n_ctx / self.original if original_ctx else s.get("factor", 1.0)
            self.attention_factor = s.get("attention_factor") or (
                1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(self.original)))
            self.register_buffer("long_inv_freq", 1.0 / (torch.tensor(long, dtype=torch.float32, device="cpu")
                                                         * theta ** exponents), persistent=False)
            inv_freq = 1.0 / (torch.tensor(short, dtype=torch.float32, device="cpu") * theta ** exponents)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids):
        # position_ids: (B, T) -> cos, sin: (B, T, dim)
        inv_freq = self.inv_freq
        if self.kind in ("dynamic", "longrope"):
            seq_len = position_ids.max() + 1
            if self.kind == "dynamic":  # a larger base beyond n_ctx; exactly theta up to it
                seq_len = seq_len.clamp(min=self.n_ctx).float()
                base = self.theta * ((self.factor * seq_len / self.n_ctx) - (self.factor - 1)) ** (
                    self.dim / (self.dim - 2))
                exponents = torch.arange(0, self.dim, 2, dtype=torch.int64, device=position_ids.device).float()
                inv_freq = 1.0 / (base ** (exponents / self.dim))
            else:
                inv_freq = torch.where(seq_len > self.original, self.long_inv_freq, self.inv_freq)
        freqs = position_ids[:, :, None].float() * inv_freq        # (B, T, dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)                   # (B, T, dim)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


def apply_rope(x, cos, sin):
    """Rotate the first cos.shape[-1] features of each head (GPT-NeoX's rotate_half layout); x: (B, H, T, D)."""
    rot = cos.shape[-1]
    x_rot, x_pass = (x, None) if rot == x.shape[-1] else (x[..., :rot], x[..., rot:])
    cos, sin = cos[:, None], sin[:, None]                          # (B, 1, T, rot)
    half = torch.cat([-x_rot[..., rot // 2:], x_rot[..., : rot // 2]], dim=-1)
    y = x_rot * cos + half * sin
    return y if x_pass is None else torch.cat([y, x_pass], dim=-1)


# ----------------------------------------------------------------------------- the blocks

class CausalSelfAttention(nn.Module):
    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = c.n_head, c.n_kv_head, c.head_dim
        q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
        self.sizes = [q, kv, kv] + ([q] if c.attn_output_gate else [])  # Qwen3.5: its output gate last
        self.c_attn = nn.Linear(c.n_embd, sum(self.sizes), bias=c.qkv_bias)  # q, k, v (, gate) in one matmul
        self.c_proj = nn.Linear(q, c.n_embd, bias=c.out_bias)
        if c.qk_norm_full:  # over the whole projection: (B, T, heads * D)
            self.q_norm, self.k_norm = make_norm(c, q), make_norm(c, kv)
        elif c.qk_norm:     # over each head: (B, T, heads, D)
            self.q_norm, self.k_norm = make_norm(c, c.head_dim), make_norm(c, c.head_dim)
        self.norm_heads = c.qk_norm and not c.qk_norm_full
        self.scale, self.softcap = c.attn_scale, c.attn_softcap
        if c.attn_sinks:  # gpt-oss: one learned logit per head joins each softmax, then is dropped
            self.sinks = nn.Parameter(torch.zeros(c.n_head))
        self.dropout = c.dropout

    def forward(self, x, bias=None, rope=None, past=None):
        # x: (B, T, C); bias: additive mask (B, 1, T, P+T), or None for plain causal; rope: (cos, sin)
        # or None; past: (key, value) each (B, KV, P, D) or None. Returns y (B, T, C) and (key, value).
        B, T, _ = x.shape
        q, k, v, *gate = self.c_attn(x).split(self.sizes, dim=2)
        if hasattr(self, "q_norm") and not self.norm_heads:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm") and self.norm_heads:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, D)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)  # (B, KV, P+T, D)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        if self.n_kv_head != self.n_head:  # grouped-query: each kv head serves n_head / n_kv_head queries
            k, v = (self._repeat(t) for t in (k, v))
        dropout = self.dropout if self.training else 0.0
        # beyond SDPA: the attention written out (Qwen3.5: as transformers eager writes it, to the last bit: its
        # DeltaNet layers after a gated attention layer amplify SDPA's rounding past 1e-5 in the logits)
        if self.softcap is not None or hasattr(self, "sinks") or gate:
            scale = self.scale if self.scale is not None else self.head_dim ** -0.5
            att = (q @ k.transpose(-2, -1)) * scale
            if self.softcap is not None:
                att = torch.tanh(att / self.softcap) * self.softcap
            att = att + bias
            if hasattr(self, "sinks"):
                sinks = self.sinks.to(att.dtype)[None, :, None, None].expand(*att.shape[:3], 1)
                probs = F.softmax(torch.cat([att, sinks], dim=-1).float(), dim=-1)[..., :-1]
            else:
                probs = F.softmax(att.float(), dim=-1)
            y = F.dropout(probs.type_as(q), dropout, self.training) @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None,
                                               dropout_p=dropout, scale=self.scale)
        y = y.transpose(1, 2).contiguous().view(B, T, self.n_head * self.head_dim)
        if gate:  # Qwen3.5's output gate
            y = y * torch.sigmoid(gate[0])
        return self.c_proj(y), present

    def _repeat(self, t):
        B, KV, S, D = t.shape
        return t[:, :, None].expand(B, KV, self.n_head // KV, S, D).reshape(B, self.n_head, S, D)


class MLP(nn.Module):
    def __init__(self, c: DecoderConfig, inner: int | None = None):
        super().__init__()
        self.gated, self.n_inner = c.gated, inner or c.n_inner
        self.c_fc = nn.Linear(c.n_embd, (2 if c.gated else 1) * self.n_inner, bias=c.mlp_bias)  # [gate, up]
        self.c_proj = nn.Linear(self.n_inner, c.n_embd, bias=c.mlp_bias)
        self.act = ACTIVATIONS[c.activation]
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x):
        h = self.c_fc(x)
        if self.gated:
            # split by a fixed width, not chunk(2): chunk exports as Shape/Gather/Add/Div/Mul/Slice arithmetic
            # on the runtime shape, 8 small ops a layer (~1 ms a token for SmolLM2's 30 layers); this is one Split
            gate, up = h.split(self.n_inner, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return self.dropout(self.c_proj(h))


class _MoEOp(torch.autograd.Function):
    """The experts as one com.microsoft MoE node in the exported graph (ONNX Runtime's CPU and CUDA
    kernels route each token to its top k experts and run only those); in PyTorch, Experts.routed."""

    @staticmethod
    def forward(ctx, x, router_logits, fc1, fc1_bias, fc2, fc2_bias, module):
        return module.routed(x, router_logits)

    @staticmethod
    def symbolic(g, x, router_logits, fc1, fc1_bias, fc2, fc2_bias, module):
        from torch.onnx.symbolic_helper import _is_none
        attrs = dict(k_i=module.k, activation_type_s="swiglu", swiglu_fusion_i=1,
                     normalize_routing_weights_i=int(module.renormalize),
                     activation_alpha_f=module.alpha, activation_beta_f=module.beta)
        if module.limit is not None:
            attrs["swiglu_limit_f"] = module.limit
        none = g.op("prim::Constant")  # an omitted optional input
        none.setType(torch._C.OptionalType.ofTensor())
        inputs = [x, router_logits, fc1, none if _is_none(fc1_bias) else fc1_bias, fc2,
                  none if _is_none(fc2_bias) else fc2_bias]
        return g.op("com.microsoft::MoE", *inputs, **attrs).setType(x.type())


class Experts(nn.Module):
    """Routed experts: a router scores n_experts SwiGLU MLPs per token and the top k run, their outputs
    weighted by the router's softmax (over all experts, then renormalized over the k chosen, or not:
    Qwen3-MoE's norm_topk_prob; gpt-oss's softmax over the k chosen logits is the renormalized form).

    The weights are kept in ONNX Runtime's MoE layout so the exported node reads them as they are:
    fc1 (E, 2 * inner, C) with each expert's gate and up rows interleaved (swiglu_fusion=1, the one its
    CPU kernel takes), fc2 (E, C, inner). Expert h: g, u = fc1 x (+ bias) de-interleaved,
    clamp(g, max=limit) * sigmoid(alpha g) * (clamp(u, -limit, limit) + beta) through fc2 (+ bias)."""

    def __init__(self, c: DecoderConfig):
        super().__init__()
        E, inner = c.n_experts, c.moe_inner
        self.k, self.renormalize = c.n_experts_per_tok, c.moe_renormalize
        self.alpha, self.beta, self.limit = c.swiglu_alpha, c.swiglu_beta, c.swiglu_limit
        self.dense = False  # export every expert on every token in standard ops (benchmarks' baseline)
        self.router = nn.Linear(c.n_embd, E, bias=c.router_bias)
        self.fc1 = nn.Parameter(torch.randn(E, 2 * inner, c.n_embd) * 0.02)
        self.fc2 = nn.Parameter(torch.randn(E, c.n_embd, inner) * 0.02)
        self.fc1_bias = nn.Parameter(torch.zeros(E, 2 * inner)) if c.expert_bias else None
        self.fc2_bias = nn.Parameter(torch.zeros(E, c.n_embd)) if c.expert_bias else None

    def forward(self, x):
        logits = self.router(x)
        if torch.onnx.is_in_onnx_export() and not self.dense:
            flat = logits.reshape(-1, logits.shape[-1])  # MoE takes (tokens, E) router logits beside (B, T, C)
            return _MoEOp.apply(x, flat, self.fc1, self.fc1_bias, self.fc2, self.fc2_bias, self)
        return self.routed(x, logits) if not self.dense else self.every_expert(x, logits)

    def weights(self, logits):
        """(..., E) router logits -> the chosen experts' weights (..., k) and indices (..., k)."""
        probs = F.softmax(logits.float(), dim=-1)
        top, chosen = probs.topk(self.k, dim=-1)
        if self.renormalize:
            top = top / top.sum(-1, keepdim=True)
        return top.to(logits.dtype), chosen

    def expert(self, e: int, x):
        h = x @ self.fc1[e].T
        if self.fc1_bias is not None:
            h = h + self.fc1_bias[e]
        g, u = h[..., 0::2], h[..., 1::2]
        if self.limit is not None:
            g, u = g.clamp(max=self.limit), u.clamp(-self.limit, self.limit)
        y = (g * torch.sigmoid(self.alpha * g) * (u + self.beta)) @ self.fc2[e].T
        return y if self.fc2_bias is None else y + self.fc2_bias[e]

    def routed(self, x, logits):
        """Each expert on the tokens that chose it (PyTorch; the graph's MoE node does the same)."""
        shape, x = x.shape, x.reshape(-1, x.shape[-1])
        top, chosen = self.weights(logits.reshape(-1, logits.shape[-1]))
        out = torch.zeros_like(x)
        for e in chosen.unique().tolist():
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, self.expert(e, x[token]) * top[token, slot, None])
        return out.reshape(shape)

    def every_expert(self, x, logits):
        """Every expert on every token, weighted by a (tokens, E) scatter of the router's choice: standard
        ONNX ops, E times the compute (the dense baseline benchmarks/moe.py measures the MoE node against)."""
        top, chosen = self.weights(logits)
        gates = torch.zeros_like(logits).scatter(-1, chosen, top)
        return sum(self.expert(e, x) * gates[..., e:e + 1] for e in range(self.fc1.shape[0]))


class ShortConv(nn.Module):
    """LFM2's gated short convolution, in place of attention: c_in projects to gates B, C and values x;
    a causal depthwise convolution (kernel conv_kernel) runs over B * x; the output is C * conv, projected.
    Its cache is the convolution's last conv_kernel - 1 inputs, (B, C, conv_kernel - 1): fixed size."""

    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.n_embd, self.kernel = c.n_embd, c.conv_kernel
        self.c_in = nn.Linear(c.n_embd, 3 * c.n_embd, bias=c.conv_bias)    # [B, C, x] in one matmul
        self.conv = nn.Conv1d(c.n_embd, c.n_embd, c.conv_kernel, groups=c.n_embd, bias=c.conv_bias)
        self.c_proj = nn.Linear(c.n_embd, c.n_embd, bias=c.conv_bias)

    def forward(self, x, mask=None, rope=None, past=None):
        # x: (B, T, C); mask: (B, T, 1), 0 at padding, or None; past: (state,) with state (B, C, K-1), or None
        # (zeros: nothing before). Padding's inputs are zeroed before the projection, as transformers does,
        # so a left-padded row's state holds only zeros before its first token. Returns y and (state,).
        if mask is not None:
            x = x * mask
        b, c, v = self.c_in(x).transpose(1, 2).split(self.n_embd, dim=1)  # each (B, C, T)
        h = b * v
        state = past[0] if past is not None else h.new_zeros(h.shape[0], self.n_embd, self.kernel - 1)
        h = torch.cat([state, h], dim=2)                                   # (B, C, K-1+T)
        conv = F.conv1d(h, self.conv.weight, self.conv.bias, groups=self.n_embd)  # (B, C, T)
        y = (c * conv).transpose(1, 2)
        return self.c_proj(y), (h[:, :, 1 - self.kernel:],)


def _optional(g, value):
    """An omitted optional input of a com.microsoft node where `value` is None."""
    from torch.onnx.symbolic_helper import _is_none
    if value is not None and not _is_none(value):
        return value
    none = g.op("prim::Constant")
    none.setType(torch._C.OptionalType.ofTensor())
    return none


class _CausalConvOp(torch.autograd.Function):
    """silu(causal depthwise conv) with its state as one com.microsoft CausalConvWithState node in the graph
    (ONNX Runtime's CPU kernel); in PyTorch, Mamba2.conv_eager."""

    @staticmethod
    def forward(ctx, x, weight, bias, state, module):
        return module.conv_eager(x, state)

    @staticmethod
    def symbolic(g, x, weight, bias, state, module):
        out, present = g.op("com.microsoft::CausalConvWithState", x, weight, _optional(g, bias), state,
                            activation_s="silu", outputs=2)
        out.setType(x.type())
        present.setType(state.type())
        return out, present


class _ConvSiluOp(torch.autograd.Function):
    """A causal depthwise convolution carrying its last kernel - 1 inputs, SiLU after: one com.microsoft
    CausalConvWithState node in the exported graph; in PyTorch, the concatenation and convolution it fuses.
    x (B, C, T), weight (C, 1, K), state (B, C, K-1) -> y (B, C, T), state (B, C, K-1)."""

    @staticmethod
    def forward(ctx, x, weight, state):
        # as transformers' causal_conv1d_forward with a cache: the state prepended, then its zero-padded
        # convolution (the same arithmetic to the last bit, which a plain valid convolution is not)
        h, K, T = torch.cat([state, x], dim=2), weight.shape[-1], x.shape[2]
        y = F.conv1d(h, weight, padding=K - 1, groups=weight.shape[0])[:, :, :h.shape[2]][:, :, -T:]
        return F.silu(y), h[:, :, 1 - K:]

    @staticmethod
    def symbolic(g, x, weight, state):
        none = g.op("prim::Constant")
        none.setType(torch._C.OptionalType.ofTensor())
        y, present = g.op("com.microsoft::CausalConvWithState", x, weight, none, state, activation_s="silu",
                          outputs=2)
        y.setType(x.type())
        present.setType(state.type())
        return y, present


class _GatedDeltaOp(torch.autograd.Function):
    """The gated delta rule over a sequence: one com.microsoft LinearAttention node (update_rule gated_delta)
    in the exported graph, which ONNX Runtime's CPU kernel runs in one call for the whole prefill (also the
    onnxruntime-node 1.30 transformers.js 4.3 bundles, which has no GatedDeltaNet kernel); in PyTorch,
    GatedDeltaNet.recurrence. q, k (B, T, H * dk) L2-normalized, one per value head; v (B, T, H * dv);
    g (log decay), beta (B, T, H); state (B, H, dk, dv) -> out (B, T, H * dv), state."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, state, heads: int):
        B, T = q.shape[:2]
        out, state = GatedDeltaNet.recurrence(*(t.reshape(B, T, heads, -1) for t in (q, k, v)), g, beta, state)
        return out.reshape(B, T, -1), state

    @staticmethod
    def symbolic(g, q, k, v, decay, beta, state, heads: int):
        dk = q.type().sizes()[-1] // heads if q.type().sizes() else None
        attrs = dict(q_num_heads_i=heads, kv_num_heads_i=heads, update_rule_s="gated_delta")
        if dk:
            attrs["scale_f"] = dk ** -0.5
        out, present = g.op("com.microsoft::LinearAttention", q, k, v, state, decay, beta, outputs=2, **attrs)
        out.setType(v.type())
        present.setType(state.type())
        return out, present


class _SSDOp(torch.autograd.Function):
    """Mamba-2's SSD recurrence as one com.microsoft GatedDeltaNet node, update_rule "gated" (ONNX Runtime's
    CPU kernel): S_t = exp(g_t) S_{t-1} + v_t k_t^T per value head, o_t = S_t q_t, with q = C, k = B (n_groups
    heads shared by the value heads: inverse GQA), v = dt x, g = dt A, scale 1; the state V-major
    (B, heads, head, d_state), fp32. In PyTorch, Mamba2.ssd_eager."""

    @staticmethod
    def forward(ctx, q, k, v, g, state, module):
        return module.ssd_eager(q, k, v, g, state)

    @staticmethod
    def symbolic(g, q, k, v, decay, state, module):
        out, final = g.op("com.microsoft::GatedDeltaNet", q, k, v, _optional(g, None), decay, _optional(g, None),
                          state, update_rule_s="gated", scale_f=1.0, outputs=2)
        out.setType(v.type())
        final.setType(state.type())
        return out, final


class Mamba2(nn.Module):
    """Granite 4's Mamba-2 mixer, in place of attention (transformers' GraniteMoeHybridMambaLayer, torch_forward):
    in_proj -> gate z, x B C, dt; silu(causal depthwise conv) over x B C; per head h and step t
    S_t = exp(dt_t A_h) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t + D_h x_t (B and C per group of heads);
    RMSNorm of y * silu(z) per group, out_proj. Padding's inputs are zeroed before in_proj and after the conv,
    as transformers does, so a left-padded row's states hold nothing of its padding. Cache: the conv's last
    d_conv - 1 inputs (B, conv_dim, d_conv - 1) and the SSM state (B, heads, head, d_state), fp32.
    Exported, the conv and the recurrence are one ONNX Runtime node each (_CausalConvOp, _SSDOp)."""

    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.heads, self.head_dim, self.groups, self.d_state = c.mamba_heads, c.mamba_head_dim, c.mamba_groups, c.mamba_state
        self.inner, self.conv_dim, self.kernel, self.eps = c.mamba_inner, c.mamba_conv_dim, c.mamba_conv, c.norm_eps
        self.in_proj = nn.Linear(c.n_embd, self.inner + self.conv_dim + self.heads, bias=c.mamba_proj_bias)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=c.mamba_conv_bias)
        self.dt_bias = nn.Parameter(torch.ones(self.heads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.heads + 1, dtype=torch.float32, device="cpu")))
        self.D = nn.Parameter(torch.ones(self.heads))
        self.norm = nn.Module()
        self.norm.weight = nn.Parameter(torch.ones(self.inner))
        self.out_proj = nn.Linear(self.inner, c.n_embd, bias=c.mamba_proj_bias)

    def conv_eager(self, x, state):
        h = torch.cat([state, x], dim=2)                                     # (B, conv_dim, K-1+T)
        out = F.silu(F.conv1d(h, self.conv1d.weight, self.conv1d.bias, groups=self.conv_dim))
        return out, h[:, :, 1 - self.kernel:]

    def ssd_eager(self, q, k, v, g, state):
        # q, k: (B, T, groups, N); v: (B, T, heads, P); g: (B, T, heads); state (B, heads, P, N), fp32
        rep = self.heads // self.groups
        q, k = q.repeat_interleave(rep, dim=2).float(), k.repeat_interleave(rep, dim=2).float()
        v, g, S = v.float(), g.float(), state.float()
        out = []
        for t in range(v.shape[1]):
            S = S * torch.exp(g[:, t])[:, :, None, None] + v[:, t, :, :, None] * k[:, t, :, None, :]
            out.append((S @ q[:, t, :, :, None]).squeeze(-1))                # (B, heads, P)
        y = torch.stack(out, dim=1) if out else v.new_zeros(v.shape)
        return y.to(v.dtype), S

    def forward(self, x, mask=None, rope=None, past=None):
        # x: (B, T, C); mask: (B, T, 1), 0 at padding, or None; past: (conv state, ssm state) or None (zeros)
        B, T, _ = x.shape
        if mask is not None:
            x = x * mask
        z, xbc, dt = self.in_proj(x).split([self.inner, self.conv_dim, self.heads], dim=-1)
        if past is None:
            past = (x.new_zeros(B, self.conv_dim, self.kernel - 1),
                    torch.zeros(B, self.heads, self.head_dim, self.d_state, dtype=torch.float32, device=x.device))
        exporting = torch.onnx.is_in_onnx_export()
        conv = _CausalConvOp.apply if exporting else lambda x, w, b, s, m: m.conv_eager(x, s)
        xbc, conv_state = conv(xbc.transpose(1, 2).contiguous(), self.conv1d.weight, self.conv1d.bias, past[0], self)
        xbc = xbc.transpose(1, 2)
        if mask is not None:
            xbc = xbc * mask
        xs, b, c = xbc.split([self.inner, self.groups * self.d_state, self.groups * self.d_state], dim=-1)
        dt = F.softplus((dt + self.dt_bias).float())                          # (B, T, heads)
        g = dt * -torch.exp(self.A_log.float())
        xs = xs.reshape(B, T, self.heads, self.head_dim)
        v = xs * dt[..., None].to(xs.dtype)
        b, c = b.reshape(B, T, self.groups, self.d_state), c.reshape(B, T, self.groups, self.d_state)
        ssd = _SSDOp.apply if exporting else lambda q, k, v, g, s, m: m.ssd_eager(q, k, v, g, s)
        y, ssm_state = ssd(c, b, v, g, past[1], self)
        y = (y + xs * self.D[:, None].to(xs.dtype)).reshape(B, T, self.inner)
        # transformers' GraniteMoeHybridRMSNormGated: y * silu(z), normalized per group of inner / groups
        h = (y.float() * F.silu(z.float())).reshape(B, T, self.groups, self.inner // self.groups)
        # a sum over the fixed group size, not mean(): ReduceMean's axes move from attribute to input at opset 18,
        # which onnxruntime's quantizer moves the graph to; ReduceSum's are an input since 13
        variance = h.pow(2).sum(-1, keepdim=True) / (self.inner // self.groups)
        h = (h * torch.rsqrt(variance + self.eps)).reshape(B, T, self.inner)
        return self.out_proj((self.norm.weight * h.to(x.dtype))), (conv_state, ssm_state)


class GatedDeltaNet(nn.Module):
    """Qwen3.5's linear attention (transformers' Qwen3_5GatedDeltaNet), in place of attention. c_qkv, c_z, c_b,
    c_a project to q k v (conv channels), z (the output gate), b (beta) and a (decay): four matmuls, not one,
    because the recurrence amplifies the last-bit differences of a fused one past 1e-5 in the logits; a causal depthwise
    convolution with SiLU runs over q k v; per value head a state S (dk x dv) decays by
    g = -exp(A_log) softplus(a + dt_bias) and takes the delta rule with rate sigmoid(b) on L2-normalized q, k;
    the output, RMS-normalized per head and gated by silu(z), is projected by c_proj.
    Its cache: the convolution's last kernel - 1 inputs (B, conv channels, K-1) and S (B, Hv, dk, dv), float32."""

    def __init__(self, c: DecoderConfig):
        super().__init__()
        self.hk, self.hv = c.linear_num_key_heads, c.linear_num_value_heads
        self.dk, self.dv = c.linear_key_head_dim, c.linear_value_head_dim
        self.kernel, conv = c.linear_conv_kernel_dim, c.linear_conv_dim
        self.c_qkv = nn.Linear(c.n_embd, conv, bias=False)
        self.c_z = nn.Linear(c.n_embd, self.hv * self.dv, bias=False)
        self.c_b = nn.Linear(c.n_embd, self.hv, bias=False)
        self.c_a = nn.Linear(c.n_embd, self.hv, bias=False)
        self.conv = nn.Conv1d(conv, conv, self.kernel, groups=conv, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.A_log = nn.Parameter(torch.zeros(self.hv))
        self.norm = RMSNorm(self.dv, c.norm_eps)  # transformers' RMSNormGated: w itself, not offset
        self.c_proj = nn.Linear(self.hv * self.dv, c.n_embd, bias=False)

    def forward(self, x, mask=None, rope=None, past=None):
        # x: (B, T, C); mask: (B, T, 1), 0 at padding, or None; past: (conv state, recurrent state) or None.
        # Padding's inputs are zeroed before the projections, as transformers' apply_mask_to_padding_states
        # does: a left-padded row's states stay zero through its padding (no convolution bias, and a zero
        # key and value leave a zero state zero whatever the decay and rate).
        B, T, _ = x.shape
        if mask is not None:
            x = x * mask
        qkv, z, b, a = self.c_qkv(x), self.c_z(x), self.c_b(x), self.c_a(x)
        if past is None:
            past = (x.new_zeros(B, qkv.shape[-1], self.kernel - 1),
                    torch.zeros(B, self.hv, self.dk, self.dv, dtype=torch.float32, device=x.device))
        exporting = torch.onnx.is_in_onnx_export()  # the ONNX Runtime ops; in PyTorch, their math (autograd too)
        conv_op = _ConvSiluOp.apply if exporting else partial(_ConvSiluOp.forward, None)
        delta_op = _GatedDeltaOp.apply if exporting else partial(_GatedDeltaOp.forward, None)
        qkv, conv_state = conv_op(qkv.transpose(1, 2), self.conv.weight, past[0])
        q, k, v = qkv.transpose(1, 2).split([self.hk * self.dk, self.hk * self.dk, self.hv * self.dv], dim=2)
        # each q/k head serves hv / hk consecutive value heads; L2-normalized in float32 as transformers does
        q, k = (t.reshape(B, T, self.hk, self.dk).repeat_interleave(self.hv // self.hk, dim=2).float()
                for t in (q, k))
        q, k = (t * torch.rsqrt((t * t).sum(-1, keepdim=True) + 1e-6) for t in (q, k))
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)               # log decay (B, T, Hv)
        beta = b.sigmoid()
        y, state = delta_op(q.reshape(B, T, -1), k.reshape(B, T, -1), v.float(), g, beta.float(), past[1], self.hv)
        y = y.reshape(B, T, self.hv, self.dv).to(v.dtype)
        y = self.norm(y) * F.silu(z.reshape(B, T, self.hv, self.dv).float()).to(y.dtype)
        return self.c_proj(y.reshape(B, T, self.hv * self.dv)), (conv_state, state)

    @staticmethod
    def recurrence(q, k, v, g, beta, state, chunk: int = 64):
        """transformers' gated delta rule in float32 on L2-normalized q, k (B, T, H, dk), v (B, T, H, dv), log
        decay g and rate beta (B, T, H), from state S (B, H, dk, dv): a single token step by step
        (torch_recurrent_gated_delta_rule), a longer sequence in chunks of `chunk` (torch_chunk_gated_delta_rule),
        each as transformers writes it, so the two agree to the last bit. Returns out (B, T, H, dv) and S."""
        B, T, H, dk = k.shape
        q, k, v = (t.transpose(1, 2).float().contiguous() for t in (q, k, v))               # (B, H, T, d)
        q = q * dk ** -0.5
        g, beta = g.transpose(1, 2).float(), beta.transpose(1, 2).float()                   # (B, H, T)
        S = state.float()
        if T == 1:
            S = S * g[:, :, 0].exp()[..., None, None]
            kv_mem = (S * k[:, :, 0].unsqueeze(-1)).sum(dim=-2)
            delta = (v[:, :, 0] - kv_mem) * beta[:, :, 0].unsqueeze(-1)
            S = S + k[:, :, 0].unsqueeze(-1) * delta.unsqueeze(-2)
            out = (S * q[:, :, 0].unsqueeze(-1)).sum(dim=-2)[:, :, None]
        else:
            pad = (chunk - T % chunk) % chunk
            q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
            beta, g = (F.pad(t, (0, pad)) for t in (beta, g))
            v_beta, k_beta = v * beta.unsqueeze(-1), k * beta.unsqueeze(-1)
            q, k, k_beta, v_beta = (t.reshape(B, H, -1, chunk, t.shape[-1]) for t in (q, k, k_beta, v_beta))
            g = g.reshape(B, H, -1, chunk).cumsum(dim=3)
            upper = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).triu(1)
            pairwise = (g.unsqueeze(4) - g.unsqueeze(3)).masked_fill(upper, float("-inf")).exp()
            system = (k_beta @ k.transpose(-1, -2)) * pairwise
            intra = (q @ k.transpose(-1, -2)) * pairwise
            decayed_k_beta = k_beta * g.exp().unsqueeze(-1)
            new_values = torch.linalg.solve_triangular(system, v_beta, upper=False, unitriangular=True)
            k_cumdecay = torch.linalg.solve_triangular(system, decayed_k_beta, upper=False, unitriangular=True)
            q = q * g.exp().unsqueeze(-1)
            k = k * (g[..., -1:] - g).exp().unsqueeze(-1)
            chunk_decay = g[..., -1].exp()[..., None, None]
            outs = []
            for i in range(q.shape[2]):
                v_new = new_values[:, :, i] - k_cumdecay[:, :, i] @ S
                outs.append(q[:, :, i] @ S + intra[:, :, i] @ v_new)
                S = S * chunk_decay[:, :, i] + k[:, :, i].transpose(-1, -2) @ v_new
            out = torch.cat(outs, dim=2)[:, :, :T]
        return out.transpose(1, 2).contiguous(), S

class Block(nn.Module):
    def __init__(self, c: DecoderConfig, layer: int = 0):
        super().__init__()
        self.parallel = c.parallel_residual
        # OLMo 2 normalizes only the sublayers' outputs: no parameters, no op in the graph
        self.ln_1 = make_norm(c, c.n_embd) if c.pre_norm else nn.Identity()
        if c.layer_types[layer] == "conv":  # LFM2: a short convolution mixes the tokens
            self.conv = ShortConv(c)
        elif c.layer_types[layer] == "mamba":  # Granite 4: a Mamba-2 mixer
            self.mamba = Mamba2(c)
        elif c.layer_types[layer] == "linear_attention":  # Qwen3.5: a Gated DeltaNet does
            self.linear = GatedDeltaNet(c)
        else:
            self.attn = CausalSelfAttention(c)
        if not c.shared_norm:  # Phi-2's MLP reads ln_1's output too
            self.ln_2 = make_norm(c, c.n_embd) if c.pre_norm else nn.Identity()
        self.mlp = Experts(c) if c.moe_layers[layer] else MLP(c)
        if c.shared_inner and c.moe_layers[layer]:  # Granite 4: a dense SwiGLU MLP beside the experts
            self.shared_mlp = MLP(c, c.shared_inner)
        if c.sandwich_norm:
            self.post_ln_1, self.post_ln_2 = make_norm(c, c.n_embd), make_norm(c, c.n_embd)
        self.resid_dropout = nn.Dropout(c.dropout)
        self.residual_scale = c.residual_scale

    def forward(self, x, bias=None, rope=None, past=None):
        h = self.ln_1(x)
        mixer = (self.conv if hasattr(self, "conv") else self.mamba if hasattr(self, "mamba")
                 else self.linear if hasattr(self, "linear") else self.attn)
        a, present = mixer(h, bias, rope, past)
        if hasattr(self, "post_ln_1"):
            a = self.post_ln_1(a)
        if self.parallel:  # both sublayers read the block's input
            m = self.mlp(h if not hasattr(self, "ln_2") else self.ln_2(x))
            return x + self._scaled(self.resid_dropout(a)) + self._scaled(m), present
        x = x + self._scaled(self.resid_dropout(a))
        h = self.ln_2(x)
        m = self.mlp(h) if not hasattr(self, "shared_mlp") else self.mlp(h) + self.shared_mlp(h)
        if hasattr(self, "post_ln_2"):
            m = self.post_ln_2(m)
        return x + self._scaled(m), present

    def _scaled(self, y):
        return y if self.residual_scale is None else y * self.residual_scale


# ----------------------------------------------------------------------------- the model

class Decoder(nn.Module):
    def __init__(self, arch: DecoderConfig):
        super().__init__()
        self.arch = self.config = arch  # GPT replaces .config with the GPTConfig it was made from
        c = arch
        self.wte = nn.Embedding(c.vocab_size, c.n_embd)
        if c.positional in ("learned", "sinusoidal"):
            self.wpe = nn.Embedding(c.n_ctx + c.position_offset, c.n_embd)
            if c.positional == "sinusoidal":
                self.wpe.weight.data.copy_(sinusoidal_table(c.n_ctx, c.n_embd))
                self.wpe.weight.requires_grad_(False)  # fixed, not learned
        else:
            self.rope = Rotary(c.head_dim, c.rope_fraction, c.rope_theta, c.rope_scaling, c.n_ctx,
                               c.rope_original_ctx)
            if c.rope_local_theta is not None:  # Gemma 3's sliding layers: their own base, no scaling
                self.rope_local = Rotary(c.head_dim, c.rope_fraction, c.rope_local_theta, None, c.n_ctx)
        self.drop = nn.Dropout(c.dropout)
        self.h = nn.ModuleList([Block(c, i) for i in range(c.n_layer)])
        self.ln_f = make_norm(c, c.n_embd)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=c.head_bias)
        if c.tied:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2's scaled init of the residual projections: keeps the residual stream's variance flat in depth
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding) and module.weight.requires_grad:
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @property
    def plain_causal(self) -> bool:
        """Full causal attention everywhere and SDPA can do it: no mask tensor is needed to train."""
        c = self.arch
        return (c.attn_softcap is None and not c.attn_sinks and not c.attn_output_gate
                and all(c.window(i) is None for i in range(c.n_layer)))

    def forward(self, input_ids, targets=None):
        """Training forward: input_ids (B, T) -> logits (B, T, V), and the mean cross-entropy if targets."""
        B, T = input_ids.shape
        assert T <= self.arch.n_ctx, f"sequence {T} longer than context {self.arch.n_ctx}"
        pos = torch.arange(T, device=input_ids.device)[None].expand(B, T)
        masks = None if self.plain_causal else self.attention_biases(torch.ones_like(input_ids), 0, T)
        x, _ = self.trunk(input_ids, pos, masks, None)
        logits = self.head(x)
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def forward_with_cache(self, input_ids, attention_mask, position_ids, past_key_values):
        """The ONNX graph contract (see docs/contract.md).

        input_ids, position_ids: (B, T) int64; attention_mask: (B, P+T) int64, 0 at padding;
        past_key_values: one tuple per layer, its cache entries (config.cache_shapes): an attention layer's
        (key, value), each (B, KV, P, D), P may be 0; a conv layer's (state,), (B, C, conv_kernel - 1).
        Returns logits (B, T, V) and the presents as the past: keys and values (B, KV, P+T, D), states as they were.
        """
        T = input_ids.shape[1]
        kinds = self.arch.layer_types
        attention = [i for i, kind in enumerate(kinds) if kind in ATTENTION_LAYER_TYPES]
        P = past_key_values[attention[0]][0].shape[2] if attention else attention_mask.shape[1] - T
        x, presents = self.trunk(input_ids, position_ids, self.attention_biases(attention_mask, P, T),
                                 past_key_values)
        return self.head(x), presents

    def attention_biases(self, attention_mask, P: int, T: int) -> dict:
        """Additive masks (B, 1, T, P+T) by layer type. Query i sits at absolute slot P+i and sees key
        slots j <= P+i that are not padding (and, in a sliding layer, j > P+i - window).
        A large finite negative rather than -inf: a padding query row, all masked, stays finite."""
        device = attention_mask.device
        q_slot = torch.arange(T, device=device)[:, None] + P
        k_slot = torch.arange(P + T, device=device)[None, :]
        causal = (k_slot <= q_slot)[None, None, :, :]                        # (1, 1, T, P+T)
        visible = causal & attention_mask[:, None, None, :].bool()           # (B, 1, T, P+T)
        dtype = self.wte.weight.dtype
        biases = {}
        for kind in set(self.arch.layer_types) & set(ATTENTION_LAYER_TYPES):
            window = self.arch.sliding_window if kind == "sliding_attention" else None
            seen = visible if window is None else visible & (k_slot > q_slot - window)[None, None]
            bias = torch.zeros(seen.shape, dtype=dtype, device=device)
            biases[kind] = bias.masked_fill(~seen, torch.finfo(dtype).min)
        for kind in set(self.arch.layer_types) - set(ATTENTION_LAYER_TYPES):  # conv, linear: padding's inputs
            biases[kind] = attention_mask[:, attention_mask.shape[1] - T:, None].to(dtype)  # zeroed: (B, T, 1)
        return biases

    def trunk(self, input_ids, position_ids, masks, past_key_values):
        """Embeddings and blocks: (B, T) ids -> (B, T, C) hidden states, and the presents."""
        c = self.arch
        x = self.wte(input_ids)
        if c.embed_scale is not None:
            x = x * torch.tensor(c.embed_scale, dtype=x.dtype)
        ropes = {}
        if c.positional == "rope":
            ropes["full_attention"] = ropes["sliding_attention"] = self.rope(position_ids)
            if hasattr(self, "rope_local"):
                ropes["sliding_attention"] = self.rope_local(position_ids)
        else:
            x = x + self.wpe(position_ids + c.position_offset if c.position_offset else position_ids)
        x = self.drop(x)
        presents = []
        for i, block in enumerate(self.h):
            kind = c.layer_types[i]
            past = None if past_key_values is None else past_key_values[i]
            rope = ropes.get(kind) if c.rope_layers[i] else None  # SmolLM3's NoPE layers: no rotation
            x, present = block(x, None if masks is None else masks[kind], rope, past)
            presents.append(present)
        return x, presents

    def head(self, x):
        logits = self.lm_head(self.ln_f(x))
        if self.arch.logit_divisor is not None:
            logits = logits / self.arch.logit_divisor
        if self.arch.final_softcap is not None:
            logits = torch.tanh(logits / self.arch.final_softcap) * self.arch.final_softcap
        return logits

    def split_cache(self, flat) -> list[tuple]:
        """A flat list of cache tensors in the graph's order (exports.cache_names) as each layer's entries."""
        layers, k = [], 0
        for i in range(self.arch.n_layer):
            n = len(self.arch.cache_shapes(i))
            layers.append(tuple(flat[k:k + n]))
            k += n
        return layers

    def empty_cache(self, batch_size: int, dtype=torch.float32):
        """Each layer's cache entries before the first step: K/V of length 0, states of zeros."""
        c = self.arch
        return [tuple(torch.zeros(batch_size, *(0 if d is None else d for d in shape),
                                  dtype=torch.float32 if j == 1 and c.layer_types[i] in ("linear_attention", "mamba")
                                  else dtype)  # the recurrent and SSM states: float32 always
                      for j, shape in enumerate(c.cache_shapes(i))) for i in range(c.n_layer)]
