"""Decides, before anything is read, whether a snapshot fits the live runtime, and which live tensors it
can be read into in place.

One checker, fit_state, serves both ends of a restore: check_fits runs it on a skeleton of the saved
state built from the manifest alone (SavedTensor leaves: dtype and shape, no data), so that a mismatch
is refused before a byte is read into the live objects; TrainingRuntime.load_state runs it again on the
real tensors (pyckpt.load users call load_state directly) before it changes anything. Objects whose saved
state a restore found to have exactly their live state's form (live_destinations, run first) fit by that
finding: neither check decodes or compares them again. With strict=False what does not fit is left out,
never loaded wrong-shaped.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from itertools import chain
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from .errors import StateMismatchError
from .manifest import Manifest
from .shards import Target, dtensor_target
from .tree import DTYPE_NAMES, TORCH_DTYPES, dict_items, is_dtensor, matching_live, unflatten

if TYPE_CHECKING:
    from .runtime import TrainingRuntime

_LISTED = 20          # keys or parameters named in one problem; the rest are counted
_MT_WORDS = 624       # numpy's MT19937 key length (its pos must lie in [0, 624])


@dataclass(slots=True)
class SavedTensor:
    """A saved tensor as the manifest records it: what a check needs, without its data."""

    dtype: str                  # a torch dtype name, or "numpy:<dtype.str>"
    shape: tuple[int, ...]


def live_state(obj: Any) -> Any:
    """A registered object's state_dict, a module's with its tensors themselves (keep_vars): pyckpt only
    reads their bytes, and detaching each one cost ~9 us per DTensor parameter (45 ms of every
    snapshot and restore of a 5,000-parameter FSDP2 model; plain tensors: ~1 us)."""
    return obj.state_dict(keep_vars=True) if isinstance(obj, torch.nn.Module) else obj.state_dict()


@dataclass
class Fit:
    """What of a saved state fits the registered objects, decided before any of it is loaded."""

    problems: list[str] = field(default_factory=list)     # what does not fit, one line each
    objects: dict[str, Any] = field(default_factory=dict)  # name -> the saved state to load, misfits left out
    progress: dict[str, Any] = field(default_factory=dict)  # "epoch", "step", "loss": those that fit
    rng: dict | None = None     # the RNG state to set (None: none saved, not captured, or it does not fit)
    absent: list[str] = field(default_factory=list)        # per-rank objects this rank has no saved state for


def check_fits(manifest: Manifest, runtime: "TrainingRuntime", rank: int | None, strict: bool, *,
               private: Any = None, matched: frozenset[str] = frozenset()) -> list[str]:
    """Check, before any data is read, that the snapshot fits the runtime (fit_state on a skeleton).

    rank: whose per-rank state to check (None, or a rank the snapshot does not have: none). private:
    that rank's state tree if the caller has already read it (a few KiB): its values are then checked
    too (torch's RNG bytes), not only their form. matched: objects whose saved state live_destinations
    found to have their live state's form (InPlace.objects): they fit, and are not decoded again.
    strict=True raises StateMismatchError listing every problem; strict=False returns them (what
    load_state will leave out, with a warning)."""
    if private is None and rank is not None and 0 <= rank < manifest.world_size:
        private = skeleton(manifest, manifest.per_rank[rank])
    problems = fit_state(runtime, _skeleton_except(manifest, matched), private, matched).problems
    if strict and problems:
        raise mismatch_error(problems)
    return problems


def skeleton(manifest: Manifest, tree: Any) -> Any:
    """A state tree of the manifest with a SavedTensor in place of each tensor."""
    return unflatten(tree, _Records(manifest), "manifest.json")


def _skeleton_except(manifest: Manifest, matched: frozenset[str]) -> Any:
    """The replicated state's skeleton with the saved state of each object in `matched` left as None:
    a 20,000-tensor model and optimizer read in place made up most of a restore's check (the tree
    was validated when the manifest was read, so its parts decode as the whole would)."""
    top = dict_items(manifest.replicated)
    objects = dict_items(top.get("objects"))
    if not matched.intersection(objects):
        return skeleton(manifest, manifest.replicated)
    out = {key: skeleton(manifest, node) for key, node in top.items() if key != "objects"}
    out["objects"] = {name: None if name in matched else skeleton(manifest, node) for name, node in objects.items()}
    return out


class _Records:
    """The manifest's tensors as SavedTensors, made as a tree references them (a rank's private tree
    references a few of 20k)."""

    def __init__(self, manifest: Manifest):
        self.tensors = manifest.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, index: int) -> SavedTensor:
        record = self.tensors[index]
        return SavedTensor(record.dtype, tuple(record.shape))


def mismatch_error(problems: list[str]) -> StateMismatchError:
    return StateMismatchError(
        "snapshot does not fit this runtime, nothing was changed:\n  - " + "\n  - ".join(problems)
        + "\nfix the model/optimizer definition or the registrations, or restore with strict=False to load "
        "what fits (the rest is left out, with a warning)")


def fit_state(runtime: "TrainingRuntime", replicated: Any, private: Any, matched: frozenset[str] = frozenset()) \
        -> Fit:
    """Which parts of a saved state (a skeleton or real tensors) fit the runtime: registered vs saved
    objects (replicated, or per rank in `private`), model keys and shapes, optimizer parameter groups and
    per-parameter state, progress, loss and RNG state. `private` None: this rank has no saved state.
    `matched`: replicated objects known to fit (check_fits), taken as they are saved."""
    fit = Fit()
    saved = _objects(replicated, "replicated", fit)
    saved_private = _objects(private, "per-rank", fit) if private is not None else {}
    registered = runtime.objects
    order = {name: index for index, name in enumerate(registered)}
    changed: dict[int, str | None] = {}  # id(parameter) -> how its shape changed since the save (None: it did not)
    missing = []
    # Modules first: they fill `changed`, which the optimizers' checks read.
    for name in sorted(registered, key=lambda n: not isinstance(registered[n], torch.nn.Module)):
        per_rank = name in runtime.per_rank_names
        home, elsewhere = (saved_private, saved) if per_rank else (saved, saved_private)
        label = f"{runtime.kind(name)} {name!r}"
        if per_rank and private is None:
            fit.absent.append(name)
        elif name in home and name in matched and not per_rank:
            fit.objects[name] = home[name]
            if isinstance(registered[name], torch.nn.Module):   # its parameters kept their shapes
                changed.update((id(v), None) for v in live_state(registered[name]).values())
        elif name in home:
            state = _fit_object(label, name, registered[name], home[name], changed, fit.problems)
            if state is not None:
                fit.objects[name] = state
        elif name in elsewhere:
            fit.problems.append(
                f"{label} is registered with per_rank=True but the snapshot holds it as replicated state"
                if per_rank else f"{label} is saved per rank: register it with per_rank=True")
        else:
            missing.append(name)
    fit.objects = dict(sorted(fit.objects.items(), key=lambda item: order[item[0]]))  # loaded in registration order
    unexpected = [n for n in chain(saved, saved_private) if n not in registered]
    if missing:
        fit.problems.append(f"registered but not in the snapshot: {', '.join(sorted(missing, key=order.get))}")
    if unexpected:
        fit.problems.append(f"in the snapshot but not registered: {', '.join(unexpected)}")
    _fit_progress(replicated, private, fit)
    if runtime.capture_rng and isinstance(private, dict) and "rng" in private:
        rng = private["rng"]
        bad = _rng_problems(rng)
        fit.problems.extend(bad.values())
        fit.rng = {part: state for part, state in rng.items() if part not in bad} if isinstance(rng, dict) else None
    return fit


def _objects(tree: Any, where: str, fit: Fit) -> dict:
    objects = tree.get("objects", {}) if isinstance(tree, dict) else None
    if not isinstance(objects, dict):
        fit.problems.append(f"the {where} state has no objects mapping (a {type(objects).__name__})")
        return {}
    return objects


def _fit_object(label: str, name: str, obj: Any, saved: Any, changed: dict, problems: list[str]) -> Any:
    """The saved state to load into one object (misfits left out), or None when none of it fits."""
    if isinstance(obj, torch.nn.Module):
        return _fit_module(label, name, obj, saved, changed, problems)
    if isinstance(obj, torch.optim.Optimizer):
        return _fit_optimizer(label, obj, saved, changed, problems)
    return saved  # anything else: its own load_state_dict decides


def _fit_module(label: str, name: str, module: torch.nn.Module, saved: Any, changed: dict,
                problems: list[str]) -> dict | None:
    if not isinstance(saved, dict):
        problems.append(f"{label}: the snapshot holds a {type(saved).__name__}, not a state dict")
        return None
    current = module.state_dict(keep_vars=True)  # the parameters themselves: optimizers know them by id
    missing = [k for k in current if k not in saved]
    unexpected = [k for k in saved if k not in current]
    wrong = []
    for key, value in current.items():
        if key in saved and isinstance(value, torch.Tensor):
            fits = _torch_shape(saved[key]) == value.shape
            changed[id(value)] = None if fits else (
                f"{name}.{key}: {_shape_text(saved[key])} in the snapshot, now {tuple(value.shape)}")
            if not fits:
                wrong.append(key)
    if missing:
        problems.append(f"{label} missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"{label} unexpected keys: {_listing(unexpected)}")
    if not wrong:
        return _in_live_layout(saved, current)
    problems.append(f"{label} shape mismatches: " + _listing(
        [f"{k}: snapshot {_shape_text(saved[k])} vs model {tuple(current[k].shape)}" for k in wrong], "; "))
    left_out = set(wrong)
    return _in_live_layout({k: v for k, v in saved.items() if k not in left_out}, current)


def _in_live_layout(saved: dict, current: dict) -> dict:
    """Whole tensors going into DTensors, cut to the live layout on this rank (the shards it holds).

    A sharded model whose saved and live structures differ (a restore with strict=False) gets no
    sharded destinations (live_destinations): its tensors are read whole, and load_state_dict would
    refuse them ("mixed torch.Tensor and DTensor"). Every rank holds the whole tensor, so the cut needs
    no communication. Layouts other than Shard/Replicate (tensor parallel's strided shards) are left
    as they are."""
    if not any(is_dtensor(v) for v in current.values()):
        return saved
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    out = dict(saved)
    for key, value in saved.items():
        live = current.get(key)
        if is_dtensor(live) and type(value) is torch.Tensor and value.shape == live.shape \
                and all(type(p) in (Shard, Replicate) for p in live.placements):
            out[key] = distribute_tensor(value.to(live.device), live.device_mesh, live.placements, src_data_rank=None)
    return out


def _fit_optimizer(label: str, optimizer: torch.optim.Optimizer, saved: Any, changed: dict,
                   problems: list[str]) -> dict | None:
    """torch's Optimizer.load_state_dict checks (group count and sizes), made before it runs, plus the
    per-parameter state: a parameter's state is left out when the parameter changed shape."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    state = saved.get("state") if isinstance(saved, dict) else None
    if not (isinstance(state, dict) and isinstance(groups, list)
            and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                    and all(type(i) is int for i in g["params"]) for g in groups)):
        problems.append(f"{label}: the snapshot does not hold an optimizer state_dict "
                        "('state', and 'param_groups' with lists of parameter ids)")
        return None
    sizes = [len(g["params"]) for g in groups]
    live = [len(g["params"]) for g in optimizer.param_groups]
    if sizes != live:
        problems.append(f"{label}: parameter groups of sizes {sizes} in the snapshot, {live} in the optimizer")
        return None
    live_params = [p for g in optimizer.param_groups for p in g["params"]]
    by_id = dict(zip((i for g in groups for i in g["params"]), live_params))
    flat = sum(p.numel() for p in live_params)
    misfits = {}
    for pid, entry in state.items():
        param = by_id.get(pid)
        if param is not None and isinstance(entry, dict):
            misfit = changed[id(param)] if id(param) in changed else _unknown_param_misfit(pid, entry, param, flat)
            if misfit:
                misfits[pid] = misfit
    if not misfits:
        return saved
    problems.append(f"{label}: state of parameters that changed shape: {_listing(list(misfits.values()), '; ')}")
    return dict(saved, state={k: v for k, v in state.items() if k not in misfits})


def _unknown_param_misfit(pid: int, entry: dict, param: torch.Tensor, flat: int) -> str | None:
    """Why the saved optimizer state of a parameter that is in no registered module (so its saved shape
    is unknown) does not fit it, or None. Each state tensor must have a form torch's optimizers keep: a
    scalar (step), the parameter's shape (momentum, Adam's moments), that shape with one of its last two
    sizes 1 (Adafactor's factored variances), or one flat vector over all the optimizer's parameters
    (LBFGS)."""
    shape = tuple(param.shape)
    factored = [shape[:-1] + (1,), shape[:-2] + (1,) + shape[-1:]] if len(shape) >= 2 else []
    for key, value in entry.items():
        saved_shape = _torch_shape(value)
        if saved_shape is not None and saved_shape not in ((), shape, (flat,), *factored):
            return f"parameter #{pid} of shape {shape}: state {key!r} is {tuple(saved_shape)}"
    return None


def _fit_progress(replicated: Any, private: Any, fit: Fit) -> None:
    progress = replicated.get("progress", {}) if isinstance(replicated, dict) else {}
    if not isinstance(progress, dict):
        fit.problems.append(f"progress is a {type(progress).__name__}, not a dict")
        progress = {"epoch": None, "step": None}
    for key in ("epoch", "step"):
        value = progress.get(key, 0)
        if type(value) is int:
            fit.progress[key] = value
        else:
            fit.problems.append(f"progress {key} {str(value)[:40]!r} is not an integer")
    loss = private.get("loss") if isinstance(private, dict) else None
    if loss is None or type(loss) in (int, float):
        fit.progress["loss"] = loss
    else:
        fit.problems.append(f"loss {str(loss)[:40]!r} is not a number")


def _rng_problems(rng: Any) -> dict[str, str]:
    """Why parts of a saved RNG state (runtime.rng_state's form) cannot be set: part -> problem. Checked
    on throwaway generators, so nothing global changes. Parts this machine does not set (CUDA without
    GPUs, or another GPU count) are only checked for their form."""
    if not isinstance(rng, dict):
        return {"": f"RNG state is a {type(rng).__name__}, not a dict"}
    problems = {"python": _python_problem(rng["python"]) if "python" in rng else None,
                "torch": _generator_problem("torch", [rng["torch"]], "cpu") if "torch" in rng else None,
                "numpy": _numpy_problem(rng["numpy"]) if "numpy" in rng else None,
                "cuda": _cuda_problem(rng["cuda"]) if "cuda" in rng else None}
    return {part: problem for part, problem in problems.items() if problem is not None}


def _python_problem(state: Any) -> str | None:
    try:
        version, internal, gauss = state
        random.Random().setstate((version, tuple(internal), gauss))
    except (TypeError, ValueError, OverflowError) as exc:
        return f"RNG state 'python' is not random.getstate()'s form ({exc})"
    return None


def _cuda_problem(states: Any) -> str | None:
    if not isinstance(states, (list, tuple)) or not all(_torch_shape(s) is not None for s in states):
        return "RNG state 'cuda' is not a list of tensors"
    if torch.cuda.is_available() and len(states) == torch.cuda.device_count():
        return _generator_problem("cuda", states, "cuda")
    return None


def _generator_problem(part: str, states: list, device: str) -> str | None:
    """A saved generator state must have the form of a fresh generator's; real bytes must also be
    taken by one (torch checks the Mersenne Twister's fields)."""
    for index, state in enumerate(states):
        where = f"RNG state {part!r}" + (f"[{index}]" if device != "cpu" else "")
        fresh = torch.Generator(device=f"{device}:{index}" if device != "cpu" else "cpu")
        expected = tuple(fresh.get_state().shape)
        if _dtype_name(state) != "uint8" or _torch_shape(state) != expected:
            return f"{where} is {_describe(state)}, this torch keeps uint8 {expected}"
        if isinstance(state, torch.Tensor):
            try:
                fresh.set_state(state)
            except RuntimeError as exc:
                return f"{where} is refused by torch ({str(exc).strip()[:200]})"
    return None


def _numpy_problem(state: Any) -> str | None:
    """numpy's legacy get_state() tuple. numpy does not check the position (an out-of-range one
    crashes the next draw), so it is checked here; numpy checks the rest on a throwaway generator."""
    if not (isinstance(state, (list, tuple)) and len(state) == 5):
        return f"RNG state 'numpy' is a {type(state).__name__}, not numpy.random.get_state()'s 5-tuple"
    algorithm, key, pos, has_gauss, gauss = state
    if _dtype_name(key) != "numpy:uint32" or _numpy_shape(key) != (_MT_WORDS,):
        return f"RNG state 'numpy' key is {_describe(key)}, not uint32 ({_MT_WORDS},)"
    if type(pos) is not int or not 0 <= pos <= _MT_WORDS:
        return f"RNG state 'numpy' position {str(pos)[:40]!r} is not an integer in [0, {_MT_WORDS}]"
    try:
        np.random.RandomState().set_state((algorithm, np.zeros(_MT_WORDS, np.uint32), pos, has_gauss, gauss))
    except (TypeError, ValueError, OverflowError) as exc:
        return f"RNG state 'numpy' is refused by numpy ({exc})"
    return None


def _torch_shape(value: Any) -> tuple | None:
    """The shape of a saved torch tensor (real or SavedTensor), None for anything else."""
    if isinstance(value, torch.Tensor):
        return value.shape
    if isinstance(value, SavedTensor) and not value.dtype.startswith("numpy:"):
        return value.shape
    return None


def _numpy_shape(value: Any) -> tuple | None:
    if isinstance(value, np.ndarray):
        return value.shape
    if isinstance(value, SavedTensor) and value.dtype.startswith("numpy:"):
        return value.shape
    return None


def _dtype_name(value: Any) -> str | None:
    """A saved tensor's dtype as "float32" (torch) or "numpy:uint32" (numpy), None for anything else."""
    if isinstance(value, torch.Tensor):
        return DTYPE_NAMES.get(value.dtype, str(value.dtype))
    if isinstance(value, np.ndarray):
        return f"numpy:{value.dtype.name}"
    if isinstance(value, SavedTensor):
        return f"numpy:{np.dtype(value.dtype[len('numpy:'):]).name}" if value.dtype.startswith("numpy:") \
            else value.dtype
    return None


def _shape_text(value: Any) -> str:
    shape = _torch_shape(value)
    return str(tuple(shape)) if shape is not None else _describe(value)


def _describe(value: Any) -> str:
    dtype = _dtype_name(value)
    if dtype is None:
        return f"a {type(value).__name__}"
    shape = _numpy_shape(value) if dtype.startswith("numpy:") else _torch_shape(value)
    return f"{dtype} {tuple(shape)}"


def _listing(items: list[str], sep: str = ", ") -> str:
    more = f"{sep}... ({len(items) - _LISTED} more)" if len(items) > _LISTED else ""
    return sep.join(items[:_LISTED]) + more


# ---------------------------------------------------------------------------------------------
# In-place destinations
# ---------------------------------------------------------------------------------------------

class InPlace(NamedTuple):
    """What a restore reads straight into the live objects."""

    tensors: dict[int, torch.Tensor]   # saved tensor index -> the live tensor it is read into
    objects: frozenset[str]            # the objects all of whose saved tensors are among them


def live_destinations(manifest: Manifest, runtime: "TrainingRuntime") -> InPlace:
    """What to read in place: saved tensor index -> the registered object's own tensor (detached), and
    the objects whose saved tensors all have one.

    Only for replicated objects whose saved state has exactly the structure of their live state (same
    keys, and every tensor with the same dtype and shape): loading them then cannot fail on a mismatch.
    Their contiguous CPU tensors are read in place, so load_state_dict's copy becomes a no-op (copy_ of
    a tensor onto itself); their DTensors are read as the boxes they hold; their other tensors (on a
    GPU, or not contiguous) are read into new tensors that load_state_dict copies. (Such a tensor used
    to drop the whole object, DTensors included, and an FSDP2 model on a GPU with a buffer then got
    full plain tensors it could not load.) Other objects (a fresh optimizer without state, a changed
    model) are read into new buffers as before. No two destinations share memory (tied weights: see
    _apart). A checksum error while reading in place leaves those objects partially overwritten: the
    restore raises IntegrityError and the caller must restore another version before training on.
    """
    saved_objects = dict_items(dict_items(manifest.replicated).get("objects"))
    records = manifest.tensors
    out: dict[int, torch.Tensor] = {}
    whole: dict[str, list[int]] = {}   # objects whose every saved tensor got a destination (before _apart)
    for name, obj in runtime.objects.items():
        if name in runtime.per_rank_names or name not in saved_objects:
            continue
        try:
            live = live_state(obj)
        except (TypeError, KeyError):
            continue
        pairs = matching_live(saved_objects[name], live)
        if pairs is None:
            continue
        views = {}
        for saved_index, t in pairs:
            rec = records[saved_index]
            if is_dtensor(t) and list(t.shape) == rec.shape and not rec.is_numpy:
                views[saved_index] = t    # read as the boxes it holds on this rank (shards.dtensor_target)
                continue
            if not (isinstance(t, torch.Tensor) and DTYPE_NAMES.get(t.dtype) == rec.dtype
                    and list(t.shape) == rec.shape and t.nbytes == rec.nbytes) \
                    or saved_index in out or saved_index in views:
                break
            if t.is_cpu and t.is_contiguous():   # else (a GPU buffer) read into a new tensor, copied at load
                views[saved_index] = t.detach() if t.requires_grad else t
        else:
            out.update(views)
            if len(views) == len(pairs):
                whole[name] = list(views)
    out = _apart(out)
    return InPlace(out, frozenset(name for name, indices in whole.items() if all(i in out for i in indices)))


def _apart(destinations: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """The destinations without any that share memory with another (kept: the lowest saved index).

    Two saved tensors read into the same memory (a tied model restored from an untied save, or any
    two views of one storage) would overwrite each other while their checksums are checked. The
    dropped ones are read into new buffers and copied by load_state_dict, as torch would load them."""
    kept_end = 0
    # DTensors are kept: two of them share memory only as one tied parameter under two keys, whose saved
    # bytes are then the same too.
    out = {i: t for i, t in destinations.items() if is_dtensor(t)}
    plain = {i: t for i, t in destinations.items() if not is_dtensor(t)}
    for start, index in sorted((t.data_ptr(), i) for i, t in plain.items()):
        tensor = destinations[index]
        if tensor.nbytes == 0:
            out[index] = tensor
        elif start >= kept_end:
            out[index] = tensor
            kept_end = start + tensor.nbytes
    return out


class _Ref(NamedTuple):
    index: int
    record: Any


class _Indexed(_Records):
    def __getitem__(self, index: int) -> _Ref:
        return _Ref(index, self.tensors[index])


def optimizer_targets(manifest: Manifest, runtime: "TrainingRuntime", done: InPlace = InPlace({}, frozenset())) \
        -> dict[int, Target]:
    """Saved optimizer state of sharded (DTensor) parameters -> a Target of the parameter's layout on
    this rank: read as the boxes the parameter holds here and loaded as DTensors like it. This serves
    optimizers that have no state yet (FSDP2 creates it at the first step) without a fake step, which
    has cost other tools off-by-one step counts and weight decay applied at load. Saved indices in
    `done` (those live_destinations reads in place) get none: a Target costs a layout query per tensor,
    and an optimizer read in place whole is not decoded at all (most restores: its state exists)."""
    objects = dict_items(dict_items(manifest.replicated).get("objects"))
    out: dict[int, Target] = {}
    for name, optimizer in runtime.objects.items():
        if not (isinstance(optimizer, torch.optim.Optimizer) and name in objects and name not in runtime.per_rank_names
                and name not in done.objects and any(is_dtensor(p) for g in optimizer.param_groups for p in g["params"])):
            continue   # (decoding only the optimizers of sharded parameters: 20k-tensor states restore often)
        saved = unflatten(objects[name], _Indexed(manifest), "manifest.json")
        if not isinstance(saved, dict):
            continue
        groups, state = saved.get("param_groups"), saved.get("state")
        if not (isinstance(groups, list) and isinstance(state, dict)
                and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups)):
            continue
        params = [p for g in optimizer.param_groups for p in g["params"]]
        by_id = dict(zip((i for g in groups for i in g["params"]), params))
        for pid, entry in state.items():
            param = by_id.get(pid)
            if not (is_dtensor(param) and isinstance(entry, dict)):
                continue
            made: dict[str, Target] = {}   # exp_avg and exp_avg_sq share one (a Target holds no buffer here)
            for ref in entry.values():
                if isinstance(ref, _Ref) and ref.index not in done.tensors and not ref.record.is_numpy \
                        and ref.record.shape == list(param.shape):
                    dtype = ref.record.dtype
                    if dtype not in made:
                        made[dtype] = dtensor_target(param, TORCH_DTYPES[dtype], in_place=False)
                    out[ref.index] = made[dtype]
    return out
