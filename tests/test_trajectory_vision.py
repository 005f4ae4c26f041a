"""Trajectory row selection and stacking for every layout of vision inputs: Qwen-VL's patches with a grid, and
the per-row tensors of Idefics3 / SmolVLM (images x tiles) and Gemma 3, which have no grid."""

from __future__ import annotations

import torch

from medrl.rl.types import Trajectory


def _traj(rows: int, tiles: int, width: int = 6) -> Trajectory:
    """Idefics3-shaped inputs: pixel_values [N, tiles, 3, 4, 4], pixel_attention_mask [N, tiles, 4, 4]."""
    pixels = torch.arange(rows, dtype=torch.float32)[:, None, None, None, None] + 1 + torch.zeros(rows, tiles, 3, 4, 4)
    return Trajectory(
        inputs={
            "input_ids": torch.arange(rows * width).reshape(rows, width),
            "attention_mask": torch.ones(rows, width, dtype=torch.long),
            "pixel_values": pixels,
            "pixel_attention_mask": torch.ones(rows, tiles, 4, 4, dtype=torch.bool),
        },
        completion_mask=torch.ones(rows, 2, dtype=torch.bool),
        group_size=2,
        texts=[f"t{i}" for i in range(rows)],
    )


def test_rows_of_per_row_vision_inputs_are_picked_by_row() -> None:
    # Without image_grid_thw this used to fail with KeyError: 'image_grid_thw' (GRPO on an Idefics3 model).
    picked = _traj(4, tiles=1).select_rows([3, 0])
    assert picked.inputs["pixel_values"][:, 0, 0, 0, 0].tolist() == [4.0, 1.0]  # row r's image holds r + 1
    assert picked.inputs["pixel_attention_mask"].shape == (2, 1, 4, 4) and picked.texts == ["t3", "t0"]


def test_parts_with_different_tile_counts_stack_with_zero_padding() -> None:
    joined = Trajectory.cat([_traj(2, tiles=1), _traj(2, tiles=3)], pad_token_id=0)
    assert joined.inputs["pixel_values"].shape == (4, 3, 3, 4, 4)
    assert joined.inputs["pixel_values"][0, 1:].abs().sum() == 0  # the padded tiles are zero images
    assert not joined.inputs["pixel_attention_mask"][0, 1:].any() and joined.inputs["pixel_attention_mask"][2].all()


def test_qwen_patches_are_still_sliced_through_their_grid() -> None:
    grid = torch.tensor([[1, 2, 2], [1, 2, 4]])  # 4 and 8 patches
    traj = Trajectory(
        inputs={"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5),
                "pixel_values": torch.arange(12, dtype=torch.float32)[:, None], "image_grid_thw": grid},
        completion_mask=torch.ones(2, 1, dtype=torch.bool), group_size=1, texts=["a", "b"],
    )  # fmt: skip
    second = traj.select_rows([1])
    assert second.inputs["pixel_values"][:, 0].tolist() == list(range(4, 12))
