"""Test helper: under torchrun (or alone), snapshot a stamped state to an S3 URL `--count` times (the
last one asynchronously), then restore it into fresh objects on every rank and print what came back:
"restored <rank> step <step> values <values> mine <this rank's own values>"."""
import argparse
import sys

import torch

from pyckpt import DistributedCoordinator, TrainingRuntime, load_config
from snapshot_loop import Stamped


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--mib", type=int, default=2)
    p.add_argument("--count", type=int, default=2)
    args = p.parse_args()
    with DistributedCoordinator(load_config(), keep_last=2) as coordinator:
        state, mine, runtime = Stamped(args.mib), Stamped(1), TrainingRuntime()
        runtime.register("stamped", state)
        runtime.register("mine", mine, per_rank=True)
        for step in range(1, args.count + 1):
            state.fill(float(step))
            mine.fill(float(100 * coordinator.rank + step))
            runtime.set_step(step)
            if step < args.count:
                coordinator.snapshot(args.url, runtime)
            else:
                coordinator.snapshot(args.url, runtime, blocking=False).result()
        fresh, fresh_mine, restored = Stamped(args.mib), Stamped(1), TrainingRuntime()
        restored.register("stamped", fresh)
        restored.register("mine", fresh_mine, per_rank=True)
        coordinator.restore(args.url, restored)
        values = sorted({float(v) for t in fresh.tensors.values() for v in torch.unique(t)})
        own = sorted({float(v) for t in fresh_mine.tensors.values() for v in torch.unique(t)})
        # One write per line: both ranks share torchrun's stdout, and print's separate "\n" write
        # let another rank's line land between them when the stream is unbuffered.
        sys.stdout.write(f"restored {coordinator.rank} step {restored.step} values {values} mine {own}\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
