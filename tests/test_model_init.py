"""`config.model_init`: pretrained weights placed straight onto their shardings.

A ViT-L/16-sized checkpoint (float16, about 300M parameters) loads onto an FSDP mesh of the 8
fake CPU devices with peak host memory under 1.5x the file (the loaded shards included), equal
values, and no large constant in a jitted train step; the real MiniLM loads through
model_init (inside a bigger model, under LoRA) with the sentence embeddings of HF PyTorch; bad
entries are refused naming the entry and every mismatch.
"""

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from hf_reference import randomized
from jax.sharding import NamedSharding, PartitionSpec as P
from mmjax import sharding
from mmjax.encoders.text import BertEncoder
from mmjax.encoders.vision import ViT
from mmjax.transfer import clip, siglip
from mmjax.transfer.bert import blank_module
from mmjax.transfer.io import (WeightMismatchError, open_safetensors, read_safetensors,
                               transformed_shape, write_safetensors)
from mmjax.transfer.lora import apply_lora
from mmjax.transfer.minilm import encode_sentences, load_minilm, minilm_path
from mmjax.transfer.model_init import apply_model_init, check_model_init, load_model_init
from mmjax.transfer.vit import hf_config, save_vit, vit_rules

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
MIB = 1 << 20


# -- helpers -------------------------------------------------------------------------------------
_ITEMSIZE = {"f64": 8, "f32": 4, "f16": 2, "bf16": 2, "i64": 8, "i32": 4, "i16": 2, "i8": 1,
             "ui8": 1, "ui32": 4, "i1": 1}


def large_constants(stablehlo: str, limit: int = MIB) -> list[str]:
  """The types of the constants in lowered StableHLO text bigger than `limit` bytes."""
  out = []
  for t in re.findall(r"stablehlo\.constant dense<[^>]*> : tensor<([^>]*)>", stablehlo):
    *dims, elem = t.split("x")
    if int(np.prod([int(d) for d in dims], dtype=np.int64)) * _ITEMSIZE.get(elem, 8) > limit:
      out.append(t)
  return out


def write_float16_safetensors(path, names_shapes, seed=0):
  """A .safetensors file of random finite float16 tensors (|x| < 2), written one at a time."""
  header, offset = {}, 0
  for name, shape in names_shapes:
    n = 2 * int(np.prod(shape))
    header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
    offset += n
  head = json.dumps(header).encode()
  head += b" " * (-len(head) % 8)
  rng = np.random.default_rng(seed)
  with open(path, "wb") as f:
    f.write(len(head).to_bytes(8, "little") + head)
    for _, shape in names_shapes:
      # Random bits without the exponent's top bit: finite values, 10x faster than normals.
      n = int(np.prod(shape))
      words = rng.integers(0, 2**63, -(-n // 4), dtype=np.uint64)
      f.write((words.view(np.uint16)[:n] & np.uint16(0xBFFF)).tobytes())


def vit_l_checkpoint(folder):
  """An HF ViTModel folder of ViT-L/16's shapes, random float16 values; returns its size."""
  with jax.threefry_partitionable(False):  # traces ~5x faster
    abstract = nnx.eval_shape(lambda: ViT("L/16", pooler=True, rngs=nnx.Rngs(0)))
  spec = abstract.spec
  params = {".".join(map(str, p)): v for p, v in nnx.iter_graph(abstract) if isinstance(v, nnx.Param)}
  names_shapes = []
  for r in vit_rules(spec):
    ours = tuple(params[r.path].shape)
    theirs = np.shape(r.to_foreign(np.broadcast_to(np.zeros((), np.float16), ours)))
    assert transformed_shape(r, theirs) == ours
    names_shapes.append((r.name, theirs))
  os.makedirs(folder, exist_ok=True)
  write_float16_safetensors(os.path.join(folder, "model.safetensors"), names_shapes)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({**hf_config(spec), "hidden_act": "gelu", "layer_norm_eps": 1e-6}, f)
  return os.path.getsize(os.path.join(folder, "model.safetensors"))


# The subprocess: a fresh process whose resident memory before and at its peak is measured.
LOAD_SCRIPT = textwrap.dedent("""
  import json, re, resource, sys
  import jax, jax.numpy as jnp, numpy as np
  from flax import nnx
  from mmjax import sharding
  from mmjax.encoders.vision import ViT
  from mmjax.transfer.io import open_safetensors
  from mmjax.transfer.model_init import load_model_init
  from mmjax.transfer.vit import vit_rules

  folder, hlo_path = sys.argv[1], sys.argv[2]

  def rss(field):
    with open("/proc/self/status") as f:
      return int(re.search(field + r":\\s+(\\d+) kB", f.read()).group(1)) * 1024

  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  rules = sharding.DEFAULT_RULES
  ctor = lambda: ViT("L/16", pooler=True, param_dtype=jnp.float16, rngs=nnx.Rngs(0))
  with jax.threefry_partitionable(False):  # traces faster
    abstract = nnx.eval_shape(ctor)
  graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
  shardings = sharding.param_shardings(params, mesh, rules)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params,
                        shardings)
  # The runtime's one-time allocations happen before the baseline.
  jax.block_until_ready(jax.device_put(np.ones((8, 8), np.float16),
                                       jax.sharding.NamedSharding(mesh, jax.P("fsdp"))))
  before = rss("VmRSS")
  loaded = load_model_init(folder, abstract, params)  # a plain source: the whole model
  jax.block_until_ready(loaded)
  peak = rss("VmHWM")
  out = {"before": before, "peak": peak}
  # Every value equals the file's, in the expected sharding.
  tensors = open_safetensors(folder + "/model.safetensors")
  flat = {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(loaded)}
  want_sh = {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(shardings)}
  for r in vit_rules(abstract.spec):
    leaf = flat[r.path]
    assert leaf.dtype == jnp.float16 and leaf.sharding == want_sh[r.path], r.path
    want = np.ascontiguousarray(r.to_mmjax(tensors[r.name].read())).view(np.uint16)  # bitwise
    for shard in leaf.addressable_shards:
      assert np.array_equal(np.asarray(shard.data).view(np.uint16), want[shard.index]), r.path
  out["count"] = len(flat)
  k = flat["encoder.layers.0.mlp.fc1.kernel"]
  out["fc1_shards"] = sorted({s.data.shape for s in k.addressable_shards})
  # A jitted train step of the loaded model: the parameters are its arguments, not constants.
  rest = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), rest)  # a ViT has no other state
  def step(p, images):
    def loss(p):
      return jnp.mean(nnx.merge(graphdef, p, rest)(images).pooled.astype(jnp.float32) ** 2)
    l, g = jax.value_and_grad(loss)(p)
    return l, jax.tree.map(lambda a, b: a - 0.1 * b, p, g)
  images = jnp.zeros((8, 224, 224, 3), jnp.float32)
  with jax.set_mesh(mesh), sharding.axis_rules(rules, mesh):
    text = jax.jit(step).lower(loaded, images).as_text()
  with open(hlo_path, "w") as f:
    f.write(text)
  print(json.dumps(out))
""")


# -- (a) + (b): ViT-L/16 onto an FSDP mesh -------------------------------------------------------
def test_vit_l_loads_onto_an_fsdp_mesh_within_host_memory_and_without_constants(tmp_path):
  size = vit_l_checkpoint(tmp_path / "vit_l")
  assert 290e6 < size / 2 < 320e6  # ViT-L/16 with its pooler: ~304M float16 parameters
  hlo = tmp_path / "programs.mlir"
  env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
  proc = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(tmp_path / "vit_l"), str(hlo)],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  growth = out["peak"] - out["before"]
  # The loaded shards themselves (float16: the file's size) live in host memory here.
  assert growth <= 1.5 * size, f"peak host memory grew by {growth / MIB:.0f} MiB, file {size / MIB:.0f} MiB"
  assert out["fc1_shards"] == [[128, 4096]]  # (1024, 4096) over 8 devices along "embed"
  text = hlo.read_text()
  assert "stablehlo.constant" in text and "dot_general" in text
  assert large_constants(text) == []


def test_large_constant_detector_finds_closed_over_weights():
  w = np.ones((600, 600), np.float32)  # 1.4 MiB
  text = jax.jit(lambda x: x @ w).lower(jnp.ones((2, 600))).as_text()
  assert large_constants(text) == ["600x600xf32"]
  assert large_constants(jax.jit(lambda x, w: x @ w).lower(jnp.ones((2, 600)), w).as_text()) == []


# -- (c): MiniLM ---------------------------------------------------------------------------------
SENTENCES = ["A man is eating food.", "The children were playing football in the park.",
             "Kids play soccer outdoors.", "Cats are independent animals.", ""]


class Holder(nnx.Module):
  """A model with its text encoder under `encoders`, as the zoo's models keep theirs."""

  def __init__(self, rngs):
    self.encoders = nnx.Dict({"text": BertEncoder("minilm-l6-h384", pool="mean", rngs=rngs)})
    self.head = nnx.Linear(384, 3, rngs=rngs)


def test_minilm_through_model_init_matches_pytorch():
  with jax.threefry_partitionable(False):
    model = Holder(nnx.Rngs(0))
  apply_lora(model, r"encoders/text/.*/attn/query", rank=2, rngs=nnx.Rngs(1))
  model.encoders["text"].encoder.layers[0].attn.query.lora_b[...] = jnp.full((2, 384), 0.5)
  lora_a = np.asarray(model.encoders["text"].encoder.layers[0].attn.query.lora_a[...])
  head = np.asarray(model.head.kernel[...])
  config = ml_collections.ConfigDict({"model_init": {"encoders/text": "minilm"}})
  apply_model_init(model, config.model_init)
  reference, tokenizer = load_minilm()
  ours = model.encoders["text"]
  q = ours.encoder.layers[0].attn.query
  np.testing.assert_array_equal(q.base.kernel[...], reference.encoder.layers[0].attn.query.kernel[...])
  np.testing.assert_array_equal(q.lora_a[...], lora_a)  # adapters and other modules untouched
  np.testing.assert_array_equal(model.head.kernel[...], head)
  q.lora_b[...] = jnp.zeros((2, 384))  # now the adapter adds nothing: MiniLM itself
  got = encode_sentences(ours, tokenizer, SENTENCES, normalize=False)
  ref = transformers.BertModel.from_pretrained(minilm_path(), attn_implementation="eager").eval()
  enc = tokenizer(SENTENCES, padding=True, return_tensors="pt")
  with torch.no_grad():
    last = ref(**enc).last_hidden_state
  m = enc["attention_mask"].unsqueeze(-1).float()
  want = ((last * m).sum(1) / m.sum(1)).numpy()
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


# -- bad entries ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
  cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=64)
  folder = tmp_path_factory.mktemp("tiny_bert")
  randomized(transformers.BertModel(cfg), {}).save_pretrained(folder)
  sharded = tmp_path_factory.mktemp("tiny_bert_sharded")
  randomized(transformers.BertModel(cfg), {}).save_pretrained(sharded, max_shard_size="20KB")
  return folder, sharded


def _bert(**kw):
  fields = {**dict(vocab_size=100, hidden=32, depth=2, heads=4, mlp_dim=64, max_len=64), **kw}
  return blank_module(lambda r: BertEncoder("tiny", rngs=r, **fields), nnx.Rngs(0))


def _params(model):
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.iter_graph(model)
          if isinstance(v, nnx.Param)}


def test_hf_folders_single_and_sharded_load_on_abstract_params(tiny_bert):
  folder, sharded = tiny_bert
  assert (sharded / "model.safetensors.index.json").exists()
  mesh = sharding.make_mesh({"data": 1, "fsdp": 8, "tensor": 1})
  for path in (folder, sharded):
    model = _bert()
    params = nnx.state(model, nnx.Param)
    shardings = sharding.param_shardings(params, mesh, sharding.DEFAULT_RULES)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            params, shardings)
    params = load_model_init({"": str(path)}, model, abstract)
    kernel = params["encoder"]["layers"][0]["attn"]["query"]["kernel"].get_value()
    assert kernel.sharding == NamedSharding(mesh, P("fsdp", None))
    nnx.update(model, params)
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
      tensors |= read_safetensors(f)
    np.testing.assert_array_equal(_params(model)["encoder.layers.1.mlp.fc2.kernel"],
                                  tensors["encoder.layer.1.output.dense.weight"].T)


def test_bad_entries_are_named(tiny_bert, tmp_path):
  folder, _ = tiny_bert
  holder = blank_module(lambda r: _Wrap(_bert(), r), nnx.Rngs(0))
  params = nnx.state(holder, nnx.Param)
  with pytest.raises(ValueError, match=r"no module at 'encoders/txt'.*'encoders/text'"):
    load_model_init({"encoders/txt": str(folder)}, holder, params)
  # Shapes that do not fit: every mismatch listed, with the entry.
  wide = blank_module(lambda r: _Wrap(_bert(mlp_dim=48), r), nnx.Rngs(0))
  with pytest.raises(WeightMismatchError) as e:
    load_model_init({"encoders/text": str(folder)}, wide, nnx.state(wide, nnx.Param))
  msg = str(e.value)
  assert msg.startswith(f"model_init['encoders/text'] ({folder}):")
  # The same check from the headers alone, on the abstract model (before any init compiles).
  with pytest.raises(WeightMismatchError) as early:
    check_model_init({"encoders/text": str(folder)}, nnx.eval_shape(lambda: wide))
  assert str(early.value) == msg
  assert check_model_init({"encoders/text": str(folder)}, nnx.eval_shape(lambda: holder)) == 39
  assert "mis-shaped tensors (6)" in msg
  assert "encoder.layer.1.output.dense.weight: got (64, 32) (stored (32, 64))" in msg
  # A checkpoint with a tensor the module has no place for.
  extra = tmp_path / "extra"
  extra.mkdir()
  (extra / "config.json").write_text((folder / "config.json").read_text())
  tensors = read_safetensors(folder) | {"encoder.layer.9.output.dense.weight": np.zeros(2, np.float32)}
  write_safetensors(extra / "model.safetensors", tensors)
  with pytest.raises(WeightMismatchError, match=r"unexpected tensors \(1\): encoder.layer.9"):
    load_model_init({"encoders/text": str(extra)}, holder, params)
  # A setting shapes cannot show (LayerNorm eps), an architecture that does not fit, no source.
  eps = blank_module(lambda r: _Wrap(_bert(ln_eps=1e-6), r), nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"ln_eps: module 1e-06, checkpoint 1e-12"):
    load_model_init({"encoders.text": str(folder)}, eps, nnx.state(eps, nnx.Param))
  with pytest.raises(ValueError, match=r"a 'bert' checkpoint loads into a BertEncoder, not a _Wrap"):
    load_model_init({"": str(folder)}, holder, params)
  with pytest.raises(FileNotFoundError, match="no such folder"):
    load_model_init({"encoders/text": str(tmp_path / "nothing")}, holder, params)


class _Wrap(nnx.Module):
  def __init__(self, encoder, rngs, name="text"):
    self.encoders = nnx.Dict({name: encoder})


def test_a_pooler_the_module_lacks_is_skipped_a_head_or_grid_it_lacks_refused(tiny_bert, tmp_path, caplog):
  """bert-base-uncased and ViT-in21k ship their poolers: a module built without one takes the rest
  (as a headless ViT leaves a classifier). A ViT with a head from a checkpoint without a
  classifier, or with as many patches on another grid, is refused naming the cause."""
  folder, _ = tiny_bert  # a BertModel saved with its pooler
  model = _bert(pooler=False)
  with caplog.at_level(logging.INFO, logger="mmjax.transfer.io"):
    apply_model_init(model, str(folder))
  assert "not loading the checkpoint's pooler (pooler.dense.weight, pooler.dense.bias)" in caplog.text
  np.testing.assert_array_equal(_params(model)["encoder.layers.1.mlp.fc2.kernel"],
                                read_safetensors(folder)["encoder.layer.1.output.dense.weight"].T)
  cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                               intermediate_size=64, image_size=32, patch_size=8)
  randomized(transformers.ViTModel(cfg), {}).save_pretrained(tmp_path / "vit")  # with its pooler
  source = str(tmp_path / "vit")
  vit = lambda **kw: nnx.eval_shape(lambda: ViT(None, width=32, depth=1, heads=4, mlp_dim=64, patch=8,  # noqa: E731
                                                 ln_eps=1e-12, rngs=nnx.Rngs(0), **kw))
  assert check_model_init(source, vit(image_size=32)) == 22
  with pytest.raises(ValueError, match=rf"^model_init\[''\] \({re.escape(source)}\): the checkpoint has "
                     r"no classifier .* build the ViT with num_classes=0 to load its encoder$"):
    check_model_init(source, vit(image_size=32, num_classes=3))
  # 32x32 images in 4x4 patches of 8, 16x64 images in 2x8 patches: 16 positions either way.
  with pytest.raises(ValueError, match=r"the ViT is not built like the checkpoint \(patch grid: module "
                     r"\(2, 8\) \(image_size \(16, 64\), patch \(8, 8\)\), checkpoint \(4, 4\)"):
    check_model_init(source, vit(image_size=(16, 64)))


def test_broken_shard_indexes_are_named(tiny_bert, tmp_path):
  """An index without its weight_map, or a tensor in two shards (which copy is meant?), is refused."""
  _, sharded = tiny_bert
  abstract = nnx.eval_shape(_bert)
  for name in ("no_map", "twice"):
    shutil.copytree(sharded, tmp_path / name)
  (tmp_path / "no_map" / "model.safetensors.index.json").write_text('{"metadata": {}}')
  with pytest.raises(ValueError, match=r"model.safetensors.index.json': no 'weight_map' object"):
    check_model_init(str(tmp_path / "no_map"), abstract)
  first, second = sorted((tmp_path / "twice").glob("*.safetensors"))[:2]
  extra = sorted(read_safetensors(second).items())[0]
  write_safetensors(first, read_safetensors(first) | dict([extra]))
  with pytest.raises(ValueError, match=rf"tensor '{re.escape(extra[0])}' is in two shards, '.*{first.name}'"
                                       rf" and '.*{second.name}'"):
    check_model_init(str(tmp_path / "twice"), abstract)


def test_safetensors_of_every_numpy_dtype_and_one_mmjax_cannot_read(tmp_path):
  """Unsigned and float8 tensors read as torch wrote them; a tensor of a type numpy lacks (4-bit
  floats, packed) fails when read, not for the whole file."""
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top

  gen = torch.Generator().manual_seed(0)
  want = {"f8_e4m3": torch.randn(3, 4, generator=gen).to(torch.float8_e4m3fn),
          "f8_e5m2": torch.randn(3, 4, generator=gen).to(torch.float8_e5m2),
          **{f"u{b}": torch.tensor([0, 1, 2**b - 1], dtype=getattr(torch, f"uint{b}")) for b in (16, 32)},
          "u64": torch.tensor([0, 1, 2**63], dtype=torch.uint64)}
  save_file(want, tmp_path / "typed.safetensors")
  got = open_safetensors(tmp_path / "typed.safetensors")
  for name, t in want.items():
    a = got[name].read()
    assert a.dtype.name == str(t.dtype).removeprefix("torch."), name
    if name.startswith("f8"):
      np.testing.assert_array_equal(a.astype(np.float32), t.float().numpy(), err_msg=name)
    else:
      assert [int(x) for x in a] == t.tolist(), name
  # A hand-written file: an F4 tensor (8 values packed in 4 bytes) beside an F32 one.
  head = json.dumps({"packed": {"dtype": "F4", "shape": [8], "data_offsets": [0, 4]},
                     "plain": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
  (tmp_path / "f4.safetensors").write_bytes(len(head).to_bytes(8, "little") + head + bytes(4)
                                            + np.array([1.5, -2], np.float32).tobytes())
  got = open_safetensors(tmp_path / "f4.safetensors")
  np.testing.assert_array_equal(got["plain"].read(), [1.5, -2])
  assert got["packed"].shape == (8,)
  with pytest.raises(ValueError, match=r"f4.safetensors': tensor 'packed' has dtype 'F4', which mmjax "
                                       r"cannot read; supported: \['BF16', 'BOOL', 'C64', 'F16'"):
    got["packed"].read()


def test_an_hf_vit_into_a_vit_hf_cannot_express_is_refused_naming_the_fields(tmp_path):
  """A CLIP-style ViT (pre-norm, no patch bias) has no HF ViT layout: refused before any read."""
  sizes = dict(width=32, depth=1, heads=4, mlp_dim=64, patch=8, image_size=16)
  save_vit(blank_module(lambda r: ViT(None, rngs=r, **sizes), nnx.Rngs(0)), tmp_path / "vit")
  clip_like = nnx.eval_shape(lambda: _Wrap(ViT(None, pre_norm=True, patch_bias=False, rngs=nnx.Rngs(0),
                                               **sizes), None, name="image"))
  with pytest.raises(ValueError) as e:
    check_model_init({"encoders/image": str(tmp_path / "vit")}, clip_like)
  assert str(e.value).startswith(f"model_init['encoders/image'] ({tmp_path / 'vit'}): this ViT has no "
                                 "HF ViT layout: pre_norm=True (HF ViT has no LayerNorm before the "
                                 "encoder: needs False); patch_bias=False ("), str(e.value)


# -- CLIP, SigLIP and big_vision sources ---------------------------------------------------------
def test_two_tower_sources_into_whole_models_and_single_towers(tmp_path):
  clip_cfg = transformers.CLIPConfig(
      text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=16, eos_token_id=98),
      vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, image_size=32, patch_size=8), projection_dim=24)
  randomized(transformers.CLIPModel(clip_cfg), {}).save_pretrained(tmp_path / "clip")
  siglip_cfg = transformers.SiglipConfig(
      text_config=dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                       num_attention_heads=4, max_position_embeddings=10),
      vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, image_size=32, patch_size=8))
  randomized(transformers.SiglipModel(siglip_cfg), {}).save_pretrained(tmp_path / "siglip")
  for load, folder in ((clip.load_clip, tmp_path / "clip"), (siglip.load_siglip, tmp_path / "siglip")):
    want = load(folder)
    fresh = load(folder, rngs=nnx.Rngs(1))
    nnx.update(fresh, jax.tree.map(jnp.zeros_like, nnx.state(fresh, nnx.Param)))
    apply_model_init(fresh, str(folder))  # the whole dual encoder
    assert _params(fresh).keys() == _params(want).keys()
    for k, v in _params(want).items():
      np.testing.assert_array_equal(_params(fresh)[k], v, err_msg=f"{folder.name}: {k}")
    # The text tower alone, into a model that holds it: the image tower's tensors are not compared.
    text = want.encoders["text"]
    holder = blank_module(lambda r, t=text: _Wrap(nnx.clone(t), r), nnx.Rngs(0))
    apply_model_init(holder, {"encoders/text": str(folder)})
    for k, v in _params(text).items():
      np.testing.assert_array_equal(_params(holder)[f"encoders.text.{k}"], v, err_msg=k)
  # A big_vision two-tower .npz (written from the SigLIP folder) into one image tower.
  vit = siglip.load_siglip(tmp_path / "siglip").encoders["image"]
  bv = {f"params/img/{k}": v for k, v in _big_vision_vit(vit).items()}
  np.savez(tmp_path / "bv.npz", **bv, **{"params/t": np.zeros(1, np.float32)})
  holder = blank_module(lambda r: _Wrap(nnx.clone(vit), r, name="image"), nnx.Rngs(0))
  apply_model_init(holder, {"encoders/image": str(tmp_path / "bv.npz")})
  for k, v in _params(vit).items():
    np.testing.assert_array_equal(_params(holder)[f"encoders.image.{k}"], v, err_msg=k)


def _big_vision_vit(vit):
  """A SigLIP-shaped mmjax ViT's parameters under big_vision's names (heads split out)."""
  p, h = _params(vit), vit.spec.heads
  out = {"embedding/kernel": p["patch_embed.conv.kernel"], "embedding/bias": p["patch_embed.conv.bias"],
         "pos_embedding": p["pos_embed.embedding"][None], "MAPHead_0/probe": p["map_head.probe"]}
  blocks = [(f"encoder.layers.{i}", f"Transformer/encoderblock_{i}") for i in range(vit.spec.depth)]
  for ours, bv in blocks + [("map_head", "MAPHead_0")]:
    norms = ({"norm": "LayerNorm_0"} if ours == "map_head" else
             {"attn_norm": "LayerNorm_0", "mlp_norm": "LayerNorm_1"})
    for o, b in norms.items():
      out[f"{bv}/{b}/scale"], out[f"{bv}/{b}/bias"] = p[f"{ours}.{o}.scale"], p[f"{ours}.{o}.bias"]
    for proj in ("query", "key", "value"):
      k = p[f"{ours}.attn.{proj}.kernel"]
      out[f"{bv}/MultiHeadDotProductAttention_0/{proj}/kernel"] = k.reshape(k.shape[0], h, -1)
      out[f"{bv}/MultiHeadDotProductAttention_0/{proj}/bias"] = p[f"{ours}.attn.{proj}.bias"].reshape(h, -1)
    k = p[f"{ours}.attn.out.kernel"]
    out[f"{bv}/MultiHeadDotProductAttention_0/out/kernel"] = k.reshape(h, -1, k.shape[-1])
    out[f"{bv}/MultiHeadDotProductAttention_0/out/bias"] = p[f"{ours}.attn.out.bias"]
    for i in (1, 2):
      for w in ("kernel", "bias"):
        out[f"{bv}/MlpBlock_0/Dense_{i - 1}/{w}"] = p[f"{ours}.mlp.fc{i}.{w}"]
  out["Transformer/encoder_norm/scale"] = p["encoder.final_norm.scale"]
  out["Transformer/encoder_norm/bias"] = p["encoder.final_norm.bias"]
  return out
