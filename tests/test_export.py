"""`python -m mmjax.export`: trained workdirs written in the Hugging Face layout, read back by
`transformers` (PyTorch, float32) with the outputs mmjax gives: a CLIP trained on shapes_captions
as a whole `CLIPModel`, the BERT question encoder of a VQA model trained with LoRA (merged) as a
`BertModel`, the parts without a counterpart listed; a bucket as the target; bad targets; and
docs/pretrained.md run as written."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tracemalloc

import jax
import numpy as np
import pytest
import torch
import transformers

from flax import nnx

from mmjax import export, predict
from mmjax.data.datasets import shapes_captions
from mmjax.encoders.text import BertEncoder
from mmjax.encoders.vision import ViT
from mmjax.train import trainer
from mmjax.train.config import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 2
TOL = dict(rtol=1e-5, atol=1e-5)
CLIP_VIT = {"name": "vit", "variant": None, "width": 32, "depth": 2, "heads": 2, "mlp_dim": 64,
            "patch": 15, "image_size": 75, "pool": "cls", "pre_norm": True, "patch_bias": False,
            "act": "quick_gelu", "ln_eps": 1e-5}


def _train(config, tmp_path_factory, name):
  config.train.steps = STEPS
  config.train.eval_every = config.train.checkpoint_every = STEPS
  wd = str(tmp_path_factory.mktemp(name))
  trainer.train(config, wd, progress=False)
  return wd


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The embedded data sets, built once for the module (the doc's subprocesses read them too)."""
  folder = str(tmp_path_factory.mktemp("data"))
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv("MMJAX_DATA_DIR", folder)
    yield folder


@pytest.fixture(scope="module")
def clip_workdir(data_dir, tmp_path_factory):
  """configs/clip_shapes.py:size=tiny with towers HF CLIP has: a ViT with CLIP's options (5x5
  patches of 15 pixels) and CLIP's causal text Transformer, pooling at the tokenizer's [SEP]."""
  config = load_config(os.path.join(REPO, "configs", "clip_shapes.py") + ":size=tiny")
  sized = shapes_captions.sized_config(config.data.num_images)
  sep = shapes_captions.load_tokenizer(config=sized).sep_token_id
  config.model.encoders = {
      "image": CLIP_VIT,
      "text": {"name": "clip_text", "vocab_size": 0, "hidden": 32, "depth": 2, "heads": 2,
               "mlp_dim": 64, "max_len": 16, "eos_id": int(sep)},
  }
  return _train(config, tmp_path_factory, "clip")


@pytest.fixture(scope="module")
def vqa_workdir(data_dir, tmp_path_factory):
  """configs/vqa.py:size=tiny (BERT question encoder) with LoRA on the question encoder's
  attention: its adapters train, so merging them changes the exported weights."""
  config = load_config(os.path.join(REPO, "configs", "vqa.py") + ":size=tiny")
  config.model.fusion_kwargs = {**config.model.fusion_kwargs, "depth": 1}
  config.data.eval_splits = ("test",)
  config.lora = {"pattern": "encoders/text/.*attn/(query|value)", "rank": 2, "alpha": 4.0}
  return _train(config, tmp_path_factory, "vqa")


def test_clip_exports_as_a_clip_model_with_equal_embeddings(clip_workdir, tmp_path, capsys):
  out = str(tmp_path / "clip")
  assert export.main(["--workdir", clip_workdir, "--out", out]) == 0
  printed = capsys.readouterr().out
  assert f"exported step {STEPS}" in printed and "CLIPModel (tokenizer)" in printed
  assert "not exported" not in printed  # the towers, projections and scale are all CLIP's
  summary = json.load(open(os.path.join(out, "export.json")))
  assert summary["step"] == STEPS and summary["not_exported"] == [] and summary["lora_merged"] == []
  assert [(e["folder"], e["architecture"]) for e in summary["exported"]] == [(".", "CLIPModel")]

  p = predict.Predictor.from_workdir(clip_workdir)
  source = p.task.source("test")
  images = [source[i]["image"] for i in range(8)]
  captions = [source[i]["captions"][j].decode() for i in range(4) for j in range(2)]
  pixels = p.image_inputs(images)
  ids, mask = p.text_inputs(captions)
  hf = transformers.CLIPModel.from_pretrained(out).eval()
  with torch.no_grad():
    out_hf = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long),
                pixel_values=torch.tensor(pixels.transpose(0, 3, 1, 2)))
  normed = lambda x: (x / x.norm(dim=-1, keepdim=True)).numpy()
  image_emb, text_emb = p.embed_images(images), p.embed_texts(captions)
  np.testing.assert_allclose(normed(out_hf.image_embeds), image_emb, **TOL)
  np.testing.assert_allclose(normed(out_hf.text_embeds), text_emb, **TOL)
  np.testing.assert_allclose(out_hf.logits_per_image.numpy(), p.logit_scale * image_emb @ text_emb.T, **TOL)
  # The tokenizer written beside it tokenises as the task does.
  tok = transformers.AutoTokenizer.from_pretrained(out)
  np.testing.assert_array_equal(tok(captions[0])["input_ids"], ids[0][mask[0]])


def test_bert_encoder_of_a_lora_vqa_model_exports_merged(vqa_workdir, tmp_path):
  out = str(tmp_path / "vqa")
  summary = export.export(vqa_workdir, out)
  assert len(summary["lora_merged"]) == 2 * 2  # query and value of both layers
  assert [(e["folder"], e["architecture"], e["tokenizer"]) for e in summary["exported"]] == [
      ("encoders/text", "BertModel", True)]
  skipped = {s["module"]: s["reason"] for s in summary["not_exported"]}
  assert skipped["encoders/image"] == "SmallCNN: no Hugging Face counterpart"
  assert {"fusion", "head"} <= set(skipped) and "encoders/text" not in skipped

  p = predict.Predictor.from_workdir(vqa_workdir)
  lora = p.state["params"]["encoders"]["text"]["encoder"]["layers"][0]["attn"]["query"]["lora_b"]
  assert np.abs(np.asarray(lora[...])).max() > 0  # trained adapters: merging changes the kernels
  source = p.task.source("test")
  _, ids, mask = p.vqa_inputs([source[0]["image"]] * 4, [q.decode() for q in source[0]["questions"][:4]])
  with p.context():
    ours = np.asarray(jax.jit(lambda m, i, k: m.encoders["text"](i, k).tokens)(p.model, ids, mask))
  folder = os.path.join(out, "encoders", "text")
  hf = transformers.BertModel.from_pretrained(folder, add_pooling_layer=False).eval()
  with torch.no_grad():
    theirs = hf(input_ids=torch.tensor(ids, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long)).last_hidden_state.numpy()
  np.testing.assert_allclose(theirs[mask], ours[mask], **TOL)  # (valid tokens, D)
  tok = transformers.AutoTokenizer.from_pretrained(folder)
  np.testing.assert_array_equal(tok(source[0]["questions"][0].decode())["input_ids"], ids[0][mask[0]])


def test_export_to_a_bucket(vqa_workdir, gcs_emulator):
  from etils import epath

  out = gcs_emulator.bucket() + "/export"
  export.export(vqa_workdir, out)
  folder = epath.Path(out) / "encoders" / "text"
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in folder.iterdir()}
  summary = json.loads((epath.Path(out) / "export.json").read_text())
  assert summary["exported"][0]["architecture"] == "BertModel"


def test_a_bare_encoder_exports_as_the_whole_model(tmp_path):
  """A `BertEncoder` or `ViT` in memory (`bert.load_bert` gives one) is its HF model, in `out/`."""
  bert = BertEncoder("tiny", vocab_size=100, depth=1, max_len=16, rngs=nnx.Rngs(0))
  vit = ViT(None, width=32, depth=1, heads=4, mlp_dim=64, patch=8, image_size=16, rngs=nnx.Rngs(1))
  for model, arch in ((bert, "BertModel"), (vit, "ViTModel")):
    summary = export.export_model(model, tmp_path / arch)
    assert [(e["folder"], e["architecture"]) for e in summary["exported"]] == [(".", arch)]
    assert summary["not_exported"] == []
  ids = np.array([[2, 17, 33, 91, 5, 3]])
  with torch.no_grad():
    theirs = transformers.BertModel.from_pretrained(tmp_path / "BertModel").eval()(torch.tensor(ids))
  ours = bert(ids, np.ones_like(ids, bool))
  np.testing.assert_allclose(theirs.last_hidden_state.numpy(), ours.tokens, **TOL)
  np.testing.assert_allclose(theirs.pooler_output.numpy(), ours.pooled, **TOL)
  pixels = np.random.default_rng(0).normal(size=(1, 16, 16, 3)).astype(np.float32)
  hf_vit = transformers.ViTModel.from_pretrained(tmp_path / "ViTModel", add_pooling_layer=False)
  with torch.no_grad():
    theirs = hf_vit.eval()(torch.from_numpy(pixels.transpose(0, 3, 1, 2))).last_hidden_state.numpy()
  np.testing.assert_allclose(theirs[:, 1:], vit(pixels).tokens, **TOL)


def test_a_bucket_upload_streams_each_file(gcs_emulator):
  """Files go up in chunks: a 48 MB one (a large tokenizer file here) never sits whole in memory."""
  from etils import epath

  class LargeTokenizer:
    def save_pretrained(self, folder):
      with open(os.path.join(folder, "vocab.bin"), "wb") as f:
        for _ in range(48):
          f.write(bytes(1 << 20))

  out = gcs_emulator.bucket()
  model = BertEncoder("tiny", vocab_size=100, depth=1, max_len=16, rngs=nnx.Rngs(0))
  export.export_model(model, out + "/warm_up")  # first-call allocations (clients, imports)
  tracemalloc.start()
  try:  # 11 MiB streamed; read whole and sent, 188 MiB
    export.export_model(model, out + "/export", tokenizer=LargeTokenizer())
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert (epath.Path(out) / "export" / "vocab.bin").stat().length == 48 << 20
  assert peak < 24 << 20, f"peak {peak / 2**20:.0f} MiB"


def test_bad_targets_and_nothing_to_export(clip_workdir, tmp_path, capsys):
  full = tmp_path / "full"
  full.mkdir()
  (full / "old.txt").write_text("x")
  with pytest.raises(SystemExit):
    export.main(["--workdir", clip_workdir, "--out", str(full)])
  assert "is not an empty folder" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    export.main(["--workdir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")])
  assert "does not exist" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    export.main(["--workdir", clip_workdir, "--out", str(tmp_path / "y"), "--step", "7"])
  assert "no checkpoint of step 7" in capsys.readouterr().err
  # A ViT with CLIP's options beside the tiny config's GRU: not a CLIP, and the ViT alone is not
  # in HF ViT's layout (its pre-norm has no place there); nothing to export, every part listed.
  config = load_config(os.path.join(REPO, "configs", "clip_shapes.py") + ":size=tiny")
  config.model.encoders.image = CLIP_VIT
  setup = trainer.Setup(config)
  model = setup.model(setup.init_state())
  with pytest.raises(ValueError) as e:
    export.export_model(model, tmp_path / "z")
  assert str(e.value).startswith("nothing to export: no part of the model has a Hugging Face counterpart")
  for part in ("(the whole model): not a CLIPModel",
               "encoders/image: ViT: this ViT has no HF ViT layout: pre_norm=True (HF ViT has no LayerNorm before the encoder: needs False); patch_bias=False",
               "encoders/text: RnnTextEncoder: no Hugging Face counterpart",
               "proj: no Hugging Face counterpart", "log_scale: no Hugging Face counterpart"):
    assert part in str(e.value)


def test_pretrained_doc_runs_as_written(data_dir, vqa_workdir, tmp_path):
  """docs/pretrained.md's blocks in order in an empty folder holding train.py and configs/; each
  printed-output block equals what the block before it printed."""
  root = pathlib.Path(REPO)
  (tmp_path / "train.py").symlink_to(root / "train.py")
  (tmp_path / "configs").symlink_to(root / "configs")
  env = {**os.environ, "PYTHONPATH": REPO}  # MMJAX_DATA_DIR: the module's, the quick start's data built
  blocks = re.findall(r"^```(python|bash|)\n(.*?)^```$", (root / "docs" / "pretrained.md").read_text(),
                      flags=re.S | re.M)
  assert [lang for lang, _ in blocks] == ["python", "bash", "bash", "", "python", ""]
  printed = []
  for lang, code in blocks:
    if not lang:
      assert printed[-1].strip() == code.strip()
      continue
    cmd = [sys.executable, "-c", code] if lang == "python" else ["bash", "-ec", code]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{lang} block:\n{code}\n{out.stderr[-4000:]}"
    printed.append(out.stdout)
  saved = json.loads((tmp_path / "workdirs" / "vqa_vit" / "config.json").read_text())
  assert saved["model_init"] == {"encoders/image": "my_vit"}
  summary = json.loads((tmp_path / "exported" / "vqa_vit" / "export.json").read_text())
  assert [(e["folder"], e["architecture"], e["tokenizer"]) for e in summary["exported"]] == [
      ("encoders/image", "ViTModel", False), ("encoders/text", "BertModel", True)]
  # The trained workdir no longer needs its init's files: predict and export restore the checkpoint.
  shutil.rmtree(tmp_path / "my_vit")
  export.export(str(tmp_path / "workdirs" / "vqa_vit"), str(tmp_path / "again"))
  assert (tmp_path / "again" / "encoders" / "image" / "model.safetensors").exists()
