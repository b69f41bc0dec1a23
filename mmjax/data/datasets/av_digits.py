"""AV digits: scikit-learn's handwritten 8x8 digits paired with spoken digit names.

Each record pairs one image from `sklearn.datasets.load_digits` (1,797 real handwritten digits,
values 0..16 rescaled to uint8 0..255) with the spoken name of its digit ("zero".."nine"),
synthesized offline by espeak-ng (`espeak-ng -v <voice> -s <speed> -p <pitch> --stdout <word>`)
and made noisy in numpy:

- the audio is resampled from espeak-ng's 22,050 Hz to 16 kHz (polyphase), trimmed of leading
  and trailing silence (frames 40 dB below the loudest), cropped to 1 s, made noisy with white
  Gaussian noise of RMS `noise` x the speech's RMS over the spoken samples, then zero-padded to
  1 s; `audio_len` counts the spoken samples;
- images: a seeded permutation puts 20% of the sklearn digits in the test pool, the rest in the
  train pool, so no image appears in both splits;
- voices: the test split speaks with voices (accent + variant) that training never hears
  (`TRAIN_VOICES` / `TEST_VOICES`); speeds and pitches come from the same grids in both splits.

Record `i` of a split draws its image, voice, speed, pitch and noise from
`numpy.random.default_rng([seed, split_id, i])`, so it does not depend on how many records are
generated. Each (voice, speed, pitch, word) is synthesized once per build and reused.

Records decode to: index () int32 (the record's number in its split; TFDS stores records in
a shuffled order), image (8, 8, 1) uint8, digit_index () int32 (index into sklearn's digits),
label () int64 (0..9), audio (16000,) float32, audio_len () int32, voice bytes, speed () int32
(words per minute), pitch () int32 (0..99), noise () float32.

Needs the `espeak-ng` program (Debian/Ubuntu: `apt-get install espeak-ng`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
import math
import os
import shutil
import subprocess
from typing import Any, Iterator

import numpy as np
import soundfile
import tensorflow_datasets as tfds
from etils import epath
from scipy import signal

from mmjax.data.datasets import default_data_dir
from mmjax.data.pp.audio import nonsilent_interval

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-us+m3", "en-gb+f2", "en-us+klatt")
TEST_VOICES = ("en-029", "en-gb-x-gbclan+f4", "en-gb-x-gbcwmd+m5")
SPEEDS = (130, 160, 190)
PITCHES = (30, 50, 70)
NOISE_LEVELS = (0.0, 0.05, 0.1, 0.2)
SAMPLE_RATE = 16_000
NUM_SAMPLES = 16_000  # 1 s
TEST_FRACTION = 0.2
TRIM_DB = 40.0
ESPEAK = "espeak-ng"
_SPLIT_IDS = {"train": 0, "test": 1}


def _check_espeak() -> str:
  """The espeak-ng executable's path, or a RuntimeError saying how to install it."""
  path = shutil.which(ESPEAK)
  if path is None:
    raise RuntimeError(f"av_digits needs the {ESPEAK!r} program to synthesize speech, and it is "
                       "not on PATH; install it with `apt-get install espeak-ng`")
  return path


@functools.lru_cache(maxsize=None)
def synthesize(voice: str, speed: int, pitch: int, word: str) -> np.ndarray:
  """(T,) float32 speech at 16 kHz, silence trimmed, of `word` (read-only, cached)."""
  proc = subprocess.run([_check_espeak(), "-v", voice, "-s", str(speed), "-p", str(pitch),
                         "--stdout", word], capture_output=True, check=False)
  if proc.returncode != 0 or not proc.stdout:
    raise RuntimeError(f"espeak-ng failed for voice={voice!r} speed={speed} pitch={pitch} "
                       f"word={word!r}: {proc.stderr.decode(errors='replace').strip()}")
  wave, rate = soundfile.read(io.BytesIO(proc.stdout), dtype="float32")
  g = math.gcd(rate, SAMPLE_RATE)
  wave = signal.resample_poly(wave, SAMPLE_RATE // g, rate // g).astype(np.float32)
  start, end = nonsilent_interval(wave, TRIM_DB, 2048, 512)
  wave = wave[start:end]
  if wave.size == 0:
    raise RuntimeError(f"espeak-ng produced silence for voice={voice!r} word={word!r}")
  wave.setflags(write=False)
  return wave


def image_pools(seed: int) -> dict[str, np.ndarray]:
  """Indices into sklearn's digits of the train and test image pools (disjoint)."""
  from sklearn.datasets import load_digits

  n = len(load_digits().target)
  perm = np.random.default_rng([seed, 99]).permutation(n)
  n_test = round(n * TEST_FRACTION)
  return {"test": np.sort(perm[:n_test]), "train": np.sort(perm[n_test:])}


@dataclasses.dataclass
class AvDigitsConfig(tfds.core.BuilderConfig):
  """Builder config; smaller ones (fewer records, digits, voices) for tests.

  Attributes:
    num_examples: (split, count) pairs.
    digits: the digit classes used.
    train_voices: espeak-ng voices of the train split.
    test_voices: espeak-ng voices of the test split (disjoint from `train_voices`).
    speeds: speaking rates in words per minute.
    pitches: espeak-ng pitches (0..99).
    noise_levels: noise RMS relative to the speech RMS.
    seed: seed of the image split and of every record.
  """

  num_examples: tuple[tuple[str, int], ...] = (("train", 3000), ("test", 600))
  digits: tuple[int, ...] = tuple(range(10))
  train_voices: tuple[str, ...] = TRAIN_VOICES
  test_voices: tuple[str, ...] = TEST_VOICES
  speeds: tuple[int, ...] = SPEEDS
  pitches: tuple[int, ...] = PITCHES
  noise_levels: tuple[float, ...] = NOISE_LEVELS
  seed: int = 0

  def __post_init__(self):
    shared = set(self.train_voices) & set(self.test_voices)
    if shared:
      raise ValueError(f"AvDigitsConfig: train and test voices must be disjoint; shared: {sorted(shared)}")
    if not set(self.digits) <= set(range(10)) or not self.digits:
      raise ValueError(f"AvDigitsConfig.digits must be a non-empty subset of 0..9, got {self.digits}")


def example_plan(config: AvDigitsConfig, split: str, index: int,
                 pool: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
  """The random choices of record `index` of `split` (image, voice, speed, pitch, noise)."""
  rng = np.random.default_rng([config.seed, _SPLIT_IDS[split], index])
  candidates = pool[np.isin(targets[pool], config.digits)]
  digit_index = int(candidates[rng.integers(len(candidates))])
  voices = config.train_voices if split == "train" else config.test_voices
  return dict(
      digit_index=digit_index,
      label=int(targets[digit_index]),
      voice=voices[rng.integers(len(voices))],
      speed=int(config.speeds[rng.integers(len(config.speeds))]),
      pitch=int(config.pitches[rng.integers(len(config.pitches))]),
      noise=float(config.noise_levels[rng.integers(len(config.noise_levels))]),
      noise_seed=int(rng.integers(2**31)),
  )


def make_audio(speech: np.ndarray, noise: float, noise_seed: int) -> tuple[np.ndarray, int]:
  """(NUM_SAMPLES,) float32 noisy speech, zero-padded, and the number of spoken samples."""
  clip = speech[:NUM_SAMPLES]
  rms = float(np.sqrt(np.mean(np.square(clip, dtype=np.float64))))
  noisy = clip + noise * rms * np.random.default_rng(noise_seed).standard_normal(clip.shape[0])
  out = np.zeros(NUM_SAMPLES, np.float32)
  out[:clip.shape[0]] = noisy
  return out, clip.shape[0]


class AvDigits(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of AV digits (see the module docstring); array_record, no TensorFlow needed."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [AvDigitsConfig(name="default", description="3,000 train / 600 test.")]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    """This file. TFDS's own lookup needs the `importlib_resources` package for modules that
    are not `__main__`, and fails without it."""
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    """Feature spec."""
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "index": tfds.features.Scalar(np.int32),
            "image": tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            "digit_index": tfds.features.Scalar(np.int32),
            "label": tfds.features.ClassLabel(names=WORDS),
            "audio": tfds.features.Tensor(shape=(NUM_SAMPLES,), dtype=np.float32),
            "audio_len": tfds.features.Scalar(np.int32),
            "voice": tfds.features.Text(),
            "speed": tfds.features.Scalar(np.int32),
            "pitch": tfds.features.Scalar(np.int32),
            "noise": tfds.features.Scalar(np.float32),
        }),
        supervised_keys=None,
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    """One generator per configured split; checks for espeak-ng first."""
    del dl_manager  # Nothing to download.
    _check_espeak()
    unknown = sorted({s for s, _ in self.builder_config.num_examples} - set(_SPLIT_IDS))
    if unknown:
      raise ValueError(f"AvDigitsConfig.num_examples: unknown splits {unknown}; use train/test")
    return {split: self._generate_examples(split, n)
            for split, n in self.builder_config.num_examples}

  def _generate_examples(self, split: str, num: int) -> Iterator[tuple[int, dict]]:
    """Yields (key, record); synthesizes the needed (voice, speed, pitch, word)s in parallel first."""
    from sklearn.datasets import load_digits

    cfg = self.builder_config
    digits = load_digits()
    targets = digits.target.astype(np.int64)
    pool = image_pools(cfg.seed)[split]
    plans = [example_plan(cfg, split, i, pool, targets) for i in range(num)]
    keys = sorted({(p["voice"], p["speed"], p["pitch"], WORDS[p["label"]]) for p in plans})
    with concurrent.futures.ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool_exec:
      list(pool_exec.map(lambda k: synthesize(*k), keys))
    for i, p in enumerate(plans):
      speech = synthesize(p["voice"], p["speed"], p["pitch"], WORDS[p["label"]])
      audio, length = make_audio(speech, p["noise"], p["noise_seed"])
      image = np.rint(digits.images[p["digit_index"]] * (255.0 / 16.0)).astype(np.uint8)
      yield i, dict(index=i, image=image[..., None], digit_index=p["digit_index"], label=p["label"],
                    audio=audio, audio_len=length, voice=p["voice"], speed=p["speed"],
                    pitch=p["pitch"], noise=p["noise"])


def load(split: str, data_dir: str | os.PathLike | None = None, *,
         config: AvDigitsConfig | str | None = None):
  """Random-access source (TFDS `ArrayRecordDataSource`) of `split`, built on first use.

  Args:
    split: "train" or "test" (TFDS slicing such as "train[:10%]" works too).
    data_dir: default `$MMJAX_DATA_DIR`, else `~/.cache/mmjax/datasets`.
    config: an `AvDigitsConfig` (e.g. a small one for tests) or a config name; default "default".
  """
  return tfds.data_source(
      "av_digits", split=split, data_dir=str(default_data_dir(data_dir)),
      builder_kwargs={"file_format": "array_record",
                      **({"config": config} if config is not None else {})},
      download_and_prepare_kwargs={"download_config": tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP)})
