"""Audio front end against librosa on espeak-ng speech and white noise; audio encoders' contracts.

Error measures (float32 JAX vs float64 librosa on the same float32 samples), elementwise absolute
bounds per config in TOLERANCES, measured on CPU (where the suite runs) and set about 1.5x above:
  log-mel: |a - b| in dB per frame and band;
  MFCC: |a - b| per frame and coefficient, the bound scaled by the coefficient's lifter weight;
  mel filterbank: max |a - b| <= 1e-6 * max |b|;
  trim intervals: equal to librosa.effects.trim's, in samples.
"""

import subprocess

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import scipy.signal
import soundfile
from flax import nnx

from mmjax.encoders import audio as audio_enc
from mmjax.encoders import audio_frontend as af
from mmjax.encoders.base import ENCODERS

SR = 16_000
VOICES = [  # espeak-ng voice, words per minute, pitch, text
    ("en-us", 140, 50, "the quick brown fox"),
    ("en+f3", 190, 70, "seven eight nine ten"),
    ("en-gb", 160, 35, "audio features in jax"),
]
CONFIGS = {
    "slaney-constant": af.FrontEndConfig(n_fft=512, win_length=400, hop_length=160, n_mels=64,
                                         fmin=20.0, fmax=7600.0, n_mfcc=20),
    "htk-reflect-refmax": af.FrontEndConfig(n_fft=400, hop_length=128, n_mels=40, htk=True,
                                            mel_norm=None, pad_mode="reflect", ref="max",
                                            top_db=60.0, n_mfcc=13, lifter=22.0),
}
# config -> (log-mel bound in dB, MFCC bound per unit of lifter weight); [observed max on CPU].
TOLERANCES = {
    # float32 FFT rounding on bands 55-70 dB below their frame's peak, kept by top_db=80 [5.5e-4, 2.1e-4]
    "slaney-constant": (8e-4, 3e-4),
    # top_db=60 below the clip's peak floors those quiet bands [1.05e-4, 5.1e-5 (c0; 2.5-4e-5 others)]
    "htk-reflect-refmax": (1.6e-4, 8e-5),
}


def _espeak(tmp_path, i, voice, speed, pitch, text) -> np.ndarray:
  """espeak-ng speech resampled from 22.05 kHz to 16 kHz, float32, at most 2 s."""
  path = tmp_path / f"speech{i}.wav"
  subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
                 check=True, capture_output=True)
  y, sr = soundfile.read(path, dtype="float64")
  if sr != 22_050:
    pytest.fail(f"espeak-ng wrote {sr} Hz, expected 22050 Hz")
  return scipy.signal.resample_poly(y, 160, 441).astype(np.float32)[:2 * SR]


@pytest.fixture(scope="module")
def clips(tmp_path_factory, requires_espeak):
  """Three espeak-ng utterances (about 0.7-1 s) and 0.75 s of white noise (float32, 16 kHz).

  The noise is shorter than the longest utterance, so in a padded batch it ends loud right
  before padding: that is where per-example 'reflect' padding is put to the test.
  """
  tmp = tmp_path_factory.mktemp("speech")
  speech = [_espeak(tmp, i, *v) for i, v in enumerate(VOICES)]
  noise = (0.1 * np.random.default_rng(0).standard_normal(12_000)).astype(np.float32)
  return speech + [noise]


def _np(tree):
  """Fetches a pytree of arrays as numpy, so the checks below compile nothing."""
  return jax.tree.map(np.asarray, tree)


def _pad_batch(clips):
  """Right-pads clips into (B, T) float32 with (B,) int32 lengths."""
  lengths = np.array([len(c) for c in clips], np.int32)
  batch = np.zeros((len(clips), lengths.max()), np.float32)
  for i, c in enumerate(clips):
    batch[i, :len(c)] = c
  return batch, lengths


def _librosa_log_mel(y, cfg):
  mel = librosa.feature.melspectrogram(
      y=y.astype(np.float64), sr=cfg.sample_rate, n_fft=cfg.n_fft, hop_length=cfg.hop_length,
      win_length=cfg.win_length, center=cfg.center, pad_mode=cfg.pad_mode, power=cfg.power,
      n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax, htk=cfg.htk, norm=cfg.mel_norm)
  ref = np.max if cfg.ref == "max" else cfg.ref
  return librosa.power_to_db(mel, ref=ref, amin=cfg.amin, top_db=cfg.top_db)  # (n_mels, F)


def test_mel_filterbank_equals_librosa():
  for sr, n_fft, n_mels, fmin, fmax, htk, norm in [
      (16_000, 512, 64, 20.0, 7600.0, False, "slaney"), (16_000, 400, 40, 0.0, None, True, None),
      (22_050, 2048, 128, 0.0, None, False, None), (8_000, 255, 23, 100.0, 3000.0, True, "slaney")]:
    ours = af.mel_filterbank(sr, n_fft, n_mels, fmin, fmax, htk, norm)
    ref = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax, htk=htk, norm=norm)
    assert ours.shape == ref.shape == (n_mels, n_fft // 2 + 1)
    np.testing.assert_array_less(np.abs(ours - ref).max(), 1e-6 * np.abs(ref).max())


def test_power_to_db_per_example_over_valid_frames():
  power = np.random.default_rng(5).gamma(0.5, 1e-3, size=(2, 12, 5)).astype(np.float32)
  power[1, 7:] = 1e3  # padding louder than the clip must not move its reference or floor
  mask = np.arange(12)[None] < np.array([[12], [7]])
  db = np.asarray(jax.jit(lambda p, m: af.power_to_db(p, m, ref="max", top_db=30.0))(power, mask))
  for i, n in enumerate((12, 7)):
    ref = librosa.power_to_db(power[i, :n].astype(np.float64), ref=np.max, top_db=30.0)
    np.testing.assert_allclose(db[i, :n], ref, atol=1e-4)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_log_mel_and_mfcc_match_librosa_in_a_padded_batch(clips, name):
  """Each clip, right-padded in one batch, matches librosa run on that clip alone."""
  cfg = CONFIGS[name]
  atol_mel, atol_mfcc = TOLERANCES[name]
  # librosa's lifter multiplies coefficient k, and so its float32 error, by this weight.
  k = np.arange(1, cfg.n_mfcc + 1)
  lifter = 1 + cfg.lifter / 2 * np.sin(np.pi * k / cfg.lifter) if cfg.lifter else np.ones(cfg.n_mfcc)
  atol_c = atol_mfcc * lifter  # (n_mfcc,)
  batch, lengths = _pad_batch(clips)
  feats = _np(af.LogMel(cfg)(batch, lengths))
  ceps = _np(af.Mfcc(cfg)(batch, lengths))
  for i, y in enumerate(clips):
    ref = _librosa_log_mel(y, cfg).T  # (F, n_mels)
    n = int(feats.lengths[i])
    assert n == ref.shape[0] == int(ceps.lengths[i]) == 1 + len(y) // cfg.hop_length
    np.testing.assert_array_equal(feats.mask[i], np.arange(batch.shape[1] // cfg.hop_length + 1) < n)
    err = np.abs(feats.values[i, :n] - ref).max(0)  # (n_mels,)
    assert err.max() <= atol_mel, f"clip {i}: log-mel error {err.max():.2e} dB in band {err.argmax()}"
    assert np.all(feats.values[i, n:] == cfg.pad_value)
    if cfg.ref == "max":
      ref_c = librosa.feature.mfcc(S=ref.T, n_mfcc=cfg.n_mfcc, lifter=cfg.lifter).T
    else:
      ref_c = librosa.feature.mfcc(
          y=y.astype(np.float64), sr=cfg.sample_rate, n_mfcc=cfg.n_mfcc, lifter=cfg.lifter,
          n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
          pad_mode=cfg.pad_mode, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax, htk=cfg.htk,
          mel_norm=cfg.mel_norm).T
    # Any coefficient scaled by 1 + 1e-3 moves by more than twice its bound somewhere, so it fails.
    assert np.all(2 * atol_c < 1e-3 * np.abs(ref_c).max(0)), f"clip {i}: bound too loose"
    err_c = np.abs(ceps.values[i, :n] - ref_c).max(0)  # (n_mfcc,)
    bad = np.flatnonzero(err_c > atol_c)
    assert bad.size == 0, f"clip {i}: MFCC coefficients {bad} off by {err_c[bad]} > {atol_c[bad]}"


def test_trim_silence_matches_librosa_intervals(clips):
  """Speech with quiet noise before and silence after, noise, and an all-zero clip, in one batch."""
  rng = np.random.default_rng(1)
  lead = (1e-4 * rng.standard_normal(4000)).astype(np.float32)
  tests = [np.concatenate([lead, clips[0], np.zeros(6000, np.float32)]),
           np.concatenate([np.zeros(3000, np.float32), clips[1]]),
           clips[3], np.zeros(5000, np.float32)]
  batch, lengths = _pad_batch(tests)
  top_db, frame_length, hop = 40.0, 1024, 256
  trimmed = _np(jax.jit(lambda x, n: af.trim_silence(
      x, n, top_db=top_db, frame_length=frame_length, hop_length=hop))(batch, lengths))
  for i, y in enumerate(tests):
    _, interval = librosa.effects.trim(y.astype(np.float64), top_db=top_db,
                                       frame_length=frame_length, hop_length=hop)
    start, end = (int(v) for v in interval)
    s, e = (int(v) for v in trimmed.intervals[i])
    assert (s, e) == (start, end), f"clip {i}: interval {(s, e)}, librosa's {(start, end)}"
    assert int(trimmed.lengths[i]) == e - s
    np.testing.assert_array_equal(trimmed.audio[i, :e - s], y[s:e])
    assert np.all(trimmed.audio[i, e - s:] == 0)
  # The quiet lead-in and the trailing silence of the first clip are cut.
  assert trimmed.intervals[0, 0] >= 3000 and trimmed.intervals[0, 1] < len(tests[0])


@pytest.mark.filterwarnings("ignore:n_fft=512 is too large:UserWarning")  # the point of the test
def test_reflect_padding_longer_than_the_clip_matches_numpy_and_librosa():
  """Clips shorter than the padding keep reflecting, as np.pad and librosa do, in one batch."""
  rng = np.random.default_rng(3)
  short = [rng.standard_normal(n).astype(np.float32) for n in (1, 2, 3, 7, 20)]
  batch, lengths = _pad_batch(short)
  frames = np.asarray(af.frame(batch, lengths, frame_length=16, hop_length=4, pad_mode="reflect"))
  for i, y in enumerate(short):
    padded = np.pad(y, 8, mode="reflect")
    want = np.stack([padded[t * 4:t * 4 + 16] for t in range(af.num_frames(len(y), 16, 4))])
    np.testing.assert_array_equal(frames[i, :len(want)], want, err_msg=f"clip of {len(y)} samples")
  cfg = af.FrontEndConfig(sample_rate=22050, n_fft=512, hop_length=128, n_mels=64, pad_mode="reflect")
  clips = [rng.standard_normal(n).astype(np.float32) for n in (100, 300)]  # pad 256 > 99
  batch, lengths = _pad_batch(clips)
  feats = _np(af.LogMel(cfg)(batch, lengths))
  for i, y in enumerate(clips):
    ref = _librosa_log_mel(y, cfg).T  # (F, n_mels)
    np.testing.assert_allclose(feats.values[i, :len(ref)], ref, atol=1e-3)


def test_batched_equals_per_example_and_dc_removal(clips):
  cfg = CONFIGS["htk-reflect-refmax"]
  pair = clips[2:]  # an utterance and the shorter noise clip, which ends loud before its padding
  batch, lengths = _pad_batch(pair)
  log_mel = af.LogMel(cfg)
  both = _np(log_mel(batch, lengths))
  alone = _np(log_mel(pair[1]))  # (T,) in, (F, n_mels) out
  n = int(both.lengths[1])
  assert alone.values.shape == (n, cfg.n_mels) and int(alone.lengths) == n
  np.testing.assert_allclose(both.values[1, :n], alone.values, rtol=0, atol=1e-4)
  assert not both.mask[1, n:].any()

  shifted = batch + np.float32(0.25) * (np.arange(batch.shape[1]) < lengths[:, None])
  centred = np.asarray(jax.jit(af.remove_dc)(shifted, lengths))
  for i, y in enumerate(pair):
    np.testing.assert_allclose(centred[i, :len(y)], y - y.mean(), atol=1e-5)
    assert np.all(centred[i, len(y):] == 0)
  with_dc = af.LogMel(cfg, remove_dc=True)(shifted, lengths)
  no_dc = log_mel(centred, lengths)
  np.testing.assert_allclose(with_dc.values, no_dc.values, atol=1e-4)


def test_jit_compiles_once_per_shape():
  cfg = CONFIGS["slaney-constant"]
  traces = []

  @jax.jit
  def features(x, n):
    traces.append(x.shape)
    return af.mfcc(x, n, cfg)

  rng = np.random.default_rng(2)
  for lengths in ([3000, 1200], [17, 3000], [3000, 3000]):
    x = rng.standard_normal((2, 3000)).astype(np.float32)
    out = features(x, np.array(lengths, np.int32))
    assert np.asarray(out.lengths).tolist() == [1 + n // cfg.hop_length for n in lengths]
  assert len(traces) == 1


def test_front_end_rejects_bad_input():
  cfg = af.FrontEndConfig(n_mels=16, n_mfcc=8)
  good = np.zeros((2, 800), np.float32)
  with pytest.raises(ValueError, match=r"\(B, T\) or \(T,\)"):
    af.log_mel(np.zeros((1, 2, 800), np.float32), None, cfg)
  with pytest.raises(ValueError, match="empty audio"):
    af.log_mel(np.zeros((2, 0), np.float32), None, cfg)
  with pytest.raises(ValueError, match="NaN"):
    af.mfcc(np.where(np.arange(800) == 5, np.nan, good).astype(np.float32), None, cfg)
  with pytest.raises(TypeError, match="floating-point"):
    af.log_mel(np.zeros((2, 800), np.int16), None, cfg)
  with pytest.raises(ValueError, match="zero-length"):
    af.LogMel(cfg)(good, np.array([800, 0], np.int32))
  with pytest.raises(ValueError, match=r"lengths: expected values in \[1, 800\]"):
    af.log_mel(good, np.array([801, 3], np.int32), cfg)
  with pytest.raises(ValueError, match="pad_mode"):
    af.FrontEndConfig(pad_mode="wrap")
  with pytest.raises(ValueError, match="n_mfcc=20 exceeds n_mels=16"):
    af.mfcc(good, None, af.FrontEndConfig(n_mels=16))
  with pytest.raises(ValueError, match="n_mfcc=20 exceeds n_mels=16"):
    af.Mfcc(n_mels=16)


# ---------------------------------------------------------------------------------------------
# Encoders, kept to few compilations: every model is built abstractly (nnx.eval_shape runs the
# constructor without compiling JAX's random initialisers, one XLA program per parameter shape)
# and filled from numpy, and all forward passes go through one nnx.jit.

N_MELS = 32
FRONTEND = af.FrontEndConfig(n_mels=N_MELS, pad_mode="reflect", ref="max")


@nnx.jit(static_argnames="use_mask")
def _run(model, x, n, use_mask=False):
  if use_mask:
    return model(x, jnp.arange(x.shape[1])[None, :] < n[:, None])
  return model(x, lengths=n)


def _build(ctor):
  """ctor() with fan-in-scaled normal weights, LayerNorm scales near 1 and small biases (seed 0)."""
  graphdef, params, rest = nnx.split(nnx.eval_shape(ctor), nnx.Param, ...)
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    if len(leaf.shape) >= 2:
      value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    else:
      value = ("scale" in jax.tree_util.keystr(path)) + 0.1 * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  params = jax.tree.map_with_path(draw, params)
  return nnx.merge(graphdef, params, jax.tree.map(lambda leaf: jnp.zeros(leaf.shape, leaf.dtype), rest))


def _ast(**kw):
  base = dict(width=32, depth=2, num_heads=2, n_mels=N_MELS, patch=(4, 8), max_frames=64)
  return _build(lambda: audio_enc.SpectrogramTransformer(**{**base, **kw}, rngs=nnx.Rngs(0)))


def _cnn(**kw):
  kw = {"act": "gelu", **kw}
  return _build(lambda: audio_enc.AudioCNN(16, (8, 16), n_mels=N_MELS, **kw, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def models():
  return {
      "ast": _ast(),
      "ast_wave": _ast(input_kind="waveform", frontend=FRONTEND, pool="mean", posemb="sincos2d",
                       stride=(3, 8), feature_mean=-20.0, feature_std=15.0),
      "cnn": _cnn(),
  }


@pytest.fixture(scope="module")
def feats():
  return np.random.default_rng(3).standard_normal((2, 37, N_MELS)).astype(np.float32)


@pytest.fixture(scope="module")
def waves():
  return (0.1 * np.random.default_rng(4).standard_normal((2, 4000))).astype(np.float32)


@nnx.jit
def _run_with_grads(model, x, n):
  """Forward pass on x with lengths n, and gradients of sum(pooled^2) w.r.t. parameters and x."""
  def loss(model, x):
    out = model(x, lengths=n)
    return jnp.sum(out.pooled.astype(jnp.float32) ** 2), out

  (_, out), grads = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(model, x)
  return out, grads


@pytest.fixture(scope="module")
def cnn_run(models, feats):
  return _np(_run_with_grads(models["cnn"], jnp.asarray(feats), jnp.array([37, 21])))


def _check_padding_invariance(model, x, n, both):
  """Clip 1 right-padded in a batch (output `both`) gives the valid tokens and pooled vector of
  the clip alone.

  This holds by design for every encoder here: padded frames are zeroed before anything mixes
  time, a patch / pooled step is valid when any of its frames is, attention and pooling skip
  invalid tokens, and normalisation is a fixed (dataset) mean/std. Per-batch feature statistics,
  BatchNorm or patches laid out frequency-major with an interpolated position table (the original
  AST) would break it; this module uses none. The tolerance covers float reassociation only.
  """
  alone = _np(_run(model, x[1:, :n], jnp.array([n])))
  m = alone.mask[0].sum()
  assert both.mask[1].sum() == m == alone.mask.shape[1]
  np.testing.assert_allclose(both.tokens[1, :m], alone.tokens[0], atol=2e-5)
  np.testing.assert_allclose(both.pooled[1], alone.pooled[0], atol=2e-5)


def _check_gradients(grads, n):
  """Finite, non-zero parameter gradients; input gradient zero exactly on clip 1's padding."""
  g_params, g_x = grads
  leaves = jax.tree.leaves(g_params)
  assert all(np.isfinite(g).all() for g in leaves + [g_x])
  assert sum(np.abs(g).sum() for g in leaves) > 0
  assert np.all(g_x[1, n:] == 0) and np.abs(g_x[1, :n]).max() > 0


def test_registry_builds_both():
  assert {"ast", "audio_cnn"} <= set(ENCODERS.names())
  assert ENCODERS.get("ast") is audio_enc.SpectrogramTransformer
  cnn = nnx.eval_shape(lambda: ENCODERS.build("audio_cnn", features=8, channels=(4,), n_mels=8,
                                              rngs=nnx.Rngs(0)))
  assert isinstance(cnn, audio_enc.AudioCNN) and cnn.proj.kernel.shape == (4, 8)


def test_ast_shapes_masks_padding_invariance(models, feats):
  out = _np(_run(models["ast"], feats, jnp.array([37, 21]), use_mask=True))
  _check_padding_invariance(models["ast"], feats, 21, out)
  # ceil(37 / 4) = 10 time patches x 4 frequency patches, plus cls; the second clip has 6 x 4 + 1.
  assert out.tokens.shape == (2, 41, 32) and out.pooled.shape == (2, 32)
  np.testing.assert_array_equal(out.mask.sum(1), [41, 25])
  assert out.mask[:, 0].all()
  assert np.all(out.tokens[~out.mask] == 0)
  np.testing.assert_array_equal(out.pooled, out.tokens[:, 0])


def test_cnn_shapes_masks_padding_invariance_gradients(models, feats, cnn_run):
  out, grads = cnn_run
  _check_padding_invariance(models["cnn"], feats, 21, out)
  _check_gradients(grads, 21)
  # Two 2x pools: 37 -> 19 -> 10 steps; 21 -> 11 -> 6.
  assert out.tokens.shape == (2, 10, 16) and out.pooled.shape == (2, 16)
  np.testing.assert_array_equal(out.mask.sum(1), [10, 6])
  np.testing.assert_allclose(out.pooled[1], out.tokens[1, :6].mean(0), atol=1e-6)
  assert np.all(out.tokens[1, 6:] == 0)


def test_ast_on_waveforms_padding_invariance_gradients(models, waves):
  """The front end inside the model: invariance, and gradients down to the samples."""
  out, grads = _np(_run_with_grads(models["ast_wave"], jnp.asarray(waves), jnp.array([4000, 2500])))
  _check_padding_invariance(models["ast_wave"], waves, 2500, out)
  _check_gradients(grads, 2500)
  # 4000 samples -> 26 frames (hop 160) -> ceil(26 / 3) = 9 time patches (stride 3) x 4; 2500 -> 16 -> 6.
  np.testing.assert_array_equal(out.mask.sum(1), [1 + 9 * 4, 1 + 6 * 4])


def test_bfloat16_path(models, feats, cnn_run):
  n = jnp.array([37, 21])
  refs = {"ast": _np(_run(models["ast"], feats, n, use_mask=True)).pooled, "cnn": cnn_run[0].pooled}
  for name, make in (("ast", _ast), ("cnn", _cnn)):
    out = _run(make(dtype=jnp.bfloat16), feats, n, use_mask=True)  # same float32 parameters
    assert out.tokens.dtype == jnp.bfloat16 and out.pooled.dtype == jnp.bfloat16
    p, ref = np.asarray(out.pooled, np.float32), refs[name]
    assert np.isfinite(p).all()
    cos = (p * ref).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() > 0.98, (name, cos)


def test_encoders_reject_bad_input(models, feats):
  ast, cnn = models["ast"], models["cnn"]
  with pytest.raises(ValueError, match=rf"\(B, frames, {N_MELS}\)"):
    ast(feats[..., :16])
  with pytest.raises(ValueError, match=rf"\(B, frames, {N_MELS}\)"):
    cnn(feats[0])
  with pytest.raises(ValueError, match="empty"):
    ast(feats[:, :0])
  with pytest.raises(ValueError, match="NaN"):
    cnn(np.where(np.arange(N_MELS) == 3, np.nan, feats).astype(np.float32))
  with pytest.raises(ValueError, match="lengths"):
    ast(feats, lengths=np.array([37, 0], np.int32))
  with pytest.raises(ValueError, match="max_frames=64"):
    ast(np.zeros((1, 80, N_MELS), np.float32))
  with pytest.raises(ValueError, match="mask or lengths"):
    ast(feats, np.ones((2, 37), bool), lengths=np.array([37, 3], np.int32))
  wave = models["ast_wave"]
  with pytest.raises(ValueError, match=r"\(B, T\)"):
    wave(np.zeros((2, 3, 400), np.float32))
  with pytest.raises(ValueError, match="empty audio"):
    wave(np.zeros((2, 0), np.float32))
  with pytest.raises(ValueError, match="NaN"):
    wave(np.full((1, 400), np.nan, np.float32))
  with pytest.raises(ValueError, match="input_kind"):
    _cnn(input_kind="spectrogram")
  with pytest.raises(ValueError, match="n_mels"):
    _cnn(input_kind="waveform", frontend=af.FrontEndConfig(n_mels=64))
