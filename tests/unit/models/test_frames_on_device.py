"""``FramesOnDevice``: a host batch goes to the device once, however many stages read it."""

from __future__ import annotations

import numpy as np
import torch

from worker.models.frames_on_device import FramesOnDevice


def test_the_same_batch_is_uploaded_once_and_a_new_batch_again():
    cache = FramesOnDevice(torch.device("cpu"), keep=2)
    a = np.arange(2 * 4 * 5 * 3, dtype=np.uint8).reshape(2, 4, 5, 3)
    first = cache.get(a)
    assert cache.get(a) is first and cache.uploads == 1
    np.testing.assert_array_equal(first.numpy(), a)
    b = a.copy()  # equal values, another array: its own upload
    assert cache.get(b) is not first and cache.uploads == 2


def test_a_view_of_the_batch_is_not_taken_for_the_batch():
    cache = FramesOnDevice(torch.device("cpu"))
    a = np.zeros((4, 2, 2, 3), np.uint8)
    cache.get(a)
    part = cache.get(a[:2])
    assert part.shape[0] == 2 and cache.uploads == 2


def test_only_the_last_batches_are_kept():
    cache = FramesOnDevice(torch.device("cpu"), keep=2)
    batches = [np.full((1, 2, 2, 3), i, np.uint8) for i in range(3)]
    for batch in batches:
        cache.get(batch)
    cache.get(batches[2])
    cache.get(batches[1])
    assert cache.uploads == 3
    cache.get(batches[0])  # evicted by the third batch: uploaded again
    assert cache.uploads == 4
