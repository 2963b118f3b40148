"""Per-rank functions the train job tests launch in place of ``train_main`` (imported by the
ranks: the tests put this directory on PYTHONPATH). Each wraps the real loop."""
import os
import signal

from dollyflow.core.training.loop import Hooks, train_main


class _FailOnRank1(Hooks):
    def on_step(self, step, entry):
        if step == 2 and int(os.environ["RANK"]) == 1:
            raise ValueError("injected failure on rank 1 at step 2")


def fail_on_rank_1(spec):
    return train_main(spec, _FailOnRank1())


class _KillAfterCheckpoint(Hooks):
    def on_checkpoint(self, step, path):
        os.kill(os.getpid(), signal.SIGKILL)       # as a preempted node would: no cleanup at all


def kill_after_first_checkpoint(spec):
    return train_main(spec, _KillAfterCheckpoint())
