"""Audio pp ops: load, resample, DC offset, silence trim, pad/crop, log-mel/MFCC, SpecAugment.

A waveform travels as a float32 (T,) mono array in field `key` with its sample rate in
`{key}_sr`; `audio.pad_or_crop` adds the number of real samples in `{key}_len` (TFDS records
may carry it too). Ops that change the length (resample, trim) keep only the real samples and
drop `{key}_len`; pad_or_crop sets it again. Spectrogram features are (frames, bins) float32.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os

import numpy as np
import soundfile
from scipy import signal

from mmjax.data.pp.registry import Example, bad, field, record_name, register


def get_wave(example: Example, key: str) -> np.ndarray:
  """The (T,) waveform in `example[key]`, or a TypeError naming record and field."""
  x = field(example, key)
  if not isinstance(x, np.ndarray) or x.ndim != 1 or not np.issubdtype(x.dtype, np.floating):
    what = f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
    raise TypeError(f"{record_name(example)}: field {key!r}: expected a float (T,) waveform, got "
                    f"{what}; put audio.load first")
  return x


def valid_wave(example: Example, key: str) -> np.ndarray:
  """The waveform cut to its `{key}_len` real samples when that field is present."""
  x = get_wave(example, key)
  if f"{key}_len" in example:
    return x[:int(np.asarray(example[f"{key}_len"]))]
  return x


def _with_wave(example: Example, out: str, wave: np.ndarray, **extra) -> Example:
  """`example` with waveform `wave` in `out`, which is all real samples: `{out}_len` is dropped."""
  new = {**example, out: wave, **extra}
  new.pop(f"{out}_len", None)
  return new


def get_rate(example: Example, key: str, given: int | None = None) -> int:
  """The sample rate: `given` if set, else field `{key}_sr`, else an error."""
  if given is not None:
    return int(given)
  if f"{key}_sr" not in example:
    raise ValueError(f"{record_name(example)}: field {key!r} has no sample rate: no field "
                     f"{key + '_sr'!r}; pass sr= to audio.load or to this op")
  return int(np.asarray(example[f"{key}_sr"]))


def _to_float(x: np.ndarray) -> np.ndarray:
  """Integer PCM to float32 in [-1, 1) (unsigned as offset binary: 128 is silence for uint8);
  floats cast to float32."""
  if np.issubdtype(x.dtype, np.signedinteger):
    return (x / float(-np.iinfo(x.dtype).min)).astype(np.float32)
  if np.issubdtype(x.dtype, np.unsignedinteger):
    half = float(np.iinfo(x.dtype).max // 2 + 1)
    return ((x - half) / half).astype(np.float32)
  return x.astype(np.float32)


@register("audio.load")
@dataclasses.dataclass
class Load:
  """Reads a waveform: a file path (str), encoded file bytes (WAV/FLAC/OGG), or a PCM array.

  Writes a float32 mono (T,) waveform (integer PCM scaled to [-1, 1), then channels averaged) and,
  when known, its rate in `{outkey}_sr`. A PCM array is (T,) or (T, channels) (transpose the
  (channels, T) layout of torchaudio or librosa). A missing, unreadable or zero-length file is a
  `BadExample`.

  Attributes:
    sr: sample rate of raw arrays (files carry their own); None leaves `{outkey}_sr` as it is.
    root: folder that relative paths are read from.
  """

  sr: int | None = None
  root: str | None = None
  key: str = "audio"
  outkey: str | None = None

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    x = field(example, self.key)
    out = self.outkey or self.key
    if isinstance(x, np.ndarray) and x.dtype.kind in "OSU" and x.ndim == 0:
      x = x.item()
    rate = self.sr
    if isinstance(x, str):
      path = os.path.join(self.root, x) if self.root else x
      if not os.path.isfile(path):
        raise bad(example, self.key, f"audio file not found: {path!r}")
      if os.path.getsize(path) == 0:
        raise bad(example, self.key, f"audio file is empty (zero bytes): {path!r}")
      wave, rate = self._read(example, path)
    elif isinstance(x, (bytes, np.bytes_)):
      if not x:
        raise bad(example, self.key, "audio bytes are empty")
      wave, rate = self._read(example, io.BytesIO(x))
    elif isinstance(x, np.ndarray) and x.dtype.kind in "iuf" and x.ndim in (1, 2):
      if x.ndim == 2 and x.shape[1] >= x.shape[0]:
        raise ValueError(f"{record_name(example)}: field {self.key!r}: a 2-D PCM array must be "
                         f"(T, channels) with more samples than channels, got shape {x.shape}; "
                         "transpose a (channels, T) array")
      wave = _to_float(x)
      wave = wave if wave.ndim == 1 else wave.mean(axis=1)
    else:
      what = f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
      raise TypeError(f"{record_name(example)}: field {self.key!r}: expected a path, audio file "
                      f"bytes or a PCM array, got {what}")
    if wave.shape[0] == 0:
      raise bad(example, self.key, "audio has zero length")
    new = {**example, out: wave}
    if rate is not None:
      new[f"{out}_sr"] = np.int32(rate)
    return new

  def _read(self, example: Example, src) -> tuple[np.ndarray, int]:
    """(mono float32 wave, rate) from a path or file object."""
    try:
      wave, rate = soundfile.read(src, dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, ValueError) as e:
      raise bad(example, self.key, f"cannot read audio ({e})") from None
    return wave.mean(axis=1), rate


@register("audio.resample")
@dataclasses.dataclass
class Resample:
  """Polyphase resampling (scipy.signal.resample_poly) to `sr`; updates `{outkey}_sr`.

  Resamples the `{key}_len` real samples when that field is present, and drops `{outkey}_len`.

  Attributes:
    sr: target rate in Hz.
    in_sr: source rate; default: field `{key}_sr`.
  """

  sr: int = 16000
  in_sr: int | None = None
  key: str = "audio"
  outkey: str | None = None

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    x = valid_wave(example, self.key)
    src = get_rate(example, self.key, self.in_sr)
    out = self.outkey or self.key
    if src != self.sr:
      g = math.gcd(src, self.sr)
      x = signal.resample_poly(x, self.sr // g, src // g).astype(np.float32)
    return _with_wave(example, out, x, **{f"{out}_sr": np.int32(self.sr)})


@register("audio.dc_offset")
@dataclasses.dataclass
class DcOffset:
  """Removes the DC offset: subtracts the mean of the real samples (padding stays zero)."""

  key: str = "audio"
  outkey: str | None = None

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    x = get_wave(example, self.key)
    n = valid_wave(example, self.key).shape[0]
    y = np.zeros_like(x, np.float32)
    y[:n] = x[:n] - x[:n].mean()
    return {**example, self.outkey or self.key: y}


def nonsilent_interval(x: np.ndarray, top_db: float, frame_length: int,
                       hop_length: int) -> tuple[int, int]:
  """[start, end) of the frames louder than max - top_db (librosa.effects.trim's rule)."""
  pad = frame_length // 2
  frames = np.lib.stride_tricks.sliding_window_view(np.pad(x, pad), frame_length)[::hop_length]
  power = np.mean(np.square(frames, dtype=np.float64), axis=-1)  # (F,) mean-square per frame
  amin = 1e-10
  db = 10 * np.log10(np.maximum(power, amin)) - 10 * np.log10(max(power.max(), amin))
  loud = np.flatnonzero(db > -top_db)
  if loud.size == 0:
    return 0, 0
  return int(loud[0] * hop_length), min(x.shape[0], int((loud[-1] + 1) * hop_length))


@register("audio.trim")
@dataclasses.dataclass
class Trim:
  """Trims leading and trailing silence: frames quieter than `top_db` below the loudest frame.

  Like `audio.resample`, it first cuts the waveform to `{key}_len` real samples when that field
  is present, and drops `{outkey}_len` (every sample left is real).
  """

  top_db: float = 60.0
  frame_length: int = 2048
  hop_length: int = 512
  key: str = "audio"
  outkey: str | None = None

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    x = valid_wave(example, self.key)
    start, end = nonsilent_interval(x, self.top_db, self.frame_length, self.hop_length)
    return _with_wave(example, self.outkey or self.key, x[start:end])


@register("audio.pad_or_crop")
@dataclasses.dataclass
class PadOrCrop:
  """Zero-pads (at the end) or crops to a fixed length; writes the real length to `{outkey}_len`.

  An input `{key}_len` marks its real samples; only those are kept before padding or cropping.

  Attributes:
    seconds: target duration (needs the sample rate); or
    samples: target length in samples.
    mode: where to crop a long waveform: "start" (keep the beginning), "center" or "random".
  """

  seconds: float | None = None
  samples: int | None = None
  mode: str = "start"
  key: str = "audio"
  outkey: str | None = None

  def __post_init__(self):
    if (self.seconds is None) == (self.samples is None):
      raise ValueError("audio.pad_or_crop: give exactly one of seconds= or samples=")
    if self.mode not in ("start", "center", "random"):
      raise ValueError(f"audio.pad_or_crop: mode must be start, center or random, got {self.mode!r}")

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    x = valid_wave(example, self.key)
    n = self.samples if self.samples is not None else round(
        self.seconds * get_rate(example, self.key))
    extra = x.shape[0] - n
    if extra > 0:
      start = {"start": 0, "center": extra // 2}.get(self.mode)
      if start is None:
        start = int(rng.integers(0, extra + 1))
      y, length = x[start:start + n], n
    else:
      y, length = np.pad(x, (0, -extra)), x.shape[0]
    out = self.outkey or self.key
    return {**example, out: y.astype(np.float32), f"{out}_len": np.int32(length)}


class _FrontEnd:
  """Runs a `mmjax.encoders.audio_frontend` extractor on one waveform, on the CPU.

  The jitted extractor is built on first use in each process (and not pickled), and compiles
  once per waveform length, so pad_or_crop first to keep one compilation.
  """

  op = ""  # the registered name, after "audio."
  default_outkey = ""
  extractor = ""  # the audio_frontend class

  def __init__(self, key: str = "audio", outkey: str | None = None, **config):
    from mmjax.encoders import audio_frontend  # Imported here: it starts JAX.
    self.key, self.outkey = key, outkey or self.default_outkey
    self.config = audio_frontend.FrontEndConfig(**config)
    self._extract = None

  def __getstate__(self):
    return {**self.__dict__, "_extract": None}

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    import jax
    from mmjax.encoders import audio_frontend

    x = get_wave(example, self.key)
    rate = self.config.sample_rate
    if f"{self.key}_sr" in example and get_rate(example, self.key) != rate:
      raise ValueError(f"{record_name(example)}: field {self.key!r} is sampled at "
                       f"{get_rate(example, self.key)} Hz but audio.{self.op} is configured for "
                       f"sample_rate={rate}; put audio.resample({rate}) first")
    length = int(np.asarray(example.get(f"{self.key}_len", x.shape[0])))
    if length < 1:
      raise bad(example, self.key, "audio has zero length")
    if self._extract is None:
      self._extract = getattr(audio_frontend, self.extractor)(self.config)
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
      feats = self._extract(x.astype(np.float32), np.asarray(length, np.int32))
    return {**example, self.outkey: np.asarray(feats.values, np.float32),
            f"{self.outkey}_len": np.int32(feats.lengths), f"{self.outkey}_mask": np.asarray(feats.mask)}

  def __repr__(self) -> str:
    return f"audio.{self.op}(key={self.key!r}, outkey={self.outkey!r}, {self.config})"


@register("audio.log_mel")
class LogMel(_FrontEnd):
  """Log-mel spectrogram in dB, (frames, n_mels) float32, from the JAX audio front end.

  Writes `outkey` (default "mel"), `{outkey}_len` (valid frames, from `{key}_len` when present)
  and `{outkey}_mask` (frames,) bool.

  Args:
    key: (T,) float waveform field; its rate (`{key}_sr`) must equal `sample_rate`.
    outkey: feature field, default "mel".
    **config: `mmjax.encoders.audio_frontend.FrontEndConfig` fields (sample_rate, n_fft,
      hop_length, n_mels, ...).
  """

  op, default_outkey, extractor = "log_mel", "mel", "LogMel"


@register("audio.mfcc")
class Mfcc(_FrontEnd):
  """MFCCs, (frames, n_mfcc) float32, from the JAX audio front end; fields as `audio.log_mel`.

  Args:
    key: (T,) float waveform field; its rate (`{key}_sr`) must equal `sample_rate`.
    outkey: feature field, default "mfcc".
    **config: `mmjax.encoders.audio_frontend.FrontEndConfig` fields (n_mfcc, n_mels, ...).
  """

  op, default_outkey, extractor = "mfcc", "mfcc", "Mfcc"


@register("audio.spec_augment")
@dataclasses.dataclass
class SpecAugment:
  """SpecAugment masking (Park et al. 2019) of a (frames, bins) spectrogram.

  Each of `time_masks` masks sets `w ~ U{0..time_width}` consecutive frames to `fill`, and each of
  `freq_masks` masks sets `w ~ U{0..freq_width}` consecutive bins; masks may overlap.

  Attributes:
    fill: the masked value, or "mean" for the spectrogram's mean.
  """

  time_masks: int = 2
  time_width: int = 10
  freq_masks: int = 2
  freq_width: int = 8
  fill: float | str = 0.0
  key: str = "mel"
  outkey: str | None = None

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    x = field(example, self.key)
    if not isinstance(x, np.ndarray) or x.ndim != 2:
      what = f"shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
      raise TypeError(f"{record_name(example)}: field {self.key!r}: expected a (frames, bins) "
                      f"spectrogram, got {what}")
    y = x.astype(np.float32, copy=True)
    fill = float(x.mean()) if self.fill == "mean" else float(self.fill)
    for axis, count, width in ((0, self.time_masks, self.time_width),
                               (1, self.freq_masks, self.freq_width)):
      size = y.shape[axis]
      for _ in range(count):
        w = int(rng.integers(0, min(width, size) + 1))
        s = int(rng.integers(0, size - w + 1))
        if axis == 0:
          y[s:s + w, :] = fill
        else:
          y[:, s:s + w] = fill
    return {**example, self.outkey or self.key: y}
