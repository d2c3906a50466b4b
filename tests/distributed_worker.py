"""One process of tests/test_distributed.py: joins the run described by CMEDL_* (or runs alone), then does tasks.

    python tests/distributed_worker.py TASKS.json

TASKS.json holds {"ct_dir", "mri_dir", "tasks": [...]} with tasks, done in order by every process:

- {"train": WORKDIR, "total_steps": N, "out": FILE}: trains (or resumes) the tiny config of tests/tiny.py in
  WORKDIR up to step N; process 0 writes {step: total loss} of the steps run to FILE (JSON);
- {"restore": WORKDIR, "step": S, "out": FILE}: restores the train state of checkpoint S onto this run's devices;
  process 0 writes its params and BatchNorm statistics to FILE (npz, one array per leaf path).
"""

import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root


def _flatten(tree):
  import jax
  import numpy as np
  return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _train(spec, phantom_dirs, is_main):
  from cmedl_jax.train import trainer
  from tests.tiny import phantom_config
  cfg = phantom_config(phantom_dirs, spec["total_steps"], checkpoint_every=2, preview_every=2,
                       val_every=spec.get("val_every", 0))
  cfg.data.val_cases = spec.get("val_cases", 0)
  result = trainer.train(cfg, spec["train"], progress=False)
  if is_main:
    with open(spec["out"], "w") as f:
      json.dump({str(h["step"]): h["total"] for h in result.history}, f)


def _restore(spec, phantom_dirs, is_main):
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from cmedl_jax.train import checkpointing, methods, state as state_lib, step as step_lib
  from tests.tiny import phantom_config
  cfg = phantom_config(phantom_dirs)
  nets = methods.build_networks(cfg)
  optimizers = state_lib.make_optimizers(cfg, nets)
  size = cfg.data.crop_size
  abstract = jax.eval_shape(lambda k: state_lib.create_train_state(nets, cfg, optimizers, k, (size, size, 1)),
                            jax.random.key(0))
  replicated = NamedSharding(step_lib.make_mesh(), P())  # every device of every process
  ckpt = checkpointing.RunCheckpointer(spec["restore"], async_save=False)
  try:
    state = ckpt.restore_state_only(spec["step"], checkpointing.abstract_like(abstract, replicated))
  finally:
    ckpt.close()
  if is_main:  # replicated arrays: every process holds all of it
    np.savez(spec["out"], **_flatten({"params": state.params, "batch_stats": state.batch_stats}))


def main(argv):
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
  logging.getLogger("cmedl_jax").setLevel(logging.INFO)
  with open(argv[1]) as f:
    job = json.load(f)
  from cmedl_jax import distributed
  info = distributed.initialize_from_environment()
  print(f"worker: process {info.process_index} of {info.process_count}, {info.local_device_count} local of "
        f"{info.device_count} devices", flush=True)
  phantom_dirs = (job["ct_dir"], job["mri_dir"])
  for spec in job["tasks"]:
    task = _train if "train" in spec else _restore
    task(spec, phantom_dirs, info.process_index == 0)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
