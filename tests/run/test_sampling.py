"""The sampler's fast paths against the plain definitions: top-k and top-p sets equal a full sort's, the
inverse CDF equals a float64 cumulative sum's, and a row sampled in a batch equals the row alone."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.run.sampling import Sampler, SamplingConfig, _inverse_cdf, _nucleus, _top_k, sample_rows


def _rows(seed: int, n: int = 12, vocab: int = 5000):
    rng = np.random.default_rng(seed)
    for i in range(n):  # flat and peaked rows, with ties among the largest in some
        z = (rng.standard_normal(vocab) * (1 + 4 * (i % 3))).astype(np.float32)
        if i % 4 == 0:
            z[rng.choice(vocab, 8)] = z.max()
        z = np.round(z, 1) if i % 5 == 0 else z  # many ties
        yield z - z.max()


@pytest.mark.parametrize("k", [1, 5, 50, 700])
def test_top_k_is_the_k_largest_with_ties_at_the_kth(k):
    for z in _rows(k):
        kth = np.sort(z)[-k]
        assert _top_k(z, k).tolist() == np.flatnonzero(z >= kth).tolist()


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_nucleus_is_the_full_sorts_prefix(top_p):
    for z in _rows(int(top_p * 1000)):
        p = np.exp(z)
        order = np.lexsort((np.arange(len(p)), -p))  # the definition: largest first, ties by id, whole row
        sp = p[order].astype(np.float64)
        want = np.sort(order[(np.cumsum(sp) - sp) < top_p * p.sum(dtype=np.float64)])
        assert _nucleus(p, top_p).tolist() == want.tolist()


def test_inverse_cdf_is_the_float64_cumulative_sums():
    rng = np.random.default_rng(0)
    for z in _rows(1, vocab=49152):
        p = np.exp(z)
        p[rng.choice(len(p), 100)] = 0.0  # ids of probability 0 are never chosen
        mass = np.cumsum(p.astype(np.float64))
        for u in rng.random(200):
            i = _inverse_cdf(p, u)
            x = u * mass[-1]
            assert p[i] > 0
            # the id whose interval holds x, up to the rounding of two summation orders
            assert mass[i] >= x * (1 - 1e-9) and (i == 0 or mass[i - 1] <= x * (1 + 1e-9))


def test_sampled_frequencies_follow_the_distribution():
    rng = np.random.default_rng(3)
    z = (rng.standard_normal((1, 300)) * 2).astype(np.float32)
    sampler = Sampler(SamplingConfig(temperature=0.7, seed=5))
    ids = np.array([sampler(z)[0] for _ in range(60_000)])
    p = np.exp((z[0] - z.max()).astype(np.float64) / 0.7)
    p /= p.sum()
    seen = np.bincount(ids, minlength=300) / len(ids)
    # total variation: 0.009 measured; temperature 0.6 or 0.8 instead of 0.7 gives 0.12-0.13, ids off by one 0.97
    assert 0.5 * np.abs(seen - p).sum() < 0.03


@pytest.mark.parametrize("config", [dict(temperature=0.8), dict(temperature=1.0, top_p=0.9),
                                    dict(temperature=0.6, top_k=40, top_p=0.95), dict(temperature=0.0)])
def test_a_row_in_a_batch_gets_what_it_gets_alone(config):
    logits = np.stack(list(_rows(7, n=6, vocab=49152)))
    batch = [Sampler(SamplingConfig(seed=s, **config)) for s in range(6)]
    alone = [Sampler(SamplingConfig(seed=s, **config)) for s in range(6)]
    for _ in range(5):
        together = sample_rows(logits, batch)
        assert together.tolist() == [int(a(logits[i:i + 1])[0]) for i, a in enumerate(alone)]


@pytest.mark.parametrize("vocab", [49152, 5037, 200])
def test_rows_at_once_are_pick_row_by_row(vocab):
    """_pick_rows (every id at a temperature, many rows in one call each) gives each row the id pick() gives
    it alone, for the same draw: the same float32 and float64 operations, row by row."""
    from pipeline.run.sampling import _pick_rows

    rng = np.random.default_rng(11)
    logits = np.stack(list(_rows(3, n=12, vocab=vocab)))
    temperatures = rng.choice([0.3, 0.7, 1.0, 1.6], size=len(logits))
    samplers = [Sampler(SamplingConfig(temperature=float(t))) for t in temperatures]
    for _ in range(20):
        u = rng.random(len(logits))
        u[0] = np.nextafter(1.0, 0.0)  # the top of the range: the last id with any mass
        got = _pick_rows(logits, np.array([s.inv_temperature for s in samplers]), u)
        assert got.tolist() == [s.pick(row, x) for s, row, x in zip(samplers, logits, u)]


@pytest.mark.parametrize("top_p", [0.3, 0.9, 0.95, 1.0])
def test_few_candidates_in_python_floats_are_the_numpy_definitions(top_p):
    """_pick_few (a top-k's candidates, in Python floats) picks what _nucleus then _inverse_cdf pick."""
    from pipeline.run.sampling import _pick_few

    rng = np.random.default_rng(5)
    for n in (1, 2, 7, 50, 256):
        for trial in range(40):
            p = np.exp(-np.abs(rng.standard_normal(n) * 3)).astype(np.float32)
            if trial % 3 == 0:
                p = np.round(p, 1).astype(np.float32)  # ties, and zeros
            p[np.argmax(p)] = 1.0
            keep = _nucleus(p, top_p) if top_p < 1.0 else np.arange(n)
            for u in (*rng.random(5), 0.0, np.nextafter(1.0, 0.0)):
                assert _pick_few(p, top_p, u) == int(keep[_inverse_cdf(p[keep], u)])


@pytest.mark.parametrize("temperature", [1.42724769270596e+45, 1e46, 1e-50])
def test_extreme_temperatures_with_top_k(temperature):
    """1/T underflows float32 to 0 (or is clamped to its max): top-k's margins are in the logits' units,
    T times the margin, never 1/(1/T). Found by tests/run/test_input_properties.py's search."""
    z = np.array([[0.0, 0.0, -1.0, -3.0]], dtype=np.float32)
    ids = Sampler(SamplingConfig(temperature=temperature, top_k=2, seed=0))(z)
    assert ids.tolist()[0] in (0, 1)
