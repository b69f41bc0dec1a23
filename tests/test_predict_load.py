"""Serving load: 10,000 VQA requests in one process, bounded memory, no recompilation; bad requests."""

import os

import jax
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import mmjax.tasks  # noqa: F401  (registers the tasks)
from mmjax import predict
from mmjax.train import trainer
from mmjax.train.config import load_config

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "vqa_sort_of_clevr.py")
REQUESTS = 10_000
CHUNK = 64  # requests per answer_batch call: the predictor's fixed compiled batch


@pytest.fixture(scope="module")
def predictor(tmp_path_factory):
  """A tiny VQA model trained for 2 steps (data built in a temporary folder), served 64 at a time."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MMJAX_DATA_DIR", str(tmp_path_factory.mktemp("data")))
    config = load_config(CONFIG + ":size=tiny")
    config.data.eval_splits = ()  # no evaluation to compile: the latest checkpoint is served
    config.train.steps = 2
    wd = str(tmp_path_factory.mktemp("workdir"))
    trainer.train(config, wd, progress=False)
    p = predict.Predictor.from_workdir(wd, batch_size=CHUNK)
    source = p.task.source("test")
    records = [source[i] for i in range(4)]
    yield p, [(r["image"], q.decode()) for r in records for q in r["questions"]]


def _rss_mb() -> float:
  return psutil.Process().memory_info().rss / 2**20


def test_ten_thousand_requests_bounded_memory_no_recompilation(predictor):
  p, pool = predictor  # 80 distinct (image, question) pairs from the test split
  compiles = []
  listener = lambda event, *_, **__: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    rss_start = _rss_mb()
    answers: dict[int, str] = {}
    served, warm = 0, None
    while served < REQUESTS:
      n = min(CHUNK, REQUESTS - served)
      idx = [(served + i) % len(pool) for i in range(n)]
      out = p.answer_batch([pool[i][0] for i in idx], [pool[i][1] for i in idx])
      for i, o in zip(idx, out):  # the same request always gets the same answer
        assert answers.setdefault(i, o["answer"]) == o["answer"]
      served += n
      if warm is None and served >= 1_000:
        warm, rss_warm, compiles_warm = served, _rss_mb(), len(compiles)
    rss_end = _rss_mb()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  print(f"\n{served} requests; RSS start {rss_start:.1f} MB, after {warm} (warm-up) {rss_warm:.1f} MB, "
        f"end {rss_end:.1f} MB; compilations after warm-up: {len(compiles) - compiles_warm}")
  assert served == REQUESTS and len(answers) == len(pool)
  assert len(compiles) == compiles_warm, f"{len(compiles) - compiles_warm} compilations after warm-up"
  assert list(p._compiled) == ["vqa"]  # one AOT-compiled function serves every request
  assert rss_end - rss_warm < 50, f"RSS grew by {rss_end - rss_warm:.1f} MB after warm-up"


CASES = []


@settings(deadline=None, derandomize=True, database=None, max_examples=120, print_blob=False,
          suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["size", "dtype", "rank", "type", "blank", "not_str", "long", "path"]), data=st.data())
def test_bad_requests_name_the_field(predictor, kind, data):
  p, pool = predictor
  image, question = pool[0]
  CASES.append(kind)
  if kind == "long":  # over-long questions are truncated to the model's length, not an error
    words = data.draw(st.lists(st.sampled_from(["what", "shape", "red", "zzz", "circle"]), min_size=20, max_size=300))
    probs = np.array(list(p.answer(image, " ".join(words))["probabilities"].values()))
    assert np.isfinite(probs).all() and abs(probs.sum() - 1) < 1e-4
    return
  field = "image"
  if kind == "size":
    image = np.zeros((*data.draw(st.tuples(st.integers(1, 90), st.integers(1, 90)).filter(lambda s: s != (75, 75))), 3),
                     np.uint8)
  elif kind == "dtype":
    image = image.astype(data.draw(st.sampled_from([np.float32, np.int32, np.uint16])))
  elif kind == "rank":
    image = np.zeros(data.draw(st.lists(st.integers(1, 4), min_size=0, max_size=5).filter(
        lambda s: len(s) != 3)), np.uint8)
  elif kind == "type":
    image = data.draw(st.sampled_from([None, 3, [[1, 2]], b"\x89PNG"]))
  elif kind == "path":
    image = "/nonexistent/" + data.draw(st.text(alphabet="abc", min_size=1, max_size=8)) + ".png"
  else:
    field = "question"
    question = data.draw(st.text(alphabet=" \t\n\u00a0", max_size=5)) if kind == "blank" else \
        data.draw(st.sampled_from([None, 3, b"what shape", ["what"]]))
  with pytest.raises((ValueError, TypeError, FileNotFoundError), match=field):
    p.answer(image, question)


def test_bad_request_count():
  print(f"predict bad-request cases: {len(CASES)}")
  assert len(CASES) >= 120
