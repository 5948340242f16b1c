"""Length-grouped sampling: deterministic from seed and epoch, one modality per megabatch,
megabatches sorted by length, every index once."""

from __future__ import annotations

import random

from vlm.data.samplers import EpochShuffleSampler, LengthGroupedSampler


def _sampler(seed=3, batch_size=4, world_size=2):
    rng = random.Random(0)
    lengths = [rng.randint(5, 200) for _ in range(61)]
    has_image = [rng.random() < 0.6 for _ in range(61)]
    return LengthGroupedSampler(lengths, has_image, batch_size, seed, world_size), lengths, has_image


def test_length_grouped_order_is_a_function_of_seed_and_epoch():
    a, _, _ = _sampler()
    b, _, _ = _sampler()
    for epoch in (0, 1, 5):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert list(a) == list(b)
    a.set_epoch(0)
    b.set_epoch(1)
    assert list(a) != list(b)
    c, _, _ = _sampler(seed=4)
    assert list(c) != list(a)


def test_length_grouped_megabatches_hold_one_modality_sorted_by_length():
    sampler, lengths, has_image = _sampler()
    order = list(sampler)
    assert sorted(order) == list(range(len(lengths)))
    full = [order[i:i + 8] for i in range(0, len(order), 8)]
    n_full = sum(has_image) // 8 + (len(has_image) - sum(has_image)) // 8
    for mega in full[:n_full]:
        assert len({has_image[i] for i in mega}) == 1
        assert [lengths[i] for i in mega] == sorted((lengths[i] for i in mega), reverse=True)
    # grouping pays: neighbours in a batch are closer in length than in a shuffle
    def spread(o):
        return sum(max(lengths[i] for i in o[k:k + 4]) - min(lengths[i] for i in o[k:k + 4])
                   for k in range(0, len(o), 4))
    assert spread(order) < spread(list(EpochShuffleSampler(len(lengths), 3)))
