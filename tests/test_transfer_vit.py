"""HF ViT import/export: layer-by-layer parity with PyTorch, bitwise round trips, clear failures."""

import json
import os

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import ViTConfig, ViTForImageClassification, ViTModel

from mmjax.transfer.io import WeightMismatchError, read_safetensors, write_safetensors
from mmjax.transfer.vit import export_vit, load_vit, save_vit

CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           image_size=32, patch_size=8, num_labels=5)


@pytest.fixture(autouse=True)
def _fast_random_init():
  """Partitionable threefry takes seconds to compile per initialiser shape on XLA:CPU."""
  with jax.threefry_partitionable(False):
    yield


def _randomized(model):
  """Random values in every parameter (HF's init leaves LayerNorms at 1/0, hiding mix-ups)."""
  g = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(0.3 * torch.randn(p.shape, generator=g))
  return model.eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  """HF ViTModel (with pooler) and ViTForImageClassification folders, saved as safetensors."""
  cfg = ViTConfig(**CFG)
  out = {}
  for name, cls in (("model", ViTModel), ("classifier", ViTForImageClassification)):
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp(name)
    _randomized(cls(cfg)).save_pretrained(d)
    assert os.path.exists(d / "model.safetensors")
    out[name] = d
  return out


@pytest.fixture(scope="module")
def pixels():
  return np.random.default_rng(0).normal(size=(3, 3, 32, 32)).astype(np.float32)  # NCHW


def _params(model):
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Param)}


def test_vit_model_matches_pytorch_layer_by_layer(hf_dirs, pixels):
  ref = ViTModel.from_pretrained(hf_dirs["model"]).eval()
  with torch.no_grad():
    want = ref(torch.from_numpy(pixels), output_hidden_states=True)
  model = load_vit(hf_dirs["model"])
  assert model.spec.ln_eps == 1e-12 and model.spec.act == "gelu" and model.pooler is not None
  out, hidden = nnx.jit(lambda m, x: m(x, return_hidden=True))(model, pixels.transpose(0, 2, 3, 1))
  assert len(hidden) == len(want.hidden_states) == 3
  for i, (h, w) in enumerate(zip(hidden, want.hidden_states)):
    np.testing.assert_allclose(h, w.numpy(), atol=1e-4, rtol=1e-4, err_msg=f"hidden state {i}")
  np.testing.assert_allclose(out.tokens, want.last_hidden_state[:, 1:].numpy(), atol=1e-4,
                             rtol=1e-4)
  np.testing.assert_allclose(out.pooled, want.pooler_output.numpy(), atol=1e-4, rtol=1e-4)
  assert out.mask.shape == (3, 16) and bool(out.mask.all())


def test_classifier_logits_match_pytorch(hf_dirs, pixels):
  ref = ViTForImageClassification.from_pretrained(hf_dirs["classifier"]).eval()
  with torch.no_grad():
    want = ref(torch.from_numpy(pixels), output_hidden_states=True)
  model = load_vit(hf_dirs["classifier"] / "model.safetensors")  # a file path works too
  assert model.spec.num_classes == 5 and model.pooler is None
  logits, out = nnx.jit(lambda m, x: (m.classify(x), m(x)))(model, pixels.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(logits, want.logits.numpy(), atol=1e-4, rtol=1e-4)
  with torch.no_grad():
    final = ref.vit.layernorm(want.hidden_states[-1]).numpy()  # (B, 1 + N, D)
  np.testing.assert_allclose(out.pooled, final[:, 0], atol=1e-4, rtol=1e-4)  # the LN'd CLS token
  np.testing.assert_allclose(out.tokens, final[:, 1:], atol=1e-4, rtol=1e-4)
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
