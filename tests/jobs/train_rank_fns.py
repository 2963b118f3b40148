"""Per-rank functions the train job tests launch in place of ``train_main`` (imported by the
ranks: the tests put this directory on PYTHONPATH). Each wraps the real loop."""
import json
import os
import signal

from dollyflow.core.training.loop import Hooks, train_main
from dollyflow.core.training.model_dir import read_provenance


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


class _WatchOldModel(Hooks):
    """While a replacement model trains beside the old one: what a reader of
    ``train.output_dir`` finds there, and how the launcher's spec file looks (rank 0, first step).
    Written to the JSON file named by $DOLLYFLOW_TEST_WATCH."""

    def __init__(self, spec):
        self.spec = spec
        self.done = False

    def on_step(self, step, entry):
        if self.done or int(os.environ.get("RANK", "0")) != 0:
            return
        self.done = True
        final = self.spec.final_output_dir
        prov = read_provenance(final) or {}
        spec_path = os.path.join(self.spec.output_dir, ".runs", self.spec.run_id, "spec.json")
        text = open(spec_path, encoding="utf-8").read() if os.path.isfile(spec_path) else ""
        seen = {"final": final, "target": self.spec.output_dir,
                "old_fingerprint": prov.get("fingerprint", {}).get("sha256"),
                "old_weights": os.path.isfile(os.path.join(final, "model.safetensors")),
                "spec_mode": oct(os.stat(spec_path).st_mode & 0o777) if text else None,
                "spec_has_secret": "TOPSECRET" in text}
        with open(os.environ["DOLLYFLOW_TEST_WATCH"], "w", encoding="utf-8") as f:
            json.dump(seen, f)


def watch_old_model(spec):
    return train_main(spec, _WatchOldModel(spec))
