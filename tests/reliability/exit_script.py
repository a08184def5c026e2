"""Test helper: a training script whose last act is a snapshot, ending in one of several ways.

    python exit_script.py PATH ENDING [--async | --atexit]

ENDING: return (falls off the end), sys.exit, exception (uncaught), interrupt (KeyboardInterrupt, what
Ctrl-C raises). The state (~64 MiB, so the background write is still running when the script ends) is
filled with the step number 7. Run alone or under torchrun (every rank snapshots).
"""
import argparse
import atexit
import sys

import torch

from pyckpt import DistributedCoordinator, TrainingRuntime, load_config


class Holder:
    def __init__(self):
        self.state = {f"t{i}": torch.full((2 << 20,), 7.0) for i in range(8)}

    def state_dict(self):
        return self.state

    def load_state_dict(self, state):
        self.state.update(state)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("path")
    p.add_argument("ending", choices=["return", "sys.exit", "exception", "interrupt"])
    p.add_argument("--atexit", action="store_true", help="take a blocking snapshot from an atexit handler")
    args = p.parse_args()
    coordinator = DistributedCoordinator(load_config()).initialize()
    runtime = TrainingRuntime()
    runtime.register("holder", Holder())
    runtime.set_step(7)
    if args.atexit:
        atexit.register(lambda: coordinator.snapshot(args.path, runtime))
    else:
        coordinator.snapshot(args.path, runtime, blocking=False)   # no wait(), no shutdown()
    print("snapshot started", flush=True)
    if args.ending == "sys.exit":
        sys.exit(0)
    if args.ending == "exception":
        raise RuntimeError("the training loop crashed")
    if args.ending == "interrupt":
        raise KeyboardInterrupt


if __name__ == "__main__":
    main()
