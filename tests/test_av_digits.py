"""AV digits: deterministic, voices disjoint between splits, audible speech, labels from sklearn."""

import numpy as np
import pytest
from sklearn.datasets import load_digits

from mmjax.data import pp
from mmjax.data.datasets import av_digits as av

TINY = dict(num_examples=(("train", 6), ("test", 4)), digits=(1, 7),
            train_voices=("en-us", "en-gb+f2"), test_voices=("en-029",), speeds=(160,),
            pitches=(50,), noise_levels=(0.0, 0.3))


def _records(source):
  return sorted((source[i] for i in range(len(source))), key=lambda r: r["index"])


@pytest.fixture(scope="module")
def built(tmp_path_factory, requires_espeak):
  cfg = av.AvDigitsConfig(name="tiny", **TINY)
  data_dir = tmp_path_factory.mktemp("av")
  return cfg, {s: _records(av.load(s, data_dir, config=cfg)) for s in ("train", "test")}


def test_deterministic_by_seed(built, tmp_path):
  cfg, first = built
  av.synthesize.cache_clear()  # resynthesize: espeak-ng itself must be deterministic
  again = _records(av.load("train", tmp_path, config=cfg))
  assert len(again) == len(first["train"]) == 6
  for a, b in zip(first["train"], again):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  other = av.AvDigitsConfig(name="tiny_seed1", seed=1, **TINY)
  moved = _records(av.load("train", tmp_path, config=other))
  assert [r["digit_index"] for r in moved] != [r["digit_index"] for r in first["train"]]


def test_voices_disjoint_between_splits(built):
  _, recs = built
  train = {r["voice"].decode() for r in recs["train"]}
  test = {r["voice"].decode() for r in recs["test"]}
  assert train <= set(TINY["train_voices"]) and test <= set(TINY["test_voices"])
  assert not train & test
  assert not set(av.TRAIN_VOICES) & set(av.TEST_VOICES)
  with pytest.raises(ValueError, match="disjoint.*en-us"):
    av.AvDigitsConfig(name="bad", train_voices=("en-us",), test_voices=("en-us", "en-029"))


def test_labels_and_images_match_sklearn(built):
  _, recs = built
  digits = load_digits()
  for split in ("train", "test"):
    for r in recs[split]:
      assert r["label"] == digits.target[r["digit_index"]]
      assert r["label"] in TINY["digits"]
      want = np.rint(digits.images[r["digit_index"]] * 255 / 16).astype(np.uint8)
      np.testing.assert_array_equal(r["image"][..., 0], want)
  train_imgs = {r["digit_index"] for r in recs["train"]}
  test_imgs = {r["digit_index"] for r in recs["test"]}
  assert not train_imgs & test_imgs
  pools = av.image_pools(0)
  assert not set(pools["train"]) & set(pools["test"])
  assert len(pools["train"]) + len(pools["test"]) == len(digits.target)


def test_audio_is_speech_with_the_recorded_noise(built):
  _, recs = built
  for r in recs["train"] + recs["test"]:
    n = int(r["audio_len"])
    audio = r["audio"]
    assert audio.shape == (av.NUM_SAMPLES,) and audio.dtype == np.float32
    assert 1600 < n <= av.NUM_SAMPLES  # a spoken digit lasts 0.1 .. 1 s
    assert np.sqrt(np.mean(audio[:n] ** 2)) > 0.02
    np.testing.assert_array_equal(audio[n:], 0.0)
    speech = av.synthesize(r["voice"].decode(), int(r["speed"]), int(r["pitch"]),
                           av.WORDS[r["label"]])[:n]
    residual = audio[:n] - speech
    ratio = np.sqrt(np.mean(residual ** 2)) / np.sqrt(np.mean(speech ** 2))
    np.testing.assert_allclose(ratio, r["noise"], atol=0.03)


def test_records_go_through_pp_ops(built):
  _, recs = built
  f = pp.parse("image.decode(channels=1)|image.resize(16)|image.value_range(0, 1)|"
               "audio.load(sr=16000)|audio.log_mel(n_mels=40)")
  out = f(recs["train"][0], np.random.default_rng(0))
  assert out["image"].shape == (16, 16, 1) and out["image"].max() <= 1.0
  assert out["mel"].shape == (101, 40)
  assert out["mel_len"] == 1 + int(recs["train"][0]["audio_len"]) // 160


def test_missing_espeak_says_how_to_install(monkeypatch, tmp_path):
  monkeypatch.setattr(av, "ESPEAK", "espeak-ng-not-installed")
  av.synthesize.cache_clear()
  cfg = av.AvDigitsConfig(name="tiny_no_espeak", **TINY)
  with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
    av.load("train", tmp_path, config=cfg)
