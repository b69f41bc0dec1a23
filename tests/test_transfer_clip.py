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

from hf_reference import assert_activations_follow_hf, randomized
from mmjax.encoders.text import ClipTextEncoder
from mmjax.encoders.vision import ViT
from mmjax.layers.embeddings import LearnedPositions
from mmjax.models.dual_encoder import DualEncoder
from mmjax.transfer.bert import blank_module
from mmjax.transfer.clip import build_clip, export_clip, load_clip, save_clip
from mmjax.transfer.io import WeightMismatchError, read_safetensors, write_safetensors

EOS, PAD = 98, 1
# Each tower keeps one of CLIP's defaults (config.json leaves it out) and sets the other field,
# differently from the other tower: text (exact GELU, eps 1e-5), vision (quick GELU, eps 1e-6).
CFG = dict(
    text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=16, eos_token_id=EOS,
                     pad_token_id=PAD, hidden_act="gelu"),
    vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=4, image_size=32, patch_size=8, layer_norm_eps=1e-6),
    projection_dim=24)
# Parameter std by the first key in the HF name (else 0.3). A small residual stream (small
# embeddings, pre_layrnorm gain, attention and feed-forward outputs) gives every LayerNorm an
# input variance ~1e-3, where its eps shows. Feed-forward input weights of 0.2 on the O(1)
# LayerNorm outputs keep the activations' inputs O(1), where exact, tanh and quick GELU differ.
STDS = {"patch_embedding": 0.001, "class_embedding": 0.01, "position_embedding": 0.01,
        "token_embedding": 0.01, "out_proj": 0.003, "fc2": 0.003, "fc1.weight": 0.2}
LN_GAINS = {"pre_layrnorm": 0.03}
# Row 0 is padded with the EOS id itself (as OpenAI's tokenizer does): HF pools at the first EOS.
IDS = np.array([[5, 17, 33, 91, 7, EOS, EOS, EOS, EOS, EOS],
                [5, 45, EOS, PAD, PAD, PAD, PAD, PAD, PAD, PAD],
                [5, 9, 8, 7, 6, 5, 4, 97, 3, EOS]], np.int64)
MASK = np.array([[1] * 6 + [0] * 4, [1] * 3 + [0] * 7, [1] * 10], np.int64)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  """A tiny HF CLIPModel with every weight random (LayerNorms included), saved as safetensors."""
  torch.manual_seed(0)
  model = randomized(CLIPModel(CLIPConfig(**CFG)), STDS, LN_GAINS)
  with torch.no_grad():
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
  image, image_hidden = model.encoders["image"](images, return_hidden=True)
  text, text_hidden = model.encoders["text"](ids, mask, return_hidden=True)
  emb, aux = model({"image": images, "text": (ids, mask)})
  logits_per_image = aux["logit_scale"] * emb["image"] @ emb["text"].T
  return image, image_hidden, text, text_hidden, emb, logits_per_image


def _close(got, want, what, atol=1e-5):
  np.testing.assert_allclose(np.asarray(got), want, atol=atol, rtol=0, err_msg=what)


def _torch_run(ref, pixels):
  """HF CLIPModel's outputs by name: each tower's hidden states, pooled and last, embeddings."""
  ids, mask = torch.from_numpy(IDS), torch.from_numpy(MASK)
  with torch.no_grad():
    want = ref(input_ids=ids, pixel_values=torch.from_numpy(pixels), attention_mask=mask,
               output_hidden_states=True)
    # CLIPModel replaces the towers' pooler_output by the projections: ask the towers directly.
    image_pooled = ref.vision_model(torch.from_numpy(pixels)).pooler_output
    text_pooled = ref.text_model(input_ids=ids, attention_mask=mask).pooler_output
  image, text = want.vision_model_output, want.text_model_output
  out = {f"image hidden state {i}": h for i, h in enumerate(image.hidden_states)}
  out |= {f"text hidden state {i}": h for i, h in enumerate(text.hidden_states)}
  out |= {"image pooled (post_layernorm of the class token)": image_pooled,
          "text pooled (the first EOS token)": text_pooled,
          "text last hidden state": text.last_hidden_state,
          "image_embeds": want.image_embeds, "text_embeds": want.text_embeds,
          "logits_per_image": want.logits_per_image}
  return {k: v.numpy() for k, v in out.items()}


def test_clip_matches_pytorch_layer_by_layer(hf_dir, pixels):
  ref = CLIPModel.from_pretrained(hf_dir, attn_implementation="eager").eval()
  want = _torch_run(ref, pixels)
  model = load_clip(hf_dir)
  assert isinstance(model.encoders["image"], ViT) and isinstance(model.encoders["text"], ClipTextEncoder)
  assert model.encoders["image"].spec.act == "quick_gelu" and model.encoders["text"].spec.eos_id == EOS
  image, image_hidden, text, text_hidden, emb, logits = _forward(
      model, pixels.transpose(0, 2, 3, 1), IDS.astype(np.int32), MASK.astype(bool))
  ours = {f"image hidden state {i}": h for i, h in enumerate(image_hidden)}
  ours |= {f"text hidden state {i}": h for i, h in enumerate(text_hidden)}
  ours |= {"image pooled (post_layernorm of the class token)": image.pooled,
           "text pooled (the first EOS token)": text.pooled, "text last hidden state": text.tokens,
           "image_embeds": emb["image"], "text_embeds": emb["text"], "logits_per_image": logits}
  # embeddings (after pre_layrnorm for images) + 2 layers per tower
  assert len(image_hidden) == len(text_hidden) == 3 and ours.keys() == want.keys()
  for k, v in want.items():
    # logits_per_image: the logit scale 20 multiplies the embeddings' float32 error.
    _close(ours[k], v, k, atol=2e-5 if k == "logits_per_image" else 1e-5)
  assert np.abs(want["logits_per_image"]).max() > 1.0
  # The weights make eps matter: HF's own model with eps 1e-12 (HF ViT's) moves every LayerNorm'd
  # output by > 1e-4 (the text embeddings have none).
  for m in ref.modules():
    if isinstance(m, torch.nn.LayerNorm):
      m.eps = 1e-12
  moved = _torch_run(ref, pixels)
  diffs = {k: np.abs(moved[k] - v).max() for k, v in want.items() if k != "text hidden state 0"}
  assert min(diffs.values()) > 1e-4, diffs


def test_built_module_follows_the_hf_config(hf_dir):
  """Every LayerNorm's eps, every feed-forward activation and the position scheme are HF's."""
  cfg = CLIPConfig.from_pretrained(hf_dir)
  model = load_clip(hf_dir)
  image, text = model.encoders["image"], model.encoders["text"]
  v, t = cfg.vision_config, cfg.text_config
  assert (t.hidden_act, t.layer_norm_eps) == ("gelu", 1e-5)
  assert (v.hidden_act, v.layer_norm_eps) == ("quick_gelu", 1e-6)
  # (tower, its config, LayerNorms: pre_layrnorm, 2 per layer, post_layernorm / final_layer_norm)
  for tower, c, n_norms in ((image, v, 2 * v.num_hidden_layers + 2),
                            (text, t, 2 * t.num_hidden_layers + 1)):
    norms = [m for _, m in nnx.iter_graph(tower) if isinstance(m, nnx.LayerNorm)]
    assert [m.epsilon for m in norms] == [c.layer_norm_eps] * n_norms
    assert len(tower.encoder.layers) == c.num_hidden_layers
    assert_activations_follow_hf(tower.encoder.layers, c.hidden_act, f"{type(tower).__name__} ")
  # Learned absolute positions: the text table indexed from 0, the image one over class + patches.
  assert isinstance(text.position_embed, LearnedPositions)
  assert text.position_embed.embedding.shape == (t.max_position_embeddings, t.hidden_size)
  assert image.spec.posemb == "learn" and isinstance(image.pos_embed, LearnedPositions)
  assert image.pos_embed.embedding.shape == ((v.image_size // v.patch_size) ** 2 + 1, v.hidden_size)


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
  assert model.encoders["text"].spec.eos_id is None
  got = nnx.jit(lambda m, i: m(i).pooled)(model.encoders["text"], ids.astype(np.int32))
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


def test_a_sharded_checkpoint_loads_as_the_single_file(hf_dir, tmp_path):
  """transformers' save_pretrained splits a large model into shards named by
  model.safetensors.index.json; every loader reads them as one checkpoint."""
  model = CLIPModel.from_pretrained(hf_dir)
  model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
  shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
  assert len(shards) > 1 and not (tmp_path / "model.safetensors").exists(), shards
  whole, sharded = _params(load_clip(hf_dir)), _params(load_clip(tmp_path))
  assert whole.keys() == sharded.keys()
  for k in whole:
    np.testing.assert_array_equal(sharded[k], whole[k], err_msg=k)


def test_text_config_dict_overrides_text_config_as_in_hf(hf_dir, tmp_path):
  """Older hub configs carry text_config_dict / vision_config_dict, which HF lays over
  text_config / vision_config: the activation (no tensor shows it) must follow them."""
  cfg = json.loads((hf_dir / "config.json").read_text())
  # HF takes every field from text_config_dict (over the defaults), text_config says exact GELU.
  cfg["text_config_dict"] = {**CFG["text_config"], "hidden_act": "quick_gelu"}
  cfg["text_config"]["layer_norm_eps"] = 0.1  # ignored by HF: text_config_dict's default 1e-5 wins
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  os.symlink(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
  ref = CLIPModel.from_pretrained(tmp_path).eval()
  assert (ref.config.text_config.hidden_act, ref.config.text_config.layer_norm_eps) == ("quick_gelu", 1e-5)
  ids, mask = IDS.astype(np.int32), MASK.astype(np.int32)
  with torch.no_grad():
    want = ref.text_model(input_ids=torch.from_numpy(IDS), attention_mask=torch.from_numpy(MASK))
  model = load_clip(tmp_path)
  assert model.encoders["text"].spec.act == "quick_gelu"
  got = nnx.jit(lambda m, i, k: m(i, k).pooled)(model.encoders["text"], ids, mask)
  _close(got, want.pooler_output.numpy(), "pooled under text_config_dict")


def test_what_hf_clip_cannot_express_is_refused_on_export(hf_dir, tmp_path):
  """A text tower HF's CLIPTextModel would run differently (bidirectional, pooled at the last
  position, with a head) or an end token id 2 (HF's legacy "largest id" rule) is not written."""
  for change, field in [(dict(causal=False), "causal"), (dict(pool="last"), "pool"),
                        (dict(out_dim=8), "head")]:
    vision = dict(width=16, depth=1, heads=2, mlp_dim=32, patch=8, image_size=16, pre_norm=True,
                  patch_bias=False)
    text = dict(vocab_size=50, hidden=16, depth=1, heads=2, mlp_dim=32, max_len=8, eos_id=49, **change)
    model = blank_module(lambda r: build_clip(vision, text, 8, rngs=r), nnx.Rngs(0))
    with pytest.raises(ValueError, match=f"text tower: HF CLIP layout needs .*'{field}'"):
      save_clip(model, tmp_path / field)
    assert not (tmp_path / field).exists()
  text = dict(vocab_size=50, hidden=16, depth=1, heads=2, mlp_dim=32, max_len=8, eos_id=2)
  model = blank_module(lambda r: build_clip(vision, text, 8, rngs=r), nnx.Rngs(0))
  with pytest.raises(ValueError, match="eos_id 2 cannot be written"):
    save_clip(model, tmp_path / "eos2")


def test_a_folder_of_another_model_type_is_named(hf_dir, tmp_path):
  cfg = json.loads((hf_dir / "config.json").read_text())
  cfg["model_type"] = "siglip"
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  os.symlink(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
  with pytest.raises(ValueError, match="model_type 'siglip' is not a CLIP model"):
    load_clip(tmp_path)


def test_a_log_scale_past_the_cap_is_exported_as_the_forward_pass_uses_it(hf_dir, pixels, tmp_path):
  """Training caps exp(t) at 100 in the forward pass while t itself may drift past log(100) (its
  gradient is 0 there, momentum carries it on): the export writes the capped value, so
  transformers' logits equal ours."""
  model = load_clip(hf_dir, max_logit_scale=100.0)
  model.log_scale[...] = np.float32(5.0)  # exp(5) = 148 > 100
  save_clip(model, tmp_path)
  ref = CLIPModel.from_pretrained(tmp_path).eval()
  assert float(ref.logit_scale) == pytest.approx(math.log(100.0), abs=1e-6)
  assert ref.config.logit_scale_init_value == pytest.approx(math.log(100.0), abs=1e-6)
  got = _forward(model, pixels.transpose(0, 2, 3, 1), IDS.astype(np.int32), MASK.astype(np.int32))[-1]
  # The scale 100 multiplies the embeddings' float32 error (2e-5 at the scale 20 above).
  _close(got, _torch_run(ref, pixels)["logits_per_image"], "logits after export", atol=1e-4)
