"""HF ViT import/export: layer-by-layer parity with PyTorch, bitwise round trips, clear failures."""

import json
import os
import re

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from hf_reference import assert_activations_follow_hf, randomized
from mmjax.encoders.vision import ViT, ViTSpec
from mmjax.layers.embeddings import LearnedPositions
from mmjax.transfer.io import WeightMismatchError, read_safetensors, write_safetensors
from mmjax.transfer.vit import export_vit, hf_config, load_vit, save_vit, vit_rules

CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           image_size=32, patch_size=8, num_labels=5)
# Parameter std by the first key in the HF name (else 0.3). A small residual stream (small
# embeddings, attention and feed-forward outputs) gives every LayerNorm an input variance ~1e-3:
# eps 1e-6 instead of 1e-12 then moves every layer's output by > 1e-4. Feed-forward input
# weights of 0.2 on the O(1) LayerNorm outputs keep the GELU's inputs O(1), where its forms differ.
STDS = {"patch_embeddings": 0.001, "cls_token": 0.01, "position_embeddings": 0.01,
        "o_proj": 0.003, "fc2": 0.003, "fc1.weight": 0.2, "pooler": 0.1}


@pytest.fixture(autouse=True)
def _fast_random_init():
  """Partitionable threefry takes seconds to compile per initialiser shape on XLA:CPU."""
  with jax.threefry_partitionable(False):
    yield


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """HF ViTModel (with pooler) and ViTForImageClassification folders, saved as safetensors."""
  cfg = ViTConfig(**CFG)
  out = {}
  for name, cls in (("model", ViTModel), ("classifier", ViTForImageClassification)):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp(name)
    randomized(cls(cfg), STDS).save_pretrained(d)
    assert os.path.exists(d / "model.safetensors")
    out[name] = d
  return out


@pytest.fixture(scope="module")
def pixels():
  return np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)  # NCHW


def _params(model):
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Param)}


def _torch_run(ref, pixels):
  """HF ViTModel's hidden states (depth + 1), last hidden state (LN'd) and pooler output."""
  with torch.no_grad():
    want = ref(torch.from_numpy(pixels), output_hidden_states=True)
  hidden = [h.numpy() for h in want.hidden_states]
  return hidden, want.last_hidden_state.numpy(), want.pooler_output.numpy()


def _close(got, want, what):
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0, err_msg=what)


def test_vit_model_matches_pytorch_layer_by_layer(hf_dirs, pixels):
  ref = ViTModel.from_pretrained(hf_dirs["model"], attn_implementation="eager").eval()
  want, last, pooled = _torch_run(ref, pixels)
  model = load_vit(hf_dirs["model"])
  assert model.pooler is not None  # eps and activation: test_built_module_follows_the_hf_config
  out, hidden = nnx.jit(lambda m, x: m(x, return_hidden=True))(model, pixels.transpose(0, 2, 3, 1))
  assert len(hidden) == len(want) == 3
  for i, (h, w) in enumerate(zip(hidden, want)):
    _close(h, w, f"hidden state {i}")
  _close(out.tokens, last[:, 1:], "last hidden state (final LayerNorm)")
  _close(out.pooled, pooled, "pooler output")
  assert out.mask.shape == (3, 16) and bool(out.mask.all())
  # The weights make eps matter: HF's own model with eps 1e-6 moves every LayerNorm'd output by
  # > 1e-4 (the embeddings, hidden state 0, have none).
  for m in ref.modules():
    if isinstance(m, torch.nn.LayerNorm):
      m.eps = 1e-6
  moved, moved_last, moved_pooled = _torch_run(ref, pixels)
  diffs = [np.abs(a - b).max() for a, b in zip(moved[1:] + [moved_last, moved_pooled],
                                                want[1:] + [last, pooled])]
  assert min(diffs) > 1e-4, diffs


def test_a_checkpoint_pooler_head_or_patch_grid_the_vit_lacks(hf_dirs, pixels):
  """A ViTModel's pooler is left out of a ViT without one (as ViT-in21k ships one); a head the
  checkpoint has no classifier for, or as many patches on another grid, is refused by its cause."""
  ref = ViTModel.from_pretrained(hf_dirs["model"], attn_implementation="eager").eval()
  _, last, _ = _torch_run(ref, pixels)
  model = load_vit(hf_dirs["model"], pooler=False)
  assert model.pooler is None
  _close(nnx.jit(lambda m, x: m(x))(model, pixels.transpose(0, 2, 3, 1)).tokens, last[:, 1:], "tokens")
  with pytest.raises(ValueError, match=r"^the checkpoint has no classifier \(a ViTModel, no "
                     r"'classifier.weight'\) but the ViT has a head \(num_classes=3\): build the "
                     r"ViT with num_classes=0 to load its encoder$"):
    load_vit(hf_dirs["model"], pooler=False, num_classes=3)
  # 32x32 images in 4x4 patches of 8 and 16x64 images in 2x8 patches: 16 positions either way.
  with pytest.raises(ValueError, match=r"patch grid: module \(2, 8\) \(image_size \(16, 64\), patch "
                     r"\(8, 8\)\), checkpoint \(4, 4\) \(image_size \(32, 32\), patch_size \(8, 8\)\)"):
    load_vit(hf_dirs["model"], image_size=(16, 64))


def test_built_module_follows_the_hf_config(hf_dirs):
  """Every LayerNorm's eps, every feed-forward activation and the position scheme are HF's."""
  for which in ("model", "classifier"):
    cfg = ViTConfig.from_pretrained(hf_dirs[which])
    model = load_vit(hf_dirs[which])
    norms = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.LayerNorm)]
    assert len(norms) == 2 * cfg.num_hidden_layers + 1  # 2 per layer, then the final one
    assert [m.epsilon for m in norms] == [cfg.layer_norm_eps] * len(norms)
    assert len(model.encoder.layers) == cfg.num_hidden_layers
    assert_activations_follow_hf(model.encoder.layers, cfg.hidden_act)
    # HF ViT: a learned table for the class token + every patch, added after the class token.
    n = (cfg.image_size // cfg.patch_size) ** 2 + 1
    assert model.spec.posemb == "learn" and isinstance(model.pos_embed, LearnedPositions)
    assert model.pos_embed.embedding.shape == (n, cfg.hidden_size)
    assert model.pooler is None or cfg.pooler_act == "tanh"


def test_classifier_logits_match_pytorch(hf_dirs, pixels):
  ref = ViTForImageClassification.from_pretrained(hf_dirs["classifier"],
                                                  attn_implementation="eager").eval()
  with torch.no_grad():
    want = ref(torch.from_numpy(pixels), output_hidden_states=True)
  model = load_vit(hf_dirs["classifier"] / "model.safetensors")  # a file path works too
  assert model.spec.num_classes == 5 and model.pooler is None
  logits, out = nnx.jit(lambda m, x: (m.classify(x), m(x)))(model, pixels.transpose(0, 2, 3, 1))
  _close(logits, want.logits.numpy(), "logits")
  with torch.no_grad():
    final = ref.vit.layernorm(want.hidden_states[-1]).numpy()  # (B, 1 + N, D)
  _close(out.pooled, final[:, 0], "pooled (the LN'd CLS token)")
  _close(out.tokens, final[:, 1:], "tokens")
  # num_classes=0 takes only the encoder ("vit." tensors) of the classification checkpoint.
  backbone = load_vit(hf_dirs["classifier"], num_classes=0)
  assert backbone.head is None
  full = _params(model)
  assert _params(backbone).keys() == full.keys() - {"head.kernel", "head.bias"}
  for k, v in _params(backbone).items():
    assert np.array_equal(v, full[k]), k


@pytest.mark.parametrize("which, cls", [("model", ViTModel),
                                        ("classifier", ViTForImageClassification)])
def test_import_export_import_is_bitwise(hf_dirs, tmp_path, which, cls):
  tensors = read_safetensors(hf_dirs[which])
  model = load_vit(hf_dirs[which])
  exported = export_vit(model)
  assert sorted(exported) == sorted(tensors)
  for k, v in tensors.items():
    assert exported[k].dtype == v.dtype and np.array_equal(exported[k], v), k
  save_vit(model, tmp_path)
  again = load_vit(tmp_path)
  a, b = _params(model), _params(again)
  assert sorted(a) == sorted(b)
  for k in a:
    assert np.array_equal(a[k], b[k]), k
  # transformers reads the saved folder back as the same architecture with the same tensors.
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["architectures"] == [cls.__name__]
  hf = cls.from_pretrained(tmp_path)
  orig = cls.from_pretrained(hf_dirs[which])
  sd, want = hf.state_dict(), orig.state_dict()
  assert sorted(sd) == sorted(want)
  for k in want:
    assert torch.equal(sd[k], want[k]), k


def _write(folder, tensors, src):
  os.makedirs(folder, exist_ok=True)
  write_safetensors(folder / "model.safetensors", tensors)
  (folder / "config.json").write_text((src / "config.json").read_text())


def test_mis_shaped_and_missing_tensors_are_named(hf_dirs, tmp_path):
  tensors = read_safetensors(hf_dirs["model"])
  bad = dict(tensors)
  q = "encoder.layer.1.attention.attention.query.weight"
  bad[q] = np.zeros((32, 31), np.float32)
  _write(tmp_path / "shape", bad, hf_dirs["model"])
  with pytest.raises(WeightMismatchError, match=r"mis-shaped.*" + q.replace(".", r"\.")):
    load_vit(tmp_path / "shape")
  bad = {k: v for k, v in tensors.items() if k != "layernorm.weight"}
  _write(tmp_path / "missing", bad, hf_dirs["model"])
  with pytest.raises(WeightMismatchError, match=r"missing tensors \(1\): layernorm\.weight"):
    load_vit(tmp_path / "missing")


def test_pickle_checkpoints_are_refused(hf_dirs, tmp_path):
  state = ViTModel.from_pretrained(hf_dirs["model"]).state_dict()
  torch.save(state, tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text((hf_dirs["model"] / "config.json").read_text())
  with pytest.raises(ValueError, match="refusing"):
    load_vit(tmp_path / "pytorch_model.bin")
  with pytest.raises(ValueError, match="refusing.*pytorch_model.bin"):
    load_vit(tmp_path)


# Each ViT option HF ViT's layout cannot express, with what the error must name.
NO_HF_LAYOUT = [
    (dict(pre_norm=True), [r"pre_norm=True \(HF ViT has no LayerNorm before the encoder: needs False\)",
                           r"CLIPModel \(mmjax\.transfer\.clip\)"]),
    (dict(patch_bias=False), [r"patch_bias=False \(HF ViT's patch projection has a bias: needs True\)",
                              r"CLIPModel"]),
    (dict(pool="gap"), [r"pool='gap' \(HF ViT pools the class token: needs 'cls'\)"]),
    (dict(pool="map"), [r"pool='map'", r"SiglipModel \(mmjax\.transfer\.siglip\)"]),
    (dict(posemb="sincos2d"), [r"posemb='sincos2d' \(.*needs 'learn'\)"]),
    (dict(act="tanh"), [r"act='tanh' \(.*needs one of \['gelu', 'gelu_tanh', 'quick_gelu'"]),
    (dict(num_classes=3, pooler=True), [r"pooler=True with num_classes=3 \(.*needs pooler=False"]),
]


@pytest.mark.parametrize("fields, says", NO_HF_LAYOUT, ids=[",".join(f"{k}={v}" for k, v in f.items()) for f, _ in NO_HF_LAYOUT])
def test_vits_without_an_hf_layout_are_refused_naming_the_field(fields, says):
  spec = ViTSpec(width=32, depth=1, heads=4, mlp_dim=64, patch=(8, 8), image_size=(32, 32), **fields)
  for make in (vit_rules, hf_config):
    with pytest.raises(ValueError, match="this ViT has no HF ViT layout") as e:
      make(spec)
    for s in says:
      assert re.search(s, str(e.value)), (s, str(e.value))


def test_every_refused_field_is_listed_at_once():
  spec = ViTSpec(pre_norm=True, patch_bias=False, act="tanh", posemb="sincos2d")
  with pytest.raises(ValueError) as e:
    vit_rules(spec)
  named = re.findall(r"(\w+)=\S+ \(", str(e.value))
  assert named == ["posemb", "pre_norm", "patch_bias", "act"]


def test_a_clip_style_vit_is_neither_saved_nor_loaded(hf_dirs, tmp_path):
  """Before the check: its pre-norm was dropped on export, and a checkpoint loaded into it left
  the pre-norm at its initial values (only a strict match noticed)."""
  model = ViT(None, width=32, depth=2, heads=4, mlp_dim=64, patch=8, image_size=32, pre_norm=True,
              rngs=nnx.Rngs(0))
  for write in (export_vit, lambda m: save_vit(m, tmp_path / "out")):
    with pytest.raises(ValueError, match=r"pre_norm=True"):
      write(model)
  assert not (tmp_path / "out").exists()
  with pytest.raises(ValueError, match=r"no HF ViT layout: patch_bias=False"):
    load_vit(hf_dirs["model"], patch_bias=False)
