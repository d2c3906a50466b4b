"""``cmedl-train`` that SIGKILLs itself at a chosen point, for tests/test_reproducibility.py.

``$CMEDL_TEST_KILL`` is ``save:N``: right after the asynchronous save of checkpoint N started (orbax is still writing
it in the background), or ``step:N``: right after step N was logged, once every save has completed (between
checkpoints: on a loaded 2-core machine an async save can span several steps, so a kill from outside at a random
moment usually lands during one). Arguments are cmedl-train's.
"""

import os
import signal

if __name__ == "__main__":  # grain's worker processes import this module too
  from cmedl_jax.train import checkpointing, main, trainer

  kind, number = os.environ["CMEDL_TEST_KILL"].split(":")
  number = int(number)
  checkpointers = []
  real_init, real_save, real_write = (checkpointing.RunCheckpointer.__init__, checkpointing.RunCheckpointer.save,
                                      trainer.MetricWriter.write)

  def init(self, *args, **kwargs):
    real_init(self, *args, **kwargs)
    checkpointers.append(self)

  def save_then_die(self, step, *args, **kwargs):
    saved = real_save(self, step, *args, **kwargs)
    if kind == "save" and int(step) == number:
      os.kill(os.getpid(), signal.SIGKILL)
    return saved

  def write_then_die(self, step, metrics):
    real_write(self, step, metrics)
    if kind == "step" and int(step) == number:
      for checkpointer in checkpointers:
        checkpointer.manager.wait_until_finished()
      os.kill(os.getpid(), signal.SIGKILL)

  checkpointing.RunCheckpointer.__init__ = init
  checkpointing.RunCheckpointer.save = save_then_die
  trainer.MetricWriter.write = write_then_die
  main.main()
