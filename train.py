"""Train an mmjax model.

  python train.py --config mmjax/projects/sort_of_clevr/configs/vqa.py --workdir workdirs/vqa
  python train.py --config configs/vqa.py:size=small,fusion=film \
      --config.optim.lr=3e-4 --workdir /tmp/vqa

A workdir that already holds checkpoints is resumed from its latest step. On a multi-host TPU
pod, run the same command on every host: `jax.distributed.initialize()` reads the environment.
"""

import json
import logging
import os

from absl import app, flags
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots.", required=True)
flags.DEFINE_bool("distributed", None, "Call jax.distributed.initialize() (default: when the "
                  "usual cluster environment variables are set).")
config_flags.DEFINE_config_file("config", None, "Config file, optionally with ':args'.",
                                lock_config=True)
FLAGS = flags.FLAGS

CLUSTER_VARS = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID")


def main(argv):
  del argv
  import jax

  want = FLAGS.distributed
  if want is None:
    want = any(v in os.environ for v in CLUSTER_VARS)
  if want:
    jax.distributed.initialize()
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)

  from mmjax.train import trainer

  final = trainer.train(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    print(json.dumps({k: v for k, v in final.items() if not k.startswith("train/")}, indent=2))


if __name__ == "__main__":
  app.run(main)
