"""The training state as a dict of statefuls: one save path, one restore path, the file as it was."""

import random

import pytest
import torch

from vlm.checkpoint.train_state import (
    TRAINING_STATE,
    DataPosition,
    RNGStates,
    StateFunctions,
    collect_training_state,
    load_training_state,
    restore_training_state,
    save_training_state,
)
from vlm.core.errors import CheckpointError


def statefuls(box):
    weights = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(weights.parameters(), lr=0.1)
    weights(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    return {"optimizer": optimizer, "rng_per_rank": RNGStates(0), "position": DataPosition(step=3, epoch=1),
            "objective": StateFunctions(lambda: dict(box), lambda state: box.update(state))}


def test_every_stateful_round_trips_and_the_file_keeps_its_layout(tmp_path):
    box = {"head.weight": torch.arange(4.0)}
    saved = statefuls(box)
    torch.manual_seed(7)
    random.seed(7)
    save_training_state(tmp_path, collect_training_state(saved))
    expected = (torch.rand(3), random.random())
    raw = load_training_state(tmp_path)
    assert set(raw) == {"optimizer", "rng", "rng_per_rank", "position", "objective"}  # the earlier layout
    assert raw["position"] == {"step": 3, "epoch": 1, "batch": 0, "samples": 0}

    fresh_box = {}
    fresh = statefuls(fresh_box)
    fresh["position"].load_state_dict({"step": 0})
    restore_training_state(tmp_path, fresh)
    assert (torch.rand(3).tolist(), random.random()) == (expected[0].tolist(), expected[1])  # RNG restored
    assert fresh["position"].position["step"] == 3 and torch.equal(fresh_box["head.weight"], torch.arange(4.0))
    assert fresh["optimizer"].state_dict()["state"][0]["step"] == saved["optimizer"].state_dict()["state"][0]["step"]


def test_a_checkpoint_with_only_rank_zeros_rng_restores_it(tmp_path):
    torch.manual_seed(3)
    state = collect_training_state({"rng_per_rank": RNGStates(0)})
    torch.save({"rng": state["rng_per_rank"][0]}, tmp_path / TRAINING_STATE)  # written before rng_per_rank
    expected = torch.rand(2)
    torch.manual_seed(99)
    restore_training_state(tmp_path, {"rng_per_rank": RNGStates(rank=1)})
    assert torch.equal(torch.rand(2), expected)


def test_a_missing_part_is_named(tmp_path):
    save_training_state(tmp_path, {"position": {"step": 1}})
    with pytest.raises(CheckpointError, match=r"training_state.pt: no scheduler in the training state"):
        restore_training_state(tmp_path, {"position": DataPosition(), "scheduler": DataPosition()})
