"""The PyTorch model: the cached forward equals the full one, and transformers' GPT-2 agrees with ours."""
import pytest
import torch

from pipeline.model.reference import hf_cache_name, hf_cache_out
from pipeline.errors import UserError
from pipeline.train.to_hf import to_gpt2
from pipeline.model.gpt import GPT, GPTConfig

CONFIGS = {
    "gelu-learned": GPTConfig(vocab_size=300, n_ctx=48, n_layer=2, n_head=4, n_embd=32),
    "relu-sinusoidal": GPTConfig(vocab_size=300, n_ctx=48, n_layer=3, n_head=2, n_embd=24, activation="relu",
                                 positional="sinusoidal"),
}


def _model(config):
    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():  # move biases and LayerNorms off their init so every parameter matters
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_forward_equals_full_forward(name):
    model = _model(CONFIGS[name])
    ids = torch.randint(0, 300, (3, 20))
    with torch.no_grad():
        full, _ = model(ids)
        mask = torch.ones(3, 20, dtype=torch.long)
        pos = torch.arange(20).repeat(3, 1)
        past = [(k, v) for k, v in model.empty_cache(3)]
        pieces = []
        for a, b in [(0, 7), (7, 8), (8, 15), (15, 20)]:  # prefill, one token, a chunk, the rest
            logits, past = model.forward_with_cache(ids[:, a:b], mask[:, :b], pos[:, a:b], past)
            pieces.append(logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)
    assert past[0][0].shape == (3, model.config.n_head, 20, model.config.head_dim)


def test_left_padded_rows_equal_rows_alone():
    model = _model(CONFIGS["gelu-learned"])
    rows = [torch.randint(0, 300, (n,)) for n in (12, 5, 9)]
    T = 12
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        batch, _ = model.forward_with_cache(ids, mask, pos, model.empty_cache(3))
        for b, r in enumerate(rows):
            alone, _ = model(r[None])
            torch.testing.assert_close(batch[b, T - len(r):], alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_transformers_gpt2_gives_our_logits(name):
    model = _model(CONFIGS[name])
    hf = to_gpt2(model)
    ids = torch.randint(0, 300, (2, 30))
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # and through their KV cache, at past > 0
    with torch.no_grad():
        first = hf(ids[:, :17], use_cache=True)
        second = hf(ids[:, 17:], use_cache=True, **{hf_cache_name(hf): hf_cache_out(first)}).logits
    torch.testing.assert_close(second, ours[:, 17:], atol=1e-5, rtol=1e-5)


def test_tied_head_and_sinusoidal_table_is_fixed():
    model = GPT(CONFIGS["relu-sinusoidal"])
    assert model.lm_head.weight is model.wte.weight
    assert not model.wpe.weight.requires_grad
    # sin(0) = 0, cos(0) = 1 at position 0
    assert torch.allclose(model.wpe.weight[0, 0::2], torch.zeros(12)) and torch.allclose(model.wpe.weight[0, 1::2], torch.ones(12))


@pytest.mark.parametrize("bad, message", [
    (dict(n_head=3, n_embd=32), "divisible by n_head"),
    (dict(activation="swish"), "activation"),
    (dict(positional="rotary"), "positional"),
    (dict(n_layer=0), "n_layer"),
])
def test_impossible_configs_are_user_errors(bad, message):
    with pytest.raises(UserError, match=message):
        GPTConfig(**bad)
