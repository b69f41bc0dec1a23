"""The Sort-of-CLEVR project's benchmark scripts, each training through `mmjax.train.trainer.train`.

  python -m mmjax.projects.sort_of_clevr.bench.relation_networks  # Relation Networks table
  python -m mmjax.projects.sort_of_clevr.bench.fusion_sweep       # every fusion block
  python -m mmjax.projects.sort_of_clevr.bench.transfer           # pretrained question encoders
  python -m mmjax.projects.sort_of_clevr.bench.reference          # a minimal model to compare
"""
