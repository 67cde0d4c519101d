"""Speculative decoding: prompt lookup (n-gram drafts from the text itself), or a draft model's greedy tokens.

At batch 1 a decode step costs one pass over the weights, and with float weights checking several tokens in one
pass costs little more (an fp32 check of 8 tokens: 1.35-1.5 steps on SmolLM2; int4's MatMulNBits pays by the
row: 2.7 steps, benchmarks/SPECULATIVE.md). Text people generate locally repeats what the prompt holds (code
being edited, a document being answered from), so the last few tokens often occurred before, followed by what
comes next again. The generation loops (OnnxLM.generate, ChatSession.reply) run it as:

    spec = start(lm, state, prompts, budget, greedy, speculate, draft)   # None: off
    ... after emitting nxt:  if spec.after(state, sampler, nxt, done, room, seen, guides): emit spec.queue
                             else: state.step(nxt)

verify() feeds the last picked token and the n drafts in one call (state.extend returns the logits at every
one of them), keeps the longest run of drafts the model itself would have chosen, plus the model's own next
token, and rolls the cache back past the rest (state.keep). Rollback is a length: the fused graph's shared
buffer forgets slots past each row's length, the plain graph's cache is cut at the sequence axis. A model with
a recurrent state (LFM2, Granite 4, Qwen3.5) cannot roll back by a length, so it does not speculate here (it
would need a snapshot of the state at every draft position, which the graph does not return).

Exactness:
  - greedy: a draft is kept only where it equals the argmax of the model's logits at that position (with the
    same repetition penalty), so the tokens are the model's greedy tokens. With fp32 weights the logits of a
    multi-token call are one token's but for the order of some sums (~5e-6), and greedy output is equal token
    for token (tests/run/test_speculative.py, benchmarks/SPECULATIVE.md); int4's MatMulNBits rounds a check
    otherwise (0.15 median |dlogit|), so near-ties go another way and it is off by default there.
  - sampling: speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with a point-mass draft:
    a draft token d is accepted with probability min(1, p(d)/q(d)) = p(d), and on rejection the token is drawn
    from the residual max(0, p - q), i.e. p without d, renormalised. Each token is then distributed as the
    model's own p (after temperature, top-k, top-p and the repetition penalty): the same distribution, not
    the same draws as the plain loop for a seed.
  - a batch keeps the drafts every live row accepted (rows advance together, one length for the batch's
    cache): each row's tokens are still its own model's choices; a row that accepted more just gives them
    again at the next step.

Prompt lookup itself (n-gram matching over a token list) is ~30 lines that no library offers outside a
PyTorch generate() (transformers' PromptLookupCandidateGenerator): written here, over NumPy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.run.sampling import Sampler

NGRAMS = (3, 2)      # tail lengths to match, longest first (a 1-token match drafts poorly: the next token differs)
FIRST_DRAFT = 4      # tokens drafted on a row's first match
MAX_DRAFT = 12       # at most this many (each adds a position to the verifying call)
# int4/int8 kernels pay for a check by its rows: 8 tokens cost 2.7x a step with MatMulNBits against 1.35-1.5x
# for fp32 MatMul (SmolLM2, benchmarks/SPECULATIVE.md), so a long draft costs more than its expected gain
# there; at an acceptance of 0.7 a token, tokens per step-cost peak near 3-4 drafts
MAX_DRAFT_QUANTIZED = 4


@dataclass
class SpeculationStats:
    calls: int = 0       # verifying calls
    drafted: int = 0     # draft tokens fed, summed over live rows
    accepted: int = 0    # of those, kept

    @property
    def rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def describe(self) -> str:
        return (f"speculation: {self.accepted} of {self.drafted} drafted tokens accepted ({100 * self.rate:.0f}%) "
                f"in {self.calls} checks")


class PromptLookup:
    """Each row's tokens (prompt and output so far) and its draft length, adapted as transformers' assisted
    generation adapts its own: +2 after a draft kept whole, -1 after one cut short (never below 1)."""

    def __init__(self, prompts: list[list[int]], capacity: int, k_max: int = MAX_DRAFT):
        B = len(prompts)
        self.k_max = k_max
        self.tokens = np.zeros((B, capacity), dtype=np.int64)
        self.length = np.zeros(B, dtype=np.int64)
        for b, p in enumerate(prompts):
            self.tokens[b, :len(p)] = p
            self.length[b] = len(p)
        self.k = np.full(B, min(FIRST_DRAFT, k_max), dtype=np.int64)
        # after a check that kept nothing, a row waits this many steps before drafting again (doubling while its
        # drafts keep failing, up to 16): in open-ended text a stray match costs a check and saves nothing
        self.wait = np.zeros(B, dtype=np.int64)
        self.backoff = np.zeros(B, dtype=np.int64)

    def push(self, column: np.ndarray) -> None:
        """One new token per row (B,)."""
        rows = np.arange(len(column))
        self.tokens[rows, self.length] = column
        self.length += 1

    def draft(self, b: int, limit: int) -> np.ndarray:
        """What followed the latest earlier occurrence of row b's last NGRAMS tokens (at most min(k, limit)
        tokens); empty where the tail never occurred before."""
        n_tok = int(self.length[b])
        h = self.tokens[b, :n_tok]
        want = int(min(self.k[b], limit))
        if want < 1:
            return h[:0]
        for n in NGRAMS:
            if n_tok <= n:
                continue
            tail = h[n_tok - n:]
            starts = np.flatnonzero(h[:n_tok - n] == tail[0])  # a match must end before the tail's last token
            for j in range(1, n):
                if not len(starts):
                    break
                starts = starts[h[starts + j] == tail[j]]
            if len(starts):
                # the latest occurrence followed by a whole draft (what came after it most recently), else the
                # earliest (the longest continuation: a latest one may overlap the tail, leaving one token)
                whole = starts[starts + n + want <= n_tok]
                s = int(whole[-1] if len(whole) else starts[0]) + n
                return h[s:s + want]
        return h[:0]

    def propose(self, alive: np.ndarray, limit: int) -> np.ndarray | None:
        """(B, n) drafts, n the shortest of the live rows' (rows go together); None where a live row has none."""
        if (self.wait[alive] > 0).any():
            self.wait[alive] = np.maximum(self.wait[alive] - 1, 0)
            return None
        drafts = {}
        for b in alive.tolist():
            d = self.draft(b, limit)
            if not len(d):
                return None
            drafts[b] = d
        if not drafts:
            return None
        n = min(len(d) for d in drafts.values())
        out = np.zeros((len(self.length), n), dtype=np.int64)
        for b, d in drafts.items():
            out[b] = d[:n]
        return out

    def adapt(self, alive: np.ndarray, drafted: int, accepted: np.ndarray) -> None:
        """accepted (B,): how many of the `drafted` tokens each row's model agreed with."""
        whole = accepted[alive] >= drafted
        self.k[alive] = np.where(whole, np.minimum(self.k[alive] + 2, self.k_max), np.maximum(self.k[alive] - 1, 1))
        none = accepted[alive] == 0
        self.backoff[alive] = np.where(none, np.minimum(np.maximum(2 * self.backoff[alive], 2), 16), 0)
        self.wait[alive] = self.backoff[alive]


class DraftModel:
    """Drafts from a smaller export with the same tokenizer (`--draft EXPORT`): its own greedy tokens, k at a
    time, so the draft is certain (q a point mass) and verify()'s acceptance stays exact for sampling too. The
    draft's cache follows the emitted text: the tokens it drafted and the target kept stay in it, the rest are
    dropped (a length, as the target's), and what it has not seen is fed before the next draft. Same
    adaptation of k as PromptLookup."""

    def __init__(self, lm, prompts: list[list[int]], budget: int):
        self.lm = lm
        self.state = lm.start(prompts, budget + MAX_DRAFT + 1)
        if not self.state.can_extend:
            from pipeline.errors import UserError

            raise UserError(f"--draft {lm.folder}: its graph cannot take several tokens after a cache (a model with "
                            "state, or a fused twin in a batch); give a plain-attention draft, or one prompt")
        self.logits = self.state.logits  # (B, V) after the last token its cache holds
        self.unseen: list[np.ndarray] = []  # emitted columns its cache has not taken yet
        self.skip = 0                       # emitted columns that are its own kept drafts, already in its cache
        self.k = np.full(len(prompts), FIRST_DRAFT, dtype=np.int64)
        self.last: np.ndarray | None = None  # the last draft, (B, n)

    def push(self, column: np.ndarray) -> None:
        if self.skip:
            self.skip -= 1
        else:
            self.unseen.append(np.asarray(column, dtype=np.int64))

    def propose(self, alive: np.ndarray, limit: int) -> np.ndarray | None:
        n = int(min(self.k[alive].min() if len(alive) else FIRST_DRAFT, limit))
        if n < 1:
            return None
        if len(self.unseen) == 1:
            self.logits = self.state.step(self.unseen[0], np.zeros(len(self.unseen[0]), bool))
        elif self.unseen:
            self.logits = self.state.extend(np.stack(self.unseen, axis=1))[:, -1]
        self.unseen = []
        drafts = [self.logits.argmax(-1)]
        for _ in range(n - 1):
            self.logits = self.state.step(drafts[-1], np.zeros(len(drafts[-1]), bool))
            drafts.append(self.logits.argmax(-1))
        self.last = np.stack(drafts, axis=1)
        return self.last

    def adapt(self, alive: np.ndarray, drafted: int, accepted: np.ndarray) -> None:
        """After verify(): the batch kept a = min over live rows of `accepted` drafts. The cache holds the
        first drafted - 1 of them; keep the kept ones, drop the rest."""
        a = int(accepted[alive].min()) if len(alive) else 0
        in_cache = drafted - 1
        kept = min(a, in_cache)
        self.state.drop(in_cache - kept)
        self.skip = kept  # those emitted columns are already in its cache
        if a > kept:      # the whole draft kept: its last token was never fed
            self.unseen.append(self.last[:, -1])
            self.skip += 1
        whole = accepted[alive] >= drafted
        self.k[alive] = np.where(whole, np.minimum(self.k[alive] + 2, MAX_DRAFT), np.maximum(self.k[alive] - 1, 1))


class Speculation:
    """One generation's speculation, as the loops of OnnxLM.generate and ChatSession.reply run it: its drafter,
    its counts, and the tokens a check chose that are not emitted yet (`queue`, one (B,) column a step)."""

    def __init__(self, drafter):
        self.drafter, self.stats, self.queue = drafter, SpeculationStats(), []

    def after(self, state, sampler: Sampler, nxt: np.ndarray, done: np.ndarray, room: int,
              seen: np.ndarray | None, guides=None) -> bool:
        """After nxt (B,) was emitted: True when the next tokens are chosen already (queued by this or an
        earlier check), so the caller does not step; False when nothing was drafted (the caller steps)."""
        self.drafter.push(nxt)
        if self.queue:
            return True
        live = np.flatnonzero(~done)
        drafts = self.drafter.propose(live, room) if room > 0 else None
        if drafts is None:
            return False
        emitted, accepted = verify(state, sampler, nxt, drafts, seen, live, self.stats, guides)
        self.drafter.adapt(live, drafts.shape[1], accepted)
        self.queue = list(emitted.T)
        return True


def start(lm, state, prompts: list[list[int]], budget: int, greedy: bool, speculate: bool | None,
          draft=None) -> Speculation | None:
    """The speculation of one generation, or None: speculate None means on where it cannot change the output
    (greedy on a graph whose checks are exact, lm.exact_checks) or with a draft model; off where the state
    cannot take several tokens after its cache."""
    on = (draft is not None or greedy and getattr(lm, "exact_checks", False)) if speculate is None else speculate
    if not (on and state.can_extend):
        return None
    if draft is not None:
        return Speculation(DraftModel(draft, prompts, budget))
    capacity = max(len(p) for p in prompts) + budget + 1
    return Speculation(PromptLookup(prompts, capacity, getattr(lm, "max_draft", MAX_DRAFT)))


def same_tokenizer(target, draft) -> None:
    """A draft must number tokens as the target does: refused in one line otherwise."""
    from pipeline.errors import UserError

    a, b = target.tokenizer.get_vocab(), draft.tokenizer.get_vocab()
    if a != b:
        differ = sum(1 for t, i in a.items() if b.get(t) != i)
        raise UserError(f"--draft {draft.folder}: its tokenizer is not {target.folder}'s ({len(b)} tokens against "
                        f"{len(a)}, {differ} numbered differently); a draft model must share the tokenizer")


def verify(state, sampler: Sampler, nxt: np.ndarray, drafts: np.ndarray, seen: np.ndarray | None,
           alive: np.ndarray, stats: SpeculationStats, guides=None) -> tuple[np.ndarray, np.ndarray]:
    """Feed nxt (B,) and drafts (B, n) in one call; returns the tokens to emit after nxt, (B, a + 1): the a
    drafts every live row accepted, then each row's own next token, and each row's own acceptance count (B,)
    (for PromptLookup.adapt). The cache keeps nxt and the a drafts (state.keep); the last emitted token is not
    in it yet (it is fed next, as a picked token is). guides: the rows' grammars (run/guidance.py): each
    position's logits are masked by the matcher's state after the drafts before it (a draft the grammar
    refuses is refused), and the matchers are rolled back after, to take the emitted tokens as the loop
    emits them."""
    B, n = drafts.shape
    logits = state.extend(np.concatenate([nxt[:, None], drafts], axis=1))  # (B, n + 1, V)
    seen = None if seen is None else seen.copy()  # a row's accepted drafts count for the penalty further on
    own = np.zeros(B, dtype=np.int64)             # per row: drafts its model accepted before its first refusal
    refused = np.zeros(B, dtype=bool)
    consumed = np.zeros(B, dtype=np.int64)        # draft tokens each row's matcher took during the check
    final = None
    a = n
    for j in range(n):
        d = drafts[:, j]
        lj = logits[:, j] if guides is None else guides.apply(logits[:, j])
        take = sampler.accepts(lj, d, seen)  # (B,) bool
        own = np.where(refused | ~take, own, own + 1)
        refused |= ~take
        if not take[alive].all():
            # the batch stops at j: a refusing row draws from its residual, an accepting one gives its draft
            final = np.where(take, d, sampler.residual(lj, d, seen, ~take))
            a = j
            break
        if seen is not None:
            seen[np.arange(B), d] = True
        if guides is not None:
            for b in alive.tolist():
                consumed[b] += guides.advance(b, int(d[b]))
    if final is None:  # every draft kept: the model's own token after the last one
        final = sampler(logits[:, n] if guides is None else guides.apply(logits[:, n]), seen)
    for b in np.flatnonzero(consumed):
        guides.rollback(int(b), int(consumed[b]))
    state.keep(a + 1)
    stats.calls += 1
    stats.drafted += n * len(alive)
    stats.accepted += a * len(alive)
    return np.concatenate([drafts[:, :a], final[:, None]], axis=1), own
