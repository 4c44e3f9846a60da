"""``publish.stored_versions`` blocks: what a block's projection stored reaches the
blocks around it only when the block ends normally (an exception rolls it back)."""

from __future__ import annotations

import pytest

from fhir_gateway import publish
from fhir_gateway.models import FhirResource


def _stored(logical_id: str) -> FhirResource:
    row = FhirResource(resource_type="Task", logical_id=logical_id, version_id=1)
    publish._collect([row])  # as the projection reports a stored version
    return row


def test_a_block_collects_what_is_stored_inside_it_and_its_inner_blocks() -> None:
    with publish.stored_versions() as outer:
        first = _stored("a")
        with publish.stored_versions() as inner:
            second = _stored("b")
        third = _stored("c")
    assert inner == [second]
    assert outer == [first, second, third]
    assert _stored("outside") is not None  # no block: nothing collects it, nothing fails


def test_an_inner_block_that_raises_passes_nothing_out() -> None:
    with publish.stored_versions() as outer:
        _stored("kept")
        with pytest.raises(RuntimeError), publish.stored_versions() as inner:
            _stored("rolled-back")
            raise RuntimeError("the write failed")
        _stored("after")
    assert [r.logical_id for r in inner] == ["rolled-back"]
    assert [r.logical_id for r in outer] == ["kept", "after"]
