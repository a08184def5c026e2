"""Every library under test behind the same four operations on a (model, optimizer) pair.

save(path): until durable (fsync'd; libraries that do not fsync get an fsync of their files).
async_save(path) -> wait: returns once the training loop may continue; wait() returns once durable.
restore(path): the state is back in the model and optimizer (read + load_state_dict).
settle(): finish background work that a finished call left behind (no figure includes it).
A restore is always "into the live model": that is what a training script needs.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable

import torch

from . import state as st
from .measure import fsync_tree

# torchsnapshot is unmaintained (0.1.0, 2023) and declares an unpinned torch dependency, so it is
# installed with --no-deps, with these pins, into a private directory (never into the venv).
TORCHSNAPSHOT_PINS = ["torchsnapshot==0.1.0", "aiofiles==25.1.0", "nest-asyncio==1.6.0",
                      "importlib-metadata==8.5.0", "zipp==3.21.0"]


REUSE_ENV = "PYCKPT_BENCH_REUSE_FILES"   # "1": DistributedCoordinator(reuse_files=True) (--pyckpt-reuse-files)


class Lib:
    name = ""
    has_async = False

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def save(self, path: str) -> None:
        raise NotImplementedError

    def async_save(self, path: str) -> Callable[[], None]:
        raise NotImplementedError

    def restore(self, path: str) -> None:
        raise NotImplementedError

    def settle(self) -> None:
        pass

    def close(self) -> None:
        pass


class Pyckpt(Lib):
    name = "pyckpt"
    has_async = True

    def __init__(self, model, optimizer, coordinator=None):
        super().__init__(model, optimizer)
        import pyckpt
        self.runtime = pyckpt.TrainingRuntime()
        self.runtime.register_model(model)
        self.runtime.register_optimizer(optimizer)
        self.coordinator = coordinator or pyckpt.DistributedCoordinator(
            pyckpt.load_config(environ={}), keep_last=1, reuse_files=os.environ.get(REUSE_ENV, "1") == "1")
        self.coordinator.initialize()
        self.last_info = None

    def save(self, path):
        self.last_info = self.coordinator.snapshot(path, self.runtime)

    def async_save(self, path):
        future = self.coordinator.snapshot(path, self.runtime, blocking=False)
        return lambda: future.result()

    def restore(self, path):
        self.coordinator.restore(path, self.runtime)

    def settle(self):
        self.coordinator.wait()   # the deletion of the version the last snapshot dropped

    def close(self):
        self.coordinator.wait()


class TorchSave(Lib):
    name = "torch.save"

    def save(self, path):
        with open(path, "wb") as f:
            torch.save({"model": self.model.state_dict(), "optim": self.optimizer.state_dict()}, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_tree(os.path.dirname(path))

    def restore(self, path):
        sd = torch.load(path, weights_only=True)
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optim"])


class Safetensors(Lib):
    name = "safetensors"

    def save(self, path):
        from safetensors.torch import save_file
        save_file(st.flat_tensors(self.model, self.optimizer), path)
        fsync_tree(path)

    def restore(self, path):
        from safetensors.torch import load_file
        st.load_flat(self.model, self.optimizer, load_file(path))


class DCP(Lib):
    """torch.distributed.checkpoint with its documented state-dict helpers (FQN-keyed optimizer state)."""

    name = "dcp"
    has_async = True

    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def save(self, path):
        import torch.distributed.checkpoint as dcp
        dcp.save(self._state(), checkpoint_id=path)   # FileSystemWriter fsyncs (sync_files=True)

    def async_save(self, path):
        import torch.distributed.checkpoint as dcp
        response = dcp.async_save(self._state(), checkpoint_id=path)
        future = getattr(response, "upload_completion", response)
        return lambda: future.result()

    def restore(self, path):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        sd = self._state()
        dcp.load(sd, checkpoint_id=path)              # in place, into the state dict's tensors
        set_state_dict(self.model, self.optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


class TorchSnapshot(Lib):
    name = "torchsnapshot"
    has_async = True

    def __init__(self, model, optimizer):
        super().__init__(model, optimizer)
        import torchsnapshot
        self.ts = torchsnapshot
        self.app = {"model": model, "optim": optimizer}

    def save(self, path):
        self.ts.Snapshot.take(path, self.app)
        fsync_tree(path)

    def async_save(self, path):
        pending = self.ts.Snapshot.async_take(path, self.app)

        def wait():
            pending.wait()
            fsync_tree(path)
        return wait

    def restore(self, path):
        self.ts.Snapshot(path).restore(self.app)


def ensure_torchsnapshot(cache_dir: str) -> str | None:
    """Make torchsnapshot importable from cache_dir; returns None or the reason it cannot run."""
    target = os.path.join(cache_dir, "torchsnapshot-0.1.0")
    if not os.path.isdir(os.path.join(target, "torchsnapshot")):
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target, *TORCHSNAPSHOT_PINS]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"pip install failed: {exc}"
        if proc.returncode != 0:
            return "pip install failed: " + (proc.stderr.strip().splitlines() or ["?"])[-1]
    if target not in sys.path:
        sys.path.append(target)
    try:
        import torchsnapshot  # noqa: F401
    except Exception as exc:  # any import-time failure means "does not run on this torch"
        return f"import failed on torch {torch.__version__}: {type(exc).__name__}: {exc}"
    return None
