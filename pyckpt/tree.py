"""State trees: the one place that knows how nested state_dicts are encoded as JSON nodes in the
manifest (docs/FORMAT.md, "State trees"), and the one walk that every reader and writer of a tree uses.

A node is a JSON object with one key, its kind: containers (dict, list, tuple) hold nodes, leaves hold
a plain value, a dtype name, or the index of a tensor in Manifest.tensors. `fold` walks a tree
iteratively (no recursion on a hostile depth, memory bounded by the depth), checks the form of every
node, and reports a malformed one with its key path; the codec (flatten/unflatten), the manifest's
validator, the reference collection, the renumbering and key chains are folds (the comparison of a
saved tree with a live object walks both side by side, reading the live one with the encoder's
classifier).
A new leaf kind is one entry in LEAVES (its on-disk form and decoding) and one case in _classifier
(which Python objects it encodes).
"""
from __future__ import annotations

from operator import itemgetter
from typing import Any, Callable, Sequence

import sys

import numpy as np
import torch

from .errors import IntegrityError

# Node kinds: the key of a node object, exactly as it is on disk.
DICT = "D"          # {"D": [[key, node], ...]}: keys str or int, order kept
LIST = "L"          # {"L": [node, ...]}
TUPLE = "U"         # {"U": [node, ...]}
TENSOR = "T"        # {"T": i}: torch tensor number i of Manifest.tensors
SHARDED = "S"       # {"S": i}: a sharded (DTensor) tensor, number i: saved as chunks of its global shape
ARRAY = "N"         # {"N": i}: numpy array number i
VALUE = "V"         # {"V": v}: None, bool, int, float (NaN/inf allowed), str
DTYPE = "dtype"     # {"dtype": "float32"}: a torch.dtype
REFERENCES = frozenset((TENSOR, SHARDED, ARRAY))     # leaves whose value is an index into Manifest.tensors

MAX_DEPTH = 64                  # nesting limit of a state tree, written or read
MAX_INT_BITS = 14_000           # Python reads no int of more than 4,300 digits (~14,284 bits) from JSON
NUMPY_KINDS = "biufc"           # bool, signed, unsigned, float, complex: plain numbers only
TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "complex64", "complex128",
        "int64", "int32", "int16", "int8", "uint8", "bool",
        "uint16", "uint32", "uint64", "float8_e4m3fn", "float8_e5m2",
    )
    if hasattr(torch, name)
}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def is_dtensor(obj: Any) -> bool:
    """Whether obj is a DTensor, without importing torch.distributed.tensor (1.4 s of CPU at start-up,
    which DDP jobs do not need): no DTensor can exist before that module is imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(obj, module.DTensor)


def _index(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise Malformed(f"tensor reference {str(value)[:40]!r} is not an index")
    return value


def _plain(value: Any) -> Any:
    if value is None or type(value) in _PLAIN or isinstance(value, (bool, int, float, str)):
        return value
    raise Malformed(f"value {str(value)[:80]!r} is not a plain value")


def _dtype(value: Any) -> torch.dtype:
    if type(value) is not str or value not in TORCH_DTYPES:
        raise Malformed(f"unknown dtype {str(value)[:40]!r}")
    return TORCH_DTYPES[value]


_PLAIN = frozenset((bool, int, float, str))
# Every leaf kind: its value read from disk, checked (Malformed if it is not in the format). A new leaf
# kind is an entry here and a case in _classifier.
LEAVES: dict[str, Callable[[Any], Any]] = {TENSOR: _index, SHARDED: _index, ARRAY: _index, VALUE: _plain,
                                           DTYPE: _dtype}


class Malformed(Exception):
    """A node that is not in the format (or, when encoding, an object that has no encoding)."""

    def __init__(self, problem: str, chain: tuple = ()):
        super().__init__(problem)
        self.problem = problem
        self.chain = chain      # the node's keys from the root: (key, is_index) pairs


# ---------------------------------------------------------------------------------------------
# The walk
# ---------------------------------------------------------------------------------------------

_second = itemgetter(1)
_MISSING = object()


def fold(root: Any, leaves: dict[str, Callable[[Any], Any] | None], build: Callable[[str, list, list], Any],
         open_node: Callable[[Any], tuple[str, Any]] | None = None) -> Any:
    """Fold a tree bottom-up, depth first, in order, without recursion (memory: one level per open
    container). leaves[kind](value) gives a leaf's result (None: the node itself is); build(kind,
    items, results) a container's, from its value (a dict's [key, node] items, a sequence's nodes)
    and its children's results. open_node turns each node into (kind, value) first (the encoder's
    objects; it checks their dict keys); its leaves' results are then {kind: value} JSON nodes. The form of every node and the depth are checked here;
    Malformed (from here or from a leaf) is raised with the node's key chain. Messages are formatted
    on failure only: str() of a node is the text of its whole subtree, and this runs once per node
    of 20k-tensor states."""
    levels: list = []               # the enclosing containers: (children, kind, value, results)
    children, kind, items, results = iter((root,)), None, None, []
    try:
        while True:
            for node in children:
                if open_node is not None:
                    node_kind, value = node = open_node(node)   # an encoder's (kind, value): a node in the making
                elif type(node) is not dict or len(node) != 1:
                    raise Malformed(f"malformed state tree node {str(node)[:80]!r}")
                else:
                    (node_kind, value), = node.items()
                read = leaves.get(node_kind, _MISSING)
                if read is not _MISSING:
                    results.append(read(value) if read is not None else node if open_node is None else {node_kind: value})
                    continue
                if node_kind == DICT:
                    if type(value) is not list:
                        raise Malformed("malformed dict node")
                    for item in value if open_node is None else ():   # (open_node checks its own)
                        if type(item) is not list or len(item) != 2 or type(item[0]) not in (str, int):
                            raise Malformed(f"malformed dict item {str(item)[:80]!r}")
                    inner = map(_second, value)
                elif node_kind == LIST or node_kind == TUPLE:
                    if type(value) is not list:
                        raise Malformed("malformed sequence node")
                    inner = iter(value)
                else:
                    raise Malformed(f"unknown state tree node kind {str(node_kind)[:40]!r}")
                if value and len(levels) >= MAX_DEPTH:
                    raise Malformed(f"state tree nested deeper than {MAX_DEPTH} levels")
                levels.append((children, kind, items, results))
                children, kind, items, results = inner, node_kind, value, []
                break
            else:
                if not levels:
                    return results[0]
                done = build(kind, items, results)
                children, kind, items, results = levels.pop()
                results.append(done)
    except Malformed as exc:
        path = levels[1:] + [(None, kind, items, results)] if levels else []
        raise Malformed(exc.problem, _chain(path)) from None


def _chain(levels: list) -> tuple:
    """The key chain of the node being read: each level's next child is the one on the path, at the
    position of the count of results so far."""
    return tuple((items[len(results)][0], False) if kind == DICT else (len(results), True)
                 for _, kind, items, results in levels)


def _integrity(where: str, exc: Malformed) -> IntegrityError:
    at = f" at {subscripts(exc.chain)}" if exc.chain else ""
    return IntegrityError(f"{where}: {exc.problem}{at}", file=where)


def _node(kind: str, items: list, results: list) -> dict:
    """A container node from its children's nodes."""
    if kind == DICT:
        return {DICT: [[item[0], result] for item, result in zip(items, results)]}
    return {kind: results}


def _encoded(kind: str, items: list, results: list) -> dict:
    """A container node from the classifier's (its [key, object] items are its own: they take the nodes)."""
    if kind == DICT:
        for item, result in zip(items, results):
            item[1] = result
        return {DICT: items}
    return {kind: results}


def _nothing(*_: Any) -> None:
    return None


# ---------------------------------------------------------------------------------------------
# Encoding: Python objects -> nodes
# ---------------------------------------------------------------------------------------------

def _key(key: Any) -> str | int:
    """A dict key other than a str: an int, or refused (subclasses as their base type, as JSON writes them)."""
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise Malformed(f"dict key {key!r} is not a str or int")
    if isinstance(key, str):
        return str.__str__(key)
    if key.bit_length() > MAX_INT_BITS:
        raise Malformed(f"an int key of {key.bit_length()} bits is too large (at most {MAX_INT_BITS}); "
                        "store it as a string")
    return int.__index__(key)


def _classifier(tensors: list) -> Callable[[Any], tuple[str, Any]]:
    """classify(obj): an object of a state_dict as (kind, value) of a node whose children are still
    objects; a tensor or array is appended to `tensors` and its value is its reference (the encoder's one call per tensor).
    Malformed for anything the reader would refuse, so that a snapshot that was written can always be
    read back. Most common kinds first (state dicts are mostly dicts, tensors and plain numbers)."""
    append = tensors.append

    def classify(obj: Any) -> tuple[str, Any]:
        if isinstance(obj, dict):
            for key in obj:
                if type(key) is not str and (type(key) is not int or key.bit_length() > MAX_INT_BITS):
                    return (DICT, [[_key(key), value] for key, value in obj.items()])   # refused, or a subclass
            return (DICT, list(map(list, obj.items())))
        if isinstance(obj, torch.Tensor):
            if is_dtensor(obj):
                if obj.dtype not in DTYPE_NAMES:
                    raise Malformed(f"dtype {obj.dtype} is not supported")
                append(obj)
                return (SHARDED, len(tensors) - 1)
            if obj.layout != torch.strided:
                raise Malformed(f"{obj.layout} tensors are not supported; convert to dense")
            if obj.dtype not in DTYPE_NAMES:
                raise Malformed(f"dtype {obj.dtype} is not supported")
            append(obj)
            return (TENSOR, len(tensors) - 1)
        if obj is None or isinstance(obj, (bool, float, str)):
            return (VALUE, obj)
        if isinstance(obj, int):
            if obj.bit_length() > MAX_INT_BITS:  # JSON could not be read back (Python's 4,300-digit limit)
                raise Malformed(f"an int of {obj.bit_length()} bits is too large (at most {MAX_INT_BITS}); "
                                "store it as a string or a tensor")
            return (VALUE, obj)
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in NUMPY_KINDS or obj.dtype.hasobject:
                raise Malformed(f"numpy dtype {obj.dtype} is not plain numbers")
            append(obj)
            return (ARRAY, len(tensors) - 1)
        if isinstance(obj, (np.integer, np.floating, np.bool_)):
            value = obj.item()
            if type(value) not in (bool, int, float):  # e.g. np.longdouble has no Python equivalent
                raise Malformed(f"numpy {obj.dtype} scalars are not supported; convert to float")
            return (VALUE, value)
        if isinstance(obj, torch.dtype):
            if obj not in DTYPE_NAMES:
                raise Malformed(f"dtype {obj} is not supported")
            return (DTYPE, DTYPE_NAMES[obj])
        if isinstance(obj, (list, tuple)):
            return (LIST if isinstance(obj, list) else TUPLE, list(obj) if type(obj) is not list else obj)
        raise Malformed(f"a {type(obj).__name__} is not supported; state_dicts may hold tensors, numpy arrays, "
                        "numbers, strings, None, and dicts/lists/tuples of them")
    return classify


_ENCODED_LEAVES: dict[str, None] = dict.fromkeys(LEAVES)   # the classifier's leaves are already nodes


def flatten(obj: Any, tensors: list, path: str = "state") -> Any:
    """Encode `obj` as a JSON node; tensors/arrays are appended to `tensors` and referenced by index.

    Refuses (TypeError naming the key, as path['key'][0]) anything the reader would refuse: the same
    checks at snapshot time as at load time."""
    try:
        return fold(obj, _ENCODED_LEAVES, _encoded, _classifier(tensors))
    except Malformed as exc:
        raise TypeError(f"cannot snapshot {path}{subscripts(exc.chain)}: {exc.problem}") from None


# ---------------------------------------------------------------------------------------------
# Reading: nodes from disk -> Python objects, checks, references
# ---------------------------------------------------------------------------------------------

def _checked(on_leaf: Callable[[str, Any], Any]) -> dict:
    """A leaves table that calls on_leaf(kind, value) once the value's form is checked."""
    def entry(kind: str) -> Callable[[Any], Any]:
        read = LEAVES[kind]

        def leaf(value: Any) -> Any:
            read(value)
            return on_leaf(kind, value)
        return leaf
    return {kind: entry(kind) for kind in LEAVES}


def _decode(kind: str, items: list, results: list) -> Any:
    if kind == DICT:
        return {item[0]: result for item, result in zip(items, results)}
    return tuple(results) if kind == TUPLE else results


def unflatten(node: Any, tensors: Sequence, where: str) -> Any:
    """Decode a JSON node, checking every field (the node comes from disk): IntegrityError naming
    `where` and the key path of what is malformed. tensors: the values the references resolve to."""
    count = len(tensors)

    def tensor(value: Any) -> Any:
        if type(value) is not int or not 0 <= value < count:
            raise Malformed(f"tensor reference {str(_index(value))[:40]!r} out of range")
        return tensors[value]

    try:
        return fold(node, {**LEAVES, TENSOR: tensor, SHARDED: tensor, ARRAY: tensor}, _decode)
    except Malformed as exc:
        raise _integrity(where, exc) from None


def validate(root: Any, kinds: Sequence[str], where: str) -> None:
    """Check a state tree read from disk: the form of every node, the depth, and that each reference
    names one of the tensors, with the reference kind its record has (kinds[i]: "T" for a whole torch
    tensor, "S" for a chunked one, "N" for a numpy array). IntegrityError naming `where`."""
    count = len(kinds)

    def reference(kind: str) -> Callable[[Any], None]:
        def check(value: Any) -> None:
            if type(value) is not int or not 0 <= value < count or kinds[value] != kind:
                raise Malformed(f"tensor reference {kind} {str(_index(value))[:40]!r} is out of range or of the "
                                "wrong kind")
        return check

    try:
        fold(root, {**LEAVES, **{kind: reference(kind) for kind in REFERENCES}}, _nothing)
    except Malformed as exc:
        raise _integrity(where, exc) from None


def references(root: Any, where: str = "the state tree") -> list[int]:
    """The tensor indices a state tree references, in order."""
    out: list[int] = []

    def reference(value: Any) -> None:
        if type(value) is not int or value < 0:
            _index(value)
        out.append(value)

    try:
        fold(root, {**LEAVES, TENSOR: reference, SHARDED: reference, ARRAY: reference}, _nothing)
    except Malformed as exc:
        raise _integrity(where, exc) from None
    return out


def shift(root: Any, base: int, where: str = "a rank's private state tree") -> Any:
    """The tree with every tensor reference moved up by base (a rank's private tensors follow the others)."""
    def leaf(kind: str, value: Any) -> dict:
        return {kind: value + base if kind in REFERENCES else value}

    try:
        return fold(root, _checked(leaf), _node)
    except Malformed as exc:
        raise _integrity(where, exc) from None


_SAME_KIND = {SHARDED: TENSOR}   # a model saved under DDP restores into FSDP2 and back


def matching_live(saved: Any, live: Any) -> list[tuple[int, Any]] | None:
    """(saved index, live tensor or array) of each tensor, in order, if a saved tree and a live object
    have the same keys, node kinds and nesting, the live object read as the encoder reads it (plain
    values may differ; a sharded tensor counts as a torch tensor); None if they do not, or either is
    malformed or the live object has no encoding. One walk of both, without encoding the live object:
    restores compare each registered object's whole state (60k nodes for a 20,000-tensor one)."""
    tensors: list = []
    classify = _classifier(tensors)
    pairs: list[tuple[int, Any]] = []
    todo = [(saved, live)]
    while todo:
        node, obj = todo.pop()
        if type(node) is not dict or len(node) != 1:
            return None
        (kind, x), = node.items()
        try:
            other, y = classify(obj)
        except Malformed:
            return None
        kind = _SAME_KIND.get(kind, kind)
        if kind != _SAME_KIND.get(other, other):
            return None
        if kind == DICT:
            if type(x) is not list or len(x) != len(y):
                return None
            for p, q in zip(x, y):
                if type(p) is not list or len(p) != 2 or p[0] != q[0] or type(p[0]) is not type(q[0]) \
                        or type(p[0]) not in (str, int):
                    return None
            todo.extend((p[1], q[1]) for p, q in zip(reversed(x), reversed(y)))
        elif kind == LIST or kind == TUPLE:
            if type(x) is not list or len(x) != len(y):
                return None
            todo.extend(zip(reversed(x), reversed(y)))
        elif kind == TENSOR or kind == ARRAY:
            if type(x) is not int or x < 0:
                return None
            pairs.append((x, tensors[y]))
    return pairs   # (a saved kind the classifier never gives, an unknown one, fails the kind comparison)


def dict_items(node: Any) -> dict:
    """A dict node's items, key -> node; {} for any other node (one level: no walk)."""
    if type(node) is dict and type(node.get(DICT)) is list:
        return {item[0]: item[1] for item in node[DICT] if type(item) is list and len(item) == 2}
    return {}


# ---------------------------------------------------------------------------------------------
# Key chains and names
# ---------------------------------------------------------------------------------------------

def tensor_chains(root: Any, where: str = "the state tree") -> dict[int, tuple]:
    """Map tensor index -> its keys from the root: (key, is_index) pairs, is_index for list positions."""
    def leaf(kind: str, value: Any) -> dict | None:
        return {value: ()} if kind in REFERENCES else None

    def build(kind: str, items: list, results: list) -> dict:
        out: dict[int, tuple] = {}
        for position, found in enumerate(results):
            if found:
                step = ((items[position][0], False),) if kind == DICT else ((position, True),)
                out.update({index: step + chain for index, chain in found.items()})
        return out

    try:
        return fold(root, _checked(leaf), build) or {}
    except Malformed as exc:
        raise _integrity(where, exc) from None


def tensor_paths(root: Any) -> dict[int, str]:
    """Map tensor index -> a readable key path, model.layers[0].weight (for messages and exports)."""
    return {index: dotted(chain) for index, chain in tensor_chains(root).items()}


def dotted(chain: tuple) -> str:
    """Keys joined with dots, list positions as [i]: two chains can give one name ('a.b' and a -> b)."""
    text = ""
    for key, is_index in chain:
        text += f"[{key}]" if is_index else f"{'.' if text else ''}{key}"
    return text or "<root>"


def subscripts(chain: tuple) -> str:
    """Keys as Python subscripts, ['a.b'] vs ['a']['b']: unambiguous, for messages."""
    return "".join(f"[{key}]" if is_index else f"[{key!r}]" for key, is_index in chain)
