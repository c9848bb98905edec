"""Fuzzing what strangers hand moec: a valid manifest mutated at random, and random feeds to a
runner. Each must give a `MoecError` or a correct result, never another exception or a hang."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import moec
from moec.errors import MoecError
from moec.runtime.inputs import make_inputs
from moec.runtime.manifest import Manifest
from moec.runtime.runner import check_feeds

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=12,
)
FUZZ = settings(
    max_examples=150, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return moec.compile("zoo:mixtral-lm", output=tmp_path_factory.mktemp("fuzz") / "art").path


@pytest.fixture(scope="module")
def runner(artifact):
    with moec.load(artifact) as active:
        yield active


def mutate(document, data: st.DataObject):
    """One random change somewhere in ``document``: a value replaced, a key dropped or added."""
    document = copy.deepcopy(document)
    node = document
    while True:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if not keys:
            break
        key = data.draw(st.sampled_from(keys))
        child = node[key]
        if isinstance(child, (dict, list)) and child and data.draw(st.booleans()):
            node = child
            continue
        action = data.draw(st.sampled_from(["replace", "drop", "add"]))
        if action == "replace":
            node[key] = data.draw(JSON)
        elif action == "drop":
            del node[key]
        elif isinstance(node, dict):
            node[data.draw(st.text(max_size=8))] = data.draw(JSON)
        else:
            node.append(data.draw(JSON))
        break
    return document


@FUZZ
@given(data=st.data())
def test_a_mutated_manifest_is_read_or_refused(artifact, data):
    document = json.loads((artifact / "manifest.json").read_text())
    for _ in range(data.draw(st.integers(1, 3))):
        document = mutate(document, data)
    try:
        manifest = Manifest.from_dict(json.loads(json.dumps(document)))
    except MoecError:
        return
    try:
        for feeds in make_inputs(manifest.inputs, ((1, 3), (2, 5)), seed=0):
            check_feeds(manifest.inputs, feeds)  # what it accepts, it can also generate
    except MoecError:
        pass


DTYPES = [np.float32, np.float64, np.float16, np.int64, np.int32, np.bool_, ">i8", ">f4", np.uint8]
ARRAYS = hnp.arrays(
    st.sampled_from(DTYPES),
    hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    elements=None,
)
IDS = hnp.arrays(
    np.int64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=8), elements=st.integers(-5, 300)
)
VALUES = (
    ARRAYS
    | IDS
    | IDS.map(torch.from_numpy)
    | st.integers()
    | st.lists(st.integers(0, 255), max_size=5)
    | st.none()
    | st.text(max_size=4)
)


@FUZZ
@given(
    feeds=st.dictionaries(
        st.sampled_from(["input_ids", "ids", "x", ""]), VALUES, min_size=0, max_size=2
    )
)
def test_random_feeds_give_outputs_or_an_input_error(runner, feeds):
    try:
        outputs = runner.infer(feeds)
    except MoecError:
        return
    ids = feeds["input_ids"]
    assert tuple(outputs["logits"].shape) == (*tuple(ids.shape), 256)
    assert all(np.isfinite(np.asarray(v, dtype=np.float64)).all() for v in outputs.values())
