"""Speculative decoding (run/speculative.py): prompt lookup drafts, checked in one call, the same greedy
tokens as one token a call, and speculative sampling that keeps the model's distribution."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.run.lm import Generation, OnnxLM
from pipeline.run.sampling import SamplingConfig
from pipeline.run.speculative import FIRST_DRAFT, MAX_DRAFT, PromptLookup
from conftest import onnxgen

# text that repeats itself: what prompt lookup is for (code being edited, a document quoted)
REPEATING = ("def parse_args(argv):\n    parser = argparse.ArgumentParser()\n    parser.add_argument('--x')\n"
             "    parser.add_argument('--y')\n    return parser.parse_args(argv)\n\ndef parse_args(argv):\n")


def _generate(lm, prompts, n, **kw):
    result = Generation()
    for _ in lm.generate(prompts, n, result=result, **kw):
        pass
    return result


def test_prompt_lookup_drafts_what_followed_the_latest_match():
    lookup = PromptLookup([[5, 6, 7, 8, 9, 1, 5, 6, 7, 2, 3, 4, 5, 6]], capacity=32)
    # the tail (5, 6) occurred twice; its latest occurrence with a whole draft after it is at 6
    assert lookup.draft(0, 8).tolist() == [7, 2, 3, 4][:FIRST_DRAFT]
    assert lookup.draft(0, 2).tolist() == [7, 2]                       # within the room left
    lookup.push(np.array([42]))
    assert lookup.draft(0, 8).tolist() == []                           # (6, 42) never occurred
    assert lookup.propose(np.array([0]), 8) is None
    alive = np.array([0])
    lookup.adapt(alive, 4, np.array([4]))
    assert lookup.k[0] == FIRST_DRAFT + 2                              # a whole draft kept: longer next time
    lookup.adapt(alive, 6, np.array([1]))
    assert lookup.k[0] == FIRST_DRAFT + 1
    for _ in range(20):
        lookup.adapt(alive, int(lookup.k[0]), lookup.k.copy())
    assert lookup.k[0] == MAX_DRAFT


@pytest.mark.parametrize("fused", [False, True])
def test_greedy_tokens_are_the_tokens_of_one_step_at_a_time(tiny_fused_export, fused):
    lm = OnnxLM(tiny_fused_export, fused=fused)
    ids = lm.encode(REPEATING)
    for penalty in (1.0, 1.3):
        sampling = SamplingConfig(repetition_penalty=penalty)
        plain = _generate(lm, [ids], 48, sampling=sampling, speculate=False)
        fast = _generate(lm, [ids], 48, sampling=sampling)  # on by default when greedy
        assert fast.tokens == plain.tokens, penalty
        assert fast.stop_reason == plain.stop_reason
        assert plain.speculation is None and fast.speculation.accepted > 0, fast.speculation


def test_a_batch_speculates_together_with_each_rows_own_tokens(tiny_export):
    lm = OnnxLM(tiny_export)
    prompts = [lm.encode(REPEATING), lm.encode("import os\nimport sys\nimport os\nimport sys\nimport"),
               lm.encode(REPEATING[:60] + REPEATING[:60])]
    plain = _generate(lm, prompts, 40, speculate=False)
    fast = _generate(lm, prompts, 40)
    assert fast.tokens == plain.tokens and fast.stop_reason == plain.stop_reason
    assert fast.speculation.accepted > 0, fast.speculation


def test_the_fused_check_returns_the_logits_of_every_position(tiny_fused_export):
    """logits_to_keep = n: the fused twin's n positions equal n decode steps' logits."""
    lm = OnnxLM(tiny_fused_export, fused=True)
    ids = lm.encode(REPEATING)
    more = np.array([lm.encode(" parser = argparse")], dtype=np.int64)
    one_by_one = lm.start([ids], 64)
    want = [one_by_one.step(more[:, i], np.zeros(1, bool)).copy() for i in range(more.shape[1])]
    state = lm.start([ids], 64)
    got = state.extend(more)
    np.testing.assert_allclose(got[0], np.concatenate(want), atol=1e-4)
    state.keep(2)  # roll back: the next step goes on after the first two tokens
    np.testing.assert_allclose(state.step(more[:, 2], np.zeros(1, bool)), want[2], atol=1e-4)


def test_run_reports_acceptance_and_can_turn_it_off(tiny_fused_export):
    on = onnxgen("run", tiny_fused_export, REPEATING, "--max-new-tokens", 32, "--temperature", 0, "--stats",
                 "--no-echo")
    off = onnxgen("run", tiny_fused_export, REPEATING, "--max-new-tokens", 32, "--temperature", 0, "--stats",
                  "--no-echo", "--no-speculate")
    assert on.stdout == off.stdout
    assert "speculation:" in on.stderr and "drafted tokens accepted" in on.stderr, on.stderr
    assert "speculation" not in off.stderr


def test_chat_answers_are_the_same_with_speculation(tiny_chat_export):
    from pipeline.run.chat import ChatSession

    lm = OnnxLM(tiny_chat_export, fused=True)
    fast = ChatSession(lm, max_new_tokens=16)
    slow = ChatSession(lm, max_new_tokens=16, speculate=False)  # the tiny model's context is 128 tokens
    for question in ["import os\nimport sys\nimport os\nimport", "x = 1\nx = 1\nx =", "def f(x):"]:
        assert "".join(fast.reply(question)) == "".join(slow.reply(question))
    assert sum(t.speculation.accepted for t in fast.turns) > 0
    assert all(t.speculation is None for t in slow.turns)


class MarkovState:
    """A decode state whose model is a Markov chain: the logits after a token are table[token]."""

    def __init__(self, table: np.ndarray, prompts: list[list[int]]):
        self.table = table
        self.logits = table[[p[-1] for p in prompts]]

    def step(self, nxt, done):
        return self.table[nxt]

    can_extend = True

    def extend(self, ids):
        return self.table[ids]

    def keep(self, n_keep):
        pass

    def drop(self, n):
        pass


def _markov_lm(table: np.ndarray) -> OnnxLM:
    lm = object.__new__(OnnxLM)  # the generation loop alone, over a model whose distribution is known exactly
    lm.vocab_size, lm.n_ctx, lm.pad_id, lm.max_draft = table.shape[0], 1 << 20, 0, MAX_DRAFT
    lm.eos_ids = np.array([table.shape[0] + 7], dtype=np.int64)  # never produced
    lm.start = lambda prompts, budget: MarkovState(table, prompts)
    return lm


@pytest.mark.parametrize("drafter", ["lookup", "draft model"])
def test_speculative_sampling_keeps_the_models_distribution(drafter):
    """Thousands of seeded draws of 3 tokens from a 4-token Markov chain whose prompt drafts its likely path
    (or whose draft model, another chain, drafts its own greedy path): the counts of the 64 sequences fit the
    chain's exact probabilities (chi-square), where a sampler that kept drafts too often (accepting with
    p > p(d), or resampling without removing the draft) would not."""
    rng = np.random.default_rng(0)
    V, n_tokens, draws = 4, 3, 6000
    table = rng.normal(0, 1.0, (V, V)).astype(np.float32)
    for t in range(V):
        table[t, (t + 1) % V] += 1.0  # the path 0 1 2 3 0 ... is likely, not certain
    prompt = [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    config = dict(temperature=0.8, top_k=3)
    p = np.exp(table / 0.8)
    p[np.arange(V), table.argmin(1)] = 0  # top-k 3: the smallest logit goes
    p /= p.sum(1, keepdims=True)
    lm = _markov_lm(table)
    draft = None
    if drafter == "draft model":
        near = table + rng.normal(0, 0.5, (V, V)).astype(np.float32)  # a draft that is often, not always, right
        draft = _markov_lm(near)
    counts, accepted, drafted = np.zeros((V,) * n_tokens), 0, 0
    for seed in range(draws):
        r = _generate(lm, [prompt], n_tokens, sampling=SamplingConfig(seed=seed, **config), speculate=True,
                      draft=draft)
        counts[tuple(r.tokens[0])] += 1
        accepted, drafted = accepted + r.speculation.accepted, drafted + r.speculation.drafted
    assert 0 < accepted < drafted  # drafts were kept and refused
    exact = np.einsum("a,ab,bc->abc", p[prompt[-1]], p, p) * draws
    cells = exact > 0
    assert counts[~cells].sum() == 0  # top-k: never a token outside the three
    chi2 = float((((counts - exact) ** 2)[cells] / exact[cells]).sum())
    dof = int(cells.sum()) - 1
    # the 0.999 quantile of chi-square (Wilson-Hilferty): a fair sampler fails 1 run in 1,000
    z = 3.09
    bound = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < bound, (chi2, bound)


def _resample_with_the_draft(self, logits, drafts, seen, rows):
    from pipeline.run.sampling import _inverse_cdf

    return np.array([_inverse_cdf(self.distribution(row), self.rng.random()) if r else -1
                     for row, r in zip(logits, rows)])


@pytest.mark.parametrize("method, bias", [
    ("accepts", lambda self, logits, drafts, seen: np.ones(len(drafts), dtype=bool)),  # keeps every draft
    ("residual", _resample_with_the_draft),                                            # p, not p - q
])
def test_speculative_sampling_is_checked_by_a_test_that_catches_a_biased_sampler(monkeypatch, method, bias):
    """The same test against a biased sampler: it must fail (chi-square 751 against a bound of 54 for the
    resampling that forgets to remove the draft)."""
    from pipeline.run.sampling import Sampler

    monkeypatch.setattr(Sampler, method, bias)
    with pytest.raises(AssertionError):
        test_speculative_sampling_keeps_the_models_distribution("lookup")


def test_a_draft_model_gives_the_targets_greedy_tokens(tiny_fused_export, tiny_export):
    """The same tiny model's plain graph drafting for its fused twin: every draft the target agrees with is
    kept, the tokens are the target's own."""
    lm, draft = OnnxLM(tiny_fused_export, fused=True), OnnxLM(tiny_export)
    for text in ["import os", REPEATING[:80]]:
        ids = lm.encode(text)
        plain = _generate(lm, [ids], 40, speculate=False)
        fast = _generate(lm, [ids], 40, draft=draft)
        assert fast.tokens == plain.tokens
        assert fast.speculation.rate > 0.9, fast.speculation  # the draft is the model itself


def test_a_draft_with_another_tokenizer_is_refused_in_one_line(tiny_export, tmp_path):
    import json
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_export, other)
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(data))
    proc = onnxgen("run", tiny_export, "import os", "--draft", other, "--unsafe-skip-verify", check=False)
    assert proc.returncode == 2 and "--draft" in proc.stderr and "tokenizer" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_constrained_rows_speculate_with_their_grammar(tiny_export):
    """Under a regex the drafts must also pass the grammar: a batch of a constrained and a free row gives the
    tokens of one step a call, the constrained row's text matches, and drafts were kept."""
    import re

    from pipeline.run.guidance import Constraint

    lm = OnnxLM(tiny_export)
    pattern = r"(import (os|sys)\n){2,12}"
    rows = [Constraint.regex(pattern, "--regex"), None]
    prompts = [lm.encode("import os\nimport sys\nimport os\n"), lm.encode("import os\nimport sys\nimport os\n")]
    plain = _generate(lm, prompts, 40, speculate=False, constraint=rows)
    fast = _generate(lm, prompts, 40, constraint=rows)
    assert fast.tokens == plain.tokens
    assert fast.speculation.accepted > 0, fast.speculation
    text = lm.tokenizer.decode([t for t in fast.tokens[0] if t not in lm.eos_ids])
    cut = r"(import (os|sys)\n)*(import (os|sys)\n?|import ?)?"  # the pattern cut at the token budget
    assert re.fullmatch(pattern, text) or re.fullmatch(cut, text), text


def test_a_bad_draft_variant_is_one_line_naming_the_draft(tiny_export):
    proc = onnxgen("run", tiny_export, "import os", "--draft", tiny_export, "--draft-variant", "int9", check=False)
    assert proc.returncode == 2 and "--draft" in proc.stderr and "--draft-variant int9" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
