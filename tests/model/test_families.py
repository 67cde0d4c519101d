"""Every family through our one decoder: a tiny random transformers model of each, saved as safetensors,
loaded through model/families.py, gives transformers' own logits (a left-padded batch, then through the
KV cache) and the same greedy tokens. And what we refuse, we refuse in one line."""
from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

from conftest import TEST_CORPUS
from pipeline import manifest
from pipeline.model.reference import hf_cache_name, hf_cache_out
from pipeline.errors import UserError
from pipeline.exports import is_state, present_of
from pipeline.model.families import FAMILIES, load_decoder

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
# name -> (model_type, config). Windows of 4 (< the 12 tokens we feed) make the sliding masks matter;
# soft-caps are small enough to bend random logits.
CASES = {
    "gpt2": ("gpt2", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "llama": ("llama", SMALL),
    "llama-biases": ("llama", {**SMALL, "attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    "llama-mqa-linear": ("llama", {**SMALL, "num_key_value_heads": 1,
                                   "rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama-dynamic": ("llama", {**SMALL, "max_position_embeddings": 8,
                                "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}),
    "llama3": ("llama", {**SMALL, "rope_theta": 500000.0, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}}),
    "llama-yarn": ("llama", {**SMALL, "rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                       "original_max_position_embeddings": 16}}),
    "mistral": ("mistral", {**SMALL, "sliding_window": 4}),
    # every pairing of NoPE/RoPE and sliding/full
    "smollm3": ("smollm3", {**SMALL, "num_hidden_layers": 4, "no_rope_layers": [1, 0, 1, 0], "use_sliding_window": True,
                            "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention",
                                                                 "full_attention", "sliding_attention"]}),
    "granite": ("granite", {**SMALL, "embedding_multiplier": 12.0, "attention_multiplier": 0.05,
                            "residual_multiplier": 0.22, "logits_scaling": 8.0}),
    "qwen2": ("qwen2", {**SMALL, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1}),
    "qwen3": ("qwen3", {**SMALL, "head_dim": 16, "attention_bias": True}),
    "phi3": ("phi3", {**SMALL, "partial_rotary_factor": 0.5, "original_max_position_embeddings": 64}),
    "phi3-longrope": ("phi3", {**SMALL, "max_position_embeddings": 64, "original_max_position_embeddings": 8,
                               "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.5, 2.0, 2.5],
                                                "long_factor": [2.0, 3.0, 5.0, 8.0]}}),
    "gemma": ("gemma", {**SMALL, "head_dim": 16}),
    "gemma2": ("gemma2", {**SMALL, "head_dim": 16, "sliding_window": 4, "query_pre_attn_scalar": 12,
                          "attn_logit_softcapping": 2.0, "final_logit_softcapping": 3.0}),
    "gemma3": ("gemma3_text", {**SMALL, "head_dim": 16, "sliding_window": 4, "sliding_window_pattern": 2,
                               "query_pre_attn_scalar": 12, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
    "olmo2": ("olmo2", SMALL),
    # the full layers' RoPE scaled, the sliding ones' not
    "olmo3": ("olmo3", {**SMALL, "sliding_window": 4, "layer_types": ["sliding_attention", "full_attention"],
                        "rope_scaling": {"rope_type": "linear", "factor": 8.0}}),
    "phi": ("phi", {**SMALL, "partial_rotary_factor": 0.5}),
    # routed experts: 4, two a token; Qwen3-MoE's first layer dense (mlp_only_layers), its weights renormalized
    "mixtral": ("mixtral", {**SMALL, "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 4}),
    "qwen3_moe": ("qwen3_moe", {**SMALL, "head_dim": 16, "num_experts": 4, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 48, "mlp_only_layers": [0], "norm_topk_prob": True}),
    # sinks, a sliding layer beside a full one, YaRN, experts with biases and a clamped SwiGLU (a limit the
    # random weights cross)
    "gpt_oss": ("gpt_oss", {**SMALL, "head_dim": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
                            "sliding_window": 4, "swiglu_limit": 0.5}),
    "gpt_neox": ("gpt_neox", {k: v for k, v in SMALL.items() if k != "num_key_value_heads"} | {"rotary_pct": 0.25}),
    "gpt_neox-sequential": ("gpt_neox", {k: v for k, v in SMALL.items() if k != "num_key_value_heads"}
                            | {"rotary_pct": 0.5, "use_parallel_residual": False}),
    # conv and attention layers interleaved; conv_L_cache 4 and biases in the second
    "lfm2": ("lfm2", {**SMALL, "num_hidden_layers": 4, "block_multiple_of": 16,
                      "layer_types": ["conv", "full_attention", "conv", "full_attention"]}),
    "lfm2-bias": ("lfm2", {**SMALL, "num_hidden_layers": 3, "block_multiple_of": 16, "conv_bias": True,
                           "conv_L_cache": 4, "full_attn_idxs": [1]}),
    # Granite 4: mamba layers around an attention layer, 4 experts two a token beside a shared MLP, 2 groups of
    # B and C for 4 mamba heads, Granite's multipliers, RoPE
    "granitemoehybrid": ("granitemoehybrid", {**SMALL, "num_hidden_layers": 3, "intermediate_size": 24,
                                              "shared_intermediate_size": 40, "num_local_experts": 4,
                                              "num_experts_per_tok": 2, "mamba_n_heads": 4, "mamba_n_groups": 2,
                                              "mamba_d_state": 8, "mamba_d_head": 16, "mamba_d_conv": 4,
                                              "layers_block_type": ["mamba", "attention", "mamba"],
                                              "position_embedding_type": "rope", "embedding_multiplier": 12.0,
                                              "attention_multiplier": 0.05, "residual_multiplier": 0.22,
                                              "logits_scaling": 8.0}),
    # Granite 4.0-H 350m/1b's shape: no experts (the shared MLP is the MLP), no position embedding (NoPE), one group,
    # an attention layer first, no conv bias
    "granitemoehybrid-dense": ("granitemoehybrid", {**SMALL, "num_hidden_layers": 3, "shared_intermediate_size": 40,
                                                    "num_local_experts": 0, "mamba_n_heads": 4, "mamba_d_state": 16,
                                                    "mamba_d_head": 16, "mamba_d_conv": 3, "mamba_conv_bias": False,
                                                    "layers_block_type": ["attention", "mamba", "mamba"],
                                                    "embedding_multiplier": 12.0, "residual_multiplier": 0.22}),
    # Gated DeltaNet layers (two value heads per key head) before a gated full-attention layer, partial rotary
    "qwen3_5": ("qwen3_5_text", {**SMALL, "num_hidden_layers": 4, "head_dim": 16, "linear_num_key_heads": 2,
                                 "linear_num_value_heads": 4, "linear_key_head_dim": 8, "linear_value_head_dim": 16,
                                 "layer_types": ["linear_attention", "full_attention", "linear_attention",
                                                 "linear_attention"]}),
    "opt": ("opt", dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                        word_embed_proj_dim=32, max_position_embeddings=64, init_std=0.2)),
}
VOCAB = 97
LENGTHS = (12, 7, 10)  # a left-padded batch: each row's tokens at the end
MAX_DELTA: dict[str, float] = {}


def save_tiny(folder, model_type: str, sizes: dict, safe: bool = True, vocab: int = VOCAB):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **sizes, vocab_size=vocab, bos_token_id=0, eos_token_id=0,
                                  pad_token_id=0, initializer_range=0.2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # norms and biases off their init (ones or zeros) so every weight matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias") or name.endswith("_bias") or name.endswith("sinks") \
                    or name.endswith((".A_log", ".D")):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    if not safe:  # a pickled checkpoint, as older Hub folders have (transformers 5 only writes safetensors)
        for f in folder.glob("*.safetensors"):
            f.unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return model.eval()


def copy_tokenizer(source, folder):
    """The tokenizer files export --hf carries that `source` has (transformers 5 writes no special_tokens_map.json);
    tokenizer.json always."""
    from pipeline.convert.hf_import import TOKENIZER_FILES

    for f in TOKENIZER_FILES:
        if (source / f).is_file() or f == "tokenizer.json":
            shutil.copyfile(source / f, folder / f)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """case -> (folder, the transformers model, eager attention: the definitional math)."""
    root = tmp_path_factory.mktemp("families")
    return {name: (root / name, save_tiny(root / name, t, sizes)) for name, (t, sizes) in CASES.items()}


def fresh(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def left_padded(lengths=LENGTHS):
    g = torch.Generator().manual_seed(1)
    T = max(lengths)
    ids = torch.zeros(len(lengths), T, dtype=torch.long)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, T - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[b, T - n:] = 1
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def test_every_family_is_covered():
    assert {t for t, _ in CASES.values()} == set(FAMILIES)


@pytest.mark.parametrize("name", CASES)
def test_logits_equal_transformers(tiny, name):
    folder, theirs = tiny[name]
    ours = load_decoder(folder)
    ids, mask, pos = left_padded()
    real = mask.bool()
    with torch.no_grad():
        want = theirs(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        got, _ = ours.forward_with_cache(ids, mask, pos, ours.empty_cache(len(ids)))
        delta = (got - want)[real].abs().max().item()
        torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)
        short = ids[:1, -5:]  # a row alone and short (longrope: its short factors)
        torch.testing.assert_close(ours(short)[0], fresh(folder)(short).logits, atol=1e-5, rtol=1e-5)

        # through the KV cache: prefill 10 columns, then two steps of one token. A fresh transformers
        # model: its dynamic RoPE keeps the longest length it has seen (ours computes it per call)
        theirs = fresh(folder)
        P = 10
        out = theirs(input_ids=ids[:, :P], attention_mask=mask[:, :P], position_ids=pos[:, :P], use_cache=True)
        cache = hf_cache_out(out)
        got, past = ours.forward_with_cache(ids[:, :P], mask[:, :P], pos[:, :P], ours.empty_cache(len(ids)))
        torch.testing.assert_close(got[real[:, :P]], out.logits[real[:, :P]], atol=1e-5, rtol=1e-5)
        for t in range(P, ids.shape[1]):
            step = theirs(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], position_ids=pos[:, t:t + 1],
                          use_cache=True, **{hf_cache_name(theirs): cache})
            cache = hf_cache_out(step)
            got, past = ours.forward_with_cache(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], past)
            delta = max(delta, (got - step.logits).abs().max().item())
            torch.testing.assert_close(got, step.logits, atol=1e-5, rtol=1e-5)
    for i, entries in enumerate(past):  # K/V grown to the whole batch, a conv layer's state as transformers' own
        if ours.arch.layer_types[i] == "conv":
            (state,) = entries
            assert state.shape == (len(ids), ours.arch.n_embd, ours.arch.conv_kernel - 1)
            # transformers keeps conv_L_cache inputs; the oldest one is never read again
            torch.testing.assert_close(state, cache.layers[i].conv_states[0][:, :, 1:], atol=1e-5, rtol=1e-5)
        elif ours.arch.layer_types[i] == "mamba":  # Granite 4: conv over x B C, then the SSM state, fp32
            conv, ssm = entries
            a = ours.arch
            assert conv.shape == (len(ids), a.mamba_conv_dim, a.mamba_conv - 1)
            assert ssm.shape == (len(ids), a.mamba_heads, a.mamba_head_dim, a.mamba_state) and ssm.dtype == torch.float32
            torch.testing.assert_close(conv, cache.layers[i].conv_states[0][:, :, 1:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(ssm, cache.layers[i].recurrent_states[0], atol=1e-5, rtol=1e-5)
        elif ours.arch.layer_types[i] == "linear_attention":  # Qwen3.5: the convolution's and the recurrence's
            conv, recurrent = entries
            a = ours.arch
            assert conv.shape == (len(ids), a.linear_conv_dim, a.linear_conv_kernel_dim - 1)
            assert recurrent.shape == (len(ids), a.linear_num_value_heads, a.linear_key_head_dim,
                                       a.linear_value_head_dim) and recurrent.dtype == torch.float32
            torch.testing.assert_close(conv, cache.layers[i].conv_states[0][:, :, 1:], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(recurrent, cache.layers[i].recurrent_states[0], atol=1e-5, rtol=1e-5)
            assert recurrent.abs().max() > 0.1  # the state carries something
        else:
            assert entries[0].shape == (len(ids), ours.arch.n_kv_head, ids.shape[1], ours.arch.head_dim)
    MAX_DELTA[name] = delta


@pytest.mark.parametrize("name", CASES)
def test_greedy_tokens_equal_transformers(tiny, name):
    """transformers' own generate(). Longrope starts past its original context: when a generation crosses
    it, transformers' Phi-3 drops its cache and recomputes every key with the long factors, which a graph
    fed its own cache cannot do (keys before the crossing keep the short factors)."""
    folder, theirs = tiny[name]
    ours = load_decoder(folder)
    ids = left_padded((9 if name == "phi3-longrope" else 6,))[0]
    with torch.no_grad():
        want = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, eos_token_id=VOCAB + 1,
                               do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        got, past = [], ours.empty_cache(1)
        x, n = ids, ids.shape[1]
        for _ in range(10):
            logits, past = ours.forward_with_cache(x, torch.ones(1, n, dtype=torch.long),
                                                   torch.arange(n - x.shape[1], n)[None], past)
            got.append(int(logits[0, -1].argmax()))
            x, n = torch.tensor([[got[-1]]]), n + 1
    assert got == want


def test_family_defaults_are_transformers_defaults():
    """A config.json may leave keys out; we fill them as transformers' config classes do."""
    from transformers import AutoConfig

    for model_type, cls in FAMILIES.items():
        config = AutoConfig.for_model(model_type)
        for key, value in cls.defaults.items():
            if key in ("sliding_window", "sliding_window_pattern") and not hasattr(config, key):
                continue  # qwen2/3: the window only counts with use_sliding_window; gemma3: a private copy
            if model_type in ("qwen2", "qwen3") and key == "sliding_window":
                continue  # transformers keeps it only when use_sliding_window (default False)
            assert getattr(config, key, value) == value, (model_type, key)


# transformers 5 writes RoPE as one rope_parameters object (exactly these, from 5.25's save_pretrained of
# the cases above); transformers 4 wrote rope_theta, rope_scaling, partial_rotary_factor, rotary_* and
# Gemma 3's rope_local_base_freq
ROPE_V5 = {
    "llama3": {"rope_parameters": {"factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                   "original_max_position_embeddings": 16, "rope_theta": 500000.0,
                                   "rope_type": "llama3"}},
    "phi3": {"partial_rotary_factor": 0.5, "rope_parameters": {"partial_rotary_factor": 0.5, "rope_theta": 10000.0,
                                                               "rope_type": "default"}},
    "phi3-longrope": {"rope_parameters": {"long_factor": [2.0, 3.0, 5.0, 8.0], "original_max_position_embeddings": 8,
                                          "partial_rotary_factor": 1.0, "rope_theta": 10000.0, "rope_type": "longrope",
                                          "short_factor": [1.0, 1.5, 2.0, 2.5], "type": "longrope"}},
    "gemma3": {"rope_parameters": {"full_attention": {"factor": 8.0, "rope_theta": 1000000.0, "rope_type": "linear"},
                                   "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}}},
    "gpt_neox": {"rope_parameters": {"partial_rotary_factor": 0.25, "rope_theta": 10000.0, "rope_type": "default"}},
}
LEGACY_ROPE = ("rope_theta", "rope_scaling", "partial_rotary_factor", "rotary_pct", "rotary_emb_base",
               "rope_local_base_freq", "rope_parameters")


def as_v5(tiny, name) -> dict:
    """The saved config of case `name` with its RoPE keys as transformers 5 writes them."""
    saved = json.loads((tiny[name][0] / "config.json").read_text())
    return {k: v for k, v in saved.items() if k not in LEGACY_ROPE} | copy.deepcopy(ROPE_V5[name])


@pytest.mark.parametrize("name", ROPE_V5)
def test_transformers_5_configs_mean_the_same_model(tiny, tmp_path, name):
    """The same model's config as transformers 5 writes it gives the same logits as the saved one (4.x keys
    when the suite runs on 4.57, 5.x keys on 5.x), past the 8 positions where longrope changes factors."""
    folder = _edited(tiny, tmp_path, name)
    (folder / "config.json").write_text(json.dumps(as_v5(tiny, name)))
    ids = torch.arange(1, 13)[None]
    with torch.no_grad():
        assert torch.equal(load_decoder(folder)(ids)[0], load_decoder(tiny[name][0])(ids)[0])


def test_a_legacy_olmo3_config_means_what_transformers_5_reads(tiny, tmp_path):
    """A transformers 4 config.json (top-level rope_theta and rope_scaling): transformers 5's Olmo3Config
    scales the full layers only and gives the sliding ones its default base (500000), whatever rope_theta
    says. So do we: the logits of the saved weights under that config are transformers' own."""
    saved = json.loads((tiny["olmo3"][0] / "config.json").read_text())
    legacy = {k: v for k, v in saved.items() if k not in LEGACY_ROPE} | {
        "rope_theta": 1234.0, "rope_scaling": {"rope_type": "linear", "factor": 8.0}}
    folder = _edited(tiny, tmp_path, "olmo3")
    (folder / "config.json").write_text(json.dumps(legacy))
    ours = load_decoder(folder)
    assert (ours.arch.rope_theta, ours.arch.rope_local_theta) == (1234.0, 500000.0)
    ids = torch.arange(1, 13)[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], fresh(folder)(ids).logits, atol=1e-5, rtol=1e-5)


def test_transformers_5_scaling_on_sliding_layers_is_refused(tiny):
    v5 = as_v5(tiny, "gemma3")
    v5["rope_parameters"]["sliding_attention"] |= {"rope_type": "linear", "factor": 2.0}
    with pytest.raises(UserError, match="sliding_attention: 'linear' scaling on sliding layers is not implemented"):
        FAMILIES["gemma3_text"](v5, "v5").arch()


# ----------------------------------------------------------------------------- refusals

def _edited(tiny, tmp_path, name, **changes):
    folder = tmp_path / name
    shutil.copytree(tiny[name][0], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_unknown_rope_scaling_type_is_refused(tiny, tmp_path):
    folder = _edited(tiny, tmp_path, "llama", rope_scaling={"rope_type": "wibble", "factor": 2.0})
    with pytest.raises(UserError, match="rope_scaling type 'wibble' is not implemented"):
        load_decoder(folder)
    folder = _edited(tiny, tmp_path / "b", "llama", rope_scaling={"rope_type": "llama3", "factor": 2.0})
    with pytest.raises(UserError, match="needs"):
        load_decoder(folder)


def test_unknown_architecture_names_the_supported_ones(tiny, tmp_path):
    folder = _edited(tiny, tmp_path, "llama", model_type="bloom")
    with pytest.raises(UserError) as e:
        load_decoder(folder)
    assert "'bloom' is not supported" in str(e.value) and all(t in str(e.value) for t in FAMILIES)


def test_shape_mismatch_is_one_line(tiny, tmp_path):
    folder = _edited(tiny, tmp_path, "llama", intermediate_size=96)
    with pytest.raises(UserError, match=r"wrong shapes .*mlp\.gate_proj\.weight\+.*up_proj\.weight \(128, 32\), "
                                        r"expected \(192, 32\)") as e:
        load_decoder(folder)
    assert "\n" not in str(e.value)


def test_tensors_we_would_ignore_are_refused(tiny, tmp_path):
    """A config saying 'no bias' over a checkpoint that has biases: the math would differ, so no."""
    folder = _edited(tiny, tmp_path, "llama-biases", attention_bias=False, mlp_bias=False)
    with pytest.raises(UserError, match=r"tensors onnxgen does not implement \[.*\.bias'"):
        load_decoder(folder)


def test_math_changing_keys_are_refused(tiny, tmp_path):
    with pytest.raises(UserError, match="do_layer_norm_before = False"):
        load_decoder(_edited(tiny, tmp_path, "opt", do_layer_norm_before=False))
    with pytest.raises(UserError, match="project_in/project_out"):
        load_decoder(_edited(tiny, tmp_path / "b", "opt", word_embed_proj_dim=16))
    with pytest.raises(UserError, match="use_bidirectional_attention"):
        load_decoder(_edited(tiny, tmp_path / "c", "gemma3", use_bidirectional_attention=True))
    with pytest.raises(UserError, match="hidden_act 'quick_gelu' is not implemented"):
        load_decoder(_edited(tiny, tmp_path / "d", "llama", hidden_act="quick_gelu"))
    with pytest.raises(UserError, match="qk_layernorm = True"):
        load_decoder(_edited(tiny, tmp_path / "e", "phi", qk_layernorm=True))
    with pytest.raises(UserError, match=r"no_rope_layers must be 4 flags of 0 or 1, got \[1, 0\]"):
        load_decoder(_edited(tiny, tmp_path / "f", "smollm3", no_rope_layers=[1, 0]))


def test_expert_counts_the_weights_contradict_are_refused(tiny, tmp_path):
    """An expert count the checkpoint does not have, more experts a token than there are, a bf16-only
    quantized gpt-oss: one line each, before any export."""
    with pytest.raises(UserError, match=r"does not match its config.json \(wrong shapes .*block_sparse_moe\.gate"
                                        r"\.weight \(4, 32\), expected \(3, 32\).*; tensors onnxgen does not implement "
                                        r"\[.*experts\.3\.") as e:
        load_decoder(_edited(tiny, tmp_path, "mixtral", num_local_experts=3))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"num_experts_per_tok = 5: need 0 < per token <= experts"):
        load_decoder(_edited(tiny, tmp_path / "b", "qwen3_moe", num_experts_per_tok=5))
    with pytest.raises(UserError, match=r"quantization_config \(mxfp4\) is not implemented"):
        load_decoder(_edited(tiny, tmp_path / "c", "gpt_oss", quantization_config={"quant_method": "mxfp4"}))


def test_lfm2_layer_types_and_kernel_are_checked(tiny, tmp_path):
    """LFM2: a layer type other than conv or full attention, or a kernel too short to carry state, is one line."""
    with pytest.raises(UserError, match=r"layer_types must be 4 of 'full_attention' or 'conv', got \['conv', "
                                        r"'sliding_attention'"):
        load_decoder(_edited(tiny, tmp_path, "lfm2", layer_types=["conv", "sliding_attention", "conv", "conv"]))
    with pytest.raises(UserError, match=r"conv_kernel \(conv_L_cache\) must be at least 2, got 1") as e:
        load_decoder(_edited(tiny, tmp_path / "b", "lfm2", conv_L_cache=1))
    assert "\n" not in str(e.value)


def test_granite4_what_we_do_not_implement_is_refused(tiny, tmp_path):
    """Granite 4: a clamped time step (transformers clamps it in prefill only), a layer type other than mamba or
    attention, heads that do not tile mamba_expand * hidden_size, another position embedding: one line each."""
    with pytest.raises(UserError, match=r"time_step_limit = \[0.001, 0.1\] is not implemented") as e:
        load_decoder(_edited(tiny, tmp_path, "granitemoehybrid", time_step_limit=[0.001, 0.1]))
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"layer_types must be 3 of 'mamba' or 'attention', got \['mamba', 'conv'"):
        load_decoder(_edited(tiny, tmp_path / "b", "granitemoehybrid", layer_types=["mamba", "conv", "mamba"]))
    with pytest.raises(UserError, match=r"mamba_n_heads \(4\) times mamba_d_head \(8\) must be mamba_expand \* "
                                        r"hidden_size \(64\)"):
        load_decoder(_edited(tiny, tmp_path / "c", "granitemoehybrid", mamba_d_head=8))
    with pytest.raises(UserError, match=r"position_embedding_type 'alibi' is not implemented"):
        load_decoder(_edited(tiny, tmp_path / "d", "granitemoehybrid", position_embedding_type="alibi"))
    # transformers 4's names for the layer types (layers_block_type) mean the same model
    legacy = _edited(tiny, tmp_path / "e", "granitemoehybrid", layer_types=None,
                     layers_block_type=["mamba", "attention", "mamba"])
    assert load_decoder(legacy).arch.layer_types == ("mamba", "full_attention", "mamba")


def test_pickled_only_folder_is_refused(tmp_path):
    save_tiny(tmp_path / "pickled", "llama", SMALL, safe=False)
    assert not list((tmp_path / "pickled").glob("*.safetensors"))
    assert (tmp_path / "pickled" / "pytorch_model.bin").exists()
    with pytest.raises(UserError, match="safetensors only"):
        load_decoder(tmp_path / "pickled")


def test_a_base_model_checkpoint_without_its_prefix_loads(tiny, tmp_path):
    """The Hub's gpt2 stores `h.0.attn...`, not `transformer.h.0.attn...` (a GPT2Model, not the LM)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "gpt2"
    shutil.copytree(tiny["gpt2"][0], folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in weights.items()}, folder / "model.safetensors")
    ids = left_padded((5,))[0]
    with torch.no_grad():
        torch.testing.assert_close(load_decoder(folder)(ids)[0], tiny["gpt2"][1](ids).logits, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- export

# the families tests/convert/test_hf_import.py does not already export (gpt2, llama, qwen2, phi3, gpt_neox)
EXPORTED = ["mistral", "qwen3", "gemma", "gemma2", "gemma3", "opt", "smollm3", "granite", "olmo2", "olmo3", "phi",
            "mixtral", "qwen3_moe", "gpt_oss", "lfm2", "granitemoehybrid", "granitemoehybrid-dense"]
# not qwen3_5: see test_qwen3_5_graph_runs_onnx_runtime_ops (a random tiny Qwen3.5 is too ill-conditioned for the
# fp32 parity bounds: its own fp32 rounding moves its logits by ~1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("name", EXPORTED)
def test_export_hf_goes_through_our_decoder(hf_models, tmp_path, name):
    """`export --hf` builds our decoder and exports it with the trained model's exporter; parity against
    transformers (eager) passes at the fp32 thresholds, with 64 identical greedy tokens."""
    import onnx

    from pipeline.convert.hf_import import export_hf

    model_type, sizes = CASES[name]
    src = tmp_path / "src"
    save_tiny(src, model_type, {**sizes, "max_position_embeddings": 128}, vocab=512)
    copy_tokenizer(hf_models["llama"], src)
    report = export_hf(src, tmp_path / "out", corpus=str(TEST_CORPUS))
    fp32 = report.to_dict()["variants"]["fp32"]
    assert report.passed and fp32["greedy_match"] == 64, fp32
    assert manifest.load(tmp_path / "out")["stages"][0]["exporter"] == "onnxgen"
    assert (tmp_path / "out" / "config.json").read_bytes() == (src / "config.json").read_bytes()
    # every graph keeps the contract's inputs, position_ids too where nothing reads it (Granite 4.0-H: NoPE)
    names = [i.name for i in onnx.load(str(tmp_path / "out" / "onnx" / "model.onnx"), load_external_data=False).graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"], names[:3]
    arch = load_decoder(src).arch
    graph = onnx.load(str(tmp_path / "out" / "onnx" / "model.onnx"), load_external_data=False).graph
    shapes = {i.name: [d.dim_value or d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input}
    first = arch.layer_types.index("full_attention") if "full_attention" in arch.layer_types else 0
    assert shapes[f"past_key_values.{first}.key"] == ["batch_size", arch.n_kv_head, "past_sequence_length", arch.head_dim]
    for i, kind in enumerate(arch.layer_types):  # LFM2's conv and Qwen3.5's linear layers: state, fixed but batch
        assert (f"past_conv.{i}" in shapes) == (kind in ("conv", "mamba", "linear_attention"))
        assert (f"past_recurrent.{i}" in shapes) == (kind == "linear_attention")
        if kind == "conv":
            assert shapes[f"past_conv.{i}"] == ["batch_size", arch.n_embd, arch.conv_kernel - 1]
        if kind == "linear_attention":
            assert shapes[f"past_conv.{i}"] == ["batch_size", arch.linear_conv_dim, arch.linear_conv_kernel_dim - 1]
            assert shapes[f"past_recurrent.{i}"] == ["batch_size", arch.linear_num_value_heads,
                                                     arch.linear_key_head_dim, arch.linear_value_head_dim]
    if "linear_attention" in arch.layer_types:  # prefill in two ONNX Runtime ops a layer, not a graph call a token
        ops = [n.op_type for n in graph.node]
        assert ops.count("LinearAttention") == ops.count("CausalConvWithState") == arch.layer_types.count(
            "linear_attention")
    for i, kind in enumerate(arch.layer_types):  # Granite 4's mamba layers: conv and SSM state, fixed but batch
        assert (f"past_ssm.{i}" in shapes) == (kind == "mamba")
        if kind == "mamba":
            assert shapes[f"past_conv.{i}"] == ["batch_size", arch.mamba_conv_dim, arch.mamba_conv - 1]
            assert shapes[f"past_ssm.{i}"] == ["batch_size", arch.mamba_heads, arch.mamba_head_dim, arch.mamba_state]


@pytest.mark.slow
def test_parity_greedy_stays_within_a_short_context(hf_models, tmp_path):
    """A model of 64 learned positions: parity's greedy check (a 16-token prompt) runs the 48 tokens the
    context has room for, not 64 past its table (transformers' GPT-2 would fail with an IndexError)."""
    from pipeline.convert.hf_import import export_hf

    save_tiny(tmp_path / "src", "gpt2", CASES["gpt2"][1], vocab=512)  # n_positions 64
    copy_tokenizer(hf_models["llama"], tmp_path / "src")
    fp32 = export_hf(tmp_path / "src", tmp_path / "out", corpus=str(TEST_CORPUS)).to_dict()["variants"]["fp32"]
    assert fp32["status"] == "pass" and fp32["greedy_tokens"] == fp32["greedy_match"] == 64 - 16


@pytest.mark.parametrize("name", ["llama-dynamic", "llama3", "llama-yarn", "llama-mqa-linear", "phi3-longrope",
                                  "gpt_neox-sequential"])
def test_rope_variants_export_to_the_same_logits(tiny, tmp_path, name):
    """Length-dependent RoPE (dynamic NTK past n_ctx, longrope past its original context) is computed in
    the graph: ONNX Runtime gives our decoder's logits on a batch long enough to switch it on."""
    import onnxruntime as ort

    from pipeline.convert.export import export_graph

    ours = load_decoder(tiny[name][0])
    export_graph(ours, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    ids, mask, pos = left_padded()
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()}
    for i, (k, v) in enumerate(ours.empty_cache(len(ids))):
        feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k.numpy(), v.numpy()
    with torch.no_grad():
        want, _ = ours.forward_with_cache(ids, mask, pos, ours.empty_cache(len(ids)))
    real = mask.bool()
    got = torch.from_numpy(session.run(["logits"], feed)[0])
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- the fused graph

# ONNX Runtime's rotary kernel takes head sizes that are multiples of 16 and rotated widths of 16 or more:
# the fused cases widen the tiny models to that (every other size as in CASES)
FUSED_SIZES = {"hidden_size": 64, "max_position_embeddings": 64}
FUSED_WIDER = {"phi3": {"hidden_size": 128}, "phi": {"hidden_size": 128}, "gpt_neox": {"hidden_size": 256}, "gpt_neox-sequential": {"hidden_size": 128},
               "llama-dynamic": {"max_position_embeddings": 64},
               "granitemoehybrid": {"mamba_d_head": 32},  # 4 heads of 32: mamba_expand (2) * 64
               "granitemoehybrid-dense": {"mamba_d_head": 32},
               # a batch of 12 tokens at most takes the short factors, two decode steps later the long ones
               "phi3-longrope": {"original_max_position_embeddings": 13, "rope_scaling": {
                   "type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.5, 2.0, 2.5, 3.0, 4.0],
                   "long_factor": [2.0, 3.0, 5.0, 8.0, 10.0, 13.0, 17.0, 21.0]}}}


def fused_case(tmp_path, name, vocab: int = VOCAB):
    model_type, sizes = CASES[name]
    if "hidden_size" in sizes and "head_dim" not in sizes and model_type != "opt":
        sizes = {**sizes, **FUSED_SIZES}
    save_tiny(tmp_path / name, model_type, {**sizes, **FUSED_WIDER.get(name, {})}, vocab=vocab)
    return tmp_path / name


def run_fused(session, arch, rows: list[list[int]], steps: int):
    """Right-padded prefill of `rows`, then `steps` decode steps each feeding the row's next token, as
    onnxgen run's shared-buffer loop does; yields each call's last-position logits (B, V)."""
    import numpy as np

    B, lengths = len(rows), [len(r) - steps for r in rows]
    S, room = max(lengths), max(len(r) for r in rows)
    ids, mask = np.zeros((B, S), np.int64), np.zeros((B, S), np.int64)
    for b, n in enumerate(lengths):
        ids[b, :n], mask[b, :n] = rows[b][:n], 1
    pos = np.tile(np.arange(S), (B, 1))
    # K/V in a buffer of `room` positions; a conv layer's state (LFM2) in its fixed shape, zeros at first
    cache = {i.name: np.zeros((B, *i.shape[1:]) if is_state(i.name) else (B, arch.n_kv_head, room, arch.head_dim),
                              np.float32) for i in session.get_inputs() if i.name.startswith("past")}
    names = [o.name for o in session.get_outputs()]
    for step in range(steps + 1):
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        if step == 0 and any(map(is_state, cache)):  # with state, each row prefills alone (as run/lm.py does)
            alone = [dict(zip(names, session.run(None, {k: v[b:b + 1, :n] for k, v in feed.items()}
                                                  | {k: v[b:b + 1] for k, v in cache.items()})))
                     for b, n in enumerate(lengths)]
            out = {k: np.concatenate([r[k] for r in alone]) for k in names}
        else:
            out = dict(zip(names, session.run(None, feed | cache)))
        yield out["logits"][:, 0]
        if step == steps:
            return
        cache = {k: out[present_of(k)] for k in cache}
        ids = np.array([[rows[b][n + step]] for b, n in enumerate(lengths)], np.int64)
        pos = np.array([[n + step] for n in lengths], np.int64)
        mask = np.zeros((B, max(lengths) + step + 1), np.int64)
        for b, n in enumerate(lengths):
            mask[b, :n + step + 1] = 1


def plain_steps(ours, rows: list[list[int]], steps: int):
    """run_fused's calls as the plain graph makes them: the same rows left-padded through our decoder's
    cache; yields each call's last-position logits (B, V). Longrope takes its table by the batch's longest
    row, in both graphs alike (a row alone could take the other)."""
    B, lengths = len(rows), [len(r) - steps for r in rows]
    S = max(lengths)
    ids, mask = torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, S - n:], mask[b, S - n:] = torch.tensor(rows[b][:n]), 1
    with torch.no_grad():
        logits, past = ours.forward_with_cache(ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), ours.empty_cache(B))
        yield logits[:, -1]
        for step in range(steps):
            ids = torch.tensor([[rows[b][n + step]] for b, n in enumerate(lengths)])
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
            logits, past = ours.forward_with_cache(ids, mask, torch.tensor([[n + step] for n in lengths]), past)
            yield logits[:, -1]


TWIN_PROMPTS = [[5, 17, 33, 2, 9], [40, 41], [7, 7, 7, 100, 3, 250]]


def twins_generate_as_plain_graphs(out, variants):
    """onnxgen's runtime gives the same greedy tokens on each variant's fused twin as on its plain graph."""
    from pipeline.run.lm import OnnxLM

    for variant in variants:
        plain, twin = OnnxLM(out, variant), OnnxLM(out, variant, fused=True)
        assert twin.fused and not plain.fused
        assert [list(map(int, t)) for t in plain.generate(TWIN_PROMPTS, 10, stop_at_eos=False)] == \
               [list(map(int, t)) for t in twin.generate(TWIN_PROMPTS, 10, stop_at_eos=False)], variant


def test_fuse_refuses_head_sizes_the_rotary_kernel_does_not_take(tiny):
    from pipeline.convert.fuse import attention_of

    with pytest.raises(UserError, match=r"RoPE with head size 8 \(not a multiple of 16\)"):
        attention_of(tiny["llama"][0])


def test_fuse_refuses_the_gated_attention_of_qwen3_5(tiny):
    from pipeline.convert.fuse import attention_of

    with pytest.raises(UserError, match=r"a gated attention output .*not fused yet, the plain graph runs it"):
        attention_of(tiny["qwen3_5"][0])


TINY_QWEN3_5_FP32 = 5e-4  # see test_qwen3_5_graph_runs_onnx_runtime_ops


def test_qwen3_5_graph_runs_onnx_runtime_ops(tiny, tmp_path):
    """The exported Qwen3.5 graph: each linear_attention layer one CausalConvWithState and one LinearAttention
    (prefill is one call, not a call a token), its states fixed but batch and the recurrent one float32; on a
    left-padded batch, prefill then decode steps, ONNX Runtime's logits and states are our decoder's (which
    are transformers', test_logits_equal_transformers) within the fp32 parity bound, and each row's logits in
    the batch are that row's alone: padding leaks into no state.

    Within 5e-4, not the parity bound's 1e-4: this random tiny Qwen3.5 amplifies rounding ~500 times (1e-7
    relative noise into its RMSNorms' inputs moves its logits by 5e-5; its fp32 logits differ from a float64
    run by 1.2e-3 over 127 tokens), so two correct fp32 computations of it differ by ~1.5e-4 here. A wrong
    state layout, gate or mask moves them by O(1)."""
    import onnx
    import onnxruntime as ort

    from pipeline.convert.export import export_graph
    from pipeline.exports import cache_names

    folder, _ = tiny["qwen3_5"]
    ours = load_decoder(folder)
    a = ours.arch
    export_graph(ours, tmp_path / "model.onnx")
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    n_linear = a.layer_types.count("linear_attention")
    assert ops.count("LinearAttention") == ops.count("CausalConvWithState") == n_linear == 3
    assert "Conv" not in ops and "Loop" not in ops
    dims = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in [*graph.input, *graph.output]}
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
    for i in (0, 2, 3):
        for io in ("past", "present"):
            assert dims[f"{io}_conv.{i}"] == ["batch_size", a.linear_conv_dim, a.linear_conv_kernel_dim - 1]
            assert dims[f"{io}_recurrent.{i}"] == ["batch_size", 4, 8, 16]  # (Hv, dk, dv): transformers' own
            assert types[f"{io}_recurrent.{i}"] == onnx.TensorProto.FLOAT
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    pasts, presents = cache_names(a.layer_types)

    def run(ids, mask, pos, past):
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy(),
                **{n: t.numpy() for n, t in zip(pasts, [t for entries in past for t in entries])}}
        out = session.run(["logits", *presents], feed)
        return torch.from_numpy(out[0]), ours.split_cache([torch.from_numpy(t) for t in out[1:]])

    ids, mask, pos = left_padded()
    real, P = mask.bool(), 10
    with torch.no_grad():
        want, want_past = ours.forward_with_cache(ids[:, :P], mask[:, :P], pos[:, :P], ours.empty_cache(3))
        got, past = run(ids[:, :P], mask[:, :P], pos[:, :P], ours.empty_cache(3))
        torch.testing.assert_close(got[real[:, :P]], want[real[:, :P]], atol=TINY_QWEN3_5_FP32, rtol=1e-5)
        batch = [got]
        for t in range(P, ids.shape[1]):
            want, want_past = ours.forward_with_cache(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], want_past)
            got, past = run(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], past)
            torch.testing.assert_close(got, want, atol=TINY_QWEN3_5_FP32, rtol=1e-5)
            batch.append(got)
        for entries, expected in zip(past, want_past):
            for t, w in zip(entries, expected):
                torch.testing.assert_close(t, w, atol=TINY_QWEN3_5_FP32, rtol=1e-5)
        batch = torch.cat(batch, dim=1)
        for b, n in enumerate(LENGTHS):  # each row alone, unpadded: the same logits as in the padded batch
            T = ids.shape[1]
            row, m, p = ids[b:b + 1, T - n:], mask[b:b + 1, T - n:], pos[b:b + 1, T - n:]
            alone, _ = run(row, m, p, ours.empty_cache(1))
            torch.testing.assert_close(alone[0], batch[b, T - n:], atol=TINY_QWEN3_5_FP32, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n, (model_type, _) in CASES.items() if model_type != "qwen3_5_text"])
def test_fused_graph_gives_our_decoders_logits(tmp_path, name):
    """onnxgen fuse's rewrite for every family: one GroupQueryAttention per layer (rotary, longrope's two
    tables, sliding windows, soft-caps, q/k norms and scales as attributes and inputs) gives our decoder's
    logits, within 5e-5, on a right-padded batch of three lengths and three decode steps after it."""
    import onnx
    import onnxruntime as ort

    from pipeline.convert.export import export_graph
    from pipeline.convert.fuse import attention_of, fuse_graph

    folder = fused_case(tmp_path, name)
    ours = load_decoder(folder)
    export_graph(ours, tmp_path / "model.onnx")
    graph = fuse_graph(onnx.load(str(tmp_path / "model.onnx")), attention_of(folder))
    ops = [n.op_type for n in graph.graph.node]
    conv = ours.arch.layer_types.count("conv")  # LFM2's conv layers: one CausalConvWithState each
    mamba = ours.arch.layer_types.count("mamba")  # Granite 4's: a CausalConvWithState and a GatedDeltaNet each
    assert ops.count("GroupQueryAttention") == ours.arch.n_layer - conv - mamba
    assert ops.count("CausalConvWithState") == conv + mamba and "Conv" not in ops
    assert ops.count("GatedDeltaNet") == mamba
    onnx.save(graph, str(tmp_path / "fused.onnx"))
    session = ort.InferenceSession(str(tmp_path / "fused.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(1)
    steps = 3
    rows = [torch.randint(1, VOCAB, (n + steps,), generator=g).tolist() for n in LENGTHS]
    expected = plain_steps(ours, rows, steps)
    if "conv" in ours.arch.layer_types:
        # the fused runtime prefills a model with state row by row; with conv biases a left-padded row's state
        # holds its padding's in-projection bias (transformers' math, which ours follows), so: each row alone
        alone = [list(plain_steps(ours, [r], steps)) for r in rows]  # each generator run out: its no_grad exits
        expected = [torch.cat(step) for step in zip(*alone)]
    for got, want in zip(run_fused(session, ours.arch, rows, steps), expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(got), want, atol=5e-5, rtol=1e-4)


@pytest.mark.slow
def test_fuse_stage_on_an_import_runs_the_fast_path(hf_models, tmp_path):
    """The stages a user runs on a real model, on a tiny Llama with GQA and RoPE: export --hf, quantize, fuse
    (each twin judged against transformers), then onnxgen's runtime on the fused twins gives the plain
    graphs' greedy tokens. int8: random weights leave int4 under the import floor (same top-1 43% at 64
    wide, where every logit is a near-tie); SmolLM2's real ones do not (77%, check/parity.py)."""
    import onnx

    from pipeline.convert.fuse import fuse_export
    from pipeline.convert.hf_import import export_hf
    from pipeline.convert.quantize import quantize

    src = fused_case(tmp_path, "llama", vocab=512)  # the tokenizer's
    copy_tokenizer(hf_models["llama"], src)
    out = tmp_path / "out"
    assert export_hf(src, out, corpus=str(TEST_CORPUS)).passed
    details = quantize(out, "int8", progress=False)["int8"]
    # onnxruntime.transformers' fusions on our decoder's RMSNorm graph: residual + norm in one node per sublayer
    assert details["optimize"]["fused"].get("SkipSimplifiedLayerNormalization") == 2 * 2  # 2 layers, 2 each
    assert fuse_export(out, ["fp32", "int8"]) == ["onnx/model_gqa.onnx", "onnx/model_quantized_gqa.onnx"]
    fused = manifest.load(out)["stages"][-1]["fused"]["variants"]
    assert {v: r["status"] for v, r in fused.items()} == {"fp32 fused": "pass", "int8 fused": "pass"}
    fp32_twin = [n.op_type for n in onnx.load(str(out / "onnx" / "model_gqa.onnx")).graph.node]
    assert fp32_twin.count("SkipSimplifiedLayerNormalization") == 2 * 2  # as the int8's graph
    twins_generate_as_plain_graphs(out, ("fp32", "int8"))


@pytest.mark.slow
def test_quantize_and_fuse_take_a_head_with_a_bias(hf_models, tmp_path):
    """Phi-2's logits are MatMul + bias: quantize finds the head's MatMul behind the Add, and fuse gathers
    each row's last hidden state before the head (not the bias). Both twins pass parity against transformers
    and the runtime on them gives the plain graphs' greedy tokens."""
    from pipeline.convert.fuse import fuse_export
    from pipeline.convert.hf_import import export_hf
    from pipeline.convert.quantize import quantize

    src = fused_case(tmp_path, "phi", vocab=512)
    copy_tokenizer(hf_models["llama"], src)
    out = tmp_path / "out"
    assert export_hf(src, out, corpus=str(TEST_CORPUS)).passed
    quantize(out, "int8", progress=False)
    fuse_export(out, ["fp32", "int8"])
    fused = manifest.load(out)["stages"][-1]["fused"]["variants"]
    assert {v: r["status"] for v, r in fused.items()} == {"fp32 fused": "pass", "int8 fused": "pass"}
    twins_generate_as_plain_graphs(out, ("fp32", "int8"))


def test_supported_list_is_what_the_tests_cover():
    """Every family export --hf takes has a case here, and the import tests' fixtures are among them."""
    from conftest import HF_FAMILIES
    from pipeline.convert.hf_import import SUPPORTED

    assert set(HF_FAMILIES) <= set(SUPPORTED) == {model_type for model_type, _ in CASES.values()}


@pytest.mark.slow
def test_qwen3_5_export_runs_quantizes_and_keeps_its_state_fp32(hf_models, tmp_path, monkeypatch):
    """`export --hf` of a tiny Qwen3.5, its parity miss let through (the tiny model's own fp32 rounding,
    test_qwen3_5_graph_runs_onnx_runtime_ops): onnxgen run's OnnxLM, prefilling a batch row by row and stepping
    the rows together, gives our decoder's greedy tokens; int8 and int4 quantize the projections (MatMulNBits)
    and the fp16 variant converts, each keeping past/present_recurrent.* float32, and each runs."""
    import onnx

    import pipeline.convert.hf_import as hf_import
    from pipeline.convert.quantize import quantize
    from pipeline.run.lm import OnnxLM

    reports = []
    monkeypatch.setattr(hf_import, "publish_parity", lambda tmp, out, report: reports.append(report) or report)
    model_type, sizes = CASES["qwen3_5"]
    src = tmp_path / "src"
    save_tiny(src, model_type, {**sizes, "max_position_embeddings": 128}, vocab=512)
    copy_tokenizer(hf_models["llama"], src)
    out = tmp_path / "out"
    hf_import.export_hf(src, out, corpus=str(TEST_CORPUS))
    fp32 = reports[0].to_dict()["variants"]["fp32"]
    assert fp32["greedy_match"] == 64, fp32  # the parity check's 64 greedy tokens equal transformers'
    ours = load_decoder(src)
    prompts = [[5, 17, 33, 2, 9], [40, 41], [7, 7, 7, 100, 3, 250]]
    want = []
    with torch.no_grad():
        for p in prompts:
            x, past, got = torch.tensor([p]), ours.empty_cache(1), []
            for _ in range(10):
                n = len(p) + len(got)
                logits, past = ours.forward_with_cache(x, torch.ones(1, n, dtype=torch.long),
                                                       torch.arange(n - x.shape[1], n)[None], past)
                got.append(int(logits[0, -1].argmax()))
                x = torch.tensor([[got[-1]]])
            want.append(got)
    steps = list(OnnxLM(out, "fp32").generate(prompts, 10, stop_at_eos=False))  # each step: (B,) ids, greedy
    assert [list(map(int, row)) for row in zip(*steps)] == want
    quantize(out, "all", progress=False)
    for variant, ops in (("int8", None), ("int4", "MatMulNBits"), ("fp16", None)):
        graph = onnx.load(str(out / "onnx" / hf_import.VARIANTS[variant]), load_external_data=False).graph
        types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.output]}
        assert {types[f"{io}_recurrent.{i}"] for io in ("past", "present") for i in (0, 2, 3)} == \
               {onnx.TensorProto.FLOAT}, variant
        assert [n.op_type for n in graph.node].count("LinearAttention") == 3
        if ops:
            assert ops in {n.op_type for n in graph.node}
        steps = list(OnnxLM(out, variant).generate(prompts, 4, stop_at_eos=False))
        assert [len(s) for s in steps] == [3] * 4
