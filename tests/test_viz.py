"""Figures: pixel sizes, not blank, attention peaks where they should, counts rendered, VQA attention."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from mmjax import viz
from mmjax.layers.attention import make_attention_mask
from mmjax.models.vqa import VQAModel


def test_infer_grid():
  assert viz.infer_grid(25, (75, 75)) == (5, 5)
  assert viz.infer_grid(6, (60, 90)) == (2, 3)
  assert viz.infer_grid(12, (100, 300)) == (2, 6)
  assert viz.infer_grid(7, (10, 10)) in ((1, 7), (7, 1))


@pytest.mark.parametrize("image_hw,grid,peak,size_px,expected_px", [
    ((75, 75), (5, 5), (1, 3), 300, (300, 300)),
    ((60, 90), (2, 3), (1, 0), 270, (180, 270)),
])
def test_attention_overlay_peaks_at_the_peak_cell(image_hw, grid, peak, size_px, expected_px, tmp_path):
  h, w = grid
  attn = np.full(h * w, 0.1, np.float32)
  attn[peak[0] * w + peak[1]] = 1.0
  image = np.zeros(image_hw + (3,), np.uint8)  # black: the overlay's brightness is the heat map
  path = tmp_path / "overlay.png"
  fig = viz.attention_over_image(image, attn, None, cmap="gray", alpha=1.0, size_px=size_px, path=path)
  pixels = viz.figure_to_array(fig)
  assert pixels.shape == expected_px + (3,)
  assert pixels.var() > 0
  saved = np.asarray(Image.open(path))
  assert saved.shape[:2] == expected_px
  brightness = pixels.astype(np.float32).mean(-1)
  H, W = expected_px
  r, c = np.unravel_index(np.argmax(brightness), brightness.shape)
  assert (r * h // H, c * w // W) == peak
  cells = brightness.reshape(h, H // h, w, W // w).mean(axis=(1, 3))
  assert np.unravel_index(np.argmax(cells), cells.shape) == peak


def test_attention_panels_one_per_map():
  peaks = [(0, 4), (3, 1), (4, 4)]
  attn = np.full((3, 25), 0.1, np.float32)
  for i, (r, c) in enumerate(peaks):
    attn[i, r * 5 + c] = 1.0
  fig = viz.attention_over_image(np.zeros((75, 75, 3), np.uint8), attn, (5, 5), cmap="gray",
                                 alpha=1.0, size_px=150)
  brightness = viz.figure_to_array(fig).astype(np.float32).mean(-1)
  assert brightness.shape == (150, 450)
  for i, peak in enumerate(peaks):
    cells = brightness[:, 150 * i:150 * (i + 1)].reshape(5, 30, 5, 30).mean(axis=(1, 3))
    assert np.unravel_index(np.argmax(cells), cells.shape) == peak, i


def test_attention_overlay_rejects_bad_shapes():
  image = np.zeros((75, 75, 3), np.uint8)
  with pytest.raises(ValueError, match="attn"):
    viz.attention_over_image(image, np.ones(24), (5, 5))
  with pytest.raises(ValueError, match="attn"):
    viz.attention_over_image(image, np.ones((5, 5)), (5, 5))
  with pytest.raises(ValueError, match="image"):
    viz.attention_over_image(np.zeros((75, 75)), np.ones(25), (5, 5))


def test_confusion_matrix_renders_the_counts(tmp_path):
  cm = np.array([[5, 1, 0], [2, 7, 3], [0, 0, 9]])
  labels = ["yes", "no", "square"]
  fig = viz.confusion_matrix_figure(cm, labels, size_px=(400, 480), path=tmp_path / "cm.png")
  pixels = viz.figure_to_array(fig)
  assert pixels.shape == (400, 480, 3) and pixels.var() > 0
  ax = fig.axes[0]
  cells = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
  assert cells == {(i, j): str(cm[i, j]) for i in range(3) for j in range(3)}
  assert [t.get_text() for t in ax.get_xticklabels()] == labels
  normed = viz.confusion_matrix_figure(cm, labels, normalize=True)
  texts = sorted((round(t.get_position()[1]), round(t.get_position()[0]), t.get_text()) for t in normed.axes[0].texts)
  assert texts[3:6] == [(1, 0, "0.17"), (1, 1, "0.58"), (1, 2, "0.25")]
  with pytest.raises(ValueError, match="cm"):
    viz.confusion_matrix_figure(np.ones((2, 3)), ["a", "b"])
  with pytest.raises(ValueError, match="labels"):
    viz.confusion_matrix_figure(cm, ["a", "b"])


def test_caption_samples_figure():
  rng = np.random.default_rng(0)
  images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(5)]
  captions = [f"a caption number {i}" for i in range(5)]
  fig = viz.caption_samples_figure(images, captions, cols=3, panel_px=120)
  pixels = viz.figure_to_array(fig)
  assert pixels.shape == (2 * (120 + 60), 3 * 120, 3) and pixels.var() > 0
  assert sorted(t.get_text().replace("\n", " ") for ax in fig.axes for t in ax.texts) == captions
  with pytest.raises(ValueError, match="same number"):
    viz.caption_samples_figure(images, captions[:2])


def test_training_curves(tmp_path):
  with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
    viz.training_curves(tmp_path)
  rows = [{"step": s, "time": 0.0, "train/loss": 2.0 / s} for s in range(1, 6)] + [{"step": 5, "test/accuracy": 0.5}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  path = viz.training_curves(tmp_path)
  pixels = np.asarray(Image.open(path))
  assert pixels.ndim == 3 and pixels.var() > 0


def test_grouped_bars_heights_are_the_values(tmp_path):
  values = {"concat": {"both": 0.9, "no image": 0.4}, "film": {"both": 0.7, "no image": 0.2},
            "gated": {"both": 0.5, "no image": 0.6}}
  path = tmp_path / "bars.png"
  fig = viz.grouped_bars_figure(values, ylabel="accuracy", size_px=(300, 500), path=path)
  pixels = np.asarray(Image.open(path))
  assert pixels.shape[:2] == (300, 500) and pixels.std() > 5
  ax = fig.axes[0]
  heights = [round(p.get_height(), 6) for p in ax.patches]  # series by series, groups in order
  assert heights == [0.9, 0.7, 0.5, 0.4, 0.2, 0.6]
  assert [t.get_text() for t in ax.get_xticklabels()] == list(values)
  assert [t.get_text() for t in ax.get_legend().get_texts()] == ["both", "no image"]
  with pytest.raises(ValueError, match="series"):
    viz.grouped_bars_figure({"a": {"x": 1.0}, "b": {"y": 1.0}})


def tiny_vqa(fusion, **fusion_kwargs):
  return VQAModel(encoders={"image": {"name": "small_cnn", "features": 16, "channels": (8, 8, 8, 8),
                                     "norm": "layer", "coords": True},
                            "text": {"name": "rnn_text", "vocab_size": 30, "features": 16, "hidden": 8}},
                  fusion=fusion, fusion_kwargs=fusion_kwargs, features=16, num_answers=10,
                  image_shape=(75, 75, 3), question_len=8, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def cross_model():
  return tiny_vqa("cross_attention", depth=2)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(1)
  images = rng.uniform(size=(2, 75, 75, 3)).astype(np.float32)
  ids = rng.integers(5, 30, (2, 8)).astype(np.int32)
  mask = np.arange(8)[None] < np.array([[5], [8]])
  return images, np.where(mask, ids, 0), mask


def test_cross_attention_maps_are_the_models(cross_model, inputs):
  """viz switches the maps on for its call of a model built without them (the default): its map
  is the one the same model built with attention_maps=True returns, and the flag is restored."""
  images, ids, mask = inputs
  with_maps = tiny_vqa("cross_attention", depth=2, attention_maps=True)  # same seed: same parameters

  @nnx.jit
  def run(model, with_maps, images, ids, mask):
    attn, logits = viz.question_image_attention(model, images, ids, mask, layer=0)
    ref_logits, aux = model(images, ids, mask)
    maps_logits, maps_aux = with_maps(images, ids, mask)
    return (attn, logits, ref_logits, "cross_attention" in aux["fusion"], maps_logits,
            maps_aux["fusion"]["cross_attention"]["text"]["image"])

  attn, logits, ref_logits, has_maps, maps_logits, maps = jax.device_get(
      run(cross_model, with_maps, images, ids, mask))
  assert not has_maps and not cross_model.fusion.attention_maps  # off by default, and after viz
  per_token = maps[0].mean(1)  # layer 0, mean over heads: (B, N_text, N_image)
  ref = np.stack([per_token[b][mask[b]].mean(0) for b in range(2)])
  np.testing.assert_allclose(attn, ref / ref.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(logits, maps_logits)
  np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-6)  # fused vs reference kernel
  assert attn.shape == (2, 25)


def test_single_stream_attention_matches_explicit_softmax(inputs):
  model = tiny_vqa("single_stream", depth=2, num_heads=2)
  images, ids, mask = inputs

  @nnx.jit
  def run(model, images, ids, mask):
    got = [viz.question_image_attention(model, images, ids, mask, layer=layer)[0] for layer in (0, -1)]
    # The [CLS] row of softmax(q k^T / sqrt(d)) over the joint sequence [CLS, image, text].
    f = model.fusion
    img = model.encoders["image"](images).tokens
    txt = model.encoders["text"](ids, mask).tokens
    h = jnp.concatenate([jnp.broadcast_to(f.cls[...], (2, 1, 16)), f.modality_embed(f.proj["image"](img), 0),
                         f.modality_embed(f.proj["text"](txt), 1)], axis=1)
    h = f.embed_norm(h)
    joint = jnp.concatenate([jnp.ones((2, 26), bool), mask], axis=1)
    refs = []
    for block in f.encoder.layers:
      x = block.attn_norm(h)
      heads = lambda y: y.reshape(2, -1, 2, 8)  # (B, L, H, Dh)
      logits = jnp.einsum("bqhd,bkhd->bhqk", heads(block.attn.query(x)), heads(block.attn.key(x))) / np.sqrt(8)
      weights = jax.nn.softmax(jnp.where(joint[:, None, None, :], logits, -jnp.inf), axis=-1)
      ref = weights[:, :, 0, 1:26].mean(1)
      refs.append(ref / ref.sum(-1, keepdims=True))
      h = block(h, make_attention_mask(joint, joint))
    return got, refs

  got, refs = jax.device_get(run(model, images, ids, mask))
  for attn, ref in zip(got, refs):
    assert attn.shape == (2, 25)
    np.testing.assert_allclose(attn, ref, rtol=1e-4, atol=1e-6)
  assert not np.allclose(refs[0], refs[1])


def test_vqa_attention_figure_from_model(cross_model, inputs):
  images, ids, mask = inputs
  image = (images[0] * 255).astype(np.uint8)
  fig = viz.vqa_attention_figure(cross_model, image, (ids[0], mask[0]), size_px=200)
  pixels = viz.figure_to_array(fig)
  assert pixels.shape == (200, 200, 3) and pixels.var() > 0
  heads = cross_model.fusion.layers[0].cross.num_heads
  fig = viz.vqa_attention_figure(cross_model, image, (ids[0], mask[0]), size_px=100, head="all")
  assert viz.figure_to_array(fig).shape == (100, 100 * heads, 3)  # one panel per head
  with pytest.raises(ValueError, match="tokenizer"):
    viz.vqa_attention_figure(cross_model, image, "What shape is the red object?")
  film = nnx.eval_shape(lambda: tiny_vqa("film", condition="text"))
  with pytest.raises(ValueError, match="fusion"):
    viz.question_image_attention(film, images, ids, mask)


def test_attention_of_one_head(cross_model, inputs):
  images, ids, mask = inputs
  mean, _ = jax.device_get(viz.question_image_attention(cross_model, images, ids, mask))
  n_heads = cross_model.fusion.layers[0].cross.num_heads
  per = jax.device_get([viz.question_image_attention(cross_model, images, ids, mask, head=h)[0]
                        for h in range(n_heads)])
  # Each head's map sums to 1 over the image tokens, so their mean is the head-mean map.
  np.testing.assert_allclose(np.mean(per, axis=0), mean, atol=1e-6)
  assert n_heads > 1 and not np.allclose(per[0], per[1])
  np.testing.assert_array_equal(per[-1], viz.question_image_attention(cross_model, images, ids, mask, head=-1)[0])
  every, _ = jax.device_get(viz.question_image_attention(cross_model, images, ids, mask, head="all"))
  np.testing.assert_allclose(every, np.stack(per, axis=1), atol=1e-6)  # (B, H, N)
  with pytest.raises(ValueError, match="head"):
    viz.question_image_attention(cross_model, images, ids, mask, head=n_heads)
  with pytest.raises(ValueError, match="head"):
    viz.question_image_attention(cross_model, images, ids, mask, head="each")


SEED = int(os.environ.get("MMJAX_TEST_SEED", "0"))  # the trained-attention test's seed


def test_trained_attention_peaks_on_the_named_object():
  """A VQA model trained to say where the object of the named colour is (left/right x top/bottom)
  looks at that object: the question-to-image attention of its head that does the looking (chosen
  on training scenes) peaks on a grid cell the object covers, for unseen scenes, and rarely on
  another colour's object. Untrained, no head's peak follows the named object. Heads specialise (one of
  four finds the object, the others look elsewhere), so the property is asserted per head.

  Real Sort-of-CLEVR scenes (mmjax.data.scenes); the question is the colour as one token.
  """
  import optax
  from mmjax.data import scenes

  grid, size = 10, scenes.IMAGE_SIZE
  n_colors = len(scenes.COLORS)

  def batch(rng, n):
    images, answers, covers = [], [], []
    for _ in range(n):
      scene = scenes.sample_scene(rng)
      images.append(scenes.render(scene).astype(np.float32) / 255.0)
      answers.append((scene.xs >= size // 2) * 2 + (scene.ys >= size // 2))  # (6,) per colour
      cells = np.zeros((n_colors, grid, grid), bool)  # the cells each object's pixels fall in
      for i, mask in enumerate(scenes.object_masks(scene)):
        rows, cols = np.nonzero(mask)
        cells[i, rows * grid // size, cols * grid // size] = True
      covers.append(cells.reshape(n_colors, -1))
    ids = np.broadcast_to(np.arange(1, n_colors + 1)[None, :, None], (n, n_colors, 1))
    return jnp.asarray(np.stack(images)), jnp.asarray(ids, jnp.int32), np.stack(answers), np.stack(covers)

  model = VQAModel(
      encoders={"image": {"name": "small_cnn", "features": 32, "channels": (16, 16, 16), "norm": "group",
                          "norm_groups": 4, "coords": True},
                "text": {"name": "rnn_text", "vocab_size": n_colors + 1, "features": 32, "hidden": 16}},
      fusion="cross_attention", fusion_kwargs={"update": ("text",), "depth": 1, "norm": "pre", "qk_scale": 4.0},
      question_tokens="pooled", features=32, num_answers=4, image_shape=(size, size, 3),
      question_len=1, head_hidden=32, rngs=nnx.Rngs(SEED))
  opt = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, images, ids, answers):
    def loss(model):
      logits, _ = model(images, ids)
      return optax.softmax_cross_entropy_with_integer_labels(logits, answers).mean()
    value, grads = nnx.value_and_grad(loss)(model)
    opt.update(model, grads)
    return value

  n_heads = model.fusion.layers[0].cross.num_heads  # 4, the cross_attention default

  @functools.partial(nnx.jit, static_argnames="head")
  def attend(model, images, ids, head):
    B, Q = ids.shape[:2]
    flat = lambda x: jnp.repeat(x, Q, axis=0)
    attn, logits = viz.question_image_attention(model, flat(images), ids.reshape(B * Q, 1),
                                                jnp.ones((B * Q, 1), bool), head=head)
    return attn.reshape(B, Q, -1), logits.reshape(B, Q, -1)

  def peak_on_object(scenes, head, shift=0):
    """How often the head's peak is on the named object (shift=k: on the object k colours on)."""
    images, ids, answers, covers = scenes
    attn, logits = jax.device_get(attend(model, images, ids, head))
    peak = attn.argmax(-1)  # (B, Q) cell index
    on = np.take_along_axis(np.roll(covers, shift, axis=1), peak[..., None], axis=-1)[..., 0]  # (B, Q)
    return on.mean(), (logits.argmax(-1) == answers).mean()

  heads = range(n_heads)
  test, chooser = (batch(np.random.default_rng([SEED, k]), n) for k, n in ((1, 40), (2, 20)))
  before = [peak_on_object(test, h)[0] for h in heads]
  # Train until the task is learned (when a model leaves the answer prior depends on the seed:
  # ~250-950 steps), at most 1,500 steps.
  rng, losses = np.random.default_rng([SEED, 0]), []  # training scenes, unlike test and chooser
  while len(losses) < 1500 and not (len(losses) >= 100 and np.mean(losses[-100:]) < 0.5):
    images, ids, answers, _ = batch(rng, 16)
    losses.append(float(step(model, opt, images, ids, jnp.asarray(answers))))
  best = max(heads, key=lambda h: peak_on_object(chooser, h)[0])  # chosen on other scenes
  after, accuracy = peak_on_object(test, best)
  # Untrained, a head may favour objects over background, but not the one the question names.
  assert max(before) < 0.35, before
  assert accuracy > 0.75, accuracy  # it learned the task (chance 0.25)
  assert after > 0.6, (before, best, after)
  # It follows the question: its peak is rarely on another colour's object.
  assert max(peak_on_object(test, best, k)[0] for k in range(1, n_colors)) < 0.2


def test_figures_are_written_into_a_bucket(gcs_emulator, tmp_path, monkeypatch):
  """A gs:// path gets the figure in the bucket (the workdir of a run in a bucket), byte for byte
  the local file's, and nothing on the local disk (matplotlib alone would write `cwd/gs:/...`)."""
  import gcsfs  # pylint: disable=g-import-not-at-top

  monkeypatch.chdir(tmp_path)
  url = gcs_emulator.bucket() + "/run/figures/confusion.png"
  local = tmp_path / "local" / "confusion.png"
  for path in (url, local):
    viz.confusion_matrix_figure(np.array([[3, 1], [0, 4]]), ["a", "b"], path=path)
  fs = gcsfs.GCSFileSystem(token="anon", use_listings_cache=False, skip_instance_cache=True)
  assert fs.cat(url.removeprefix("gs://")) == local.read_bytes()
  assert sorted(os.listdir(tmp_path)) == ["local"]
