"""Trained weights out: a workdir's model written in the Hugging Face layout.

  python -m mmjax.export --workdir workdirs/clip --out exported/clip [--step N] [--json]

restores the checkpoint `mmjax.predict` serves (`--step`, default the best by the task's metric,
else the latest), folds LoRA adapters into their layers (`mmjax.transfer.lora.merge_lora`), and
writes every part that has a Hugging Face counterpart as a folder `transformers` loads with
`from_pretrained` (config.json + model.safetensors):

  - a dual encoder shaped like CLIP (a `ViT` image tower with CLIP's options, a `ClipTextEncoder`,
    loss "clip") as a whole `CLIPModel` in `out/`, one shaped like SigLIP as a `SiglipModel`;
  - otherwise each encoder that has one, in `out/encoders/<modality>/`: a `BertEncoder` as a
    `BertModel`, a `ViT` in HF ViT's layout as a `ViTModel` (`ViTForImageClassification` with a
    head).

A folder whose model reads text also gets the task's tokenizer (`save_pretrained`). Everything
else (fusion blocks, heads, projections, encoders with no counterpart) is listed as not exported,
with the reason, on the console and in `out/export.json`, which records what went where; when
nothing has a counterpart, the export is an error. `out` is a new or empty folder, local or in a
bucket (`gs://...`: written locally first, then copied up).

From Python, `export(workdir, out)`, or `export_model(model, out, tokenizer=...)` for a model in
memory; a bare `BertEncoder` or `ViT` (`mmjax.transfer.bert.load_bert`, ...) is written as the
whole model, in `out/` itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Callable, Sequence

from flax import nnx

from mmjax import io_paths

WHOLE = ""  # the module path of the model itself
NO_COUNTERPART = "no Hugging Face counterpart"


@dataclasses.dataclass
class Part:
  """One folder to write: the module at `module` ("" = the whole model) as HF `architecture`."""

  module: str
  architecture: str
  save: Callable[[str], None]  # writes config.json + model.safetensors into a local folder
  reads_text: bool
  notes: list[str] = dataclasses.field(default_factory=list)

  @property
  def folder(self) -> str:
    return self.module or "."


def _param_paths(module: nnx.Module) -> set[str]:
  return {".".join(map(str, p)) for p, v in nnx.iter_graph(module) if isinstance(v, nnx.Param)}


def _covered(module: nnx.Module, rules) -> None:
  """Raises unless `rules` write every parameter of `module` and name no other: an export that
  dropped a parameter (a layer the HF layout lacks) would load as a different model."""
  params, written = _param_paths(module), {r.path for r in rules}
  dropped, unknown = sorted(params - written), sorted(written - params)
  if dropped or unknown:
    raise ValueError("the HF layout " + "; ".join(
        ([f"has no place for {dropped[:4]}{' ...' if len(dropped) > 4 else ''}"] if dropped else []) +
        ([f"expects parameters the module lacks: {unknown[:4]}"] if unknown else [])))


def _whole(model) -> Part | str:
  """The whole dual encoder as a CLIPModel / SiglipModel, or why it is not one."""
  from mmjax.models.dual_encoder import DualEncoder  # pylint: disable=g-import-not-at-top
  from mmjax.transfer import clip, siglip  # pylint: disable=g-import-not-at-top

  if not isinstance(model, DualEncoder):
    return f"a {type(model).__name__} has no whole-model counterpart"
  lib, arch, rules = ((clip, "CLIPModel", clip.clip_rules) if model.loss_type == "clip"
                      else (siglip, "SiglipModel", siglip.siglip_rules))
  try:
    lib.hf_config(model)
    _covered(model, rules(model))
  except ValueError as e:
    return f"not a {arch}: {e}"
  save = clip.save_clip if lib is clip else siglip.save_siglip
  return Part(WHOLE, arch, lambda folder: save(model, folder), reads_text=True)


def _encoder(path: str, encoder) -> Part | str:
  """One encoder as a BertModel / ViTModel, or why it is not one."""
  # pylint: disable=g-import-not-at-top
  from mmjax.encoders.text import BertEncoder
  from mmjax.encoders.vision import ViT
  from mmjax.transfer import bert, vit

  name = type(encoder).__name__
  try:
    if isinstance(encoder, BertEncoder):
      bert.hf_config(encoder.spec)
      _covered(encoder, bert.bert_rules(encoder.spec.depth, encoder.spec.pooler))
      notes = [] if encoder.spec.pooler else [
          "no pooler: load with BertModel.from_pretrained(folder, add_pooling_layer=False)"]
      return Part(path, "BertModel", lambda folder: bert.save_bert(encoder, folder), reads_text=True,
                  notes=notes)
    if isinstance(encoder, ViT):
      cfg = vit.hf_config(encoder.spec)
      _covered(encoder, vit.vit_rules(encoder.spec))
      notes = [] if encoder.spec.pooler or encoder.spec.num_classes else [
          "no pooler: load with ViTModel.from_pretrained(folder, add_pooling_layer=False)"]
      return Part(path, cfg["architectures"][0], lambda folder: vit.save_vit(encoder, folder),
                  reads_text=False, notes=notes)
  except (ValueError, KeyError) as e:
    return f"{name}: {e}"
  return f"{name}: {NO_COUNTERPART}"


def plan(model: nnx.Module) -> tuple[list[Part], list[dict[str, str]]]:
  """(the parts to write, [{'module', 'reason'}] of those that are not) of `model`."""
  from mmjax.encoders.text import BertEncoder  # pylint: disable=g-import-not-at-top
  from mmjax.encoders.vision import ViT  # pylint: disable=g-import-not-at-top

  if isinstance(model, (BertEncoder, ViT)):  # a bare encoder (`bert.load_bert`, ...) is the model
    got = _encoder(WHOLE, model)
    if isinstance(got, Part):
      return [got], []
    return [], [{"module": "(the whole model)", "reason": got}]
  whole = _whole(model)
  if isinstance(whole, Part):
    return [whole], []
  skipped: list[dict[str, str]] = []
  if whole.startswith("not a "):  # a dual encoder, but not CLIP- or SigLIP-shaped
    skipped.append({"module": "(the whole model)", "reason": whole})
  parts = []
  encoders = getattr(model, "encoders", None) or {}
  for m in (encoders.keys() if hasattr(encoders, "keys") else ()):
    got = _encoder(f"encoders/{m}", encoders[m])
    if isinstance(got, Part):
      parts.append(got)
    else:
      skipped.append({"module": f"encoders/{m}", "reason": got})
  # The model's other parameters, by their top-level attribute (fusion, head, proj, ...).
  others = sorted({str(p[0]) for p, v in nnx.iter_graph(model)
                   if isinstance(v, nnx.Param) and p[0] != "encoders"})
  skipped += [{"module": name, "reason": NO_COUNTERPART} for name in others]
  return parts, skipped


def _empty_target(out: io_paths.PathLike):
  """`out` as a path; ValueError unless it is new or an empty folder (no stale files mixed in)."""
  target = io_paths.as_path(out)
  if target.exists() and (not target.is_dir() or any(target.iterdir())):
    raise ValueError(f"out: {os.fspath(out)!r} exists and is not an empty folder; export into a new one")
  return target


def export_model(model: nnx.Module, out: io_paths.PathLike, *, tokenizer: Any = None,
                 info: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes the parts of `model` (LoRA merged first, in place) to `out`; see the module docstring.

  Args:
    model: a trained model (a live NNX module).
    out: a new or empty folder, local or a bucket URL.
    tokenizer: written (`save_pretrained`) into each folder whose model reads text; None: none.
    info: extra entries for export.json (the workdir, the step, ...).

  Returns:
    The summary also written to out/export.json: 'exported' [{'module', 'folder',
    'architecture', 'tokenizer', 'notes'}], 'not_exported' [{'module', 'reason'}], 'lora_merged'.

  Raises:
    ValueError: `out` holds files, or no part of the model has a Hugging Face counterpart.
  """
  from mmjax.transfer.lora import merge_lora  # pylint: disable=g-import-not-at-top

  target = _empty_target(out)
  merged = merge_lora(model)
  parts, skipped = plan(model)
  if not parts:
    raise ValueError("nothing to export: no part of the model has a Hugging Face counterpart (" +
                     "; ".join(f"{s['module']}: {s['reason']}" for s in skipped) + ")")
  saves_tokenizer = tokenizer is not None and hasattr(tokenizer, "save_pretrained")
  summary = {**(info or {}), "lora_merged": merged, "exported": [], "not_exported": skipped}
  with tempfile.TemporaryDirectory() as tmp:
    local = os.fspath(target) if not io_paths.is_url(target) else tmp
    for part in parts:
      folder = os.path.join(local, part.module)
      part.save(folder)
      wrote_tokenizer = saves_tokenizer and part.reads_text
      if wrote_tokenizer:
        tokenizer.save_pretrained(folder)
      summary["exported"].append({"module": part.module, "folder": part.folder,
                                  "architecture": part.architecture, "tokenizer": wrote_tokenizer,
                                  "notes": part.notes})
    with open(os.path.join(local, "export.json"), "w") as f:
      json.dump(summary, f, indent=2)
    if io_paths.is_url(target):  # buckets: the files written here, copied up one by one
      for root, _, names in os.walk(local):
        for name in names:
          rel = os.path.relpath(os.path.join(root, name), local)
          dest = target / rel
          dest.parent.mkdir(parents=True, exist_ok=True)
          with open(os.path.join(root, name), "rb") as f, dest.open("wb") as g:
            shutil.copyfileobj(f, g)  # streamed: a weights file never sits whole in memory
  return summary


def export(workdir: io_paths.PathLike, out: io_paths.PathLike, *, step: int | None = None) -> dict[str, Any]:
  """Exports checkpoint `step` of `workdir` (default: the one `mmjax.predict` serves) to `out`."""
  from mmjax import predict  # pylint: disable=g-import-not-at-top

  if not io_paths.as_path(workdir).is_dir():
    raise FileNotFoundError(f"workdir {os.fspath(workdir)!r} does not exist")
  _empty_target(out)  # before restoring anything
  config = predict.load_workdir_config(workdir)
  predict.checkpoint_dir(workdir)
  setup = predict.workdir_setup(config, workdir)
  state, step = predict.restore_params(setup, workdir, step)
  model = setup.model(state)
  info = {"workdir": os.fspath(workdir), "step": step, "task": config.task}
  return export_model(model, out, tokenizer=getattr(setup.task, "tokenizer", None), info=info)


def main(argv: Sequence[str] | None = None) -> int:
  """`python -m mmjax.export --workdir W --out DIR [--step N] [--json]`."""
  parser = argparse.ArgumentParser(prog="python -m mmjax.export", description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", required=True,
                      help="training workdir (config.json + checkpoints/): a folder or a bucket URL")
  parser.add_argument("--out", required=True, help="a new or empty folder (or bucket URL) to write")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: best, else latest)")
  parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
  args = parser.parse_args(argv)
  try:
    summary = export(args.workdir, args.out, step=args.step)
  except (FileNotFoundError, ValueError, TypeError) as e:
    parser.exit(2, f"error: {e}\n")
  if args.json:
    print(json.dumps(summary))
    return 0
  merged = f", LoRA merged into {len(summary['lora_merged'])} layers" if summary["lora_merged"] else ""
  print(f"exported step {summary['step']} of {args.workdir}{merged}:")
  for e in summary["exported"]:
    extra = ["tokenizer"] * e["tokenizer"] + e["notes"]
    where = args.out if e["folder"] == "." else f"{args.out.rstrip('/')}/{e['folder']}"
    print(f"  {where}  {e['architecture']}" + (f" ({'; '.join(extra)})" if extra else ""))
  for s in summary["not_exported"]:
    print(f"not exported: {s['module']} ({s['reason']})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
