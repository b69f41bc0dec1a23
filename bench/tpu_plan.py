"""Scale table for TPU pod slices, compiled ahead of time on a machine without a TPU (needs libtpu:
`pip install "jax[tpu]==<jax version>"`): for each model, topology and sharding (data parallel, or
FSDP over every chip), the largest global batch whose train step fits the chip's HBM, the model's
FLOPs per chip, and the roofline step time and MFU bound (`mmjax.train.topology.roofline`).

  JAX_PLATFORMS=cpu python bench/tpu_plan.py [--models vit_b16,lxmert_vqa] [--topologies v5e-16]

This file is also a config (the models below at a given batch and mesh) for the planner:

  JAX_PLATFORMS=cpu python -m mmjax.train.plan --topology v5e:4x4 \\
      --config bench/tpu_plan.py:model=vit_b16,batch=256,data=4,fsdp=4

Models: ViT-B/16 and ViT-L/16 classifiers (ImageNet-1k shapes), CLIP B/16 and L/14 (224 px, 77
tokens), LXMERT-style VQA (BERT-base question stream, ViT-B/16 image stream, 5 two-stream
cross-modality layers, VQA v2's 3,129 soft-scored answers, 20-token questions). Parameters are
float32, compute bfloat16, AdamW.

The search: powers of two per chip, doubling from --start_per_chip (32; on the next topology,
from the batch the last one found) up to --max_per_chip (256) while XLA:TPU compiles the train
step within HBM (it refuses a larger program), halving when the start does not fit; a "+" marks a search that stopped at the cap. FLOPs are the model's
(`mmjax.train.plan.model_flops`, on the jaxpr); "XLA/model" is XLA:TPU's own count over them:
above 1 where it rematerialises activations to fit, below 1 where its count misses matmuls it
split around FSDP's all-gathers. The MFU bound counts the model's FLOPs.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import ml_collections

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

from mmjax.train.config import parse_arg, standard_optim_and_train  # noqa: E402

# CLIP's towers as OpenAI's (HF CLIPVisionConfig / CLIPTextConfig fields, `mmjax.transfer.clip`).
_CLIP_VIT = dict(name="vit", variant=None, pool="cls", posemb="learn", pre_norm=True,
                 patch_bias=False, ln_eps=1e-5, act="quick_gelu", image_size=224)
_CLIP = {
    "clip_b16": (dict(_CLIP_VIT, width=768, depth=12, heads=12, mlp_dim=3072, patch=16),
                 dict(name="clip_text", hidden=512, depth=12, heads=8, mlp_dim=2048), 512),
    "clip_l14": (dict(_CLIP_VIT, width=1024, depth=24, heads=16, mlp_dim=4096, patch=14),
                 dict(name="clip_text", hidden=768, depth=12, heads=12, mlp_dim=3072), 768),
}
MODELS = ("vit_b16", "vit_l16", "clip_b16", "clip_l14", "lxmert_vqa")


def make_config(model: str, batch: int, mesh: dict[str, int], dtype: str = "bfloat16",
                **vqa) -> ml_collections.ConfigDict:
  """A shape-only config (`mmjax.train.plan_tasks`) of `model` at global `batch` over `mesh`.

  `vqa` overrides LXMERT's sizes (text_variant, vision_variant, cross_layers) for smaller copies."""
  c = ml_collections.ConfigDict()
  c.name, c.seed = f"plan-{model}", 0
  c.data = ml_collections.ConfigDict({"batch_size": batch, "eval_batch_size": batch,
                                      "image_shape": (224, 224, 3)})
  c.model = ml_collections.ConfigDict({"dtype": dtype})
  if model in ("vit_b16", "vit_l16"):
    c.task = "mmjax.train.plan_tasks:plan_image_classification"
    c.data.num_classes = 1000
    c.model.encoders = {"image": {"name": "vit", "variant": "B/16" if model == "vit_b16" else "L/16",
                                  "num_classes": 1000}}
  elif model in _CLIP:
    c.task = "mmjax.train.plan_tasks:plan_clip"
    image, text, embed = _CLIP[model]
    c.data.max_len = 77
    c.model.name = "dual_encoder"
    c.model.encoders = {"image": image, "text": text}
    c.model.embed_dim, c.model.loss_type = embed, "clip"
  elif model == "lxmert_vqa":
    c.task = "mmjax.train.plan_tasks:plan_vqa"
    c.data.max_len, c.data.num_answers = 20, 3129
    c.model.name = "vqa"
    c.model.encoders = {"image": {"name": "vit", "variant": vqa.get("vision_variant", "B/16")},
                        "text": {"name": "bert", "variant": vqa.get("text_variant", "bert-base"),
                                 "max_len": 20}}
    width = 768 if vqa.get("text_variant", "bert-base") == "bert-base" else 512
    c.model.fusion = "cross_attention"  # both streams attend to each other (LXMERT's X-layers)
    c.model.fusion_kwargs = {"depth": vqa.get("cross_layers", 5), "num_heads": width // 64,
                             "mlp_dim": 4 * width, "norm": "post", "attention_maps": False}
    c.model.features, c.model.head_hidden = width, 2 * width
    c.model.question_tokens = "all"
  else:
    raise ValueError(f"model {model!r}: expected one of {MODELS}")
  standard_optim_and_train(c, 10_000, tiny=False)
  c.mesh = dict(mesh)
  return c


def get_config(arg=None):
  """The config-file entry point: model, global batch, mesh sizes (-1: the remaining devices),
  compute dtype, depth (of the image encoder; 0: the model's)."""
  arg = parse_arg(arg, model="vit_b16", batch=256, data=-1, fsdp=1, tensor=1, dtype="bfloat16", depth=0,
                  remat="none")
  c = make_config(arg.model, arg.batch, {"data": arg.data, "fsdp": arg.fsdp, "tensor": arg.tensor}, arg.dtype)
  image = c.model.encoders.image
  if arg.depth:  # a shallower image encoder, for quick looks
    image.depth = arg.depth
  image.remat = arg.remat  # per-block jax.checkpoint policy of the image encoder: none | dots | full
  return c


STRATEGIES = {"data": {"data": -1, "fsdp": 1, "tensor": 1}, "fsdp": {"data": 1, "fsdp": -1, "tensor": 1}}


def largest_batch(model: str, topology: str, strategy: str, start: int = 32, max_per_chip: int = 256):
  """The largest power-of-two per-chip batch (<= max_per_chip) whose train step compiles within HBM
  (XLA:TPU refuses a larger program): doubles from `start` while it fits, else halves until it
  does -> (per-chip batch, its plan, compiles); (0, the last plan, compiles) if one example per
  chip does not fit."""
  from mmjax.train import topology as topo  # noqa: PLC0415
  from mmjax.train.plan import plan  # noqa: PLC0415
  chips = len(topo.topology_devices(topology))
  best, per_chip, compiles, failed = (0, None), start, 0, False
  while True:
    p = plan(make_config(model, per_chip * chips, STRATEGIES[strategy]), topology, eval_step=False)
    compiles += 1
    if p["train"]["fits"]:
      best = (per_chip, p)
      if failed or per_chip * 2 > max_per_chip:
        break
      per_chip *= 2
    else:
      failed = True
      if best[0] or per_chip == 1:
        break
      per_chip //= 2
  return best[0], best[1] or p, compiles


def fsdp_memory_table(model: str, topology: str, sizes=(1, 2, 4, 8, 16)) -> str:
  """Per-chip parameter and optimizer-state bytes of `model` on `topology` as the FSDP axis grows
  (the rest of the chips data-parallel): the trainer's shardings, no step compiled."""
  from mmjax.train import plan as plan_lib  # noqa: PLC0415
  from mmjax.train import topology as topo  # noqa: PLC0415
  chips = len(topo.topology_devices(topology))
  rows = ["| fsdp | params MiB/chip | optimizer MiB/chip | total MiB/chip | x fsdp=1 |", "|---:|---:|---:|---:|---:|"]
  first = None
  for fsdp in sizes:
    setup = plan_lib.make_setup(make_config(model, chips, {"data": chips // fsdp, "fsdp": fsdp, "tensor": 1}), topology)
    params = plan_lib._bytes_per_device(setup.abstract_state["params"])
    opt = plan_lib._bytes_per_device(setup.abstract_state["opt_state"])
    first = first or params + opt
    rows.append(f"| {fsdp} | {params / 2**20:,.1f} | {opt / 2**20:,.1f} | {(params + opt) / 2**20:,.1f} "
                f"| {(params + opt) / first:.3f} |")
  return "\n".join(rows)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--models", default=",".join(MODELS))
  ap.add_argument("--topologies", default="v5e-16,v5e-256,v5p-128")
  ap.add_argument("--strategies", default="data,fsdp")
  ap.add_argument("--start_per_chip", type=int, default=32)
  ap.add_argument("--max_per_chip", type=int, default=256)
  ap.add_argument("--fsdp_memory", default=None, metavar="MODEL",
                  help="instead: MODEL's per-chip parameter + optimizer bytes on the first topology as FSDP grows")
  args = ap.parse_args(argv)
  from mmjax.train import topology as topo  # noqa: PLC0415
  if not topo.libtpu_available():
    sys.exit(topo.install_hint())
  if args.fsdp_memory:
    print(fsdp_memory_table(args.fsdp_memory, args.topologies.split(",")[0]))
    return 0
  print("| model | params | topology | sharding | global batch | per chip | GiB/chip | model GFLOP/chip/step "
        "| XLA/model FLOPs | step ms (roofline) | bound | MFU bound | compiles | s |\n"
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|", flush=True)
  found = {}  # (model, strategy) -> the per-chip batch found on the previous topology
  for model in args.models.split(","):
    for topology in args.topologies.split(","):
      for strategy in args.strategies.split(","):
        t0 = time.perf_counter()
        # Data parallelism compiles the same per-chip program on every slice size, and FSDP's
        # shards shrink as the slice grows: start where the last topology ended (still compiled).
        start = found.get((model, strategy)) or args.start_per_chip
        per_chip, p, n = largest_batch(model, topology, strategy, start, args.max_per_chip)
        found[(model, strategy)] = per_chip
        head = f"| {model} | {p['parameters'] / 1e6:.0f} M | {p['topology']} | {strategy} "
        if not per_chip:
          print(head + f"| none fits | | | | | | | | {n} | {time.perf_counter() - t0:.0f} |", flush=True)
          continue
        s, r = p["train"], p["train"]["roofline"]
        print(head + f"| {per_chip * p['devices']:,} | {per_chip}{'+' if per_chip * 2 > args.max_per_chip else ''} "
              f"| {s['total_bytes'] / topo.GiB:.2f} | {s['model_flops'] / 1e9:,.0f} | {s['flops'] / s['model_flops']:.2f} "
              f"| {r['step_s'] * 1e3:.1f} | {r['bound']} | {r['mfu']:.0%} | {n} | {time.perf_counter() - t0:.0f} |",
              flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
