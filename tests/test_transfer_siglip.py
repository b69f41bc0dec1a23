"""HF SigLIP import/export: both towers layer by layer, embeddings, logits and the sigmoid loss
against PyTorch's SiglipModel on the same weights, a round trip that transformers reads back,
and clear failures on mismatched checkpoints."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import SiglipConfig, SiglipModel

from hf_reference import assert_activations_follow_hf, randomized
from mmjax.encoders.text import ClipTextEncoder
from mmjax.encoders.vision import MapHead, ViT
from mmjax.transfer.bert import blank_module
from mmjax.models.dual_encoder import DualEncoder
from mmjax.transfer.io import WeightMismatchError, read_safetensors
from mmjax.transfer.siglip import (build_siglip, import_siglip, load_siglip, save_siglip,
                                   spec_from_hf_config)

# The text tower is narrower than the shared space (its head maps 24 -> 32) and has exact GELU
# with eps 1e-5; the image tower keeps SigLIP's defaults (GELU-tanh, eps 1e-6, left out of
# config.json).
CFG = dict(
    text_config=dict(vocab_size=99, hidden_size=24, intermediate_size=37, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=10, projection_size=32,
                     hidden_act="gelu", layer_norm_eps=1e-5),
    vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, image_size=32, patch_size=8))
# Parameter std by the first key in the HF name (else 0.3): a small residual stream gives every
# LayerNorm an input variance ~1e-3, where its eps shows; feed-forward inputs stay O(1), where
# exact and tanh GELU differ.
STDS = {"patch_embedding": 0.001, "position_embedding": 0.01, "token_embedding": 0.01,
        "out_proj": 0.003, "fc2": 0.003, "fc1.weight": 0.2, "probe": 1.0}
# SigLIP pads texts to the full length and pools the last position (no attention mask).
IDS = np.array([[5, 17, 33, 91, 7, 1, 1, 1, 1, 1],
                [5, 45, 2, 1, 1, 1, 1, 1, 1, 1],
                [5, 9, 8, 7, 6, 5, 4, 97, 3, 2]], np.int64)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny HF SiglipModel with every weight random (LayerNorms included), saved as safetensors."""
  model = randomized(SiglipModel(SiglipConfig(**CFG)), STDS)
  with torch.no_grad():
    model.logit_scale.fill_(math.log(10.0))
    model.logit_bias.fill_(-2.0)
  folder = tmp_path_factory.mktemp("tiny_siglip")
  model.save_pretrained(folder, safe_serialization=True)
  return folder


@pytest.fixture(scope="module")
def pixels():
  return np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)  # NCHW


@nnx.jit
def _forward(model, images, ids):
  image, image_hidden = model.encoders["image"](images, return_hidden=True)
  text, text_hidden = model.encoders["text"](ids, return_hidden=True)
  emb, aux = model({"image": images, "text": ids})
  logits_per_image = aux["logit_scale"] * emb["image"] @ emb["text"].T + aux["logit_bias"]
  return image, image_hidden, text, text_hidden, emb, logits_per_image, model.loss(emb)[0]


def _torch_run(ref, pixels):
  """HF SiglipModel's outputs by name."""
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(IDS), pixel_values=torch.from_numpy(pixels),
               output_hidden_states=True, return_loss=True)
  image, text = want.vision_model_output, want.text_model_output
  out = {f"image hidden state {i}": h for i, h in enumerate(image.hidden_states)}
  out |= {f"text hidden state {i}": h for i, h in enumerate(text.hidden_states)}
  out |= {"image pooled (attention-pooling head)": image.pooler_output,
          "text pooled (head on the last position)": text.pooler_output,
          "text last hidden state": text.last_hidden_state,
          "image_embeds": want.image_embeds, "text_embeds": want.text_embeds,
          "logits_per_image": want.logits_per_image, "loss": want.loss}
  return {k: v.numpy() for k, v in out.items()}


def test_siglip_matches_pytorch_layer_by_layer(hf_dir, pixels):
  ref = SiglipModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
  want = _torch_run(ref, pixels)
  model = load_siglip(hf_dir)
  image_tower, text_tower = model.encoders["image"], model.encoders["text"]
  assert isinstance(image_tower, ViT) and isinstance(image_tower.map_head, MapHead)
  assert image_tower.cls_token is None and model.proj is None and model.max_log_scale is None
  assert isinstance(text_tower, ClipTextEncoder) and text_tower.spec.out_dim == 32
  image, image_hidden, text, text_hidden, emb, logits, loss = _forward(
      model, pixels.transpose(0, 2, 3, 1), IDS.astype(np.int32))
  ours = {f"image hidden state {i}": h for i, h in enumerate(image_hidden)}
  ours |= {f"text hidden state {i}": h for i, h in enumerate(text_hidden)}
  ours |= {"image pooled (attention-pooling head)": image.pooled,
           "text pooled (head on the last position)": text.pooled,
           "text last hidden state": text.tokens, "image_embeds": emb["image"],
           "text_embeds": emb["text"], "logits_per_image": logits, "loss": loss}
  assert len(image_hidden) == len(text_hidden) == 3 and ours.keys() == want.keys()
  for k, v in want.items():
    np.testing.assert_allclose(np.asarray(ours[k]), v, atol=1e-5, rtol=0, err_msg=k)
  # The logits are not trivially close: they spread over several units.
  assert np.ptp(want["logits_per_image"]) > 0.5


def test_siglip_follows_the_hf_config(hf_dir):
  model = load_siglip(hf_dir)
  cfg = SiglipConfig.from_pretrained(hf_dir)
  for tower, c in ((model.encoders["image"], cfg.vision_config), (model.encoders["text"], cfg.text_config)):
    norms = [m for _, m in nnx.iter_graph(tower) if isinstance(m, nnx.LayerNorm)]
    # two per layer, the final one, and the image head's
    assert len(norms) == 2 * c.num_hidden_layers + 1 + isinstance(tower, ViT)
    assert {m.epsilon for m in norms} == {c.layer_norm_eps}
    assert_activations_follow_hf(tower.encoder.layers, c.hidden_act, f"{type(tower).__name__} ")
  assert_activations_follow_hf([model.encoders["image"].map_head], cfg.vision_config.hidden_act, "head ")


def test_save_round_trip_is_read_by_transformers(hf_dir, tmp_path):
  model = load_siglip(hf_dir)
  save_siglip(model, tmp_path / "out")
  original = read_safetensors(hf_dir)
  written = read_safetensors(tmp_path / "out")
  assert written.keys() == original.keys()
  for k, v in original.items():
    np.testing.assert_array_equal(written[k], v, err_msg=k)
  back = SiglipModel.from_pretrained(tmp_path / "out")
  for k, v in back.state_dict().items():
    np.testing.assert_array_equal(v.numpy(), original[k], err_msg=k)
  assert back.config.vision_config.hidden_act == "gelu_pytorch_tanh"
  assert back.config.text_config.projection_size == 32


def test_mismatches_are_named(hf_dir):
  tensors = read_safetensors(hf_dir)
  tensors["text_model.head.weight"] = tensors["text_model.head.weight"][:, :20]
  del tensors["vision_model.head.probe"]
  tensors["vision_model.extra"] = np.zeros(3, np.float32)
  vision, text = spec_from_hf_config(SiglipConfig(**CFG).to_dict())
  model = blank_module(lambda r: build_siglip(vision, text, rngs=r), nnx.Rngs(0))
  with pytest.raises(WeightMismatchError) as e:
    import_siglip(model, tensors)
  msg = str(e.value)
  assert "missing tensors (1): vision_model.head.probe" in msg
  assert "unexpected tensors (1): vision_model.extra" in msg
  assert ("text_model.head.weight: got (20, 32) (stored (32, 20)), encoders.text.head.kernel "
          "needs (24, 32)") in msg
  # A model with projections (CLIP-style) is no SigLIP layout.
  proj = blank_module(lambda r: DualEncoder(
      encoders=dict(image=dict(name="vit", variant=None, **vision), text=dict(name="clip_text", **text)),
      input_examples=model_examples(vision, text), embed_dim=16, loss_type="siglip", rngs=r), nnx.Rngs(0))
  with pytest.raises(ValueError, match="projection=False"):
    import_siglip(proj, read_safetensors(hf_dir))


def model_examples(vision, text):
  return {"image": jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
          "text": jax.ShapeDtypeStruct((1, text["max_len"]), jnp.int32)}


def test_an_image_size_off_the_patch_grid_drops_the_edge_as_hf(tmp_path):
  """SigLIP So400m/14 runs at 384 px, no multiple of 14: the strided patch convolution drops the
  last 6 rows and columns. Here 36 px with 8 px patches: a 4 x 4 grid, 4 pixels dropped."""
  cfg = {**CFG, "vision_config": {**CFG["vision_config"], "image_size": 36}}
  model = randomized(SiglipModel(SiglipConfig(**cfg)), STDS)
  model.save_pretrained(tmp_path, safe_serialization=True)
  ref = SiglipModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
  pixels = np.random.default_rng(1).normal(size=(3, 3, 36, 36)).astype(np.float32)
  with torch.no_grad():
    want = ref.vision_model(torch.from_numpy(pixels)).pooler_output.numpy()
  ours = load_siglip(tmp_path)
  assert ours.encoders["image"].spec.grid == (4, 4)
  got = nnx.jit(lambda m, x: m(x).pooled)(ours.encoders["image"], pixels.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
