"""Fixtures of the peer comparisons (``tox -e peers``; never collected by the default ``pytest``, whose
testpaths is ``tests``)."""

from __future__ import annotations

import pytest
from clip_inputs import (
    BLOCKS,
    CANCEL_KEY,
    CANCEL_POSITIONS,
    ONE_LAYER_KEYS,
    SCALES,
    SVD_KEYS,
    TIE_KEY,
    TIE_POSITIONS,
    StateDict,
    light_keys,
    make_models,
    replace_entries,
    subset,
)

Models = tuple[StateDict, list[StateDict]]


@pytest.fixture(scope="session")
def clip() -> Models:
    """θ0 and K = 5 experts on ViT-B/32 shapes (2 blocks), task-vector scales ``SCALES``."""
    return make_models(BLOCKS, SCALES, seed=0)


@pytest.fixture(scope="session")
def clip_svd(clip) -> Models:
    """:func:`clip` restricted to ``SVD_KEYS``."""
    return subset(clip, SVD_KEYS)


@pytest.fixture(scope="session")
def clip_light(clip) -> Models:
    """:func:`clip` restricted to :func:`clip_inputs.light_keys`, keys inserted in sorted order (the order in which
    mergekit visits them, and so draws its random numbers)."""
    return subset(clip, sorted(light_keys(clip[0])))


@pytest.fixture(scope="session")
def clip_one_layer(clip) -> Models:
    """:func:`clip` restricted to ``ONE_LAYER_KEYS``."""
    return subset(clip, ONE_LAYER_KEYS)


@pytest.fixture(scope="session")
def clip_cancel(clip) -> Models:
    """:func:`clip` with the planted sign cancellations ``CANCEL_*``."""
    return replace_entries(clip, CANCEL_KEY, CANCEL_POSITIONS, 0.5, [0.25, -0.25])


@pytest.fixture(scope="session")
def clip_tall_ties(clip) -> Models:
    """:func:`clip` with the planted TALL-mask ties ``TIE_*``."""
    return replace_entries(clip, TIE_KEY, TIE_POSITIONS, 1.0, [0.25, 0.5])
