"""The lockstep bookkeeping every engine's stream group builds on (dragon_core/lockstep.py):
pure, no engine."""

from __future__ import annotations

import pytest

from dragon_core.errors import ProtocolError
from dragon_core.lockstep import Lockstep


class CloudLike(Lockstep):
    rollback_error = closed_error = ProtocolError


def test_lengths_count_generated_tokens_of_every_stream():
    books = Lockstep([[1, 2, 3], [4]])
    books._extend([7, 8])
    assert (books.num_streams, books.length, books._generated) == (2, 2, [7, 8])


def test_truncate_says_whether_anything_was_dropped():
    books = Lockstep([[1]])
    books._extend([5, 6, 7])
    assert books._truncate(3) is False and books.length == 3
    assert books._truncate(1) is True and books._generated == [5]
    assert books._truncate(0) is True and books.length == 0


@pytest.mark.parametrize("cls, error", [(Lockstep, ValueError), (CloudLike, ProtocolError)])
def test_each_side_refuses_with_its_own_error(cls, error):
    books = cls([[1]])
    books._extend([5])
    for bad in (-1, 2):
        with pytest.raises(error, match="cannot roll back"):
            books._truncate(bad)
    assert books._generated == [5]
    assert books._mark_closed() is True and books._mark_closed() is False
    with pytest.raises(RuntimeError if cls is Lockstep else ProtocolError, match="closed"):
        books._check_open()
