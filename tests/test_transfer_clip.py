"""HF CLIP import/export: both towers layer by layer, embeddings and logits against PyTorch's
CLIPModel on the same weights, bitwise round trips, and clear failures on mismatched checkpoints."""

import json
import math
import os

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import CLIPConfig, CLIPModel

from mmjax.encoders.text import ClipTextEncoder
from mmjax.encoders.vision import ViT
from mmjax.models.dual_encoder import DualEncoder
from mmjax.transfer.bert import blank_module
from mmjax.transfer.clip import build_clip, export_clip, load_clip, save_clip
from mmjax.transfer.io import WeightMismatchError, read_safetensors, write_safetensors

EOS, PAD = 98, 1
CFG = dict(
    text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=16, eos_token_id=EOS,
                     pad_token_id=PAD),
    vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, image_size=32, patch_size=8),
    projection_dim=24)
# Row 0 is padded with the EOS id itself (as OpenAI's tokenizer does): HF pools at the first EOS.
IDS = np.array([[5, 17, 33, 91, 7, EOS, EOS, EOS, EOS, EOS],
                [5, 45, EOS, PAD, PAD, PAD, PAD, PAD, PAD, PAD],
                [5, 9, 8, 7, 6, 5, 4, 97, 3, EOS]], np.int64)
MASK = np.array([[1] * 6 + [0] * 4, [1] * 3 + [0] * 7, [1] * 10], np.int64)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny HF CLIPModel with every weight random (LayerNorms included), saved as safetensors."""
  torch.manual_seed(0)
  model = CLIPModel(CLIPConfig(**CFG)).eval()
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(0.3 * torch.randn(p.shape, generator=g))
    model.logit_scale.fill_(math.log(20.0))  # logits of a visible size
  folder = tmp_path_factory.mktemp("tiny_clip")
  model.save_pretrained(folder, safe_serialization=True)
  assert os.path.exists(folder / "model.safetensors")
  return folder


@pytest.fixture(scope="module")
def pixels():
  return np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)  # NCHW


def _params(model):
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Param)}


@nnx.jit
def _forward(model, images, ids, mask):
  image, image_hidden = model.towers["image"](images, return_hidden=True)
  text, text_hidden = model.towers["text"](ids, mask, return_hidden=True)
  emb, aux = model({"image": images, "text": (ids, mask)})
  logits_per_image = aux["logit_scale"] * emb["image"] @ emb["text"].T
  return image, image_hidden, text, text_hidden, emb, logits_per_image


def _close(got, want, what):
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4, err_msg=what)


def test_clip_matches_pytorch_layer_by_layer(hf_dir, pixels):
  ref = CLIPModel.from_pretrained(hf_dir).eval()
  ids, mask = torch.from_numpy(IDS), torch.from_numpy(MASK)
  with torch.no_grad():
    want = ref(input_ids=ids, pixel_values=torch.from_numpy(pixels), attention_mask=mask,
               output_hidden_states=True)
    # CLIPModel replaces the towers' pooler_output by the projections: ask the towers directly.
    image_pooled = ref.vision_model(torch.from_numpy(pixels)).pooler_output.numpy()
    text_pooled = ref.text_model(input_ids=ids, attention_mask=mask).pooler_output.numpy()
  model = load_clip(hf_dir)
  assert isinstance(model.towers["image"], ViT) and isinstance(model.towers["text"], ClipTextEncoder)
  assert model.towers["image"].spec.act == "quick_gelu" and model.towers["text"].spec.eos_id == EOS
  image, image_hidden, text, text_hidden, emb, logits = _forward(
      model, pixels.transpose(0, 2, 3, 1), IDS.astype(np.int32), MASK.astype(bool))
  for name, ours, theirs in (("image", image_hidden, want.vision_model_output.hidden_states),
                             ("text", text_hidden, want.text_model_output.hidden_states)):
    assert len(ours) == len(theirs) == 3  # embeddings (after pre_layrnorm for images) + 2 layers
    for i, (h, w) in enumerate(zip(ours, theirs)):
      _close(h, w.numpy(), f"{name} hidden state {i}")
  _close(image.pooled, image_pooled, "image pooled (post_layernorm of the class token)")
  _close(text.pooled, text_pooled, "text pooled (the first EOS token)")
  _close(text.tokens, want.text_model_output.last_hidden_state.numpy(), "text last hidden state")
  _close(emb["image"], want.image_embeds.numpy(), "image_embeds")
  _close(emb["text"], want.text_embeds.numpy(), "text_embeds")
  _close(logits, want.logits_per_image.numpy(), "logits_per_image")
  assert np.abs(want.logits_per_image.numpy()).max() > 1.0


def test_legacy_eos_id_pools_at_the_largest_id(hf_dir, tmp_path):
  """Configs with eos_token_id 2 (pre-2023 CLIP) pool at each row's largest id, as HF does."""
  ids = np.array([[5, 45, 20, 97, 3], [5, 96, 2, PAD, PAD]], np.int64)  # no EOS: rules differ
  cfg = json.loads((hf_dir / "config.json").read_text())
  cfg["text_config"]["eos_token_id"] = 2
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  os.symlink(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
  ref = CLIPModel.from_pretrained(tmp_path).eval()
  with torch.no_grad():
    want = ref.text_model(input_ids=torch.from_numpy(ids))
  model = load_clip(tmp_path)
  assert model.towers["text"].spec.eos_id is None
  got = nnx.jit(lambda m, i: m(i).pooled)(model.towers["text"], ids.astype(np.int32))
  _close(got, want.pooler_output.numpy(), "legacy pooled")
  last = want.last_hidden_state.numpy()
  _close(got, last[[0, 1], [3, 1]], "legacy pooled = the largest id's token")
  assert not np.allclose(last[:, 0], last[[0, 1], [3, 1]], atol=1e-3)


def test_import_export_import_is_bitwise(hf_dir, tmp_path):
  tensors = read_safetensors(hf_dir)
  model = load_clip(hf_dir)
  exported = export_clip(model)
  assert sorted(exported) == sorted(tensors)
  for k, v in tensors.items():
    assert exported[k].dtype == v.dtype and np.array_equal(exported[k], v), k
  save_clip(model, tmp_path)
  again = load_clip(tmp_path)
  a, b = _params(model), _params(again)
  assert sorted(a) == sorted(b)
  for k in a:
    assert np.array_equal(a[k], b[k]), k
  # transformers reads the saved folder back with the same tensors.
  hf, orig = CLIPModel.from_pretrained(tmp_path), CLIPModel.from_pretrained(hf_dir)
  sd, want = hf.state_dict(), orig.state_dict()
  assert sorted(sd) == sorted(want)
  for k in want:
    assert torch.equal(sd[k], want[k]), k
  assert hf.config.text_config.eos_token_id == EOS and hf.config.projection_dim == 24


def _write(folder, tensors, src):
  os.makedirs(folder, exist_ok=True)
  write_safetensors(folder / "model.safetensors", tensors)
  (folder / "config.json").write_text((src / "config.json").read_text())


def test_mismatched_checkpoints_are_named(hf_dir, tmp_path):
  tensors = read_safetensors(hf_dir)
  q = "vision_model.encoder.layers.1.self_attn.q_proj.weight"
  bad = {k: v for k, v in tensors.items() if k != "text_model.final_layer_norm.weight"}
  bad[q] = np.zeros((32, 31), np.float32)
  bad["text_model.pooler.weight"] = np.zeros((2, 2), np.float32)
  _write(tmp_path / "bad", bad, hf_dir)
  with pytest.raises(WeightMismatchError) as err:
    load_clip(tmp_path / "bad")
  msg = str(err.value)
  assert "missing tensors (1): text_model.final_layer_norm.weight" in msg
  assert "unexpected tensors (1): text_model.pooler.weight" in msg
  assert f"mis-shaped tensors (1): {q}: got (31, 32)" in msg


def test_towers_without_clip_options_have_no_clip_layout():
  vision = dict(width=16, depth=1, heads=2, mlp_dim=32, patch=8, image_size=16, pre_norm=False)
  text = dict(vocab_size=50, hidden=16, depth=1, heads=2, mlp_dim=32, max_len=8, eos_id=49)
  plain = blank_module(lambda r: build_clip(vision, text, 8, rngs=r), nnx.Rngs(0))
  assert isinstance(plain, DualEncoder)
  with pytest.raises(ValueError, match="image tower: HF CLIP layout needs .*'pre_norm': True"):
    export_clip(plain)
