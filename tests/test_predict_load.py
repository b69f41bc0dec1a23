"""Serving load: thousands of distinct VQA requests, no per-request memory, no recompilation; bad
requests; a workdir of the older model layout."""

import gc
import hashlib
import os
import tracemalloc

import jax
import numpy as np
import psutil
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from mmjax import predict
from mmjax.train import trainer
from mmjax.train.config import load_config

CONFIG = os.path.join(os.path.dirname(__file__), "..", "mmjax/projects/sort_of_clevr/configs/vqa.py")
CHUNK = 64  # the predictor's fixed compiled batch
CALLS = (CHUNK, 36)  # answer_batch sizes, alternating: full batches and padded ones
WARMUP = 1_000  # requests before measuring: the one compilation, first-call allocations
# Measured requests: one answer dict kept per request (~1 KB) shows as ~5 MB against the ~65 KB
# serving retains in all, so 5,000 measure the growth per request as well as 10,000 would.
MEASURED = 5_000
# Python heap per measured request: serving retains ~13 B (jax's own caches), and the replaced
# entries of the questions' tokenizer cache (256 of them at most) count ~45 B more over 5,000.
GROWTH_BYTES = 256
RSS_BYTES = 16_384  # per measured request: device buffers, C++ heap (tracemalloc sees neither); noise 0-5 KB
WORDS = ("red", "green", "blue", "orange", "gray", "yellow", "circle", "square")  # one token each


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


def request(pool, i: int) -> tuple[np.ndarray, str]:
  """Request i: a test image with i written into its first pixel, a question with i in words."""
  image, question = pool[i % len(pool)]
  image = image.copy()
  image[0, 0] = (i % 256, i // 256 % 256, 255 - i % 256)
  return image, question + " " + " ".join(WORDS[i // len(WORDS)**k % len(WORDS)] for k in range(5))


def serve(p, pool, start: int, stop: int) -> None:
  """Answers requests start..stop-1 in calls of CALLS sizes; keeps nothing."""
  i, c = start, 0
  while i < stop:
    n = min(CALLS[c % len(CALLS)], stop - i)
    out = p.answer_batch(*zip(*(request(pool, j) for j in range(i, i + n))))
    assert len(out) == n and all(o["answer"] == next(iter(o["probabilities"])) for o in out)
    i, c = i + n, c + 1


def test_distinct_requests_bounded_memory_no_recompilation(predictor):
  p, pool = predictor
  images, questions = set(), set()
  for i in range(WARMUP + MEASURED):
    image, question = request(pool, i)
    images.add(hashlib.sha1(image.tobytes()).digest())
    questions.add(question)
  assert len(images) == len(questions) == WARMUP + MEASURED  # each request differs in pixels and in text
  del images, questions
  p._compiled.clear()  # serve from cold: the listener must see the one compilation in warm-up
  compiles = []
  listener = lambda name, *_, **__: compiles.append(name) if name.startswith("/jax/core/compile/") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    first = p.answer_batch(*zip(*(request(pool, i) for i in range(CHUNK))))
    serve(p, pool, CHUNK, WARMUP)
    compiles_warm = len(compiles)
    gc.collect()
    rss_warm = psutil.Process().memory_info().rss
    tracemalloc.start()
    try:
      traced_warm = tracemalloc.get_traced_memory()[0]
      serve(p, pool, WARMUP, WARMUP + MEASURED)
      gc.collect()
      traced_end = tracemalloc.get_traced_memory()[0]
    finally:
      tracemalloc.stop()
    rss_end = psutil.Process().memory_info().rss
    again = p.answer_batch(*zip(*(request(pool, i) for i in range(CHUNK))))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  growth, rss = (traced_end - traced_warm) / MEASURED, (rss_end - rss_warm) / MEASURED
  print(f"\n{WARMUP} warm-up + {MEASURED} measured distinct requests: Python heap (tracemalloc) "
        f"{growth:+.1f} B/request, RSS {rss:+.1f} B/request; compile events in warm-up {compiles_warm}, "
        f"after {len(compiles) - compiles_warm}")
  backend = compiles.count("/jax/core/compile/backend_compile_duration")
  assert backend == 1, f"{backend} compilations serving calls of {CALLS} requests; expected one (the padded batch)"
  assert len(compiles) == compiles_warm, f"traced or compiled after warm-up: {compiles[compiles_warm:]}"
  assert list(p._compiled) == ["vqa"]  # one AOT-compiled function serves every request
  assert growth < GROWTH_BYTES, f"Python heap grew by {growth:.1f} B per request (bound {GROWTH_BYTES})"
  assert rss < RSS_BYTES, f"RSS grew by {rss:.1f} B per request (bound {RSS_BYTES})"
  for a, b in zip(first, again):  # the same requests after all the others: the same answers
    assert a["probabilities"] == b["probabilities"]


# Single-token words: a question of more than max_len - 2 of them is cut to its first max_len - 2.
LONG_WORDS = ["what", "shape", "red", "circle", "is", "the", "object"]
IMAGE_ERRORS = {"size": ValueError, "dtype": TypeError, "rank": TypeError, "type": TypeError,
                "path": FileNotFoundError}
QUESTION_ERRORS = {"blank": ValueError, "not_str": TypeError}


# Each case records a hypothesis `event` (kind, error, field): `--hypothesis-show-statistics` counts them.
@settings(deadline=None, derandomize=True, database=None, max_examples=120, print_blob=False,
          suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["long", *IMAGE_ERRORS, *QUESTION_ERRORS]), data=st.data())
def test_bad_requests_name_the_field(predictor, kind, data):
  p, pool = predictor
  if kind == "long":  # over-long questions are cut to their first max_len - 2 tokens, not an error
    max_len = int(p.config.data.max_len)
    words = data.draw(st.lists(st.sampled_from(LONG_WORDS), min_size=max_len - 1, max_size=300))
    image = pool[0][0]
    long, cut = p.answer_batch([image, image], [" ".join(words), " ".join(words[:max_len - 2])])
    assert long["probabilities"].keys() == cut["probabilities"].keys()
    np.testing.assert_allclose(list(long["probabilities"].values()), list(cut["probabilities"].values()),
                               rtol=1e-6, atol=0)
    event("long: truncated like its first max_len - 2 tokens")
    return
  n = data.draw(st.integers(1, 3))  # requests in the call; the bad one at position `at`
  at = data.draw(st.integers(0, n - 1))
  images, questions = [list(x) for x in zip(*(request(pool, i) for i in range(n)))]
  if kind == "size":
    images[at] = np.zeros((*data.draw(st.tuples(st.integers(1, 90), st.integers(1, 90)).filter(
        lambda s: s != (75, 75))), 3), np.uint8)
  elif kind == "dtype":
    images[at] = images[at].astype(data.draw(st.sampled_from([np.float32, np.int32, np.uint16])))
  elif kind == "rank":
    images[at] = np.zeros(data.draw(st.lists(st.integers(1, 4), min_size=0, max_size=5).filter(
        lambda s: len(s) != 3)), np.uint8)
  elif kind == "type":
    images[at] = data.draw(st.sampled_from([None, 3, [[1, 2]], b"\x89PNG"]))
  elif kind == "path":
    images[at] = "/nonexistent/" + data.draw(st.text(alphabet="abc", min_size=1, max_size=8)) + ".png"
  elif kind == "blank":
    questions[at] = data.draw(st.text(alphabet=" \t\n\u00a0", max_size=5))
  else:
    questions[at] = data.draw(st.sampled_from([None, 3, b"what shape", ["what"]]))
  error = IMAGE_ERRORS.get(kind) or QUESTION_ERRORS[kind]
  name = "image" if kind in IMAGE_ERRORS else "question"
  field = name if n == 1 else f"{name}s[{at}]"  # answer_batch names the position of the bad request
  with pytest.raises(Exception) as e:  # any exception: a wrong kind fails the assert below, naming both
    p.answer(images[0], questions[0]) if n == 1 else p.answer_batch(images, questions)
  assert e.type is error, f"{kind}: raised {e.type.__name__}, expected {error.__name__}: {e.value}"
  assert str(e.value).startswith(f"{field}: "), f"{kind}: message {str(e.value)!r} does not name {field!r}"
  event(f"{kind}: {error.__name__} naming {name if n == 1 else name + 's[i]'}")


# model.vision / model.text (one encoder spec per key, no model.name): the layout before
# model.name + model.encoders, as an old workdir's config.json holds it.
OLD_MODEL = {"vision": {"name": "small_cnn", "features": 64, "channels": [32, 32]},
             "text": {"name": "bert", "variant": "tiny", "vocab_size": 0},
             "fusion": "film", "features": 64, "head_hidden": 128, "dtype": "float32"}


def test_a_workdir_of_the_older_model_layout_is_named_as_such(tmp_path, capsys, monkeypatch):
  from mmjax import export  # pylint: disable=g-import-not-at-top

  monkeypatch.setenv("MMJAX_DATA_DIR", str(tmp_path / "data"))  # a missed check builds no data elsewhere
  config = load_config(CONFIG + ":size=tiny")
  config.model = OLD_MODEL  # the rest of the config as the trainer writes it
  (tmp_path / "config.json").write_text(config.to_json_best_effort(indent=2))
  (tmp_path / "checkpoints").mkdir()
  wd = str(tmp_path)
  with pytest.raises(ValueError) as e:
    predict.Predictor.from_workdir(wd)
  message = str(e.value)
  assert message.startswith(f"workdir {wd!r}: config.json has the older mmjax model layout "
                            "(model.vision, model.text: ")
  assert "model.name (a registered model) and model.encoders" in message and "docs/configs.md" in message
  for main in (lambda: predict.main(["--workdir", wd, "--image", "x.png", "--question", "q"]),
               lambda: export.main(["--workdir", wd, "--out", str(tmp_path / "out")])):
    with pytest.raises(SystemExit) as e:
      main()
    assert e.value.code == 2 and capsys.readouterr().err == f"error: {message}\n"
