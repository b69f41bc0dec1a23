"""Training throughput: mmjax (jitted) against HF transformers PyTorch eager, in one run.

For each model, one train step (forward + backward + AdamW, float32, all dropout probabilities 0)
is timed on both sides at the same configuration and on the same inputs, back to back:

- mmjax: the trainer's own train step (`mmjax.train.trainer.Setup.make_train_step`, through
  `bench/library_step.py`: value and gradient, global norm, the non-finite guard, the library's
  AdamW), compiled once, its state donated; the model runs with `deterministic=True`, which with
  zero dropout is the same computation as training mode (`--mmjax-mode train` passes False).
- HF: `model.train()`, `torch.optim.AdamW`, eager PyTorch with `torch.set_num_threads(threads)`
  and the library's default attention implementation (`--hf-attn` to choose another).

Reported per model: the parameter count of each side, the median step time of each, the speed
ratio HF ms / mmjax ms (> 1: mmjax is faster), the FLOPs of the mmjax step from XLA's
`compiled.cost_analysis()`, the achieved GFLOP/s of both sides on that FLOP count and their
fraction of the measured float32 matmul limit (a jitted n x n matmul, median), and compile time.

  python bench/throughput.py --out bench/throughput.json            # all four models, full size
  python bench/throughput.py --models vit,bert --steps 10 --warmup 3
  python bench/throughput.py --tiny                                  # seconds; what the smoke test runs

The models (full size; `--tiny` shrinks every width, depth, length and batch):

- vit: ViT-S/16 at 224 px, batch 8, 10 classes; `mmjax.encoders.vision.ViT` vs
  `ViTForImageClassification`. Parameter layouts are the same, so the counts agree exactly.
- bert: BERT-small (D 512, 4 layers, 8 heads, MLP 2048, vocab 30522), sequence 64, batch 32,
  2-way classification on the pooler output; `BertEncoder` + linear head vs
  `BertForSequenceClassification`. The counts agree exactly.
- lxmert: D 256, 4 heads, MLP 1024, 2 language / 2 vision / 2 cross-modal layers, 36 region
  features of 512 + 4 box coordinates, question length 20, 10 answers, batch 32; a `BertEncoder`,
  LXMERT's visual feature encoder, a post-LN `Encoder` over regions, the "cross_attention" fusion
  (LXMERT's cross-modality layers, shared cross-attention) and an MLP answer head, vs
  `LxmertForQuestionAnswering`. mmjax's fusion adds per-stream input projections and pools by
  masked means where LXMERT has a pooler, so the counts differ by under 1%.
- clip: a ViT-S/16 image tower at 224 px and a 4-layer text tower (D 512, 8 heads, MLP 2048,
  vocab 49408, length 77), quick-GELU, 512-wide projections, batch 32, CLIP loss; mmjax
  `DualEncoder` (ViT + `BertEncoder`: post-LN, bidirectional, CLS-pooled) vs `CLIPModel` (pre-LN,
  causal, EOS-pooled text tower). Same widths and depths; the counts differ by a few norms.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from flax import nnx

from mmjax.encoders.text import BertEncoder
from mmjax.encoders.vision import ViT
from mmjax.fusion import build_fusion
from mmjax.layers import Encoder, dense, layer_norm
from mmjax.models.dual_encoder import DualEncoder
from mmjax.models.vqa import AnswerHead

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import library_step  # noqa: E402  (bench/library_step.py: the trainer's step around a model)

MODELS = ("vit", "bert", "lxmert", "clip")
LR, WEIGHT_DECAY = 1e-4, 0.01  # the same AdamW on both sides (eps 1e-8, betas 0.9/0.999)
# XLA compiler options of --fast-compile (LLVM optimisation off): for smoke tests only.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

# Full-size and --tiny configurations per model.
SIZES: dict[str, dict[str, dict[str, int]]] = {
    "vit": {
        "full": dict(width=384, depth=12, heads=6, mlp=1536, patch=16, image=224, classes=10, batch=8),
        "tiny": dict(width=32, depth=1, heads=2, mlp=64, patch=8, image=32, classes=10, batch=2),
    },
    "bert": {
        "full": dict(width=512, depth=4, heads=8, mlp=2048, vocab=30522, seq=64, classes=2, batch=32),
        "tiny": dict(width=32, depth=1, heads=4, mlp=64, vocab=500, seq=16, classes=2, batch=4),
    },
    "lxmert": {
        "full": dict(width=256, heads=4, mlp=1024, l_layers=2, x_layers=2, r_layers=2, vocab=30522,
                     seq=20, regions=36, feat=512, answers=10, batch=32),
        "tiny": dict(width=32, heads=4, mlp=64, l_layers=1, x_layers=1, r_layers=1, vocab=500,
                     seq=8, regions=6, feat=16, answers=10, batch=4),
    },
    "clip": {
        "full": dict(v_width=384, v_depth=12, v_heads=6, v_mlp=1536, patch=16, image=224,
                     t_width=512, t_depth=4, t_heads=8, t_mlp=2048, vocab=49408, seq=77,
                     proj=512, batch=32),
        "tiny": dict(v_width=32, v_depth=1, v_heads=2, v_mlp=64, patch=8, image=32,
                     t_width=32, t_depth=1, t_heads=4, t_mlp=64, vocab=500, seq=8,
                     proj=16, batch=4),
    },
}

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Case:
  """One benchmarked model: its inputs and how each side builds it and computes its loss.

  Attributes:
    name: model key ("vit", ...).
    size: the configuration used (an entry of `SIZES`).
    make_batch: numpy inputs (images NHWC float32, ids int32, masks bool, labels int32).
    mmjax_model: (rngs, default nnx.Rngs(0)) -> the nnx model (called under `jax.jit`, so it
      must be pure).
    mmjax_loss: (model, jax batch, deterministic) -> scalar loss.
    make_hf: () -> (torch model, loss(model, torch batch) -> scalar tensor); the torch batch
      is `torch_batch` of the numpy one.
  """

  name: str
  size: dict[str, int]
  make_batch: Callable[[np.random.Generator], Batch]
  mmjax_model: Callable[..., nnx.Module]
  mmjax_loss: Callable[[nnx.Module, dict, bool], jax.Array]
  make_hf: Callable[[], tuple[torch.nn.Module, Callable[[torch.nn.Module, dict], torch.Tensor]]]


def _images(rng: np.random.Generator, batch: int, size: int) -> np.ndarray:
  return rng.standard_normal((batch, size, size, 3), dtype=np.float32)  # (B, H, W, 3)


def _ids(rng: np.random.Generator, batch: int, seq: int, vocab: int) -> np.ndarray:
  return rng.integers(1, vocab, (batch, seq), dtype=np.int32)  # no padding token (id 0)


def torch_batch(batch: Batch) -> dict[str, torch.Tensor]:
  """NHWC images -> NCHW; integer arrays -> int64; bool masks -> int64 (HF's 0/1 masks)."""
  out = {}
  for k, v in batch.items():
    t = torch.from_numpy(np.ascontiguousarray(v))
    if k == "images":
      t = t.permute(0, 3, 1, 2).contiguous()
    elif not t.is_floating_point():
      t = t.long()
    out[k] = t
  return out


def _xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels))


def _hf_kw(attn: str | None) -> dict[str, Any]:
  return {} if attn is None else {"attn_implementation": attn}


# --- ViT -----------------------------------------------------------------------------------------
def vit_case(s: dict[str, int], attn: str | None) -> Case:
  def batch(rng):
    return {"images": _images(rng, s["batch"], s["image"]),
            "labels": rng.integers(0, s["classes"], s["batch"], dtype=np.int32)}

  def mm(rngs=None):
    return ViT(None, width=s["width"], depth=s["depth"], heads=s["heads"], mlp_dim=s["mlp"],
               patch=s["patch"], image_size=s["image"], num_classes=s["classes"], ln_eps=1e-12,
               rngs=nnx.Rngs(0) if rngs is None else rngs)

  def loss(m, b, det):
    return _xent(m.classify(b["images"], deterministic=det), b["labels"])

  def hf():
    cfg = transformers.ViTConfig(
        hidden_size=s["width"], num_hidden_layers=s["depth"], num_attention_heads=s["heads"],
        intermediate_size=s["mlp"], patch_size=s["patch"], image_size=s["image"],
        num_labels=s["classes"], hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        **_hf_kw(attn))
    model = transformers.ViTForImageClassification(cfg)
    return model, lambda m, b: m(pixel_values=b["images"], labels=b["labels"]).loss

  return Case("vit", s, batch, mm, loss, hf)


# --- BERT ----------------------------------------------------------------------------------------
class BertClassifier(nnx.Module):
  """`BertEncoder` + a linear head on the pooler output (HF's BertForSequenceClassification).

  Attributes:
    encoder: the BERT encoder (pool="pooler").
    head: dense (D -> num_classes).
  """

  def __init__(self, s: dict[str, int], *, rngs: nnx.Rngs):
    self.encoder = BertEncoder("bert-small", vocab_size=s["vocab"], hidden=s["width"],
                               depth=s["depth"], heads=s["heads"], mlp_dim=s["mlp"], dropout=0.0,
                               attn_dropout=0.0, rngs=rngs)
    self.head = dense(s["width"], s["classes"], ("embed", None), rngs=rngs)

  def __call__(self, ids: jax.Array, mask: jax.Array, *, deterministic: bool = True) -> jax.Array:
    """ids, mask (B, L) -> logits (B, num_classes)."""
    return self.head(self.encoder(ids, mask, deterministic=deterministic).pooled)


def bert_case(s: dict[str, int], attn: str | None) -> Case:
  def batch(rng):
    return {"ids": _ids(rng, s["batch"], s["seq"], s["vocab"]),
            "mask": np.ones((s["batch"], s["seq"]), bool),
            "labels": rng.integers(0, s["classes"], s["batch"], dtype=np.int32)}

  def mm(rngs=None):
    return BertClassifier(s, rngs=nnx.Rngs(0) if rngs is None else rngs)

  def loss(m, b, det):
    return _xent(m(b["ids"], b["mask"], deterministic=det), b["labels"])

  def hf():
    cfg = transformers.BertConfig(
        vocab_size=s["vocab"], hidden_size=s["width"], num_hidden_layers=s["depth"],
        num_attention_heads=s["heads"], intermediate_size=s["mlp"], num_labels=s["classes"],
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_hf_kw(attn))
    model = transformers.BertForSequenceClassification(cfg)
    return model, lambda m, b: m(input_ids=b["ids"], attention_mask=b["mask"], labels=b["labels"]).loss

  return Case("bert", s, batch, mm, loss, hf)


# --- LXMERT --------------------------------------------------------------------------------------
class LxmertLike(nnx.Module):
  """LXMERT for VQA composed from mmjax parts, layer for layer as HF's LxmertForQuestionAnswering.

  Attributes:
    text: language encoder (`BertEncoder`, l_layers post-LN blocks, no pooler).
    feat, feat_norm, box, box_norm: LXMERT's visual feature encoder, (LN(W f) + LN(W b)) / 2.
    vision: object-relation encoder (r_layers post-LN blocks).
    fusion: the "cross_attention" fusion block (x_layers LXMERT cross-modality layers).
    head: answer MLP (D -> 2D -> answers, GELU) on the fused pooled vector.
  """

  def __init__(self, s: dict[str, int], *, rngs: nnx.Rngs):
    d = s["width"]
    kw = dict(rngs=rngs)
    self.text = BertEncoder("bert-small", vocab_size=s["vocab"], hidden=d, depth=s["l_layers"],
                            heads=s["heads"], mlp_dim=s["mlp"], pooler=False, pool="cls",
                            dropout=0.0, attn_dropout=0.0, **kw)
    self.feat = dense(s["feat"], d, (None, "embed"), **kw)
    self.feat_norm = layer_norm(d, eps=1e-12, **kw)
    self.box = dense(4, d, (None, "embed"), **kw)
    self.box_norm = layer_norm(d, eps=1e-12, **kw)
    self.vision = Encoder(s["r_layers"], d, s["heads"], s["mlp"], norm="post", final_norm=False,
                          ln_eps=1e-12, **kw)
    self.fusion = build_fusion("cross_attention", modalities={"text": d, "image": d}, features=d,
                               depth=s["x_layers"], num_heads=s["heads"], mlp_dim=s["mlp"],
                               attention_maps=False, **kw)
    self.head = AnswerHead(d, 2 * d, s["answers"], act="gelu", **kw)

  def __call__(self, ids: jax.Array, mask: jax.Array, feats: jax.Array, boxes: jax.Array, *,
               deterministic: bool = True) -> jax.Array:
    """ids, mask (B, L); feats (B, N, F); boxes (B, N, 4) -> answer logits (B, answers)."""
    txt = self.text(ids, mask, deterministic=deterministic)
    v = (self.feat_norm(self.feat(feats)) + self.box_norm(self.box(boxes))) / 2  # (B, N, D)
    v = self.vision(v, deterministic=deterministic)
    regions = jnp.ones(v.shape[:2], bool)
    fused = self.fusion({"text": (txt.tokens, txt.mask), "image": (v, regions)},
                        deterministic=deterministic)
    return self.head(fused.pooled, deterministic=deterministic)


def lxmert_case(s: dict[str, int], attn: str | None) -> Case:
  def batch(rng):
    b, n = s["batch"], s["regions"]
    return {"ids": _ids(rng, b, s["seq"], s["vocab"]), "mask": np.ones((b, s["seq"]), bool),
            "feats": rng.standard_normal((b, n, s["feat"]), dtype=np.float32),
            "boxes": rng.uniform(size=(b, n, 4)).astype(np.float32),
            "labels": rng.integers(0, s["answers"], b, dtype=np.int32)}

  def mm(rngs=None):
    return LxmertLike(s, rngs=nnx.Rngs(0) if rngs is None else rngs)

  def loss(m, b, det):
    return _xent(m(b["ids"], b["mask"], b["feats"], b["boxes"], deterministic=det), b["labels"])

  def hf():
    cfg = transformers.LxmertConfig(
        vocab_size=s["vocab"], hidden_size=s["width"], num_attention_heads=s["heads"],
        intermediate_size=s["mlp"], l_layers=s["l_layers"], x_layers=s["x_layers"],
        r_layers=s["r_layers"], visual_feat_dim=s["feat"], visual_pos_dim=4,
        num_qa_labels=s["answers"], task_matched=False, task_mask_lm=False,
        task_obj_predict=False, task_qa=True, visual_obj_loss=False, visual_attr_loss=False,
        visual_feat_loss=False, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        **_hf_kw(attn))
    model = transformers.LxmertForQuestionAnswering(cfg)
    return model, lambda m, b: m(input_ids=b["ids"], attention_mask=b["mask"], visual_feats=b["feats"],
                                 visual_pos=b["boxes"], labels=b["labels"]).loss

  return Case("lxmert", s, batch, mm, loss, hf)


# --- CLIP ----------------------------------------------------------------------------------------
def clip_case(s: dict[str, int], attn: str | None) -> Case:
  eos = s["vocab"] - 1

  def batch(rng):
    ids = _ids(rng, s["batch"], s["seq"], eos)
    ids[:, -1] = eos  # HF pools the text tower at the first EOS token
    return {"images": _images(rng, s["batch"], s["image"]), "ids": ids,
            "mask": np.ones((s["batch"], s["seq"]), bool)}

  def mm(rngs=None):
    rngs = nnx.Rngs(0) if rngs is None else rngs
    image = ViT(None, width=s["v_width"], depth=s["v_depth"], heads=s["v_heads"],
                mlp_dim=s["v_mlp"], patch=s["patch"], image_size=s["image"], act="quick_gelu",
                ln_eps=1e-5, rngs=rngs)
    text = BertEncoder("bert-small", vocab_size=s["vocab"], hidden=s["t_width"], depth=s["t_depth"],
                       heads=s["t_heads"], mlp_dim=s["t_mlp"], max_len=s["seq"], act="quick_gelu",
                       ln_eps=1e-5, pooler=False, pool="cls", dropout=0.0, attn_dropout=0.0,
                       rngs=rngs)
    examples = {"image": jax.ShapeDtypeStruct((1, s["image"], s["image"], 3), jnp.float32),
                "text": (jax.ShapeDtypeStruct((1, s["seq"]), jnp.int32),
                         jax.ShapeDtypeStruct((1, s["seq"]), jnp.bool_))}
    return DualEncoder(encoders={"image": image, "text": text}, input_examples=examples,
                       embed_dim=s["proj"], loss_type="clip", rngs=rngs)

  def loss(m, b, det):
    emb, _ = m({"image": b["images"], "text": (b["ids"], b["mask"])}, deterministic=det)
    return m.loss(emb)[0]

  def hf():
    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=s["vocab"], hidden_size=s["t_width"],
                         num_hidden_layers=s["t_depth"], num_attention_heads=s["t_heads"],
                         intermediate_size=s["t_mlp"], max_position_embeddings=s["seq"],
                         eos_token_id=eos, bos_token_id=eos - 1, pad_token_id=0,
                         attention_dropout=0.0, dropout=0.0),
        vision_config=dict(hidden_size=s["v_width"], num_hidden_layers=s["v_depth"],
                           num_attention_heads=s["v_heads"], intermediate_size=s["v_mlp"],
                           patch_size=s["patch"], image_size=s["image"], attention_dropout=0.0,
                           dropout=0.0),
        projection_dim=s["proj"], **_hf_kw(attn))
    model = transformers.CLIPModel(cfg)
    return model, lambda m, b: m(input_ids=b["ids"], attention_mask=b["mask"],
                                 pixel_values=b["images"], return_loss=True).loss

  return Case("clip", s, batch, mm, loss, hf)


CASES: dict[str, Callable[[dict[str, int], str | None], Case]] = {
    "vit": vit_case, "bert": bert_case, "lxmert": lxmert_case, "clip": clip_case}


# --- measurement ---------------------------------------------------------------------------------
def _timed(fn: Callable[[], Any], steps: int, warmup: int) -> tuple[list[float], Any]:
  """Runs fn (which must block until its work is done) warmup + steps times; step times in s."""
  out = None
  for _ in range(warmup):
    out = fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return times, out


def matmul_limit(n: int, reps: int) -> dict[str, float]:
  """Median GFLOP/s of a jitted float32 (n, n) @ (n, n) matmul (2 n^3 FLOPs)."""
  rng = np.random.default_rng(0)
  a = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
  b = jnp.asarray(rng.standard_normal((n, n), dtype=np.float32))
  f = jax.jit(jnp.matmul)
  times, _ = _timed(lambda: f(a, b).block_until_ready(), reps, 2)
  return {"n": n, "median_s": statistics.median(times),
          "gflops": 2 * n ** 3 / statistics.median(times) / 1e9}


def mmjax_step(case: Case, batch_np: Batch, compiler_options: dict[str, Any],
               deterministic: bool = True) -> dict[str, Any]:
  """Compiles the trainer's train step for the case's model (`deterministic` is passed to it).

  Returns {"one": () -> None (runs one step and blocks), "compiled", "params", "compile_s",
  "flops", "losses" and "nonfinite" (the step's loss and non-finite flag, appended by each step)}.
  """
  setup = library_step.make_setup(case.mmjax_model, case.mmjax_loss, lr=LR,
                                  weight_decay=WEIGHT_DECAY, deterministic=deterministic)
  state = {"train": setup.init_state()}  # donated to each step
  batch = setup.global_batch(batch_np)
  t0 = time.perf_counter()
  step = library_step.compile_step(setup, state["train"], batch, compiler_options)
  compile_s = time.perf_counter() - t0
  losses: list[float] = []
  nonfinite: list[int] = []

  def one():
    state["train"], metrics = step(state["train"], batch)
    jax.block_until_ready((state["train"], metrics))
    losses.append(float(metrics["loss"]))
    nonfinite.append(int(metrics["nonfinite"]))

  return {"one": one, "compiled": step, "params": setup.num_params, "compile_s": compile_s,
          "flops": library_step.flops(step), "losses": losses, "nonfinite": nonfinite}


def run_mmjax(case: Case, batch_np: Batch, steps: int, warmup: int,
              compiler_options: dict[str, Any], deterministic: bool = True) -> dict[str, Any]:
  """Compiles and times the jitted mmjax train step."""
  s = mmjax_step(case, batch_np, compiler_options, deterministic)
  times, _ = _timed(s["one"], steps, warmup)
  return {"params": s["params"], "compile_s": s["compile_s"], "flops": s["flops"],
          "ms": 1e3 * statistics.median(times), "step_ms": [1e3 * t for t in times],
          "first_loss": s["losses"][0], "last_loss": s["losses"][-1]}


def hf_step(case: Case, batch_np: Batch, adamw: str) -> dict[str, Any]:
  """The HF PyTorch eager train step; `adamw` picks torch's AdamW implementation.

  Returns {"one": () -> None (runs one step), "model", "params", "losses"}.
  """
  torch.manual_seed(0)
  model, loss_of = case.make_hf()
  model.train()
  num_params = sum(p.numel() for p in model.parameters())
  impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[adamw]
  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, **impl)
  batch = torch_batch(batch_np)
  losses: list[float] = []

  def one():
    opt.zero_grad(set_to_none=True)
    loss = loss_of(model, batch)
    loss.backward()
    opt.step()
    losses.append(float(loss.detach()))

  return {"one": one, "model": model, "params": num_params, "losses": losses}


def run_hf(case: Case, batch_np: Batch, steps: int, warmup: int, adamw: str) -> dict[str, Any]:
  """Times the HF PyTorch eager train step."""
  s = hf_step(case, batch_np, adamw)
  times, _ = _timed(s["one"], steps, warmup)
  return {"params": s["params"], "ms": 1e3 * statistics.median(times),
          "step_ms": [1e3 * t for t in times], "first_loss": s["losses"][0],
          "last_loss": s["losses"][-1],
          "attn_implementation": getattr(s["model"].config, "_attn_implementation", None)}


def bench_model(case: Case, steps: int, warmup: int, limit_gflops: float,
                compiler_options: dict[str, Any], adamw: str = "default",
                deterministic: bool = True) -> dict[str, Any]:
  """mmjax then HF on the same inputs; derived rates against the matmul limit."""
  batch_np = case.make_batch(np.random.default_rng(0))
  mm = run_mmjax(case, batch_np, steps, warmup, compiler_options, deterministic)
  gc.collect()
  hf = run_hf(case, batch_np, steps, warmup, adamw)
  gc.collect()
  flops = mm["flops"]
  mm_gflops = flops / (mm["ms"] / 1e3) / 1e9
  hf_gflops = flops / (hf["ms"] / 1e3) / 1e9
  return {"config": case.size, "mmjax": mm, "hf": hf,
          "speed_ratio": hf["ms"] / mm["ms"],
          "gflop_per_step": flops / 1e9,
          "mmjax_gflops": mm_gflops, "mmjax_fraction": mm_gflops / limit_gflops,
          "hf_gflops": hf_gflops, "hf_fraction": hf_gflops / limit_gflops}


def markdown(results: dict[str, Any]) -> str:
  """The results as a markdown table (speed ratio = HF ms / mmjax ms; > 1: mmjax is faster)."""
  lines = [f"matmul limit: {results['matmul']['gflops']:.1f} GFLOP/s "
           f"(f32 {results['matmul']['n']}^2 jitted matmul, median); threads: {results['threads']}",
           "",
           "| model | params mmjax | params HF | mmjax ms/step | HF ms/step | speed ratio "
           "| GFLOP/step | mmjax GFLOP/s | fraction of matmul limit | HF fraction | compile s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for name, r in results["models"].items():
    lines.append(
        f"| {name} | {r['mmjax']['params']:,} | {r['hf']['params']:,} | {r['mmjax']['ms']:.1f} "
        f"| {r['hf']['ms']:.1f} | {r['speed_ratio']:.2f} | {r['gflop_per_step']:.3g} "
        f"| {r['mmjax_gflops']:.1f} | {r['mmjax_fraction']:.2f} | {r['hf_fraction']:.2f} "
        f"| {r['mmjax']['compile_s']:.1f} |")
  return "\n".join(lines)


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def _models(value: str) -> list[str]:
  names = [m.strip() for m in value.split(",") if m.strip()]
  bad = [m for m in names if m not in MODELS]
  if bad or not names:
    raise argparse.ArgumentTypeError(f"--models: expected a comma list of {list(MODELS)}, got {value!r}")
  return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", type=_models, default=list(MODELS),
                 help="comma-separated subset of " + ",".join(MODELS))
  p.add_argument("--tiny", action="store_true",
                 help="tiny widths, one layer per stack, 2 steps, 1 warm-up, --fast-compile "
                      "(a smoke test; its timings mean nothing)")
  p.add_argument("--fast-compile", action="store_true",
                 help="compile with XLA's LLVM optimisation off (faster compiles, slower steps)")
  p.add_argument("--steps", type=int, default=None, help="timed steps (default 10; tiny 2)")
  p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; tiny 1)")
  p.add_argument("--threads", type=int, default=None,
                 help="cores to use: torch.set_num_threads and the process's CPU affinity, "
                      "restored on return (default: all available)")
  p.add_argument("--matmul-size", type=int, default=None,
                 help="n of the matmul limit (default 2048; tiny 256)")
  p.add_argument("--hf-attn", default=None,
                 help="HF attn_implementation (e.g. sdpa, eager); default: the library's choice")
  p.add_argument("--hf-adamw", choices=("default", "foreach", "fused"), default="default",
                 help="torch AdamW implementation (default: torch's choice, per-tensor on CPU)")
  p.add_argument("--mmjax-mode", choices=("deterministic", "train"), default="deterministic",
                 help="call the mmjax model with deterministic=True (default; the same maths at "
                      "dropout 0) or False, as the trainer does (attention then takes its explicit "
                      "einsum-softmax path, the one that can return weights and apply dropout)")
  p.add_argument("--out", default=None, help="write the results as JSON here")
  args = p.parse_args(argv)
  args.steps = args.steps if args.steps is not None else (2 if args.tiny else 10)
  args.warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
  args.matmul_size = args.matmul_size or (256 if args.tiny else 2048)
  args.fast_compile = args.fast_compile or args.tiny
  if args.steps < 1 or args.warmup < 0:
    p.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps} and {args.warmup}")
  return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Runs the benchmark; the process's CPU affinity and torch threads are restored afterwards."""
  args = parse_args(argv)
  available = sorted(os.sched_getaffinity(0))
  threads = args.threads or len(available)
  if not 1 <= threads <= len(available):
    raise SystemExit(f"--threads: expected 1..{len(available)}, got {threads}")
  torch_threads = torch.get_num_threads()
  # XLA sizes its thread pool from the affinity mask when its backend starts.
  os.sched_setaffinity(0, available[:threads])
  torch.set_num_threads(threads)
  try:
    return run(args, threads)
  finally:
    os.sched_setaffinity(0, available)
    torch.set_num_threads(torch_threads)


def run(args: argparse.Namespace, threads: int) -> dict[str, Any]:
  """Measures the matmul limit and every model in `args.models`; prints and writes the results."""
  size = "tiny" if args.tiny else "full"
  options = FAST_COMPILE if args.fast_compile else {}
  limit = matmul_limit(args.matmul_size, max(args.steps, 8))
  results: dict[str, Any] = {
      "threads": threads, "size": size, "steps": args.steps, "warmup": args.warmup,
      "compiler_options": options, "hf_adamw": args.hf_adamw, "mmjax_mode": args.mmjax_mode,
      "matmul": limit,
      "env": {"cpu": _cpu_name(), "python": sys.version.split()[0], "jax": jax.__version__,
              "flax": flax.__version__, "optax": optax.__version__,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "xla_flags": os.environ.get("XLA_FLAGS", ""),
              "jax_devices": [str(d) for d in jax.local_devices()]},
      "models": {}}
  for name in args.models:
    case = CASES[name](SIZES[name][size], args.hf_attn)
    results["models"][name] = r = bench_model(case, args.steps, args.warmup, limit["gflops"], options,
                                              args.hf_adamw, args.mmjax_mode == "deterministic")
    print(f"{name}: mmjax {r['mmjax']['ms']:.1f} ms, HF {r['hf']['ms']:.1f} ms "
          f"(params {r['mmjax']['params']:,} / {r['hf']['params']:,})", flush=True)
  print(markdown(results))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
  return results


if __name__ == "__main__":
  main()
