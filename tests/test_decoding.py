"""Greedy and beam search against exhaustive search, hand-built cases, and compile counts.

The step functions here are Markov tables: the next-token log-probabilities are
`tables[example, t, previous token]`, with the example id carried in the cache (so a wrong beam
gather would read another example's table) and t as a shared scalar cache leaf.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.models import decoding

PAD, BOS, EOS, A, B_ = 0, 1, 2, 3, 4


def markov_step(tables):
  """step_fn reading next-token log-probs from tables (B, L, V, V) at [example, t, previous token]."""

  def step(cache, tokens):
    ex, t = cache
    return tables[ex, t, tokens[:, 0]], (ex, t + 1)

  return step


@functools.partial(jax.jit, static_argnames=("method", "beam_size", "return_all"))
def run(tables, alpha, method, beam_size=1, return_all=False):
  B, L = tables.shape[:2]
  kw = dict(batch_size=B, max_len=L, bos_id=BOS, eos_id=EOS, pad_id=PAD, length_penalty=alpha)
  if method == "greedy":
    return decoding.greedy_search(markov_step(tables), (jnp.arange(B), jnp.array(0)), **kw)
  cache = (decoding.tile_beams(jnp.arange(B), beam_size), jnp.array(0))
  return decoding.beam_search(markov_step(tables), cache, beam_size=beam_size,
                              return_all=return_all, **kw)


def gnmt(n, alpha):
  return ((5.0 + n) / 6.0) ** alpha


def all_hypotheses(table):
  """Every complete hypothesis under one example's table (L, V, V): (tokens, log-prob)."""
  L, V = table.shape[:2]
  out = []

  def walk(prefix, logp):
    t, prev = len(prefix), (prefix[-1] if prefix else BOS)
    for tok in range(V):
      lp = logp + float(table[t, prev, tok])
      if tok == EOS or t + 1 == L:
        out.append((prefix + [tok], lp))
      else:
        walk(prefix + [tok], lp)

  walk([], 0.0)
  return out


def padded(seq, L):
  return np.array(seq + [PAD] * (L - len(seq)))


def random_tables(seed, B=3, L=3, V=4):
  logits = np.random.default_rng(seed).normal(size=(B, L, V, V)) * 2.0
  return (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)


def chain(first, after):
  """Position-independent tables (1, 3, 5, 5) from P(. | BOS) and P(. | token) dicts."""
  probs = np.full((5, 5), 1e-6)
  probs[BOS] = [first.get(i, 1e-6) for i in range(5)]
  for tok, dist in after.items():
    probs[tok] = [dist.get(i, 1e-6) for i in range(5)]
  probs /= probs.sum(-1, keepdims=True)
  return np.log(np.broadcast_to(probs, (1, 3, 5, 5))).astype(np.float32), probs


@pytest.mark.parametrize("alpha", [0.0, 0.7, 2.0])
def test_beam_without_pruning_equals_exhaustive_search(alpha):
  tables = random_tables(0)
  # 40 hypotheses exist for V=4, L=3, so a 40-wide beam prunes nothing.
  res = run(tables, alpha, "beam", beam_size=40, return_all=True)
  for b in range(3):
    hyps = sorted(((lp / gnmt(len(s), alpha), s) for s, lp in all_hypotheses(tables[b])),
                  key=lambda h: -h[0])
    assert len(hyps) == 40
    np.testing.assert_allclose(res.beam_scores[b], [h[0] for h in hyps], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(res.tokens[b], padded(hyps[0][1], 3))
    assert int(res.lengths[b]) == len(hyps[0][1])
    best_lp = dict((tuple(s), lp) for s, lp in all_hypotheses(tables[b]))[tuple(hyps[0][1])]
    np.testing.assert_allclose(res.log_probs[b], best_lp, rtol=1e-5)
    got = {tuple(np.asarray(t)) for t in res.beam_tokens[b]}
    assert got == {tuple(padded(s, 3)) for _, s in hyps}


@pytest.mark.parametrize("seed", [1, 2])
def test_greedy_follows_argmax_and_beam_one_equals_greedy(seed):
  tables = random_tables(seed)
  greedy = run(tables, 0.5, "greedy")
  beam = run(tables, 0.5, "beam", beam_size=1)
  for b in range(3):
    seq, lp, prev = [], 0.0, BOS
    for t in range(3):
      tok = int(np.argmax(tables[b, t, prev]))
      seq, lp, prev = seq + [tok], lp + float(tables[b, t, prev, tok]), tok
      if tok == EOS:
        break
    np.testing.assert_array_equal(greedy.tokens[b], padded(seq, 3))
    np.testing.assert_allclose(greedy.log_probs[b], lp, rtol=1e-6)
    np.testing.assert_allclose(greedy.scores[b], lp / gnmt(len(seq), 0.5), rtol=1e-6)
  np.testing.assert_array_equal(beam.tokens, greedy.tokens)
  np.testing.assert_array_equal(beam.lengths, greedy.lengths)
  np.testing.assert_allclose(beam.scores, greedy.scores, rtol=1e-6)
  np.testing.assert_allclose(beam.log_probs, greedy.log_probs, rtol=1e-6)


def test_beam_beats_myopic_greedy():
  # Greedy takes A (0.55) but A's best continuation is EOS at 0.4; B (0.45) ends at 0.9.
  tables, probs = chain({A: 0.55, B_: 0.45},
                        {A: {EOS: 0.4, A: 0.3, B_: 0.3}, B_: {EOS: 0.9, A: 0.05, B_: 0.05}})
  greedy = run(tables, 0.0, "greedy")
  beam = run(tables, 0.0, "beam", beam_size=2)
  np.testing.assert_array_equal(greedy.tokens[0], [A, EOS, PAD])
  np.testing.assert_array_equal(beam.tokens[0], [B_, EOS, PAD])
  assert float(beam.scores[0]) > float(greedy.scores[0]) + 0.5
  recomputed = np.log(probs[BOS, B_]) + np.log(probs[B_, EOS])
  np.testing.assert_allclose(beam.scores[0], recomputed, rtol=1e-5)
  np.testing.assert_allclose(greedy.scores[0], np.log(probs[BOS, A]) + np.log(probs[A, EOS]), rtol=1e-5)


@pytest.mark.parametrize("alpha,expected", [(0.0, [EOS, PAD, PAD]), (0.5, [EOS, PAD, PAD]),
                                            (2.0, [A, EOS, PAD])])
def test_length_penalty_changes_preferred_length(alpha, expected):
  # [EOS] has log 0.5 = -0.69; [A, EOS] has log 0.45 = -0.80, which wins once divided by
  # (7/6)**alpha >= 1.16.
  tables, _ = chain({EOS: 0.5, A: 0.5}, {A: {EOS: 0.9, B_: 0.1}, B_: {EOS: 1.0}})
  res = run(tables, alpha, "beam", beam_size=2)
  np.testing.assert_array_equal(res.tokens[0], expected)
  n = expected.index(EOS) + 1
  assert int(res.lengths[0]) == n
  np.testing.assert_allclose(res.scores[0], res.log_probs[0] / gnmt(n, alpha), rtol=1e-6)


def test_sequences_stop_at_eos_and_are_padded():
  # Example b emits EOS at step b (never for b = 2); after EOS the tables favour A, which must not leak.
  probs = np.full((3, 3, 4, 4), 0.1)
  probs[..., A] = 0.7
  probs[0, 0, BOS] = probs[1, 1, A] = [0.05, 0.05, 0.85, 0.05]
  tables = np.log(probs / probs.sum(-1, keepdims=True)).astype(np.float32)
  expected = [[EOS, PAD, PAD], [A, EOS, PAD], [A, A, A]]
  for res in (run(tables, 0.0, "greedy"), run(tables, 0.0, "beam", beam_size=1)):
    np.testing.assert_array_equal(res.tokens, expected)
    np.testing.assert_array_equal(res.lengths, [1, 2, 3])


def test_search_compiles_once_per_shape():
  traces = []

  def search(tables, beam):
    def step(cache, tokens):
      traces.append(beam)
      return markov_step(tables)(cache, tokens)

    cache = (decoding.tile_beams(jnp.arange(3), beam), jnp.array(0))
    kw = dict(batch_size=3, max_len=3, bos_id=BOS, eos_id=EOS, pad_id=PAD)
    if beam == 1:
      return decoding.greedy_search(step, cache, **kw)
    return decoding.beam_search(step, cache, beam_size=beam, **kw)

  jitted = jax.jit(search, static_argnames="beam")
  for beam in (1, 2):
    counts = []
    for seed in (4, 5, 6):  # same shapes, different contents
      jitted(random_tables(seed), beam)
      counts.append(traces.count(beam))
    assert counts == [1, 1, 1]  # traced once for the whole loop: not per step, not per batch
  assert jitted._cache_size() == 2


def test_helpers_and_errors():
  np.testing.assert_array_equal(decoding.tile_beams(jnp.array([[1], [2]]), 3)[:, 0], [1, 1, 1, 2, 2, 2])
  np.testing.assert_allclose(decoding.length_normalizer(jnp.array([1, 7]), 1.0), [1.0, 2.0])
  cache = {"kv": jnp.arange(4)[:, None] * jnp.ones((4, 2)), "index": jnp.array(5)}
  out = decoding.gather_beams(cache, jnp.array([1, 1, 3, 2]))
  np.testing.assert_array_equal(out["kv"][:, 0], [1, 1, 3, 2])
  assert int(out["index"]) == 5  # scalar leaves are shared, not gathered
  with pytest.raises(ValueError, match="leading batch"):
    decoding.gather_beams({"kv": jnp.ones((3, 2))}, jnp.array([0, 1, 2, 3]))
  with pytest.raises(ValueError, match="max_len"):
    decoding.greedy_search(None, None, batch_size=1, max_len=0, bos_id=1, eos_id=2, pad_id=0)
  with pytest.raises(ValueError, match="beam_size"):
    decoding.beam_search(None, None, batch_size=1, beam_size=0, max_len=2, bos_id=1, eos_id=2, pad_id=0)
  with pytest.raises(ValueError, match="method"):
    decoding.decode(None, None, jnp.ones((1, 2)), method="sample", bos_id=1, eos_id=2)


def test_exhaustive_oracle_is_complete():
  """The oracle itself: 40 distinct hypotheses whose probabilities sum to one."""
  hyps = all_hypotheses(random_tables(7)[0])
  assert len(hyps) == len({tuple(s) for s, _ in hyps}) == 1 + 3 + 36
  np.testing.assert_allclose(sum(np.exp(lp) for _, lp in hyps), 1.0, rtol=1e-5)
