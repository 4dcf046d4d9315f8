"""Feature losses: hand-worked values per loss, and contract tests over every registered loss.

The contract tests iterate over ``LOSSES``, so a newly registered loss is checked without
new test code. Hand-worked values use plain Python arithmetic on tiny maps (B=1, C=2,
H=W=2 with the bottom-right cell invalid), never the torch formula under test.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest
import torch
import yaml

import vfmkd.distillation.losses  # noqa: F401  (registers the losses)
from vfmkd.config import validate_config
from vfmkd.distillation.losses import foreground_background_masks
from vfmkd.registry import LOSSES

EXPECTED_NAMES = {"mse", "smooth_l1", "cosine", "cos_l1", "kl", "pkd", "cwd", "mgd", "fgd", "bce"}
# Losses whose value is not 0 when student == teacher (mgd regenerates from a masked map).
NONZERO_AT_EQUALITY = {"mgd"}
# Losses that draw random numbers: seed before every call.
RANDOM = {"mgd"}

# Tiny hand-worked example: STUDENT[c][y][x], TEACHER[c][y][x]; cell (1, 1) is invalid and
# holds values that would change every result if it leaked in.
STUDENT = [[[1.0, 2.0], [0.5, 9.0]], [[-1.0, 0.0], [3.0, -7.0]]]
TEACHER = [[[0.0, 2.5], [1.5, -4.0]], [[1.0, -0.5], [2.0, 5.0]]]
VALID_CELLS = [(0, 0), (0, 1), (1, 0)]
CHANNELS = (0, 1)


def tiny_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    valid = torch.tensor([[[[True, True], [True, False]]]])
    return torch.tensor([STUDENT]), torch.tensor([TEACHER]), valid


def softmax(values: list[float]) -> list[float]:
    exponentials = [math.exp(value) for value in values]
    return [value / sum(exponentials) for value in exponentials]


def smooth_l1(difference: float, beta: float) -> float:
    return 0.5 * difference**2 / beta if abs(difference) < beta else abs(difference) - 0.5 * beta


# The feature losses' contract; ``mask_kd`` (prompt in the loop) is tested in test_mask_kd.py.
FEATURE_LOSSES = [name for name in LOSSES.names() if not getattr(LOSSES.get(name), "prompt_in_the_loop", False)]


def build(name: str, channels: int = 2, **params: Any) -> torch.nn.Module:
    return LOSSES.build(name, student_channels=channels, teacher_channels=channels, **params)


# ---------------------------------------------------------------------------------------
# Hand-worked values
# ---------------------------------------------------------------------------------------


def test_mse_by_hand() -> None:
    total = sum((STUDENT[c][y][x] - TEACHER[c][y][x]) ** 2 for c in CHANNELS for y, x in VALID_CELLS)
    expected = total / (len(VALID_CELLS) * len(CHANNELS))
    assert build("mse")(*tiny_inputs()).item() == pytest.approx(expected, rel=1e-6)


def test_smooth_l1_by_hand() -> None:
    beta = 0.8
    total = sum(smooth_l1(STUDENT[c][y][x] - TEACHER[c][y][x], beta) for c in CHANNELS for y, x in VALID_CELLS)
    expected = total / (len(VALID_CELLS) * len(CHANNELS))
    assert build("smooth_l1", beta=beta)(*tiny_inputs()).item() == pytest.approx(expected, rel=1e-6)


def hand_cosine_distance() -> float:
    distances = []
    for y, x in VALID_CELLS:
        student = [STUDENT[c][y][x] for c in CHANNELS]
        teacher = [TEACHER[c][y][x] for c in CHANNELS]
        dot = sum(a * b for a, b in zip(student, teacher))
        distances.append(1.0 - dot / (math.hypot(*student) * math.hypot(*teacher)))
    return sum(distances) / len(distances)


def test_cosine_by_hand() -> None:
    assert build("cosine")(*tiny_inputs()).item() == pytest.approx(hand_cosine_distance(), rel=1e-6)


def test_cos_l1_by_hand() -> None:
    total = sum(smooth_l1(STUDENT[c][y][x] - TEACHER[c][y][x], 1.0) for c in CHANNELS for y, x in VALID_CELLS)
    smooth = total / (len(VALID_CELLS) * len(CHANNELS))
    expected = 0.9 * hand_cosine_distance() + 0.1 * smooth
    assert build("cos_l1")(*tiny_inputs()).item() == pytest.approx(expected, rel=1e-6)
    custom = build("cos_l1", cosine_weight=2.0, smooth_l1_weight=3.0)(*tiny_inputs()).item()
    assert custom == pytest.approx(2.0 * hand_cosine_distance() + 3.0 * smooth, rel=1e-6)


def test_kl_by_hand() -> None:
    tau = 2.0
    divergences = []
    for y, x in VALID_CELLS:
        student = softmax([STUDENT[c][y][x] / tau for c in CHANNELS])
        teacher = softmax([TEACHER[c][y][x] / tau for c in CHANNELS])
        divergences.append(sum(p * math.log(p / q) for p, q in zip(teacher, student)) * tau**2)
    expected = sum(divergences) / len(divergences)
    assert build("kl", tau=tau)(*tiny_inputs()).item() == pytest.approx(expected, rel=1e-5)


def test_cwd_by_hand() -> None:
    tau = 2.0
    total = 0.0
    for c in CHANNELS:
        student = softmax([STUDENT[c][y][x] / tau for y, x in VALID_CELLS])
        teacher = softmax([TEACHER[c][y][x] / tau for y, x in VALID_CELLS])
        total += sum(p * math.log(p / q) for p, q in zip(teacher, student))
    expected = total * tau**2 / (1 * len(CHANNELS))  # averaged over B * C = 1 * 2
    assert build("cwd", tau=tau)(*tiny_inputs()).item() == pytest.approx(expected, rel=1e-5)


def test_bce_by_hand() -> None:
    student, teacher, valid = tiny_inputs()

    def sigmoid(value: float) -> float:
        return 1.0 / (1.0 + math.exp(-value))

    def cross_entropy(logit: float, target: float) -> float:
        return -(target * math.log(sigmoid(logit)) + (1 - target) * math.log(1 - sigmoid(logit)))

    total = scores = 0.0
    for channel in CHANNELS:
        for y, x in VALID_CELLS:
            target = sigmoid(TEACHER[channel][y][x])
            total += cross_entropy(STUDENT[channel][y][x], target) - cross_entropy(TEACHER[channel][y][x], target)
            scores += target
    assert build("bce")(student, teacher, valid).item() == pytest.approx(total / max(scores, 1.0), rel=1e-5)


def test_pkd_by_hand() -> None:
    def standardised(values: list[float]) -> list[float]:
        mean = sum(values) / len(values)
        deviation = math.sqrt(sum((value - mean) ** 2 for value in values) / len(values))
        return [(value - mean) / (deviation + 1e-6) for value in values]

    total = 0.0
    for c in CHANNELS:
        student = standardised([STUDENT[c][y][x] for y, x in VALID_CELLS])
        teacher = standardised([TEACHER[c][y][x] for y, x in VALID_CELLS])
        total += sum((a - b) ** 2 for a, b in zip(student, teacher))
    expected = total / (len(VALID_CELLS) * len(CHANNELS)) / 2
    assert build("pkd")(*tiny_inputs()).item() == pytest.approx(expected, rel=1e-5)


def test_pkd_equals_one_minus_pearson() -> None:
    student = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    assert build("pkd", channels=1)(student, -student, None).item() == pytest.approx(2.0, rel=1e-5)  # r = -1
    assert build("pkd", channels=1)(student, 3 * student + 1, None).item() == pytest.approx(0.0, abs=1e-6)  # r = 1


def identity_generator(loss: torch.nn.Module) -> None:
    """Make mgd's generator copy the (one-channel, non-negative) student into every channel."""
    with torch.no_grad():
        for conv in (loss.generator.input_conv, loss.generator.output_conv):
            conv.weight.zero_()
            conv.bias.zero_()
        loss.generator.input_conv.weight[:, 0, 1, 1] = 1.0
        for channel in range(loss.generator.output_conv.weight.shape[0]):
            loss.generator.output_conv.weight[channel, channel, 1, 1] = 1.0


def test_mgd_by_hand() -> None:
    student_map = [[1.0, 2.0], [3.0, 4.0]]  # one channel, mapped to the teacher's two
    student = torch.tensor([[student_map]])
    _, teacher, valid = tiny_inputs()
    alpha = 0.5

    unmasked = LOSSES.build("mgd", student_channels=1, teacher_channels=2, alpha=alpha, mask_ratio=0.0)
    identity_generator(unmasked)
    total = sum((student_map[y][x] - TEACHER[c][y][x]) ** 2 for c in CHANNELS for y, x in VALID_CELLS)
    assert unmasked(student, teacher, valid).item() == pytest.approx(alpha * total / 1, rel=1e-6)  # / B

    all_masked = LOSSES.build("mgd", student_channels=1, teacher_channels=2, alpha=alpha, mask_ratio=1.0)
    identity_generator(all_masked)  # every cell dropped: the generator sees zeros and outputs 0
    total = sum(TEACHER[c][y][x] ** 2 for c in CHANNELS for y, x in VALID_CELLS)
    assert all_masked(student, teacher, valid).item() == pytest.approx(alpha * total, rel=1e-6)


def test_fgd_by_hand() -> None:
    tau = 0.5
    weights = {"foreground_weight": 1.0, "background_weight": 2.0, "attention_weight": 3.0, "global_weight": 4.0}
    loss = build("fgd", tau=tau, **weights)
    # One box covering exactly cell (0, 0) at stride 8: foreground 1 / (1 * 1) there; the
    # other two valid cells are background, 1 / 2 each.
    targets = {"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0]]), "batch_idx": torch.tensor([0]), "stride": 8}
    foreground_mask = {(0, 0): 1.0, (0, 1): 0.0, (1, 0): 0.0}
    background_mask = {(0, 0): 0.0, (0, 1): 0.5, (1, 0): 0.5}

    def attention(features: list[list[list[float]]]) -> tuple[dict[tuple[int, int], float], list[float]]:
        cell_means = [sum(abs(features[c][y][x]) for c in CHANNELS) / len(CHANNELS) for y, x in VALID_CELLS]
        spatial = [len(VALID_CELLS) * p for p in softmax([m / tau for m in cell_means])]
        channel_means = [sum(abs(features[c][y][x]) for y, x in VALID_CELLS) / len(VALID_CELLS) for c in CHANNELS]
        channel = [len(CHANNELS) * p for p in softmax([m / tau for m in channel_means])]
        return dict(zip(VALID_CELLS, spatial)), channel

    spatial_student, channel_student = attention(STUDENT)
    spatial_teacher, channel_teacher = attention(TEACHER)
    foreground = background = global_term = 0.0
    for y, x in VALID_CELLS:
        for c in CHANNELS:
            squared = (STUDENT[c][y][x] - TEACHER[c][y][x]) ** 2
            weighted = squared * spatial_teacher[(y, x)] * channel_teacher[c]
            foreground += weighted * foreground_mask[(y, x)]
            background += weighted * background_mask[(y, x)]
            global_term += squared  # the global-context blocks start as the identity
    attention_term = sum(abs(a - b) for a, b in zip(channel_student, channel_teacher)) + sum(
        abs(spatial_student[cell] - spatial_teacher[cell]) for cell in VALID_CELLS
    )
    expected = 1.0 * foreground + 2.0 * background + 3.0 * attention_term + 4.0 * global_term
    assert loss(*tiny_inputs(), targets).item() == pytest.approx(expected, rel=1e-5)


def test_fgd_without_targets_treats_every_valid_cell_as_background() -> None:
    tau = 0.5
    loss = build("fgd", tau=tau, foreground_weight=5.0, background_weight=1.0, attention_weight=0.0, global_weight=0.0)
    cell_means = [sum(abs(TEACHER[c][y][x]) for c in CHANNELS) / 2 for y, x in VALID_CELLS]
    spatial = [3 * p for p in softmax([m / tau for m in cell_means])]
    channel_means = [sum(abs(TEACHER[c][y][x]) for y, x in VALID_CELLS) / 3 for c in CHANNELS]
    channel = [2 * p for p in softmax([m / tau for m in channel_means])]
    expected = sum(
        (STUDENT[c][y][x] - TEACHER[c][y][x]) ** 2 * spatial[index] * channel[c] / 3
        for index, (y, x) in enumerate(VALID_CELLS)
        for c in CHANNELS
    )
    assert loss(*tiny_inputs(), None).item() == pytest.approx(expected, rel=1e-5)
    empty = {"boxes": torch.zeros((0, 4)), "batch_idx": torch.zeros((0,), dtype=torch.long), "stride": 8}
    assert loss(*tiny_inputs(), empty).item() == pytest.approx(expected, rel=1e-5)


def test_fgd_masks_from_boxes() -> None:
    valid = torch.ones((2, 1, 4, 4), dtype=torch.bool)
    valid[0, :, :, 3] = False  # image 0: right column is padding
    targets = {
        # image 0: a 2x2-cell box and, overlapping it, a 1x1-cell box (the larger weight wins);
        # a box reaching past the map is clipped; one box entirely outside is dropped.
        "boxes": torch.tensor(
            [[0.0, 0.0, 8.0, 8.0], [4.0, 4.0, 7.0, 7.0], [10.0, 12.0, 30.0, 30.0], [40.0, 40.0, 50.0, 50.0]]
        ),
        "batch_idx": torch.tensor([0, 0, 1, 1]),
        "stride": 4,
    }
    foreground, background = foreground_background_masks(valid, targets)
    expected_image_0 = torch.tensor(
        [[0.25, 0.25, 0.0, 0.0], [0.25, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    )
    assert torch.equal(foreground[0, 0], expected_image_0)
    # image 1: x 10..30 -> cells 2..3 (clipped), y 12..30 -> cells 3..3: 2 cells of 1/2.
    expected_image_1 = torch.zeros((4, 4))
    expected_image_1[3, 2:4] = 0.5
    assert torch.equal(foreground[1, 0], expected_image_1)
    # Background: valid, non-foreground cells, each 1 / count; invalid cells are neither.
    assert background[0, 0, :, 3].sum() == 0 and foreground[0, 0, :, 3].sum() == 0
    assert background[0].sum().item() == pytest.approx(1.0) and (background[0] > 0).sum() == 12 - 4
    assert background[1].sum().item() == pytest.approx(1.0) and (background[1] > 0).sum() == 16 - 2
    with pytest.raises(KeyError, match="stride"):
        foreground_background_masks(valid, {"boxes": targets["boxes"], "batch_idx": targets["batch_idx"]})


# ---------------------------------------------------------------------------------------
# Contract tests over every registered loss
# ---------------------------------------------------------------------------------------

BATCH, CONTRACT_CHANNELS, SIZE, STRIDE = 2, 4, 5, 8


def contract_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, Any]]:
    generator = torch.Generator().manual_seed(seed)
    student = torch.randn((BATCH, CONTRACT_CHANNELS, SIZE, SIZE), generator=generator)
    teacher = torch.randn((BATCH, CONTRACT_CHANNELS, SIZE, SIZE), generator=generator)
    valid = torch.ones((BATCH, 1, SIZE, SIZE), dtype=torch.bool)
    valid[0, :, :, 3:] = False  # letterbox padding on the right of image 0
    valid[1, :, 4, :] = False  # padding at the bottom of image 1
    targets = {
        "boxes": torch.tensor([[2.0, 2.0, 20.0, 14.0], [8.0, 16.0, 40.0, 30.0]]),
        "batch_idx": torch.tensor([0, 1]),
        "stride": STRIDE,
    }
    return student, teacher, valid, targets


def evaluate(name: str, loss: torch.nn.Module, *args: Any) -> torch.Tensor:
    if name in RANDOM:
        torch.manual_seed(1234)
    return loss(*args)


def test_all_expected_losses_are_registered() -> None:
    assert EXPECTED_NAMES <= set(LOSSES.names())


@pytest.mark.parametrize("name", FEATURE_LOSSES)
def test_zero_when_student_equals_teacher(name: str) -> None:
    if name in NONZERO_AT_EQUALITY:
        pytest.skip(f"{name} is not zero at student == teacher by design")
    _, teacher, valid, targets = contract_inputs()
    value = build(name, CONTRACT_CHANNELS)(teacher.clone(), teacher, valid, targets)
    assert value.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("name", FEATURE_LOSSES)
def test_invalid_cells_do_not_change_the_value(name: str) -> None:
    student, teacher, valid, targets = contract_inputs()
    loss = build(name, CONTRACT_CHANNELS)
    reference = evaluate(name, loss, student, teacher, valid, targets)
    noise = torch.randn_like(student) * 100.0
    noise[0, 0, 0, 4] = float("nan")  # an invalid cell of image 0
    changed_student = torch.where(valid, student, noise)
    changed_teacher = torch.where(valid, teacher, -noise)
    changed = evaluate(name, loss, changed_student, changed_teacher, valid, targets)
    assert torch.isfinite(changed)
    assert changed.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", [name for name in FEATURE_LOSSES if name not in RANDOM])
def test_an_all_padding_sample_neither_adds_nor_dilutes(name: str) -> None:
    student, teacher, valid, targets = contract_inputs()
    loss = build(name, CONTRACT_CHANNELS)
    first_only = {"boxes": targets["boxes"][:1], "batch_idx": targets["batch_idx"][:1], "stride": STRIDE}
    alone = loss(student[:1], teacher[:1], valid[:1], first_only)
    padded_valid = valid.clone()
    padded_valid[1] = False
    together = loss(student, teacher, padded_valid, targets)
    assert together.item() == pytest.approx(alone.item(), rel=1e-5)


@pytest.mark.parametrize("name", FEATURE_LOSSES)
def test_gradient_reaches_the_student_only(name: str) -> None:
    student, teacher, valid, targets = contract_inputs()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    evaluate(name, build(name, CONTRACT_CHANNELS), student, teacher, valid, targets).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
    assert torch.all(student.grad.masked_select(~valid.expand_as(student)) == 0)


@pytest.mark.parametrize("name", FEATURE_LOSSES)
def test_no_valid_cell_gives_zero_and_backward_works(name: str) -> None:
    student, teacher, _, targets = contract_inputs()
    student.requires_grad_(True)
    loss = build(name, CONTRACT_CHANNELS)
    nothing_valid = torch.zeros((BATCH, 1, SIZE, SIZE), dtype=torch.bool)
    value = evaluate(name, loss, student, teacher, nothing_valid, targets)
    assert value.item() == 0.0
    value.backward()
    assert student.grad is not None and torch.all(student.grad == 0)
    # Parameters the loss owns stay in the graph (DDP expects a gradient for each).
    for parameter_name, parameter in loss.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name


@pytest.mark.parametrize("name", FEATURE_LOSSES)
def test_float32_under_bf16_autocast(name: str) -> None:
    student, teacher, valid, targets = contract_inputs()
    student, teacher = student.bfloat16(), teacher.bfloat16()
    loss = build(name, CONTRACT_CHANNELS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = evaluate(name, loss, student, teacher, valid, targets)
    assert value.dtype == torch.float32
    # Same as computing in float32 from the same (bf16-rounded) inputs outside autocast.
    reference = evaluate(name, loss, student.float(), teacher.float(), valid, targets)
    assert value.item() == pytest.approx(reference.item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", FEATURE_LOSSES)
def test_docstring_yaml_example_is_a_valid_config(name: str) -> None:
    docstring = LOSSES.get(name).__doc__ or ""
    blocks = re.findall(r"```yaml\n(.*?)```", docstring, flags=re.DOTALL)
    assert blocks, f"the {name} docstring needs a ```yaml example"
    indent = min(len(line) - len(line.lstrip()) for line in blocks[0].splitlines() if line.strip())
    text = "\n".join(line[indent:] for line in blocks[0].splitlines())
    config = validate_config(yaml.safe_load(text), source=f"{name} docstring")
    entries = list(config.distillation.losses.values())
    assert [entry.type for entry in entries] == [name]
    built = LOSSES.build(
        name, student_channels=CONTRACT_CHANNELS, teacher_channels=CONTRACT_CHANNELS, **entries[0].params
    )
    student, teacher, valid, targets = contract_inputs()
    assert torch.isfinite(evaluate(name, built, student, teacher, valid, targets))


# ---------------------------------------------------------------------------------------
# Input checks and loss-specific behaviour
# ---------------------------------------------------------------------------------------


def test_shape_and_mask_errors_name_the_problem() -> None:
    loss = build("mse", CONTRACT_CHANNELS)
    student, teacher, valid, _ = contract_inputs()
    with pytest.raises(ValueError, match="adapter"):
        loss(student[:, :2], teacher, valid)
    with pytest.raises(TypeError, match="bool"):
        loss(student, teacher, valid.float())
    with pytest.raises(ValueError, match="valid has shape"):
        loss(student, teacher, valid[:, :, :3])
    # A [B, H, W] mask and a missing mask are accepted.
    assert loss(student, teacher, valid[:, 0]).item() == pytest.approx(loss(student, teacher, valid).item())
    full = torch.ones_like(valid)
    assert loss(student, teacher, None).item() == pytest.approx(loss(student, teacher, full).item())


def test_mgd_needs_channels_and_maps_them() -> None:
    with pytest.raises(ValueError, match="student_channels"):
        LOSSES.build("mgd")
    loss = LOSSES.build("mgd", student_channels=3, teacher_channels=CONTRACT_CHANNELS)
    student, teacher, valid, _ = contract_inputs()
    assert torch.isfinite(loss(student[:, :3], teacher, valid))
    with pytest.raises(ValueError, match="built for 3 student"):
        loss(student, teacher, valid)


def test_mgd_mask_repeats_with_the_seed() -> None:
    loss = build("mgd", CONTRACT_CHANNELS)
    student, teacher, valid, _ = contract_inputs()
    torch.manual_seed(7)
    first = loss(student, teacher, valid)
    torch.manual_seed(7)
    again = loss(student, teacher, valid)
    torch.manual_seed(8)
    other = loss(student, teacher, valid)
    assert first.item() == again.item()
    assert first.item() != other.item()


def test_pkd_ignores_per_sample_scale_and_offset() -> None:
    student, teacher, valid, _ = contract_inputs()
    loss = build("pkd", CONTRACT_CHANNELS)
    reference = loss(student, teacher, valid)
    # Per-sample, per-channel positive scale and offset (mixed offline/online statistics).
    scale = torch.tensor([0.01, 50.0]).view(2, 1, 1, 1) * torch.arange(1.0, 5.0).view(1, 4, 1, 1)
    offset = torch.tensor([3.0, -20.0]).view(2, 1, 1, 1)
    assert loss(student * scale + offset, teacher, valid).item() == pytest.approx(reference.item(), rel=1e-4)


def test_losses_reject_bad_parameters() -> None:
    bad = {
        "kl": {"tau": 0.0},
        "cwd": {"tau": -1.0},
        "fgd": {"tau": 0.0},
        "smooth_l1": {"beta": -1.0},
        "pkd": {"eps": 0.0},
        "mgd": {"mask_ratio": 1.5},
    }
    for name, params in bad.items():
        with pytest.raises(ValueError, match=next(iter(params))):
            build(name, CONTRACT_CHANNELS, **params)
    with pytest.raises(TypeError, match="tau"):
        build("mse", CONTRACT_CHANNELS, tau=1.0)
