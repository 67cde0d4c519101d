"""Property-based tests (hypothesis) for what users type: sampling options and prompt text."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.errors import UserError
from pipeline.run.sampling import Sampler, SamplingConfig

floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-2.0, 2.0), st.just(0.0),
                   st.just(1.0), st.floats(0, 1e-300))
options = st.fixed_dictionaries({
    "temperature": floats,
    "top_k": st.one_of(st.integers(-3, 80), st.integers(-(2**70), 2**70)),
    "top_p": floats,
    "seed": st.one_of(st.none(), st.integers(-(2**64), 2**64)),
})


def valid(o: dict) -> bool:
    """Written from the options' documentation, independently of SamplingConfig's checks."""
    return (math.isfinite(o["temperature"]) and o["temperature"] >= 0 and o["top_k"] >= 0
            and 0 < o["top_p"] <= 1 and (o["seed"] is None or o["seed"] >= 0))


@st.composite
def logits(draw):
    batch, vocab = draw(st.integers(1, 4)), draw(st.integers(1, 70))
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    return draw(arrays(dtype, (batch, vocab), elements=st.floats(-1e4, 1e4, width=16)))


@settings(max_examples=300, deadline=None)
@given(options, logits())
def test_sampling_options_are_validated_and_valid_ones_never_fail(o, z):
    if not valid(o):
        with pytest.raises(UserError):
            SamplingConfig(**o)
        return
    config = SamplingConfig(**o)
    ids = Sampler(config)(z)
    assert ids.dtype == np.int64 and ids.shape == (z.shape[0],)
    assert ((0 <= ids) & (ids < z.shape[1])).all()
    zf = z.astype(np.float64)
    if config.greedy:
        assert (ids == zf.argmax(-1)).all()
    elif 0 < config.top_k < z.shape[1]:  # the id is among the k largest (ties at the k-th included)
        kth = np.sort(zf, -1)[:, -config.top_k]
        assert (zf[np.arange(len(ids)), ids] >= kth).all()


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 2**63), logits())
def test_the_same_seed_samples_the_same_ids(seed, z):
    config = SamplingConfig(temperature=1.0, top_p=0.9, seed=seed)
    assert (Sampler(config)(z) == Sampler(config)(z)).all()


@pytest.fixture(scope="module")
def tokenizer(tiny_export):
    from pipeline.tokenizer import load_tokenizer

    return load_tokenizer(tiny_export)


# any code point, lone surrogates included (what bad bytes on stdin or in argv become)
any_unicode = st.text(st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()), max_size=200)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_any_text_round_trips_through_the_tokenizer(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert all(0 <= i < tokenizer.get_vocab_size() for i in ids)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(any_unicode)
def test_any_unicode_is_either_tokenized_or_a_user_error(tokenizer, text):
    from pipeline.tokenizer import check_text

    try:
        check_text(text)
    except UserError as e:
        assert "not UTF-8" in str(e)
        assert any(0xD800 <= ord(c) <= 0xDFFF for c in text)
        return
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text
