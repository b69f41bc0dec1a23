"""Caption metrics with pycocoevalcap's semantics: BLEU-1..4, ROUGE-L and CIDEr-D.

Inputs are pre-tokenised strings (tokens separated by whitespace), the form in which
pycocoevalcap's scorers receive captions after its PTBTokenizer. That tokenizer runs Stanford
CoreNLP in Java and is not used here; `simple_tokenize` approximates it in Python (lower-case, PTB
clitic splits such as "don't" -> "do n't", punctuation dropped, brackets kept as "-lrb-" because
pycocoevalcap only removes the upper-case "-LRB-") and agrees with it on ordinary captions, but
tokenise with PTBTokenizer yourself to reproduce published COCO numbers exactly.

- BLEU (`Bleu(4)`): corpus-level; n-gram matches clipped by the maximum count in any reference;
  the reference length of each hypothesis is the "closest" one (ties to the shorter); every
  precision is (matches + 1e-15) / (guesses + 1e-9), and the brevity penalty
  exp(1 - r / c) uses (c + 1e-15) / (r + 1e-9).
- ROUGE-L (`Rouge()`): per caption, the best LCS precision and the best LCS recall over the
  references (possibly from different references) are combined into an F-measure with
  beta = 1.2; the corpus score is the mean.
- CIDEr-D (`Cider()`): TF-IDF vectors of 1..4-grams, document frequencies counted over the
  reference sets of the evaluated corpus, idf = log(#images) - log(max(1, df)); per n the
  hypothesis vector is clipped by each reference vector (min), cosine-normalised, and scaled by
  the length penalty exp(-(len_h - len_r)^2 / (2 * 6^2)); averaged over n and references, times
  10; the corpus score is the mean.

Empty hypotheses score 0 everywhere, as in pycocoevalcap. One documented difference: for ROUGE-L
pycocoevalcap splits on single spaces, so "" is one empty token and an empty hypothesis against an
empty *reference* scores 1.0 there; here it scores 0 (empty references are degenerate anyway).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Sequence

import numpy as np

from mmjax.metrics.accumulate import Accumulator, select_items

NGram = tuple[str, ...]

BLEU_TINY = 1e-15
BLEU_SMALL = 1e-9
ROUGE_BETA = 1.2
CIDER_SIGMA = 6.0

# PTB splits these clitics off the word before them: "don't" -> "do n't", "dog's" -> "dog 's".
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)(?=\W|$)")
_CLITIC_TOKEN = re.compile(r"n't|'s|'re|'ve|'ll|'d|'m")
# PTB writes brackets as -LRB- etc.; with -lowerCase they become "-lrb-", which pycocoevalcap's
# upper-case punctuation list then fails to remove, so they stay tokens. "$", "%", "#" split off.
_SPLIT_OFF = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-",
              "$": "$", "%": "%", "#": "#"}
_KEEP = frozenset(_SPLIT_OFF.values())
_EDGE_PUNCT = "\"'`.,;:!?-"


def simple_tokenize(text: str) -> str:
  """Lower-cases and tokenises a caption roughly as PTBTokenizer + pycocoevalcap do.

  Clitics, brackets, "$", "%" and "#" become tokens of their own; other punctuation at the edges
  of words is dropped, as are quotes and dashes standing alone; punctuation inside a word stays
  ("hot-dog", "3.5", "1,000"). Known differences from PTB: abbreviations ("u.s." keeps its last
  period there), runs such as "!!!" (kept there), "a--b" (split there), leading apostrophes
  ("'90s").
  """
  text = text.lower()
  for char, token in _SPLIT_OFF.items():
    text = text.replace(char, f" {token} ")
  tokens = []
  for word in _CLITIC.sub(r" \1", text).split():
    if word in _KEEP or _CLITIC_TOKEN.fullmatch(word):
      tokens.append(word)
    elif core := word.strip(_EDGE_PUNCT):
      tokens.append(core)
  return " ".join(tokens)


def _tokens(text: str, field: str) -> list[str]:
  if not isinstance(text, str):
    raise TypeError(f"{field}: expected a tokenised string, got {type(text).__name__}")
  return text.split()


def _check_corpus(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[list, list]:
  """Tokenises a corpus: (hyp token lists, per-hyp lists of reference token lists)."""
  if isinstance(hypotheses, str) or len(hypotheses) != len(references):
    raise ValueError(f"references: expected one list of references per hypothesis "
                     f"({len(hypotheses)}), got {len(references)}")
  hyps = [_tokens(h, "hypotheses[]") for h in hypotheses]
  refs = []
  for i, rs in enumerate(references):
    if isinstance(rs, str) or len(rs) == 0:
      raise ValueError(f"references[{i}]: expected a non-empty list of strings, got {rs!r}")
    refs.append([_tokens(r, f"references[{i}][]") for r in rs])
  return hyps, refs


def ngram_counts(tokens: Sequence[str], n: int = 4) -> Counter[NGram]:
  """Counts of every 1..n-gram of `tokens`."""
  counts: Counter[NGram] = Counter()
  for k in range(1, n + 1):
    counts.update(tuple(tokens[i:i + k]) for i in range(len(tokens) - k + 1))
  return counts


# ----------------------------------------------------------------------------------------- BLEU


def bleu_stats(hyp: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4) -> np.ndarray:
  """Sufficient statistics of one caption: [testlen, reflen, guess_1..n, correct_1..n]."""
  counts = ngram_counts(hyp, n)
  max_ref: Counter[NGram] = Counter()
  for ref in refs:
    max_ref |= ngram_counts(ref, n)  # element-wise max
  testlen = len(hyp)
  reflen = min((abs(len(r) - testlen), len(r)) for r in refs)[1]
  guess = [max(0, testlen - k + 1) for k in range(1, n + 1)]
  correct = [0] * n
  for gram, c in counts.items():
    correct[len(gram) - 1] += min(max_ref[gram], c)
  return np.array([testlen, reflen] + guess + correct, np.float64)


def bleu_from_stats(stats: np.ndarray, n: int = 4) -> list[float]:
  """Corpus BLEU-1..n from summed `bleu_stats`."""
  testlen, reflen = float(stats[0]), float(stats[1])
  guess, correct = stats[2:2 + n], stats[2 + n:2 + 2 * n]
  scores, prod = [], 1.0
  for k in range(n):
    prod *= (float(correct[k]) + BLEU_TINY) / (float(guess[k]) + BLEU_SMALL)
    scores.append(prod ** (1.0 / (k + 1)))
  ratio = (testlen + BLEU_TINY) / (reflen + BLEU_SMALL)
  if ratio < 1:
    scores = [s * math.exp(1 - 1 / ratio) for s in scores]
  return scores


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> list[float]:
  """Corpus BLEU-1..n (pycocoevalcap `Bleu(n)`, "closest" reference length)."""
  hyps, refs = _check_corpus(hypotheses, references)
  total = sum((bleu_stats(h, r, n) for h, r in zip(hyps, refs)), np.zeros(2 + 2 * n))
  return bleu_from_stats(total, n)


# -------------------------------------------------------------------------------------- ROUGE-L


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  """Length of the longest common subsequence of two token lists."""
  if len(a) < len(b):
    a, b = b, a
  prev = [0] * (len(b) + 1)
  for x in a:
    cur = [0]
    for j, y in enumerate(b):
      cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
    prev = cur
  return prev[-1]


def rouge_l_sentence(hyp: Sequence[str], refs: Sequence[Sequence[str]], beta: float = ROUGE_BETA) -> float:
  """ROUGE-L F-measure of one caption (pycocoevalcap `Rouge.calc_score`)."""
  if not hyp:
    return 0.0
  prec, rec = [], []
  for ref in refs:
    lcs = lcs_length(ref, hyp) if ref else 0
    prec.append(lcs / len(hyp))
    rec.append(lcs / len(ref) if ref else 0.0)
  p, r = max(prec), max(rec)
  if p == 0 or r == 0:
    return 0.0
  return ((1 + beta ** 2) * p * r) / (r + beta ** 2 * p)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> tuple[float, np.ndarray]:
  """Corpus ROUGE-L (mean) and per-caption scores."""
  hyps, refs = _check_corpus(hypotheses, references)
  scores = np.array([rouge_l_sentence(h, r) for h, r in zip(hyps, refs)], np.float64)
  return float(np.mean(scores)) if len(scores) else 0.0, scores


# -------------------------------------------------------------------------------------- CIDEr-D


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]], *, n: int = 4,
            sigma: float = CIDER_SIGMA) -> tuple[float, np.ndarray]:
  """Corpus CIDEr-D (pycocoevalcap `Cider()`) and per-caption scores.

  Document frequencies come from the references of exactly this corpus, so the score of a caption
  depends on the whole corpus: accumulate captions and call this once.
  """
  hyps, refs = _check_corpus(hypotheses, references)
  if not hyps:
    return 0.0, np.zeros(0)
  hyp_counts = [ngram_counts(h, n) for h in hyps]
  ref_counts = [[ngram_counts(r, n) for r in rs] for rs in refs]
  df: Counter[NGram] = Counter()
  for rs in ref_counts:
    df.update(set().union(*rs))
  log_images = math.log(float(len(hyps)))

  def tfidf(counts: Counter[NGram]) -> tuple[list[dict[NGram, float]], list[float]]:
    vec: list[dict[NGram, float]] = [{} for _ in range(n)]
    for gram, tf in counts.items():
      vec[len(gram) - 1][gram] = float(tf) * (log_images - math.log(max(1.0, df[gram])))
    return vec, [math.sqrt(sum(v * v for v in vk.values())) for vk in vec]

  scores = np.zeros(len(hyps))
  for i, (hc, rcs) in enumerate(zip(hyp_counts, ref_counts)):
    vh, nh = tfidf(hc)
    total = np.zeros(n)
    for rc, rtoks in zip(rcs, refs[i]):
      vr, nr = tfidf(rc)
      penalty = math.e ** (-(float(len(hyps[i]) - len(rtoks)) ** 2) / (2 * sigma ** 2))
      for k in range(n):
        val = sum(min(v, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0) for g, v in vh[k].items())
        if nh[k] != 0 and nr[k] != 0:
          val /= nh[k] * nr[k]
        total[k] += val * penalty
    scores[i] = np.mean(total) / len(rcs) * 10.0
  return float(np.mean(scores)), scores


# ---------------------------------------------------------------------------------- accumulator

CAPTION_METRICS = ("bleu", "rouge_l", "cider_d")


class CaptionMetrics(Accumulator):
  """Accumulates BLEU-1..4, ROUGE-L and CIDEr-D over batches and hosts.

  BLEU and ROUGE-L keep summed sufficient statistics; CIDEr-D keeps the captions themselves
  (records), because its document frequencies are computed over the whole corpus.

  Attributes:
    metrics: which of "bleu", "rouge_l", "cider_d" to compute.
    n: the largest BLEU / CIDEr n-gram order.
  """

  def __init__(self, metrics: Sequence[str] = CAPTION_METRICS, n: int = 4):
    unknown = sorted(set(metrics) - set(CAPTION_METRICS))
    if unknown or not metrics:
      raise ValueError(f"metrics: unknown {unknown}; choose from {list(CAPTION_METRICS)}")
    self.metrics = tuple(m for m in CAPTION_METRICS if m in metrics)
    self.n = n
    super().__init__()

  def _config(self) -> tuple:
    return super()._config() + (self.metrics, self.n)

  def _zero_sums(self) -> dict[str, np.ndarray]:
    return {"bleu": np.zeros(2 + 2 * self.n), "rouge_l": np.zeros(2)}

  def update(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]], mask=None) -> None:
    """Adds tokenised hypotheses (N,) with their reference lists; `mask` (N,) drops padding."""
    hyps_in, refs_in = select_items(hypotheses, mask), select_items(references, mask)
    hyps, refs = _check_corpus(hyps_in, refs_in)
    for h, r in zip(hyps, refs):
      if "bleu" in self.metrics:
        self.sums["bleu"] = self.sums["bleu"] + bleu_stats(h, r, self.n)
      if "rouge_l" in self.metrics:
        self.sums["rouge_l"] = self.sums["rouge_l"] + np.array([rouge_l_sentence(h, r), 1.0])
    if "cider_d" in self.metrics:
      self.records.extend([h, list(r)] for h, r in zip(hyps_in, refs_in))

  def compute(self) -> dict[str, float]:
    out: dict[str, float] = {}
    if "bleu" in self.metrics:
      out.update({f"bleu_{k + 1}": s for k, s in enumerate(bleu_from_stats(self.sums["bleu"], self.n))})
    if "rouge_l" in self.metrics:
      total, count = self.sums["rouge_l"]
      out["rouge_l"] = float(total / count) if count else 0.0
    if "cider_d" in self.metrics:
      out["cider_d"] = cider_d([h for h, _ in self.records], [r for _, r in self.records], n=self.n)[0]
    return out
