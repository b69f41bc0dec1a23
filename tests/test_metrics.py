"""Metrics against oracles: pycocoevalcap scorers, the official VQA rules, brute-force recall@K,
scikit-learn's confusion matrix; accumulators merged over random batches (and two processes)."""

import json
import os
import random
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge
from sklearn.metrics import confusion_matrix as sk_confusion_matrix

from mmjax.metrics import (CaptionMetrics, ConfusionMatrix, ExactMatch, Mean, Retrieval, VQAAccuracy, accuracy,
                           bleu, cider_d, confusion_matrix, exact_match, normalize_answer, recall_at_k, rouge_l,
                           simple_tokenize, vqa_accuracy)

# ------------------------------------------------------------------------------ caption corpus

_VOCAB = ("a man dog the on of in with is , . ? ! ' 's n't red blue sitting table woman riding "
          "horse street near two people").split()


def _corpus(seed=0, size=240):
  """Tokenised captions: punctuation tokens, repeated n-grams, 1-2 token and empty hypotheses."""
  rng = random.Random(seed)

  def sent(lo, hi, vocab_size=None):
    vocab = _VOCAB[:vocab_size or rng.randint(4, len(_VOCAB))]
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))

  hyps, refs = [], []
  for i in range(size):
    rs = [sent(3, 14) for _ in range(rng.randint(3, 5))]
    kind = i % 7
    if kind == 0:
      h = ""
    elif kind == 1:
      h = sent(1, 2)
    elif kind == 2:
      h = rs[rng.randrange(len(rs))]  # exact copy of a reference
    elif kind == 3:
      h = " ".join(["a man on a"] * rng.randint(1, 4))  # repeated n-grams
    elif kind == 4:
      h = sent(4, 10, vocab_size=4)  # few distinct words: many repeats
    else:
      h = sent(2, 18)
    hyps.append(h)
    refs.append(rs)
  return hyps, refs


def _coco(hyps, refs):
  gts = {i: list(r) for i, r in enumerate(refs)}
  res = {i: [h] for i, h in enumerate(hyps)}
  return gts, res


@pytest.fixture(scope="module")
def corpus():
  return _corpus()


@pytest.fixture(scope="module")
def coco_scores(corpus):
  gts, res = _coco(*corpus)
  b, _ = Bleu(4).compute_score(gts, res, verbose=0)
  r, r_each = Rouge().compute_score(gts, res)
  c, c_each = Cider().compute_score(gts, res)
  return b, r, r_each, c, c_each


def test_corpus_has_the_hard_cases(corpus):
  hyps, refs = corpus
  assert len(hyps) >= 200 and all(3 <= len(r) <= 5 for r in refs)
  assert sum(h == "" for h in hyps) >= 20
  assert sum(1 <= len(h.split()) <= 2 for h in hyps) >= 20
  assert any("," in h.split() for h in hyps) and any("." in h.split() for h in hyps)


def test_bleu_matches_pycocoevalcap(corpus, coco_scores):
  np.testing.assert_allclose(bleu(*corpus), coco_scores[0], rtol=0, atol=1e-6)


def test_rouge_l_matches_pycocoevalcap(corpus, coco_scores):
  mean, each = rouge_l(*corpus)
  np.testing.assert_allclose(each, coco_scores[2], rtol=0, atol=1e-6)
  assert abs(mean - coco_scores[1]) < 1e-6


def test_cider_d_matches_pycocoevalcap(corpus, coco_scores):
  mean, each = cider_d(*corpus)
  np.testing.assert_allclose(each, coco_scores[4], rtol=0, atol=1e-6)
  assert abs(mean - coco_scores[3]) < 1e-6
  hyps = corpus[0]
  assert all(each[i] == 0.0 for i, h in enumerate(hyps) if h == "")


def test_small_corpora_and_brevity_penalty_match_pycocoevalcap():
  """A corpus whose hypotheses are all short (brevity penalty < 1) and a one-image corpus."""
  hyps = ["a dog", "man", "", "red red red"]
  refs = [["a dog on a table"], ["a man riding a horse", "man"], ["two people"], ["red car", "a red bus is red"]]
  gts, res = _coco(hyps, refs)
  np.testing.assert_allclose(bleu(hyps, refs), Bleu(4).compute_score(gts, res, verbose=0)[0], atol=1e-12)
  np.testing.assert_allclose(cider_d(hyps, refs)[1], Cider().compute_score(gts, res)[1], atol=1e-12)
  np.testing.assert_allclose(rouge_l(hyps, refs)[1], Rouge().compute_score(gts, res)[1], atol=1e-12)
  # One image: log(1) - log(df) makes every tf-idf weight 0, so CIDEr-D is 0 there too.
  assert cider_d(hyps[:1], refs[:1])[0] == Cider().compute_score(*_coco(hyps[:1], refs[:1]))[0] == 0.0


def test_caption_accumulator_over_random_batches_equals_one_shot(corpus, coco_scores):
  hyps, refs = corpus
  rng = np.random.default_rng(1)
  cuts = np.sort(rng.choice(np.arange(1, len(hyps)), size=6, replace=False))
  parts = []
  for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(hyps)]):
    acc = CaptionMetrics()
    acc.update(hyps[lo:hi], refs[lo:hi])
    parts.append(acc)
  merged = CaptionMetrics()
  for p in parts:
    merged.merge(p)
  out = merged.compute()
  np.testing.assert_allclose([out[f"bleu_{k}"] for k in range(1, 5)], coco_scores[0], atol=1e-6)
  assert abs(out["rouge_l"] - coco_scores[1]) < 1e-6
  assert abs(out["cider_d"] - coco_scores[3]) < 1e-6
  # The serialised state (what `gather` exchanges between hosts) merges to the same values.
  via_bytes = CaptionMetrics()
  for p in parts:
    via_bytes.merge_bytes(p.to_bytes())
  assert via_bytes.compute() == out
  # A padding mask drops entries.
  masked = CaptionMetrics(metrics=("bleu",))
  masked.update(hyps[:10] + ["pad"] * 3, refs[:10] + [["pad"]] * 3, mask=[True] * 10 + [False] * 3)
  np.testing.assert_allclose([masked.compute()[f"bleu_{k}"] for k in range(1, 5)], bleu(hyps[:10], refs[:10]))
  with pytest.raises(ValueError, match="merge"):
    masked.merge(CaptionMetrics())


# Ordinary COCO-style captions; simple_tokenize must agree with PTBTokenizer on them.
_RAW_CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Two dogs playing with a frisbee in the park!",
    "A woman's hand holding a hot-dog, with mustard.",
    "The cat isn't sleeping; it's watching TV.",
    "A plate of food (rice and beans) on a table",
    'A sign that says "STOP" near the street.',
    "People walking down a busy street... at night?",
    "There are 3.5 pizzas and 1,000 people here - wow",
    "A dogs' bowl sitting on the floor: empty",
    "Kids don't like the rain, they'll stay inside",
    "A [red] {blue} car, 50% off for $5 & a #1 hit",  # PTB brackets stay as "-lsb-" etc.
]


def test_simple_tokenize_agrees_with_ptbtokenizer_on_ordinary_captions(requires_java):
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
  ptb = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(_RAW_CAPTIONS)})
  assert [simple_tokenize(c) for c in _RAW_CAPTIONS] == [ptb[i][0] for i in range(len(_RAW_CAPTIONS))]


# ---------------------------------------------------------------------------------------- VQA

# (raw answer, normalised form), each worked out by hand from the official vqaEval.py rules.
_NORMALISATION_CASES = [
    ("yes.", "yes"),                      # periodStrip: a period not followed by a digit goes
    ("Yes", "yes"),                       # lower-case
    ("  Yes\n", "yes"),                   # newline -> space, strip
    ("two", "2"),                         # number words -> digits
    ("Ten", "10"),
    ("none", "0"),
    ("one dog", "1 dog"),
    ("The Two Dogs", "2 dogs"),           # article dropped, number word mapped
    ("a dog", "dog"),                     # articles a / an / the dropped
    ("an apple", "apple"),
    ("the red ball", "red ball"),
    ("a", ""),                            # nothing left but an article
    ("none of the above", "0 of above"),
    ("dont", "don't"),                    # contractions restored
    ("isnt", "isn't"),
    ("whats", "what's"),
    ("oclock", "o'clock"),
    ("10 oclock", "10 o'clock"),
    ("don't", "don't"),                   # the apostrophe is not in the punctuation list
    ("Im", "im"),                         # the table's "Im" never matches after lower-casing
    ("its", "its"),                       # not in the table
    ("1,000", "1000"),                    # comma between digits: punctuation deleted, not spaced
    ("1,000!", "1000"),                   # ... every punctuation mark, once a digit comma exists
    ("3,4 and 5", "34 and 5"),
    ("2.5", "2.5"),                       # a period before a digit stays
    ("3.", "3"),
    ("1.5.", "1.5"),
    ("u.s.a.", "usa"),
    ("mr. smith", "mr smith"),
    ("hello, world", "hello world"),      # ", " touches a space: deleted
    ("black,white", "black white"),       # not touching a space: becomes a space
    ("t-shirt", "t shirt"),
    ("left - right", "left right"),
    ("well-done; good", "well done good"),
    ("yes!", "yes"),                      # "!" becomes a space, then split/join drops it
    ("what?", "what"),
    ("(red)", "red"),
    ("red/white", "red white"),
    ("a/b", "b"),                         # "/" -> space, then the article "a" goes
    ("yes;no", "yes no"),
    ("<3", "3"),
    ("#1", "#1"),                         # "#" and ":" are not in the punctuation list
    ("5:30", "5:30"),
    ("x" + "." * 40, "x........"),        # re.sub(..., re.UNICODE) strips only 32 periods
]


@pytest.mark.parametrize("raw,expected", _NORMALISATION_CASES)
def test_vqa_normalisation_official_rules(raw, expected):
  assert normalize_answer(raw) == expected


@pytest.mark.parametrize("matches,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_ten_choose_nine(matches, expected):
  # By hand: m matching humans; leaving out a matching one leaves m-1, another one leaves m;
  # acc = (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10.
  answers = ["blue"] * matches + ["red", "green", "black", "white", "gray", "pink", "brown", "tan", "cyan",
                                  "gold"][:10 - matches]
  assert vqa_accuracy("blue", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_accuracy_normalises_the_prediction_and_follows_the_official_gt_rule():
  assert vqa_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
  assert vqa_accuracy("the dog", ["dog"] * 2 + ["cat"] * 8) == pytest.approx(0.6)
  # Human answers are punctuation-processed only when they disagree: "yes." -> "yes" matches.
  assert vqa_accuracy("yes", ["yes."] * 3 + ["no"] * 7) == pytest.approx(0.9)
  # ... and "yes!" -> "yes " (the "!" becomes a space, nothing strips it), which does not match.
  assert vqa_accuracy("yes", ["yes!"] * 3 + ["no"] * 7) == 0.0
  # Ten identical human answers are left untouched: raw "Yes" never equals a normalised answer,
  assert vqa_accuracy("yes", ["Yes"] * 10) == 0.0
  # while the prediction is always normalised (GT-Vision-Lab/VQA vqaEval.py: processPunctuation
  # and processDigitArticle on resAns before the human answers are looked at).
  assert vqa_accuracy(" Two.\n", ["2"] * 10) == 1.0
  # unless the human answers are normalised too.
  assert vqa_accuracy("yes", ["Yes"] * 10, normalize_answers=True) == 1.0
  with pytest.raises(ValueError, match="answers"):
    vqa_accuracy("yes", [])


def test_exact_match_and_vqa_accumulators():
  assert list(exact_match(["Two.", "a circle", "yes"], ["2", "circle", "no"])) == [1.0, 1.0, 0.0]
  assert list(exact_match(["Two."], ["2"], normalize=False)) == [0.0]
  preds = ["yes", "2", "no", "blue", "one"] * 7
  answers = [["yes"] * 10, ["2"] * 2 + ["3"] * 8, ["yes"] * 10, ["blue"] * 4 + ["red"] * 6, ["1"] * 3 + ["2"] * 7] * 7
  one_shot = np.mean([vqa_accuracy(p, a) for p, a in zip(preds, answers)])
  accs = [VQAAccuracy() for _ in range(3)]
  for i, (p, a) in enumerate(zip(preds, answers)):
    accs[i % 3].update([p], [a])
  merged = accs[0].merge(accs[1]).merge(accs[2])
  assert merged.compute()["vqa_accuracy"] == pytest.approx(one_shot, abs=1e-12)
  em = ExactMatch()
  em.update(["Two.", "no", "pad"], ["2", "yes", "pad"], mask=[True, True, False])
  assert em.compute() == {"exact_match": 0.5}


# ---------------------------------------------------------------------------------- retrieval


def _brute_force_recall(sim, owner, ks):
  """Sorts every row and column and finds where the ground truth lands."""
  n_img, n_txt = sim.shape
  out = {}
  i2t = []
  for i in range(n_img):
    order = list(np.argsort(-sim[i], kind="stable"))
    i2t.append(min(order.index(j) for j in range(n_txt) if owner[j] == i))
  t2i = []
  for j in range(n_txt):
    order = list(np.argsort(-sim[:, j], kind="stable"))
    t2i.append(order.index(owner[j]))
  for k in ks:
    out[f"i2t_r@{k}"] = np.mean(np.array(i2t) < k)
  for k in ks:
    out[f"t2i_r@{k}"] = np.mean(np.array(t2i) < k)
  return out


def test_recall_at_k_matches_brute_force():
  rng = np.random.default_rng(0)
  n_img, per = 40, [rng.integers(1, 6) for _ in range(40)]
  owner = np.repeat(np.arange(n_img), per)
  rng.shuffle(owner)
  img = rng.normal(size=(n_img, 8))
  txt = img[owner] + 1.5 * rng.normal(size=(len(owner), 8))  # correlated but imperfect
  sim = img @ txt.T
  ours = recall_at_k(sim, owner)
  ref = _brute_force_recall(sim, owner, (1, 5, 10))
  for k, v in ref.items():
    assert ours[k] == pytest.approx(v, abs=1e-12), k
  assert 0 < ours["i2t_r@1"] < ours["i2t_r@10"] < 1
  assert ours["rsum"] == pytest.approx(sum(ref.values()))
  with pytest.raises(ValueError, match="at least one text"):
    recall_at_k(sim[:, owner != 0], np.where(owner[owner != 0] > 0, owner[owner != 0], 0))
  # Ties resolve against the ground truth: a collapsed encoder (every score equal) retrieves
  # nothing at rank 0 instead of everything, and a diverged one (NaN scores) nothing at all.
  owners3 = np.array([0, 0, 1, 1, 2, 2])
  flat = recall_at_k(np.zeros((3, 6)), owners3, (1, 3, 5))
  assert (flat["t2i_r@1"], flat["t2i_r@3"], flat["i2t_r@1"], flat["i2t_r@5"]) == (0.0, 1.0, 0.0, 1.0)
  assert recall_at_k(np.full((3, 6), np.nan), owners3, (1, 5))["rsum"] == 0.0
  # A NaN caption does not hide its image's other caption; bool scores rank as 0/1 floats.
  one = np.eye(3)[:, owners3] * 2.0 - 1.0  # each image scores its own captions 1, others -1
  one[0, 0] = np.nan
  assert recall_at_k(one, owners3, (1,))["i2t_r@1"] == 1.0
  assert recall_at_k(one > 0, owners3, (1,))["i2t_r@1"] == recall_at_k((one > 0) * 1.0, owners3, (1,))["i2t_r@1"]


def test_retrieval_accumulator_over_batches_equals_one_shot():
  rng = np.random.default_rng(1)
  n_img, caps = 30, 5
  img = rng.normal(size=(n_img, 6)).astype(np.float32)
  txt = (np.repeat(img, caps, axis=0) + rng.normal(size=(n_img * caps, 6))).astype(np.float32)
  owner = np.repeat(np.arange(n_img), caps)
  norm = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  one_shot = recall_at_k(norm(img) @ norm(txt).T, owner)
  ids = np.arange(100, 100 + n_img)  # dataset ids, not row numbers
  accs = [Retrieval() for _ in range(3)]
  perm = rng.permutation(n_img)
  for b, chunk in enumerate(np.array_split(perm, 3)):
    rows = np.concatenate([np.arange(i * caps, (i + 1) * caps) for i in chunk])
    # Pad each batch with two junk rows that the masks must drop.
    accs[b].update(np.r_[img[chunk], np.zeros((2, 6))], np.r_[ids[chunk], [-1, -1]],
                   np.r_[txt[rows], np.ones((2, 6))], np.r_[ids[owner[rows]], [-1, -1]],
                   image_mask=np.r_[np.ones(len(chunk), bool), [False, False]],
                   text_mask=np.r_[np.ones(len(rows), bool), [False, False]])
  accs[0].update(img[:2], ids[:2], txt[:0], ids[:0])  # a repeated image counts once
  merged = accs[2].merge(accs[0]).merge(accs[1])
  out = merged.compute()
  for k, v in one_shot.items():
    assert out[k] == pytest.approx(v, abs=1e-6), k
  orphan = Retrieval()
  orphan.update(img[:2], ids[:2], txt[:3], np.array([100, 101, 555]))
  with pytest.raises(ValueError, match="never added: \\[555\\]"):
    orphan.compute()


# ------------------------------------------------------------------------------ classification


def test_accuracy_and_confusion_matrix_match_sklearn():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 5, size=(4, 25))
  logits = rng.normal(size=(4, 25, 5)) + 2 * np.eye(5)[labels]
  mask = rng.random((4, 25)) > 0.2
  preds = logits.argmax(-1)
  ref = sk_confusion_matrix(labels[mask], preds[mask], labels=range(5))
  np.testing.assert_array_equal(np.asarray(confusion_matrix(logits, labels, 5, mask)), ref)
  assert float(accuracy(logits, labels, mask)) == pytest.approx((preds == labels)[mask].mean(), abs=1e-6)
  assert float(accuracy(preds, labels, np.zeros_like(mask))) == 0.0
  acc = ConfusionMatrix(5)
  for b in range(4):
    acc.update(logits[b], labels[b], mask[b])
  out = acc.compute()
  np.testing.assert_array_equal(out["confusion_matrix"], ref)
  assert out["accuracy"] == pytest.approx(np.trace(ref) / ref.sum())
  assert out["balanced_accuracy"] == pytest.approx(np.mean(np.diag(ref) / ref.sum(1)))
  with pytest.raises(ValueError, match="labels"):
    acc.update(preds[0], labels[0] + 5)
  # Out-of-range ids are not counted (and do not alias into other cells).
  np.testing.assert_array_equal(np.asarray(confusion_matrix(np.array([5, 1]), np.array([0, 1]), 5)),
                                np.diag([0, 1, 0, 0, 0]))


def test_mean_accumulator_weights():
  m = Mean("loss")
  m.update([1.0, 2.0, 100.0], [1.0, 1.0, 0.0])
  m.update(np.array([[4.0]]))
  assert m.compute() == {"loss": pytest.approx(7.0 / 3.0)}
  assert Mean("x").compute() == {"x": 0.0}


# ---------------------------------------------------------------------------- across processes

_WORKER = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_platforms", "cpu")
    jax.distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
    from mmjax.metrics import CaptionMetrics, ConfusionMatrix, VQAAccuracy
    data = json.loads(sys.argv[3])
    pid = jax.process_index()
    cap = CaptionMetrics()
    cap.update(data["hyps"][pid::2], data["refs"][pid::2])
    cm = ConfusionMatrix(3)
    cm.update(data["preds"][pid::2], data["labels"][pid::2])
    vqa = VQAAccuracy()
    if pid == 0:  # process 1 adds nothing at all
      vqa.update(["yes", "2"], [["yes"] * 10, ["2"] * 2 + ["3"] * 8])
    out = cap.gather().compute()
    out["accuracy"] = cm.gather().compute()["accuracy"]
    out.update(vqa.gather().compute())
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_gather_across_two_processes_equals_one_shot(tmp_path):
  hyps, refs = _corpus(seed=3, size=40)
  preds, labels = [0, 1, 2, 2, 1, 0, 1], [0, 1, 1, 2, 0, 0, 2]
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  script = tmp_path / "worker.py"
  script.write_text(_WORKER)
  payload = json.dumps({"hyps": hyps, "refs": refs, "preds": preds, "labels": labels})
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
  procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i), payload], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
  results = [json.loads(o[0].split("RESULT")[1]) for o in outs]
  assert results[0] == results[1]
  expected = CaptionMetrics()
  expected.update(hyps, refs)
  for k, v in expected.compute().items():
    assert results[0][k] == pytest.approx(v, abs=1e-9), k
  assert results[0]["accuracy"] == pytest.approx(4 / 7)
  assert results[0]["vqa_accuracy"] == pytest.approx((1.0 + 0.6) / 2)


def test_contrastive_summary_of_an_empty_split_is_zeros():
  """Every row padding (an empty evaluation shard): zeros, as the other tasks give, not a crash."""
  from mmjax.tasks.clip import RECALL_KS, ContrastiveTask

  sums = {"valid": np.zeros(4, bool), "image_emb": np.zeros((4, 8)), "text_emb": np.zeros((4, 2, 8)),
          "loss": 0.0, "count": 0.0}
  out = ContrastiveTask.summarize(None, sums)
  assert out == {**{f"{d}_r@{k}": 0.0 for d in ("i2t", "t2i") for k in RECALL_KS}, "rsum": 0.0, "loss": 0.0}
