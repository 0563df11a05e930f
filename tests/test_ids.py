"""Response and item ids: OpenAI's shape, unguessable, and growing with time (store locality)."""

from __future__ import annotations

import os
import re
import time
import warnings

from venna.server.ids import new_id

_SHAPE = re.compile(r"resp_[0-9a-f]{48}")


def test_ids_have_the_shape_and_grow_with_time() -> None:
    first = new_id("resp")
    time.sleep(0.002)
    later = [new_id("resp") for _ in range(1000)]
    assert all(_SHAPE.fullmatch(each) for each in [first, *later])
    # The first 12 hex digits are the creation time in milliseconds.
    assert abs(int(first[5:17], 16) - time.time() * 1000) < 5_000
    assert all(first[5:17] < each[5:17] for each in later)
    # The rest is random: no two alike, however close in time.
    assert len({each[17:] for each in [first, *later]}) == 1001


def test_a_forked_child_draws_other_random_bits_than_its_parent() -> None:
    new_id("resp")  # the parent has a pool of random bytes now
    reader, writer = os.pipe()
    with warnings.catch_warnings():  # newer Pythons warn about forking a threaded process
        warnings.simplefilter("ignore", DeprecationWarning)
        child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(writer, new_id("resp").encode())
        os._exit(0)
    os.waitpid(child, 0)
    from_child = os.read(reader, 100).decode()
    os.close(reader)
    os.close(writer)
    assert from_child[17:] != new_id("resp")[17:]
