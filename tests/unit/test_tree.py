"""The state-tree module: the codec round trip of every node kind, the walk's depth limit and its
reports of malformed nodes (with their key path), key chains, renumbering and structure comparison."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyckpt import IntegrityError
from pyckpt.tree import (MAX_DEPTH, dotted, flatten, matching_live, references, shift, subscripts,
                         tensor_chains, tensor_paths, unflatten, validate)


def round_trip(obj):
    """flatten -> JSON text -> unflatten, as a snapshot stores and reads a tree."""
    tensors: list = []
    node = json.loads(json.dumps(flatten(obj, tensors, "state")))
    return node, tensors, unflatten(node, tensors, "manifest.json")


def test_every_node_kind_round_trips_with_its_type():
    t, a = torch.arange(6, dtype=torch.float32).reshape(2, 3), np.arange(4, dtype=np.int64)
    obj = {"t": t, "a": a, "dtype": torch.bfloat16, "none": None, "flag": True, "n": 3, "x": 0.5, "s": "run",
           "list": [1, [2, (3, "4")]], "tuple": (t, ()), 7: {}, "np": np.float32(1.5), "npint": np.int64(-2)}
    node, tensors, back = round_trip(obj)
    assert set(node) == {"D"} and [item[0] for item in node["D"]] == list(obj)   # order kept, int key kept
    assert tensors[0] is t and tensors[1] is a and tensors[2] is t
    assert back["t"] is t and back["a"] is a and back["tuple"][0] is t
    assert back["dtype"] is torch.bfloat16 and type(back["tuple"]) is tuple and type(back["list"][1][1]) is tuple
    assert back["np"] == 1.5 and type(back["np"]) is float and back["npint"] == -2 and type(back["npint"]) is int
    assert {k: v for k, v in back.items() if k not in ("t", "a", "tuple", "np", "npint")} == \
        {k: v for k, v in obj.items() if k not in ("t", "a", "tuple", "np", "npint")}


def test_the_encoding_is_the_documented_one():
    """docs/FORMAT.md: one key per node, the kinds spelled D, L, U, T, N, V, dtype."""
    tensors: list = []
    node = flatten({"w": torch.ones(1), "r": np.zeros(1), "l": [None], "u": (1,), "d": torch.float32}, tensors)
    assert node == {"D": [["w", {"T": 0}], ["r", {"N": 1}], ["l", {"L": [{"V": None}]}], ["u", {"U": [{"V": 1}]}],
                          ["d", {"dtype": "float32"}]]}


plain = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
keys = st.text(max_size=4) | st.integers(-5, 5)
states = st.recursive(plain, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                      | st.dictionaries(keys, inner, max_size=4), max_leaves=30)


@settings(max_examples=100, deadline=None)
@given(states)
def test_plain_states_round_trip(obj):
    assert round_trip(obj)[2] == obj


def nested(depth: int):
    node = {"leaf": torch.ones(1)}
    for _ in range(depth - 1):
        node = {"x": node}
    return node


def test_depth_limit_is_the_same_when_writing_and_reading():
    round_trip(nested(MAX_DEPTH))                          # a tensor at depth 64 is allowed
    with pytest.raises(TypeError, match=r"cannot snapshot state\['x'\]\['x'\].*nested deeper than 64"):
        flatten(nested(MAX_DEPTH + 1), [])
    node = {"V": 1}
    for _ in range(MAX_DEPTH + 1):
        node = {"L": [node]}
    with pytest.raises(IntegrityError, match="nested deeper than 64 levels at"):
        unflatten(node, [], "manifest.json")


def test_a_hostile_depth_costs_no_recursion():
    """A tree 100,000 levels deep (Python recurses 1,000) is refused at level 65, without a RecursionError."""
    node: dict = {"V": 1}
    for _ in range(100_000):
        node = {"L": [node]}
    for walk in (lambda: unflatten(node, [], "m"), lambda: validate(node, [], "m"),
                 lambda: references(node, "m"), lambda: tensor_chains(node, "m")):
        with pytest.raises(IntegrityError, match="nested deeper"):
            walk()


@pytest.mark.parametrize("bad,problem", [
    ([1], "malformed state tree node"),
    ({"V": 1, "T": 0}, "malformed state tree node"),
    ({"D": {"a": 1}}, "malformed dict node"),
    ({"D": [["a"]]}, "malformed dict item"),
    ({"D": [[True, {"V": 1}]]}, "malformed dict item"),
    ({"L": "abc"}, "malformed sequence node"),
    ({"Q": 1}, "unknown state tree node kind 'Q'"),
    ({"V": [1]}, "is not a plain value"),
    ({"dtype": "complex32"}, "unknown dtype 'complex32'"),
    ({"T": -1}, "is not an index"),
    ({"T": True}, "is not an index"),
    ({"T": 5}, "out of range"),
])
def test_malformed_nodes_are_named_with_their_key_path(bad, problem):
    tree = {"D": [["model", {"L": [{"V": 0}, bad]}]]}
    for walk in (lambda: unflatten(tree, [torch.ones(1)], "m.json"),
                 lambda: validate(tree, ["T"], "m.json")):
        with pytest.raises(IntegrityError) as caught:
            walk()
        assert caught.value.file == "m.json" and problem in str(caught.value)
        assert str(caught.value).endswith("at ['model'][1]"), str(caught.value)


def test_validate_checks_references_against_the_tensors_and_their_kind():
    validate({"L": [{"T": 0}, {"N": 1}, {"S": 2}]}, ["T", "N", "S"], "m")
    for tree, kinds in (({"T": 2}, ["T", "T"]), ({"T": 1}, ["T", "N"]), ({"N": 0}, ["T", "T"]),
                        ({"S": 0}, ["T"]), ({"T": 0}, ["S"])):
        with pytest.raises(IntegrityError, match="out of range or of the wrong kind"):
            validate(tree, kinds, "m")


def test_unsupported_objects_are_named_by_key():
    for obj, problem in (({"a": [1, object()]}, r"state\['a'\]\[1\]: a object is not supported"),
                         ({"a": {(1, 2): 1}}, r"state\['a'\]: dict key \(1, 2\) is not a str or int"),
                         ({"a": 10 ** 5000}, r"state\['a'\]: an int of \d+ bits is too large"),
                         ({"a": torch.ones(2).to_sparse()}, "sparse_coo tensors are not supported"),
                         ({"a": np.array(["x"])}, "is not plain numbers")):
        with pytest.raises(TypeError, match=problem):
            flatten(obj, [], "state")


def test_key_chains_and_names():
    tree = flatten({"model": {"layers": [{"w": torch.ones(1)}, torch.ones(1)]}, "a.b": torch.ones(1), 3: np.ones(1)},
                   [])
    chains = tensor_chains(tree)
    assert chains == {0: (("model", False), ("layers", False), (0, True), ("w", False)),
                      1: (("model", False), ("layers", False), (1, True)), 2: (("a.b", False),), 3: ((3, False),)}
    assert tensor_paths(tree) == {0: "model.layers[0].w", 1: "model.layers[1]", 2: "a.b", 3: "3"}
    assert subscripts(chains[2]) == "['a.b']" and subscripts(chains[0]) == "['model']['layers'][0]['w']"
    assert tensor_paths({"T": 0}) == {0: "<root>"} and dotted(()) == "<root>"
    assert references(tree) == [0, 1, 2, 3]


def test_shift_renumbers_every_reference_and_nothing_else():
    tree = flatten({"rng": (np.ones(2), torch.ones(1)), "n": 4, "d": torch.int8, "e": [[]]}, [])
    moved = shift(tree, 10)
    assert moved == {"D": [["rng", {"U": [{"N": 10}, {"T": 11}]}], ["n", {"V": 4}], ["d", {"dtype": "int8"}],
                           ["e", {"L": [{"L": []}]}]]}
    assert references(tree) == [0, 1]     # the input is left as it was


def test_structure_comparison_pairs_saved_references_with_live_tensors_in_order():
    saved = flatten({"w": torch.ones(2), "opt": {"lr": 0.1, "ids": [0, 1]}, "b": torch.ones(3)}, [])
    w, b = torch.zeros(2), torch.zeros(3)
    pairs = matching_live(saved, {"w": w, "opt": {"lr": 0.5, "ids": [7, 8]}, "b": b})   # plain values may differ
    assert [index for index, _ in pairs] == [0, 1] and pairs[0][1] is w and pairs[1][1] is b
    for other in ({"w": torch.ones(2), "b": torch.ones(3), "opt": {"lr": 0.1, "ids": [0, 1]}},   # key order
                  {"w": torch.ones(2), "opt": {"lr": 0.1, "ids": [0]}, "b": torch.ones(3)},      # length
                  {"w": torch.ones(2), "opt": {"lr": 0.1, "ids": (0, 1)}, "b": torch.ones(3)},   # list vs tuple
                  {"w": np.ones(2), "opt": {"lr": 0.1, "ids": [0, 1]}, "b": torch.ones(3)},      # numpy vs torch
                  {"w": 1.0, "opt": {"lr": 0.1, "ids": [0, 1]}, "b": torch.ones(3)},             # value vs tensor
                  {"w": torch.ones(2), "opt": {"lr": object(), "ids": [0, 1]}, "b": torch.ones(3)}):  # no encoding
        assert matching_live(saved, other) is None
    assert matching_live({"D": "broken"}, {"w": w}) is None
    assert matching_live({"L": [{"S": 2}, {"V": 1}]}, [w, 5]) == [(2, w)]                  # FSDP2 <-> DDP
    assert matching_live({"U": [{"N": 3}]}, (np.ones(1),))[0][0] == 3                        # numpy arrays pair too
    assert matching_live({"D": [[1, {"T": 0}]]}, {"1": w}) is None                           # 1 vs "1"
    assert matching_live({"L": [{"T": 0}, {"X": 1}]}, [w, 1]) is None                       # unknown kind
