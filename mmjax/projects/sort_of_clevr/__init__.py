"""Sort-of-CLEVR (Santoro et al. 2017): relational VQA on the embedded data set, as a project.

  python train.py --config mmjax/projects/sort_of_clevr/configs/vqa.py --workdir workdirs/vqa

- `task`: the VQA task ("mmjax.projects.sort_of_clevr.task:vqa_sort_of_clevr"): input pipeline,
  loss, accuracy per question kind, subtype and named colour, the answer-prior baseline.
- `model`: pixel features for the CNN, question de-duplication, flattened late fusion.
- `fusion`: cross-attention whose second hop is biased by distance from the first hop's focus.
- `configs/`: the tuned recipe (`vqa.py`) and pretrained question encoders (`transfer.py`).
- `bench/`: the project's benchmarks, training through the library's trainer.

See README.md for results and what was tried. Nothing here is imported by the library: configs
name these modules and the registries import them.
"""
