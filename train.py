"""Train an mmjax model.

  python train.py --config mmjax/projects/sort_of_clevr/configs/vqa.py --workdir workdirs/vqa
  python train.py --config configs/vqa.py:size=small,fusion=film \
      --config.optim.lr=3e-4 --workdir /tmp/vqa

A workdir that already holds checkpoints is resumed from its latest step. On a multi-host TPU
pod (or a SLURM, Open MPI or Kubernetes job), run the same command on every host: with
--distributed=auto (the default) JAX's own cluster detection starts the distributed runtime, and
one process trains alone where it finds no cluster; docs/tpu.md walks through a pod.
"""

import json
import logging
import sys

from absl import app, flags

from mmjax.train.config import CommandLineConfig

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots: a local folder or a bucket URL (gs://...).", required=True)
flags.DEFINE_enum("distributed", "auto", ["auto", "true", "false"],
                  "Start the JAX distributed runtime: auto (when JAX's cluster detection finds a "
                  "cluster of several processes: Cloud TPU VM, GKE, SLURM, Open MPI, Kubernetes), "
                  "true (always: an error where there is none), false (never).", case_sensitive=False)
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, outside a cluster JAX "
                    "detects (also read from JAX_COORDINATOR_ADDRESS).")
flags.DEFINE_integer("num_processes", None, "Number of processes, with --coordinator_address.")
flags.DEFINE_integer("process_id", None, "This process's index, with --coordinator_address.")
flags.DEFINE_string("config", None, "Config file, optionally with ':args'; then --config.KEY=VALUE "
                    "overrides (mmjax.train.config.load_config: unknown keys are errors).")
FLAGS = flags.FLAGS
CONFIG = CommandLineConfig("train.py")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  import jax

  from mmjax.train import distributed

  try:  # before anything else touches a JAX backend
    distributed.start(FLAGS.distributed.lower(), coordinator_address=FLAGS.coordinator_address,
                      num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)
  except distributed.StartError as e:
    sys.exit(f"train.py: {e}")

  from mmjax.train import trainer

  config = CONFIG.load()
  final = trainer.train(config, FLAGS.workdir)
  if jax.process_index() == 0:
    print(json.dumps({k: v for k, v in final.items() if not k.startswith("train/")}, indent=2))


if __name__ == "__main__":
  app.run(main, flags_parser=CONFIG.parse)
