"""big_vision `.npz` import: the same random weights written in the HF layout and (by this test's
own converter, big_vision's key names, transposes and head reshapes) in the big_vision layout load
into equal mmjax parameters that match HF PyTorch; pickled archives and wrong shapes are refused."""

import pickle

import numpy as np
import pytest
import torch
from flax import nnx
from transformers import SiglipConfig, SiglipModel, ViTConfig, ViTModel

from hf_reference import randomized
from mmjax.encoders.vision import ViT
from mmjax.transfer import big_vision
from mmjax.transfer import siglip as hf_siglip
from mmjax.transfer import vit as hf_vit
from mmjax.transfer.bert import blank_module
from mmjax.transfer.io import WeightMismatchError, import_weights, open_npz, read_safetensors
from mmjax.transfer.model_init import check_model_init

# big_vision computes GELU-tanh and LayerNorm eps 1e-6 (flax defaults): the HF ViT is set so.
VIT_CFG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
               image_size=32, patch_size=8, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
SIGLIP_CFG = dict(
    text_config=dict(vocab_size=99, hidden_size=24, intermediate_size=37, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=10, projection_size=32),
    vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                       num_attention_heads=2, image_size=32, patch_size=8))
STDS = {"patch_emb": 0.001, "cls_token": 0.01, "position_emb": 0.01, "token_embedding": 0.01,
        "out_proj": 0.003, "output.dense": 0.003, "fc2": 0.003, "fc1.weight": 0.2,
        "intermediate.dense.weight": 0.2, "pooler": 0.1, "probe": 1.0}
IDS = np.array([[5, 17, 33, 91, 7, 1, 1, 1, 1, 1], [5, 9, 8, 7, 6, 5, 4, 97, 3, 2]], np.int32)


# -- this test's HF -> big_vision converter -----------------------------------------------------
def _attn(out, bv, q, k, v, o, heads):
  """flax MultiHeadDotProductAttention params from torch (out, in) weights and biases."""
  for name, (w, b) in zip(("query", "key", "value"), (q, k, v)):
    out[f"{bv}/{name}/kernel"] = w.T.reshape(w.shape[1], heads, -1)  # (D, H, Dh)
    out[f"{bv}/{name}/bias"] = b.reshape(heads, -1)
  w, b = o
  out[f"{bv}/out/kernel"] = w.T.reshape(heads, -1, w.shape[0])  # (H, Dh, D)
  out[f"{bv}/out/bias"] = b


def _norm(out, bv, t, hf):
  out[f"{bv}/scale"], out[f"{bv}/bias"] = t[f"{hf}.weight"], t[f"{hf}.bias"]


def _dense(out, bv, t, hf):
  out[f"{bv}/kernel"], out[f"{bv}/bias"] = t[f"{hf}.weight"].T, t[f"{hf}.bias"]


def _wb(t, hf):
  return t[f"{hf}.weight"], t[f"{hf}.bias"]


def _clip_style_blocks(out, bv, t, hf, depth, heads):
  for i in range(depth):
    b, h = f"{bv}/encoderblock_{i}", f"{hf}.encoder.layers.{i}"
    _norm(out, f"{b}/LayerNorm_0", t, f"{h}.layer_norm1")
    a = f"{h}.self_attn"
    _attn(out, f"{b}/MultiHeadDotProductAttention_0", _wb(t, f"{a}.q_proj"), _wb(t, f"{a}.k_proj"),
          _wb(t, f"{a}.v_proj"), _wb(t, f"{a}.out_proj"), heads)
    _norm(out, f"{b}/LayerNorm_1", t, f"{h}.layer_norm2")
    _dense(out, f"{b}/MlpBlock_0/Dense_0", t, f"{h}.mlp.fc1")
    _dense(out, f"{b}/MlpBlock_0/Dense_1", t, f"{h}.mlp.fc2")


def vit_to_big_vision(t, cfg):
  """An HF ViTModel's tensors as a big_vision ViT (pool "tok", rep_size = width)."""
  out, heads, depth = {}, cfg["num_attention_heads"], cfg["num_hidden_layers"]
  out["embedding/kernel"] = t["embeddings.patch_embeddings.projection.weight"].transpose(2, 3, 1, 0)
  out["embedding/bias"] = t["embeddings.patch_embeddings.projection.bias"]
  pos = t["embeddings.position_embeddings"]  # (1, 1 + N, D); big_vision's cls gets no position
  out["cls"] = t["embeddings.cls_token"] + pos[:, :1]
  out["pos_embedding"] = pos[:, 1:]
  for i in range(depth):
    b, h = f"Transformer/encoderblock_{i}", f"encoder.layer.{i}"
    _norm(out, f"{b}/LayerNorm_0", t, f"{h}.layernorm_before")
    a = f"{h}.attention.attention"
    _attn(out, f"{b}/MultiHeadDotProductAttention_0", _wb(t, f"{a}.query"), _wb(t, f"{a}.key"),
          _wb(t, f"{a}.value"), _wb(t, f"{h}.attention.output.dense"), heads)
    _norm(out, f"{b}/LayerNorm_1", t, f"{h}.layernorm_after")
    _dense(out, f"{b}/MlpBlock_0/Dense_0", t, f"{h}.intermediate.dense")
    _dense(out, f"{b}/MlpBlock_0/Dense_1", t, f"{h}.output.dense")
  _norm(out, "Transformer/encoder_norm", t, "layernorm")
  _dense(out, "pre_logits", t, "pooler.dense")
  return out


def siglip_to_big_vision(t, cfg):
  """An HF SiglipModel's tensors as a big_vision two-tower checkpoint."""
  out, v, x = {}, cfg["vision_config"], cfg["text_config"]
  e = "vision_model.embeddings"
  out["img/embedding/kernel"] = t[f"{e}.patch_embedding.weight"].transpose(2, 3, 1, 0)
  out["img/embedding/bias"] = t[f"{e}.patch_embedding.bias"]
  out["img/pos_embedding"] = t[f"{e}.position_embedding.weight"][None]
  _clip_style_blocks(out, "img/Transformer", t, "vision_model", v["num_hidden_layers"],
                     v["num_attention_heads"])
  _norm(out, "img/Transformer/encoder_norm", t, "vision_model.post_layernorm")
  h, d = "vision_model.head", v["hidden_size"]
  out["img/MAPHead_0/probe"] = t[f"{h}.probe"]
  w, b = t[f"{h}.attention.in_proj_weight"], t[f"{h}.attention.in_proj_bias"]
  _attn(out, "img/MAPHead_0/MultiHeadDotProductAttention_0", *[(w[i * d:(i + 1) * d], b[i * d:(i + 1) * d])
                                                                for i in range(3)],
        _wb(t, f"{h}.attention.out_proj"), v["num_attention_heads"])
  _norm(out, "img/MAPHead_0/LayerNorm_0", t, f"{h}.layernorm")
  _dense(out, "img/MAPHead_0/MlpBlock_0/Dense_0", t, f"{h}.mlp.fc1")
  _dense(out, "img/MAPHead_0/MlpBlock_0/Dense_1", t, f"{h}.mlp.fc2")
  out["txt/Embed_0/embedding"] = t["text_model.embeddings.token_embedding.weight"]
  out["txt/pos_embedding"] = t["text_model.embeddings.position_embedding.weight"][None]
  _clip_style_blocks(out, "txt/Encoder_0", t, "text_model", x["num_hidden_layers"],
                     x["num_attention_heads"])
  _norm(out, "txt/Encoder_0/encoder_norm", t, "text_model.final_layer_norm")
  _dense(out, "txt/head", t, "text_model.head")
  out["t"], out["b"] = t["logit_scale"], t["logit_bias"]
  return out


def scanned(tensors, encoder):
  """big_vision's scan layout: every `encoder`/encoderblock_i/X stacked into encoderblock/X."""
  out, stacks = {}, {}
  for k, v in tensors.items():
    if k.startswith(f"{encoder}/encoderblock_"):
      i, rest = k[len(f"{encoder}/encoderblock_"):].split("/", 1)
      stacks.setdefault(rest, {})[int(i)] = v
    else:
      out[k] = v
  for rest, layers in stacks.items():
    out[f"{encoder}/encoderblock/{rest}"] = np.stack([layers[i] for i in range(len(layers))])
  return out


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_files(tmp_path_factory):
  """(HF folder, big_vision .npz with "params/" keys, scanned .npz compressed) of one random ViT."""
  torch.manual_seed(0)
  d = tmp_path_factory.mktemp("vit")
  randomized(ViTModel(ViTConfig(**VIT_CFG)), STDS).save_pretrained(d / "hf")
  bv = vit_to_big_vision(read_safetensors(d / "hf"), VIT_CFG)
  np.savez(d / "bv.npz", **{f"params/{k}": v for k, v in bv.items()})
  np.savez_compressed(d / "bv_scan.npz", **scanned(bv, "Transformer"))
  return d / "hf", d / "bv.npz", d / "bv_scan.npz"


@pytest.fixture(scope="module")
def siglip_files(tmp_path_factory):
  d = tmp_path_factory.mktemp("siglip")
  model = randomized(SiglipModel(SiglipConfig(**SIGLIP_CFG)), STDS)
  with torch.no_grad():
    model.logit_scale.fill_(2.3)
    model.logit_bias.fill_(-1.5)
  model.save_pretrained(d / "hf")
  bv = siglip_to_big_vision(read_safetensors(d / "hf"), SIGLIP_CFG)
  np.savez(d / "bv.npz", **{f"params/{k}": v for k, v in scanned(bv, "txt/Encoder_0").items()})
  return d / "hf", d / "bv.npz"


def _params(model):
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Param)}


@pytest.fixture(scope="module")
def pixels():
  return np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)  # NCHW


# -- tests ---------------------------------------------------------------------------------------
def test_vit_npz_equals_the_hf_path_and_pytorch(vit_files, pixels):
  hf, npz, npz_scan = vit_files
  with torch.no_grad():
    want = ViTModel.from_pretrained(hf, attn_implementation="eager").eval()(torch.from_numpy(pixels))
  from_hf = hf_vit.load_vit(hf)
  for path in (npz, npz_scan):
    ours = big_vision.load_vit(path)
    assert ours.spec == from_hf.spec, path
    a, b = _params(ours), _params(from_hf)
    assert a.keys() == b.keys()
    # big_vision's class token carries the position HF adds to it; its own position row is 0.
    np.testing.assert_array_equal(a.pop("cls_token")[0, 0],
                                  b["cls_token"][0, 0] + b["pos_embed.embedding"][0])
    np.testing.assert_array_equal(a["pos_embed.embedding"][0], 0)
    a["pos_embed.embedding"] = a["pos_embed.embedding"][1:]
    b["pos_embed.embedding"] = b["pos_embed.embedding"][1:]
    for k, v in a.items():
      np.testing.assert_array_equal(v, b[k], err_msg=f"{path.name}: {k}")
    out = nnx.jit(lambda m, x: m(x))(ours, pixels.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(out.tokens, want.last_hidden_state[:, 1:].numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(out.pooled, want.pooler_output.numpy(), atol=1e-5, rtol=0)


def test_siglip_npz_equals_the_hf_path_and_pytorch(siglip_files, pixels):
  hf, npz = siglip_files
  ours, from_hf = big_vision.load_siglip(npz), hf_siglip.load_siglip(hf)
  a, b = _params(ours), _params(from_hf)
  assert a.keys() == b.keys()
  for k, v in a.items():
    np.testing.assert_array_equal(v, b[k], err_msg=k)
  ref = SiglipModel.from_pretrained(hf, attn_implementation="eager").eval()
  with torch.no_grad():
    want = ref(input_ids=torch.from_numpy(IDS.astype(np.int64)), pixel_values=torch.from_numpy(pixels))
  emb, aux = nnx.jit(lambda m, x, t: m({"image": x, "text": t}))(ours, pixels.transpose(0, 2, 3, 1), IDS)
  np.testing.assert_allclose(emb["image"], want.image_embeds.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(emb["text"], want.text_embeds.numpy(), atol=1e-5, rtol=0)
  logits = aux["logit_scale"] * emb["image"] @ emb["text"].T + aux["logit_bias"]
  np.testing.assert_allclose(logits, want.logits_per_image.numpy(), atol=1e-5, rtol=0)


def test_pickled_archives_are_refused(tmp_path):
  np.savez(tmp_path / "objects.npz", kernel=np.zeros(3, np.float32),
           meta=np.array([{"step": 1}], dtype=object))
  with pytest.raises(ValueError, match="'meta' holds Python objects"):
    big_vision.load_vit(tmp_path / "objects.npz")
  (tmp_path / "pickle.npz").write_bytes(pickle.dumps({"embedding/kernel": np.zeros(3)}))
  with pytest.raises(ValueError, match="not an .npz"):
    open_npz(tmp_path / "pickle.npz")


def test_mismatched_heads_and_names_are_reported(vit_files):
  _, npz, _ = vit_files
  tensors = big_vision.read_npz(npz)
  fields = big_vision.vit_fields(tensors)
  assert fields["heads"] == 4
  two_heads = blank_module(lambda r: ViT(None, rngs=r, **{**fields, "heads": 2}), nnx.Rngs(0))
  del tensors["Transformer/encoder_norm/scale"]
  with pytest.raises(WeightMismatchError) as e:
    import_weights(two_heads, tensors, big_vision.vit_rules(two_heads.spec))
  msg = str(e.value)
  assert "missing tensors (1): Transformer/encoder_norm/scale" in msg
  assert "expected (D, 2 heads, head_dim)" in msg and "mis-shaped tensors (14)" in msg


def test_model_init_refuses_a_tower_not_built_with_big_vision_settings(vit_files, siglip_files):
  """A big_vision file records no activation or LayerNorm eps: each tower must have big_vision's
  (gelu_tanh, 1e-6), as an HF folder's must have config.json's, or every output differs."""
  _, npz, _ = vit_files
  fields = big_vision.vit_fields(big_vision.read_npz(npz))
  vit = lambda **kw: nnx.eval_shape(lambda: ViT(None, rngs=nnx.Rngs(0), **{**fields, **kw}))  # noqa: E731
  assert check_model_init(str(npz), vit()) > 0
  with pytest.raises(ValueError, match=r"\): the ViT is not built like the checkpoint \(ln_eps: module "
                     r"1e-12, checkpoint 1e-06; act: module 'gelu', checkpoint 'gelu_tanh'\)"):
    check_model_init(str(npz), vit(act="gelu", ln_eps=1e-12))
  _, two = siglip_files
  tensors = big_vision.read_npz(two)
  vision = big_vision.vit_fields(big_vision.subtree(tensors, big_vision.IMG))
  text = big_vision.text_fields(big_vision.subtree(tensors, big_vision.TXT))
  siglip = lambda t: nnx.eval_shape(lambda: hf_siglip.build_siglip(vision, t, rngs=nnx.Rngs(0)))  # noqa: E731
  assert check_model_init(str(two), siglip(text)) > 0
  clip_like = {**text, "act": "quick_gelu", "ln_eps": 1e-5}  # CLIP's settings
  with pytest.raises(ValueError, match=r"\(text tower\): the ClipTextEncoder is not built like the "
                     r"checkpoint \(ln_eps: module 1e-05, checkpoint 1e-06; act: module 'quick_gelu'"):
    check_model_init(str(two), siglip(clip_like))
  holder = nnx.eval_shape(lambda: hf_siglip.build_siglip(vision, clip_like, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"\['encoders/text'\] .*: the ClipTextEncoder is not built"):
    check_model_init({"encoders/text": str(two)}, holder)


def test_a_compressed_scanned_stack_is_read_once_for_all_its_rows(vit_files, monkeypatch):
  """Each layer of a compressed stack read alone would decompress the whole stack per layer."""
  _, _, npz_scan = vit_files
  key = "Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"
  want = np.load(npz_scan)[key]  # (depth, D, mlp_dim)
  reads, getitem = [], np.lib.npyio.NpzFile.__getitem__
  monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda f, k: reads.append(k) or getitem(f, k))
  stack = open_npz(npz_scan)[key]
  assert stack.span is None and len(want) == 2  # compressed
  for i in reversed(range(len(want))):
    np.testing.assert_array_equal(stack.row(i).read(), want[i])
  assert reads == [key]
  assert stack._rows is None  # pylint: disable=protected-access (freed once every row was read)
