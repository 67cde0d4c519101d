"""Our GPT as a transformers GPT2LMHeadModel: an independent implementation to check ours against,
and a way into the Hugging Face ecosystem."""
from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import UserError
from pipeline.exports import staging
from pipeline.tokenizer import EOT, load_tokenizer, write_hf_tokenizer_files
from pipeline.model.gpt import GPT
from pipeline.train.runs import load_model


def to_gpt2(model: GPT, eot_id: int | None = None):
    """A transformers GPT2LMHeadModel with our weights. GPT-2's Conv1D stores (in, out): transpose Linears.
    Sinusoidal position encodings become GPT-2's wpe table (it is only a lookup either way)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    c = model.config
    if not c.bias:
        raise UserError("to_gpt2: a model without biases has no GPT-2 equivalent")
    config = GPT2Config(
        vocab_size=c.vocab_size, n_positions=c.n_ctx, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
        n_inner=4 * c.n_embd, activation_function="gelu_new" if c.activation == "gelu" else "relu",
        layer_norm_epsilon=c.layer_norm_epsilon, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True,
        # our end-of-text id (GPT2Config would otherwise default to GPT-2's 50256)
        bos_token_id=eot_id, eos_token_id=eot_id, pad_token_id=eot_id,
    )
    hf = GPT2LMHeadModel(config).eval()
    ours = model.state_dict()
    theirs = {}
    for name, value in ours.items():
        if name == "lm_head.weight":
            continue
        key = "transformer." + name
        if name.endswith(("c_attn.weight", "c_fc.weight", "c_proj.weight")):
            value = value.t().contiguous()
        theirs[key] = value
    missing, unexpected = hf.load_state_dict(theirs, strict=False)
    missing = [k for k in missing if not k.endswith(("attn.bias", "attn.masked_bias", "lm_head.weight"))]
    assert not missing and not unexpected, (missing, unexpected)
    hf.tie_weights()
    return hf


def save_gpt2(model: GPT, folder: str | Path, eot_id: int) -> None:
    with torch.no_grad():
        to_gpt2(model, eot_id).save_pretrained(str(folder), safe_serialization=True)


def save_run(checkpoint: str | Path, out: str | Path) -> None:
    """`onnxgen to-hf`: a trained run folder as a transformers folder (safetensors + tokenizer), made
    beside `out` and renamed into place whole."""
    out = Path(out)
    if out.exists():
        raise UserError(f"--out {out}: exists")
    model, tok = load_model(checkpoint), load_tokenizer(checkpoint)
    with staging(out, force=False) as tmp:
        save_gpt2(model, tmp, tok.token_to_id(EOT))
        write_hf_tokenizer_files(tok, tmp, model.config.n_ctx)
