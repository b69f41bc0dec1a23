"""VQA accuracy as the official evaluation computes it (GT-Vision-Lab/VQA, vqaEval.py).

Answer normalisation follows the official script rule for rule:

1. newlines and tabs become spaces, then the answer is stripped;
2. punctuation (`processPunctuation`): each character of `PUNCT` is deleted when it touches a
   space in the original answer ("p " or " p"), or when the answer contains a comma between two
   digits ("1,000"); otherwise it becomes a space. Then every period not followed by a digit is
   deleted (`periodStrip`; "2.5" keeps its point). The official script passes `re.UNICODE` (32) as
   the `count` argument of `re.sub`, so at most 32 periods go; reproduced;
3. digits and articles (`processDigitArticle`): lower-case, split on whitespace, number words
   "none", "zero" .. "ten" become digits, the articles "a", "an", "the" are dropped, and
   apostrophe-less contractions are restored ("dont" -> "don't") from the official table.

Accuracy of a prediction against the n (normally 10) human answers is the mean, over the n ways of
leaving one human out, of min(#remaining humans who gave the prediction / 3, 1). As in the script,
the prediction always gets steps 1-3, the human answers only step 2, and only when they are not
all identical (the published annotations are already normalised); `normalize_answers=True`
applies the full normalisation to them instead, for data sets whose answers are raw.
"""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np

from mmjax.metrics.accumulate import MeanBase, select_items

# The official contraction table (keys and values as in vqaEval.py, including its quirks such as
# "somebody'd" -> "somebodyd").
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`",
         ",", "?", "!")
# "(?!<=\d)" is the official pattern verbatim: a look-ahead for the literal "<=", which never
# matches before a "."; the effective rule is "a period not followed by a digit".
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_OFFICIAL_PERIOD_COUNT = int(re.UNICODE)  # 32: the flag the official script passes as `count`


def process_punctuation(text: str) -> str:
  """The official `processPunctuation`."""
  out = text
  digit_comma = COMMA_STRIP.search(text) is not None
  for p in PUNCT:
    if p + " " in text or " " + p in text or digit_comma:
      out = out.replace(p, "")
    else:
      out = out.replace(p, " ")
  return PERIOD_STRIP.sub("", out, count=_OFFICIAL_PERIOD_COUNT)


def process_digit_article(text: str) -> str:
  """The official `processDigitArticle`: number words to digits, articles out, contractions in."""
  words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
  return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def normalize_answer(answer: str) -> str:
  """Full official normalisation of a predicted answer."""
  answer = answer.replace("\n", " ").replace("\t", " ").strip()
  return process_digit_article(process_punctuation(answer))


def vqa_accuracy(prediction: str, answers: Sequence[str], *, normalize_answers: bool = False) -> float:
  """Official accuracy of one predicted answer against the human answers (normally 10).

  Args:
    prediction: the model's answer, raw; it is normalised here.
    answers: the human answers of one question.
    normalize_answers: fully normalise the human answers too (see the module docstring).

  Returns:
    Mean over leave-one-out subsets of min(#matches / 3, 1), in [0, 1].
  """
  if isinstance(answers, str) or not answers:
    raise ValueError(f"answers: expected a non-empty list of strings, got {answers!r}")
  pred = normalize_answer(prediction)
  if normalize_answers:
    gts = [normalize_answer(a) for a in answers]
  elif len(set(answers)) > 1:
    gts = [process_punctuation(a) for a in answers]
  else:
    gts = list(answers)
  matches = [g == pred for g in gts]
  total = sum(matches)
  return float(np.mean([min(1.0, (total - m) / 3.0) for m in matches]))


def vqa_accuracies(predictions: Sequence[str], answers: Sequence[Sequence[str]], *,
                   normalize_answers: bool = False) -> np.ndarray:
  """Per-question official accuracies, (N,) float64."""
  if len(predictions) != len(answers):
    raise ValueError(f"answers: expected {len(predictions)} answer lists (one per prediction), got {len(answers)}")
  return np.array([vqa_accuracy(p, a, normalize_answers=normalize_answers)
                   for p, a in zip(predictions, answers)], np.float64)


def exact_match(predictions: Sequence[str], targets: Sequence[str], *, normalize: bool = True) -> np.ndarray:
  """1.0 where prediction equals the single target answer, (N,) float64.

  With `normalize`, both sides get the full official normalisation first ("Two." == "2").
  """
  if len(predictions) != len(targets):
    raise ValueError(f"targets: expected {len(predictions)} answers (one per prediction), got {len(targets)}")
  norm = normalize_answer if normalize else (lambda s: s)
  return np.array([norm(p) == norm(t) for p, t in zip(predictions, targets)], np.float64)


def majority_answers(train_answers, train_types, types) -> np.ndarray:
  """The answer prior: each question is answered with its type's most frequent training answer.

  Scoring these predictions gives the question-type baseline (VQA's "per Q-type prior") that a
  model has to beat to show it reads the image. Ties go to the lower answer index.

  Args:
    train_answers: int answers of the training questions, any shape.
    train_types: int (>= 0) type of each training question, shaped like `train_answers` (e.g.
      a question template's subtype).
    types: int types of the questions to answer, any shape.

  Returns:
    The predicted answers, int64 shaped like `types`.
  """
  train_answers, train_types = np.ravel(train_answers), np.ravel(train_types)
  types = np.asarray(types)
  if train_answers.size != train_types.size:
    raise ValueError(f"train_types: expected {train_answers.size} types (one per answer), got {train_types.size}")
  unseen = np.setdiff1d(types, train_types)
  if unseen.size:
    raise ValueError(f"types: {unseen.tolist()} never occur in train_types")
  table = np.zeros(train_types.max() + 1, np.int64)  # type -> its majority answer
  for t in np.unique(train_types):
    table[t] = np.bincount(train_answers[train_types == t]).argmax()
  return table[types]


class VQAAccuracy(MeanBase):
  """Accumulates official VQA accuracy over batches (and hosts) as a (sum, count) pair."""

  def __init__(self, name: str = "vqa_accuracy", *, normalize_answers: bool = False):
    super().__init__(name)
    self.normalize_answers = normalize_answers

  def _config(self) -> tuple:
    return super()._config() + (self.normalize_answers,)

  def update(self, predictions: Sequence[str], answers: Sequence[Sequence[str]], mask=None) -> None:
    """Adds a batch; `mask` (N,) bool drops padded entries."""
    if len(predictions) != len(answers):
      raise ValueError(f"answers: expected {len(predictions)} answer lists, got {len(answers)}")
    self._add(vqa_accuracies(select_items(predictions, mask), select_items(answers, mask),
                               normalize_answers=self.normalize_answers))


class ExactMatch(MeanBase):
  """Accumulates exact-match accuracy of single-answer predictions over batches (and hosts)."""

  def __init__(self, name: str = "exact_match", *, normalize: bool = True):
    super().__init__(name)
    self.normalize = normalize

  def _config(self) -> tuple:
    return super()._config() + (self.normalize,)

  def update(self, predictions: Sequence[str], targets: Sequence[str], mask=None) -> None:
    """Adds a batch; `mask` (N,) bool drops padded entries."""
    if len(predictions) != len(targets):
      raise ValueError(f"targets: expected {len(predictions)} answers, got {len(targets)}")
    self._add(exact_match(select_items(predictions, mask), select_items(targets, mask), normalize=self.normalize))
