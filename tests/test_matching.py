import pytest
import torch

from pading.errors import AnnotationError
from pading.model.matching import assign_query_labels, hungarian_match, matching_cost

CONFIDENT = 10.0  # |logit| giving sigmoid ~ 0 / 1


def _grid_masks():
    """4x4 grid: gt 0 = columns 0-1, gt 1 = columns 2-3.

    query 0 covers columns 0-2 (12 px), query 1 column 0 (4 px), query 2 nothing.
    Dice costs (1 - (2|p∩t|+1)/(|p|+|t|+1)):
        q0: g0 1-17/21=0.190, g1 1-9/21=0.571
        q1: g0 1-9/13=0.308,  g1 1-1/13=0.923
        q2: g0 1-1/9=0.889,   g1 1-1/9=0.889
    Greedy takes (q0, g0) first and ends at 0.190 + 0.889 = 1.079; the optimum is
    (q0, g1) + (q1, g0) = 0.879.
    """
    gt = torch.zeros(2, 4, 4)
    gt[0, :, :2] = 1
    gt[1, :, 2:] = 1
    pred = torch.full((3, 4, 4), -CONFIDENT)
    pred[0, :, :3] = CONFIDENT
    pred[1, :, :1] = CONFIDENT
    return pred, gt


def test_dice_cost_matches_hand_computation():
    pred, gt = _grid_masks()
    class_logits = torch.zeros(3, 3)
    cost = matching_cost(
        class_logits, pred, torch.tensor([0, 1]), gt, class_weight=0.0, mask_weight=0.0, dice_weight=1.0
    )
    expected = torch.tensor([[1 - 17 / 21, 1 - 9 / 21], [1 - 9 / 13, 1 - 1 / 13], [1 - 1 / 9, 1 - 1 / 9]])
    torch.testing.assert_close(cost, expected, atol=1e-3, rtol=0)


def test_optimal_assignment_differs_from_greedy():
    pred, gt = _grid_masks()
    class_logits = torch.zeros(3, 3)
    query_idx, gt_idx = hungarian_match(
        class_logits, pred, torch.tensor([0, 1]), gt, class_weight=0.0, mask_weight=0.0, dice_weight=1.0
    )
    assert dict(zip(query_idx.tolist(), gt_idx.tolist())) == {0: 1, 1: 0}
    labels = assign_query_labels(
        class_logits,
        pred,
        torch.tensor([0, 1]),
        gt,
        class_weight=0.0,
        mask_weight=0.0,
        dice_weight=1.0,
        no_object_index=2,
    )
    assert labels.tolist() == [1, 0, 2]


def test_bce_cost_and_low_resolution_predictions_are_upsampled():
    pred, gt = _grid_masks()
    low_res = torch.nn.functional.avg_pool2d(pred[:, None], 2)[:, 0]  # (3, 2, 2)
    cost = matching_cost(
        torch.zeros(3, 3), low_res, torch.tensor([0, 1]), gt, class_weight=0.0, mask_weight=1.0, dice_weight=0.0
    )
    assert cost.shape == (3, 2)
    # query 1 (column 0 only, blurred at 2x2) fits gt 0 far better than gt 1
    assert cost[1, 0] < cost[1, 1]
    # a perfect confident mask has a near-zero BCE cost
    exact = matching_cost(
        torch.zeros(1, 2), gt[:1] * 2 * CONFIDENT - CONFIDENT, torch.tensor([0]), gt[:1],
        class_weight=0.0, mask_weight=1.0, dice_weight=0.0,
    )
    assert float(exact) < 1e-3


def test_sampled_points_are_deterministic_and_agree_with_dense():
    pred, gt = _grid_masks()
    kwargs = dict(class_weight=0.0, mask_weight=1.0, dice_weight=1.0, num_points=2048)

    def sampled_cost(seed):
        generator = torch.Generator().manual_seed(seed)
        return matching_cost(torch.zeros(3, 3), pred, torch.tensor([0, 1]), gt, generator=generator, **kwargs)

    assert torch.equal(sampled_cost(3), sampled_cost(3))
    assert not torch.equal(sampled_cost(3), sampled_cost(4))
    # bilinear point sampling blurs a 4x4 grid, but the dice optimum is robust to it
    dice_only = dict(class_weight=0.0, mask_weight=0.0, dice_weight=1.0)
    sampled = hungarian_match(
        torch.zeros(3, 3), pred, torch.tensor([0, 1]), gt,
        num_points=2048, generator=torch.Generator().manual_seed(3), **dice_only,
    )
    dense = hungarian_match(torch.zeros(3, 3), pred, torch.tensor([0, 1]), gt, **dice_only)
    assert torch.equal(sampled[0], dense[0]) and torch.equal(sampled[1], dense[1])
    assert dict(zip(sampled[0].tolist(), sampled[1].tolist())) == {0: 1, 1: 0}


def test_no_ground_truth_gives_all_no_object():
    pred, _ = _grid_masks()
    query_idx, gt_idx = hungarian_match(
        torch.zeros(3, 4), pred, torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, 4),
        class_weight=2.0, mask_weight=5.0, dice_weight=5.0,
    )
    assert query_idx.numel() == 0 and gt_idx.numel() == 0
    labels = assign_query_labels(
        torch.zeros(3, 4), pred, torch.zeros(0, dtype=torch.long), torch.zeros(0, 4, 4),
        class_weight=2.0, mask_weight=5.0, dice_weight=5.0, no_object_index=3,
    )
    assert labels.tolist() == [3, 3, 3]


def test_class_cost_dominates_when_mask_weights_are_zero():
    pred, gt = _grid_masks()
    # masks say q0->g0, but class probabilities say q2 is class 1 (gt 0) and q1 is class 0 (gt 1)
    class_logits = torch.full((3, 3), -5.0)
    class_logits[2, 1] = 5.0
    class_logits[1, 0] = 5.0
    class_logits[0, 2] = 5.0  # q0 looks like no object
    query_idx, gt_idx = hungarian_match(
        class_logits, pred, torch.tensor([1, 0]), gt, class_weight=1.0, mask_weight=0.0, dice_weight=0.0
    )
    assert dict(zip(query_idx.tolist(), gt_idx.tolist())) == {1: 1, 2: 0}
    cost = matching_cost(
        class_logits, pred, torch.tensor([1, 0]), gt, class_weight=1.0, mask_weight=0.0, dice_weight=0.0
    )
    torch.testing.assert_close(cost, -class_logits.softmax(-1)[:, [1, 0]])


def test_more_segments_than_queries_and_bad_labels():
    pred, gt = _grid_masks()
    gt4 = torch.cat([gt, gt, gt, gt])  # 8 segments, 3 queries
    query_idx, gt_idx = hungarian_match(
        torch.zeros(3, 3), pred, torch.tensor([0, 1] * 4), gt4, class_weight=1.0, mask_weight=1.0, dice_weight=1.0
    )
    assert len(query_idx) == 3 and len(set(gt_idx.tolist())) == 3
    with pytest.raises(AnnotationError, match="labels must lie"):
        hungarian_match(
            torch.zeros(3, 3), pred, torch.tensor([0, 2]), gt, class_weight=1.0, mask_weight=1.0, dice_weight=1.0
        )
