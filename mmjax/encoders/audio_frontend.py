"""A jit-able, batched audio front end in pure JAX: DC removal, silence trimming, STFT, log-mel, MFCC.

Every function takes waveforms `(B, T)` (or one `(T,)` clip) plus optional per-example valid
lengths in samples, and gives the same result for a clip whether it is alone or right-padded in a
batch: padding is resolved per example (also for `pad_mode="reflect"`), and the outputs carry
lengths and masks in frames. Shapes are static, so one compilation serves every batch of a shape.

The numbers follow librosa (tested against it): `stft` framing with `center=True` and
pad_mode 'constant' or 'reflect', a periodic window padded to `n_fft`, `filters.mel` (slaney or
htk scale, slaney or no norm), `power_to_db`, `feature.mfcc` (DCT-II, ortho) and `effects.trim`.
The mel filterbank, window and DCT matrix are built in numpy once per config and baked in as
constants. Matmuls run at HIGHEST precision so TPUs do not round the spectrum to bfloat16.
Features are time-major, `(B, frames, n_mels)`, the transpose of librosa's layout.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
import scipy.signal

HIGHEST = jax.lax.Precision.HIGHEST
PAD_MODES = ("constant", "reflect")


@dataclasses.dataclass(frozen=True)
class FrontEndConfig:
  """Front-end hyper-parameters (librosa's names and defaults where it has them).

  Attributes:
    sample_rate: samples per second of the input waveform.
    n_fft: FFT size (frame length) in samples.
    hop_length: samples between frame starts.
    win_length: window length (<= n_fft, zero-padded to n_fft in the centre); None = n_fft.
    window: a `scipy.signal.get_window` name, built periodic ("fftbins") as librosa does.
    center: pad n_fft // 2 samples on both sides so frame t is centred on sample t * hop_length.
    pad_mode: "constant" (zeros, librosa's default) or "reflect", used when `center`.
    power: exponent of the magnitude spectrum (2 = power, 1 = magnitude).
    n_mels: number of mel bands.
    fmin, fmax: band edges in Hz; fmax None = sample_rate / 2.
    htk: HTK mel scale instead of Slaney's.
    mel_norm: "slaney" (bands of equal area) or None.
    ref: dB reference power: a positive number, or "max" for each example's maximum.
    amin: floor on power before the log.
    top_db: clip each example at (its max dB - top_db); None = no clipping.
    n_mfcc: number of cepstral coefficients kept.
    lifter: MFCC liftering coefficient (0 = none), as in librosa.
    remove_dc: subtract each clip's mean before anything else.
    trim_db: if set, trim leading/trailing silence quieter than this many dB below the clip's
      peak frame (librosa.effects.trim's top_db) before the STFT.
    trim_frame_length, trim_hop_length: framing for trimming (librosa's 2048 / 512 by default).
    pad_value: value of feature frames past each example's length.
  """

  sample_rate: int = 16_000
  n_fft: int = 400
  hop_length: int = 160
  win_length: int | None = None
  window: str = "hann"
  center: bool = True
  pad_mode: str = "constant"
  power: float = 2.0
  n_mels: int = 80
  fmin: float = 0.0
  fmax: float | None = None
  htk: bool = False
  mel_norm: str | None = "slaney"
  ref: float | str = 1.0
  amin: float = 1e-10
  top_db: float | None = 80.0
  n_mfcc: int = 20
  lifter: float = 0.0
  remove_dc: bool = False
  trim_db: float | None = None
  trim_frame_length: int = 2048
  trim_hop_length: int = 512
  pad_value: float = 0.0

  def __post_init__(self):
    for name in ("sample_rate", "n_fft", "hop_length", "n_mels", "n_mfcc", "trim_frame_length",
                 "trim_hop_length"):
      if int(getattr(self, name)) <= 0:
        raise ValueError(f"FrontEndConfig.{name}: expected a positive integer, got {getattr(self, name)}")
    if self.win_length is not None and not 0 < self.win_length <= self.n_fft:
      raise ValueError(f"FrontEndConfig.win_length: expected 0 < win_length <= n_fft={self.n_fft}, "
                       f"got {self.win_length}")
    if self.pad_mode not in PAD_MODES:
      raise ValueError(f"FrontEndConfig.pad_mode: expected one of {PAD_MODES}, got {self.pad_mode!r}")
    if self.mel_norm not in ("slaney", None):
      raise ValueError(f"FrontEndConfig.mel_norm: expected 'slaney' or None, got {self.mel_norm!r}")
    if not (self.ref == "max" or (isinstance(self.ref, (int, float)) and self.ref > 0)):
      raise ValueError(f"FrontEndConfig.ref: expected a positive number or 'max', got {self.ref!r}")
    if self.amin <= 0:
      raise ValueError(f"FrontEndConfig.amin: expected > 0, got {self.amin}")
    if self.top_db is not None and self.top_db < 0:
      raise ValueError(f"FrontEndConfig.top_db: expected >= 0 or None, got {self.top_db}")
    fmax = self.sample_rate / 2 if self.fmax is None else self.fmax
    if not 0 <= self.fmin < fmax <= self.sample_rate / 2:
      raise ValueError(f"FrontEndConfig.fmin/fmax: expected 0 <= fmin < fmax <= sample_rate / 2, "
                       f"got fmin={self.fmin}, fmax={fmax}")
    if self.lifter < 0:
      raise ValueError(f"FrontEndConfig.lifter: expected >= 0, got {self.lifter}")

  @property
  def n_freqs(self) -> int:
    return self.n_fft // 2 + 1


class Features(NamedTuple):
  """Frame-level features with their extent.

  Attributes:
    values: (B, F, C) features, time-major; frames past `lengths` hold `pad_value`.
    lengths: (B,) int32 valid frames per example.
    mask: (B, F) bool, True on valid frames.
  """

  values: jax.Array
  lengths: jax.Array
  mask: jax.Array


class Trimmed(NamedTuple):
  """Silence-trimmed audio at a fixed length.

  Attributes:
    audio: (B, T) the kept interval shifted to the start, zeros after it.
    lengths: (B,) int32 kept samples (0 when the whole clip is silent).
    intervals: (B, 2) int32 [start, end) of the kept interval in the input, as librosa's trim.
  """

  audio: jax.Array
  lengths: jax.Array
  intervals: jax.Array


# ---------------------------------------------------------------------------------------------
# Constants built in numpy once per config.


def _hz_to_mel(freqs: np.ndarray, htk: bool) -> np.ndarray:
  """librosa.hz_to_mel: HTK's 2595 log10(1 + f/700), or Slaney's linear-then-log scale."""
  freqs = np.asarray(freqs, np.float64)
  if htk:
    return 2595.0 * np.log10(1.0 + freqs / 700.0)
  f_sp, min_log_hz = 200.0 / 3, 1000.0
  min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
  safe = np.maximum(freqs, min_log_hz)
  return np.where(freqs >= min_log_hz, min_log_mel + np.log(safe / min_log_hz) / logstep, freqs / f_sp)


def _mel_to_hz(mels: np.ndarray, htk: bool) -> np.ndarray:
  """librosa.mel_to_hz, the inverse of `_hz_to_mel`."""
  mels = np.asarray(mels, np.float64)
  if htk:
    return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
  f_sp, min_log_hz = 200.0 / 3, 1000.0
  min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
  return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)


@functools.lru_cache(maxsize=64)
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None, htk: bool = False,
                   norm: str | None = "slaney") -> np.ndarray:
  """Triangular mel filters (n_mels, n_fft // 2 + 1) float32, equal to `librosa.filters.mel`.

  librosa is a test-only dependency, so its twenty lines are restated here in float64 numpy;
  the test suite checks the two agree for both scales and norms.
  """
  if norm not in ("slaney", None):
    raise ValueError(f"norm: expected 'slaney' or None, got {norm!r}")
  fmax = sample_rate / 2 if fmax is None else fmax
  fft_freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)  # (n_freqs,)
  mel_f = _mel_to_hz(np.linspace(_hz_to_mel(fmin, htk), _hz_to_mel(fmax, htk), n_mels + 2), htk)
  fdiff = np.diff(mel_f)
  ramps = mel_f[:, None] - fft_freqs[None, :]  # (n_mels + 2, n_freqs)
  lower = -ramps[:-2] / fdiff[:-1, None]
  upper = ramps[2:] / fdiff[1:, None]
  weights = np.maximum(0.0, np.minimum(lower, upper))
  if norm == "slaney":
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]
  weights = weights.astype(np.float32)
  weights.setflags(write=False)
  return weights


@functools.lru_cache(maxsize=64)
def stft_window(window: str, win_length: int, n_fft: int) -> np.ndarray:
  """Periodic window of `win_length` zero-padded to `n_fft` in the centre, as librosa's stft builds it."""
  w = scipy.signal.get_window(window, win_length, fftbins=True).astype(np.float64)
  lpad = (n_fft - win_length) // 2
  w = np.pad(w, (lpad, n_fft - win_length - lpad)).astype(np.float32)
  w.setflags(write=False)
  return w


@functools.lru_cache(maxsize=64)
def dct_matrix(n_mels: int, n_mfcc: int, lifter: float = 0.0) -> np.ndarray:
  """(n_mels, n_mfcc) orthonormal DCT-II basis (scipy.fft.dct), with librosa's liftering."""
  m = scipy.fft.dct(np.eye(n_mels), type=2, norm="ortho", axis=0)[:n_mfcc].T  # (n_mels, n_mfcc)
  if lifter > 0:
    m = m * (1 + (lifter / 2) * np.sin(np.pi * np.arange(1, n_mfcc + 1) / lifter))[None, :]
  m = m.astype(np.float32)
  m.setflags(write=False)
  return m


# ---------------------------------------------------------------------------------------------
# Input checks and lengths.


def _check_mfcc(config: FrontEndConfig) -> None:
  if config.n_mfcc > config.n_mels:
    raise ValueError(f"FrontEndConfig.n_mfcc={config.n_mfcc} exceeds n_mels={config.n_mels}")


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _check_audio(audio, lengths, field: str = "audio") -> None:
  """Raises TypeError/ValueError for non-float, wrong-rank, empty or non-finite audio and bad lengths."""
  if not hasattr(audio, "ndim") or not hasattr(audio, "dtype"):
    raise TypeError(f"{field}: expected an array of shape (B, T) or (T,), got {type(audio).__name__}")
  if audio.ndim not in (1, 2):
    raise ValueError(f"{field}: expected a waveform of shape (B, T) or (T,), got shape {audio.shape}")
  if not jnp.issubdtype(audio.dtype, jnp.floating):
    raise TypeError(f"{field}: expected a floating-point waveform, got dtype {audio.dtype}")
  if audio.shape[-1] == 0 or audio.size == 0:
    raise ValueError(f"{field}: empty audio (shape {audio.shape}); need at least one sample")
  if _is_concrete(audio) and not np.all(np.isfinite(np.asarray(audio, np.float32))):
    raise ValueError(f"{field}: contains NaN or Inf")
  if lengths is None:
    return
  want = audio.shape[:1] if audio.ndim == 2 else ()
  if getattr(lengths, "shape", None) != want:
    got = getattr(lengths, "shape", type(lengths).__name__)
    raise ValueError(f"{field} lengths: expected shape {want}, got {got}")
  if not jnp.issubdtype(lengths.dtype, jnp.integer):
    raise TypeError(f"{field} lengths: expected an integer array, got dtype {lengths.dtype}")
  if _is_concrete(lengths):
    ln = np.asarray(lengths)
    if ln.size and (ln.min() < 1 or ln.max() > audio.shape[-1]):
      raise ValueError(f"{field} lengths: expected values in [1, {audio.shape[-1]}], got min {ln.min()}, "
                       f"max {ln.max()} (zero-length audio is not allowed)")


def _checked(audio, lengths):
  """Checks inputs; returns (B, T) float32 audio, (B,) int32 lengths (full when None), unbatch flag."""
  if lengths is not None and not hasattr(lengths, "dtype"):
    lengths = np.asarray(lengths)
  _check_audio(audio, lengths)
  audio = jnp.asarray(audio)
  single = audio.ndim == 1
  if single:
    audio = audio[None]
    lengths = None if lengths is None else jnp.asarray(lengths)[None]
  if lengths is None:
    lengths = jnp.full(audio.shape[:1], audio.shape[1], jnp.int32)
  return audio.astype(jnp.float32), jnp.asarray(lengths).astype(jnp.int32), single


def _unbatch(tree, single: bool):
  return jax.tree.map(lambda a: a[0], tree) if single else tree


def _padding(frame_length: int, center: bool) -> int:
  return frame_length // 2 if center else 0


def num_frames(num_samples, frame_length: int, hop_length: int, center: bool = True):
  """Frames librosa makes of `num_samples` samples (int or int array); 0 when too short and not centred."""
  pad = _padding(frame_length, center)
  extra = num_samples + 2 * pad - frame_length
  if isinstance(extra, (int, np.integer)):
    return 1 + extra // hop_length if extra >= 0 else 0
  return jnp.where(extra >= 0, 1 + jnp.maximum(extra, 0) // hop_length, 0).astype(jnp.int32)


def frame_lengths(lengths: jax.Array, config: FrontEndConfig) -> jax.Array:
  """Valid STFT frames (B,) for valid sample counts (B,) under `config`."""
  return num_frames(jnp.asarray(lengths), config.n_fft, config.hop_length, config.center)


def lengths_to_mask(lengths: jax.Array, size: int) -> jax.Array:
  """(B, size) bool mask, True at positions < lengths[b]."""
  return jnp.arange(size)[None, :] < jnp.asarray(lengths)[:, None]


def _masked_max(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Per-example max of x (B, F, ...) over frames where mask (B, F) is True."""
  m = mask.reshape(mask.shape + (1,) * (x.ndim - 2))
  return jnp.max(jnp.where(m, x, -jnp.inf), axis=tuple(range(1, x.ndim)))


# ---------------------------------------------------------------------------------------------
# Batched implementations: x (B, T) float32, n (B,) int32, no checks.


def _remove_dc(x, n):
  valid = lengths_to_mask(n, x.shape[1])
  mean = jnp.sum(jnp.where(valid, x, 0.0), axis=1, keepdims=True) / n[:, None]
  return jnp.where(valid, x - mean, 0.0)


def _frame(x, n, frame_length, hop_length, center, pad_mode):
  T = x.shape[1]
  pad = _padding(frame_length, center)
  total = num_frames(T, frame_length, hop_length, center)
  if total == 0:
    raise ValueError(f"audio: {T} samples are fewer than frame_length={frame_length} with center=False")
  slots = jnp.arange(T + 2 * pad)[None, :]  # (1, P)
  pos = slots - pad  # sample index each padded slot reads
  nn = n[:, None]
  if pad_mode == "reflect" and pad:
    # numpy's reflection is periodic (period 2 (n - 1)), also where the padding outruns the clip.
    period = 2 * (nn - 1)
    pos = jnp.abs(pos) % jnp.maximum(period, 1)
    pos = jnp.where(pos >= nn, period - pos, pos)
    inside = slots < nn + 2 * pad
  else:
    inside = (pos >= 0) & (pos < nn)
  padded = jnp.where(inside, jnp.take_along_axis(x, jnp.clip(pos, 0, T - 1), axis=1), 0.0)  # (B, P)
  idx = np.arange(total)[:, None] * hop_length + np.arange(frame_length)[None, :]  # (F, L)
  return padded[:, idx]  # (B, F, L)


def _trim(x, n, top_db, frame_length, hop_length):
  T = x.shape[1]
  frames = _frame(x, n, frame_length, hop_length, True, "constant")  # (B, F, L)
  mean_sq = jnp.mean(frames * frames, axis=-1)  # (B, F) RMS^2
  fmask = lengths_to_mask(num_frames(n, frame_length, hop_length), frames.shape[1])
  amin = 1e-10  # librosa.amplitude_to_db's amin (1e-5) squared
  db = 10.0 * jnp.log10(jnp.maximum(amin, mean_sq))
  db = db - 10.0 * jnp.log10(jnp.maximum(amin, _masked_max(mean_sq, fmask)))[:, None]
  loud = (db > -top_db) & fmask  # (B, F)
  any_loud = jnp.any(loud, axis=1)
  first = jnp.argmax(loud, axis=1)
  last = loud.shape[1] - 1 - jnp.argmax(loud[:, ::-1], axis=1)
  start = jnp.where(any_loud, first * hop_length, 0).astype(jnp.int32)
  end = jnp.where(any_loud, jnp.minimum(n, (last + 1) * hop_length), 0).astype(jnp.int32)
  kept = end - start
  src = jnp.clip(start[:, None] + jnp.arange(T)[None, :], 0, T - 1)
  out = jnp.where(lengths_to_mask(kept, T), jnp.take_along_axis(x, src, axis=1), 0.0)
  return Trimmed(out, kept, jnp.stack([start, end], axis=1))


def _power_to_db(power, mask, ref, amin, top_db):
  expand = lambda v: v.reshape(v.shape + (1,) * (power.ndim - 1))
  db = 10.0 * jnp.log10(jnp.maximum(amin, power))
  if ref == "max":
    db = db - expand(10.0 * jnp.log10(jnp.maximum(amin, _masked_max(power, mask))))
  else:
    db = db - 10.0 * np.log10(max(amin, abs(float(ref))))
  if top_db is not None:
    db = jnp.maximum(db, expand(_masked_max(db, mask) - top_db))
  return db


def _features(x, n, config: FrontEndConfig, kind: str) -> Features:
  """The whole chain up to `kind` ("power", "mel", "log_mel" or "mfcc") on a batch."""
  if config.remove_dc:
    x = _remove_dc(x, n)
  if config.trim_db is not None:
    trimmed = _trim(x, n, config.trim_db, config.trim_frame_length, config.trim_hop_length)
    x, n = trimmed.audio, jnp.maximum(trimmed.lengths, 1)
  frames = _frame(x, n, config.n_fft, config.hop_length, config.center, config.pad_mode)
  win = stft_window(config.window, config.win_length or config.n_fft, config.n_fft)
  spec = jnp.fft.rfft(frames * win, axis=-1)  # (B, F, n_freqs) complex
  values = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
  if config.power != 2.0:
    values = values ** (config.power / 2.0)
  flen = frame_lengths(n, config)
  mask = lengths_to_mask(flen, values.shape[1])  # (B, F)
  if kind != "power":
    fb = mel_filterbank(config.sample_rate, config.n_fft, config.n_mels, config.fmin, config.fmax,
                        config.htk, config.mel_norm)  # (n_mels, n_freqs)
    values = jnp.einsum("bfk,mk->bfm", values, fb, precision=HIGHEST)
  if kind in ("log_mel", "mfcc"):
    values = _power_to_db(values, mask, config.ref, config.amin, config.top_db)
  if kind == "mfcc":
    basis = dct_matrix(config.n_mels, config.n_mfcc, config.lifter)  # (n_mels, n_mfcc)
    values = jnp.einsum("bfm,mc->bfc", values, basis, precision=HIGHEST)
  values = jnp.where(mask[..., None], values, config.pad_value)
  return Features(values, flen, mask)


# ---------------------------------------------------------------------------------------------
# Public functions: (B, T) or (T,) audio, optional lengths; checked when concrete.


def remove_dc(audio: jax.Array, lengths: jax.Array | None = None) -> jax.Array:
  """Subtracts each example's mean over its valid samples; samples past `lengths` become 0."""
  x, n, single = _checked(audio, lengths)
  return _unbatch(_remove_dc(x, n), single)


def frame(audio: jax.Array, lengths: jax.Array | None = None, *, frame_length: int,
          hop_length: int, center: bool = True, pad_mode: str = "constant") -> jax.Array:
  """Overlapping frames (B, F, frame_length) of audio (B, T), padded per example like librosa.

  With `center`, each clip is padded by frame_length // 2 on both sides of its own valid extent:
  zeros ('constant') or a mirror image without the edge sample ('reflect', numpy's mode, which
  keeps reflecting where the padding is longer than the clip). Samples past `lengths`
  never enter a frame; frames past `num_frames(lengths)` are to be masked by callers.
  """
  if pad_mode not in PAD_MODES:
    raise ValueError(f"pad_mode: expected one of {PAD_MODES}, got {pad_mode!r}")
  x, n, single = _checked(audio, lengths)
  return _unbatch(_frame(x, n, frame_length, hop_length, center, pad_mode), single)


def trim_silence(audio: jax.Array, lengths: jax.Array | None = None, *, top_db: float = 60.0,
                 frame_length: int = 2048, hop_length: int = 512) -> Trimmed:
  """librosa.effects.trim at a fixed shape: keeps [start, end) and shifts it to the front.

  A frame (RMS over `frame_length` samples, zero-padded and centred) is non-silent when it is
  within `top_db` dB of the loudest frame of its clip; the kept interval runs from the first
  non-silent frame's start to one hop past the last (capped at the clip's length), in samples.
  """
  if top_db < 0:
    raise ValueError(f"top_db: expected >= 0, got {top_db}")
  x, n, single = _checked(audio, lengths)
  return _unbatch(_trim(x, n, top_db, frame_length, hop_length), single)


def power_to_db(power: jax.Array, mask: jax.Array | None = None, *, ref: float | str = 1.0,
                amin: float = 1e-10, top_db: float | None = 80.0) -> jax.Array:
  """librosa.power_to_db per example over power (B, F, ...) with frames masked by (B, F).

  `ref="max"` and the `top_db` clip use each example's maximum over its valid frames only, so
  padding does not change the result. Masked frames are left as computed.
  """
  if amin <= 0:
    raise ValueError(f"amin: expected > 0, got {amin}")
  if top_db is not None and top_db < 0:
    raise ValueError(f"top_db: expected >= 0 or None, got {top_db}")
  if not (ref == "max" or (isinstance(ref, (int, float)) and ref > 0)):
    raise ValueError(f"ref: expected a positive number or 'max', got {ref!r}")
  if getattr(power, "ndim", 0) < 2:
    raise ValueError(f"power: expected shape (B, F, ...), got {getattr(power, 'shape', None)}")
  if mask is None:
    mask = jnp.ones(power.shape[:2], bool)
  elif getattr(mask, "shape", None) != power.shape[:2]:
    raise ValueError(f"mask: expected shape {power.shape[:2]}, got {getattr(mask, 'shape', None)}")
  return _power_to_db(jnp.asarray(power, jnp.float32), jnp.asarray(mask, bool), ref, amin, top_db)


def power_spectrogram(audio: jax.Array, lengths: jax.Array | None = None,
                      config: FrontEndConfig = FrontEndConfig()) -> Features:
  """|STFT|^power (B, F, n_fft // 2 + 1), librosa's `stft` framing and window, transposed."""
  x, n, single = _checked(audio, lengths)
  return _unbatch(_features(x, n, config, "power"), single)


def mel_spectrogram(audio: jax.Array, lengths: jax.Array | None = None,
                    config: FrontEndConfig = FrontEndConfig()) -> Features:
  """Mel power spectrogram (B, F, n_mels): `librosa.feature.melspectrogram` transposed."""
  x, n, single = _checked(audio, lengths)
  return _unbatch(_features(x, n, config, "mel"), single)


def log_mel(audio: jax.Array, lengths: jax.Array | None = None,
            config: FrontEndConfig = FrontEndConfig()) -> Features:
  """Log-mel in dB (B, F, n_mels): `power_to_db(melspectrogram(...))` in librosa terms, transposed."""
  x, n, single = _checked(audio, lengths)
  return _unbatch(_features(x, n, config, "log_mel"), single)


def mfcc(audio: jax.Array, lengths: jax.Array | None = None,
         config: FrontEndConfig = FrontEndConfig()) -> Features:
  """MFCCs (B, F, n_mfcc): DCT-II (ortho) of the log-mel, `librosa.feature.mfcc` transposed."""
  _check_mfcc(config)
  x, n, single = _checked(audio, lengths)
  return _unbatch(_features(x, n, config, "mfcc"), single)


class _Extractor:
  """A jitted feature function of a fixed config; checks concrete inputs before calling it."""

  kind = ""

  def __init__(self, config: FrontEndConfig | None = None, **overrides):
    config = config or FrontEndConfig()
    self.config = dataclasses.replace(config, **overrides) if overrides else config
    self._fn = jax.jit(functools.partial(_FEATURES[self.kind], config=self.config))

  def __call__(self, audio, lengths=None) -> Features:
    """audio (B, T) or (T,) float; lengths (B,) or () int valid samples; returns `Features`."""
    if lengths is not None and not hasattr(lengths, "dtype"):
      lengths = np.asarray(lengths)
    _check_audio(audio, lengths)
    if lengths is None:
      lengths = np.full(np.shape(audio)[:-1], np.shape(audio)[-1], np.int32)
    return self._fn(audio, lengths)

  def __repr__(self) -> str:
    return f"{type(self).__name__}({self.config})"


class LogMel(_Extractor):
  """Log-mel front end as a callable: `LogMel(n_mels=64)(audio, lengths)` -> `Features`.

  Holds no parameters; takes numpy or JAX input, eagerly or inside a traced model. Calls with the
  same shapes share one compilation whatever the lengths.

  Attributes:
    config: the `FrontEndConfig` (a base config updated with keyword overrides).
  """

  kind = "log_mel"


class Mfcc(_Extractor):
  """MFCC front end as a callable: `Mfcc(n_mfcc=13)(audio, lengths)` -> `Features`.

  Attributes:
    config: the `FrontEndConfig` (a base config updated with keyword overrides).
  """

  kind = "mfcc"

  def __init__(self, config: FrontEndConfig | None = None, **overrides):
    super().__init__(config, **overrides)
    _check_mfcc(self.config)


_FEATURES = {"log_mel": log_mel, "mfcc": mfcc}
