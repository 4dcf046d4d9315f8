"""RTDETRDecoder against Ultralytics' RTDETRDecoder (a test oracle only, never imported by vfmkd)."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.ultralytics_oracle import import_ultralytics
from vfmkd.models.heads.rtdetr_decoder import (
    RTDETR_PRESETS,
    RTDETRDecoder,
    convert_ultralytics_rtdetr_decoder,
    proposal_anchors,
)
from vfmkd.models.heads.rtdetr_denoising import contrastive_denoising_queries
from vfmkd.ops.deformable_attention import sample_multi_scale

ultralytics_head = import_ultralytics("ultralytics.nn.modules.head")

CHANNELS = (16, 24, 32)
NUM_CLASSES = 5
TINY = {"hd": 64, "nq": 30, "ndp": 2, "nh": 4, "ndl": 2, "d_ffn": 128, "nd": 10}
ATOL = 1e-4


def _oracle(**overrides) -> torch.nn.Module:
    """A tiny Ultralytics decoder with every tensor randomised (constants too: biases, norms, stats)."""
    torch.manual_seed(0)
    oracle = ultralytics_head.RTDETRDecoder(nc=NUM_CLASSES, ch=CHANNELS, **{**TINY, **overrides})
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, tensor in oracle.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.1)
    return oracle


def _ours(oracle: torch.nn.Module, **overrides) -> RTDETRDecoder:
    settings = {
        "hidden_dim": oracle.hidden_dim,
        "num_queries": oracle.num_queries,
        "num_heads": oracle.nhead,
        "num_points": oracle.decoder.layers[0].cross_attn.n_points,
        "num_decoder_layers": oracle.num_decoder_layers,
        "ffn_dim": oracle.decoder.layers[0].linear1.out_features,
        "eval_idx": oracle.decoder.eval_idx,
        "num_denoising": oracle.num_denoising,
        "learnt_init_query": oracle.learnt_init_query,
    }
    model = RTDETRDecoder(CHANNELS, NUM_CLASSES, **{**settings, **overrides})
    model.load_state_dict(convert_ultralytics_rtdetr_decoder(oracle.state_dict()), strict=True)
    return model


def _features(batch: int = 2, size: int = 256, seed: int = 2) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, channels, size // stride, size // stride, generator=generator)
        for channels, stride in zip(CHANNELS, (8, 16, 32))
    ]


def _targets(counts: list[int], seed: int = 3) -> dict:
    generator = torch.Generator().manual_seed(seed)
    total = sum(counts)
    centres = torch.rand(total, 2, generator=generator) * 0.6 + 0.2
    sizes = torch.rand(total, 2, generator=generator) * 0.3 + 0.05
    return {
        "cls": torch.randint(0, NUM_CLASSES, (total,), generator=generator),
        "bboxes": torch.cat((centres, sizes), dim=1),
        "batch_idx": torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts)),
        "gt_groups": counts,
    }


def _assert_outputs_equal(ours: dict, theirs: tuple) -> None:
    boxes, logits, encoder_boxes, encoder_logits, dn_meta = theirs
    torch.testing.assert_close(ours["layer_boxes"], boxes, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours["layer_logits"], logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours["encoder_boxes"], encoder_boxes, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours["encoder_logits"], encoder_logits, atol=ATOL, rtol=0)
    if dn_meta is None:
        assert ours["dn_meta"] is None
    else:
        assert ours["dn_meta"].keys() == dn_meta.keys()
        for key, value in dn_meta.items():
            torch.testing.assert_close(ours["dn_meta"][key], value, atol=0, rtol=0)


@pytest.mark.parametrize("learnt_init_query", [False, True])
def test_eval_outputs_equal_ultralytics(learnt_init_query: bool) -> None:
    oracle = _oracle(learnt_init_query=learnt_init_query).eval()
    model = _ours(oracle).eval()
    features = _features()
    with torch.no_grad():
        _, theirs = oracle(features)
        ours = model(features)
    _assert_outputs_equal(ours, theirs)
    assert ours["layer_boxes"].shape == (1, 2, 30, 4)
    expected = torch.cat((theirs[0][0], theirs[1][0].sigmoid()), dim=-1)
    torch.testing.assert_close(ours["predictions"], expected, atol=ATOL, rtol=0)
    assert ours["predictions"].shape == (2, 30, 4 + NUM_CLASSES)


def _train_step(module: torch.nn.Module, features: list[torch.Tensor], targets: dict | None, seed: int = 7):
    torch.manual_seed(seed)
    return module.train()(features, targets)


@pytest.mark.parametrize("counts", [[3, 1], [13, 2, 0]], ids=["few", "more-objects-than-denoising-queries"])
def test_training_outputs_and_denoising_equal_ultralytics(counts: list[int]) -> None:
    oracle = _oracle()
    model = _ours(oracle)
    features, targets = _features(batch=len(counts)), _targets(counts)
    theirs = _train_step(oracle, features, targets)
    ours = _train_step(model, features, targets)
    _assert_outputs_equal(ours, theirs)
    meta = ours["dn_meta"]
    per_image = min(max(counts), 10)
    assert meta["dn_num_group"] == 10 // per_image
    assert meta["dn_num_split"] == [2 * per_image * meta["dn_num_group"], 30]
    assert ours["layer_boxes"].shape == (2, len(counts), sum(meta["dn_num_split"]), 4)
    assert [len(index) for index in meta["dn_gt_idx"]] == [min(count, 10) for count in counts]

    # Gradients too: the detached references, the look-forward-twice boxes, the denoising embedding.
    generator = torch.Generator().manual_seed(4)
    ours_outputs = (ours["layer_boxes"], ours["layer_logits"], ours["encoder_boxes"], ours["encoder_logits"])
    for ours_output, theirs_output in zip(ours_outputs, theirs[:4]):
        probe = torch.randn(theirs_output.shape, generator=generator)
        ((ours_output * probe).sum() + (theirs_output * probe).sum()).backward(retain_graph=True)
    theirs_grads = {**oracle.state_dict(), **{name: p.grad for name, p in oracle.named_parameters()}}
    theirs_grads = convert_ultralytics_rtdetr_decoder(theirs_grads)
    for name, parameter in model.named_parameters():
        expected = theirs_grads[name]  # float rounding differs (~1e-5 of the largest gradient); a wrong graph does not
        scale = float(expected.abs().max())
        torch.testing.assert_close(parameter.grad, expected, atol=ATOL * max(scale, 1.0), rtol=0, msg=name)


def test_unsorted_targets_give_the_same_queries() -> None:
    model = _ours(_oracle())
    features, targets = _features(), _targets([3, 2])
    order = torch.tensor([3, 0, 1, 4, 2])  # images interleaved, each image's objects still in order
    shuffled = {key: targets[key][order] for key in ("cls", "bboxes", "batch_idx")}
    ours = _train_step(model, features, targets)
    again = _train_step(model, features, shuffled)
    torch.testing.assert_close(again["layer_boxes"], ours["layer_boxes"])
    for sorted_rows, shuffled_rows in zip(ours["dn_meta"]["dn_gt_idx"], again["dn_meta"]["dn_gt_idx"]):
        assert torch.equal(order[shuffled_rows], sorted_rows)


def test_no_objects_or_no_targets_train_without_denoising() -> None:
    oracle = _oracle()
    model = _ours(oracle)
    features = _features()
    theirs = _train_step(oracle, features, _targets([0, 0]))
    ours = _train_step(model, features, _targets([0, 0]))
    _assert_outputs_equal(ours, theirs)
    assert ours["dn_meta"] is None and ours["layer_boxes"].shape == (2, 2, 30, 4)
    ours["layer_boxes"].sum().backward()
    assert model.denoising_class_embedding.weight.grad is not None  # still in the graph (DDP)
    assert _train_step(model, features, None)["dn_meta"] is None


def test_eval_idx_cuts_the_depth() -> None:
    oracle = _oracle(ndl=3, eval_idx=1).eval()
    model = _ours(oracle, eval_idx=-1).eval()
    features = _features()
    with torch.no_grad():
        full = model(features)
        model.eval_idx = 1
        cut = model(features)
        _, theirs = oracle(features)
    _assert_outputs_equal(cut, theirs)
    assert not torch.allclose(cut["predictions"], full["predictions"])
    with torch.no_grad():  # in training mode every layer runs; the eval_idx layer is the prediction
        trained = model.train()(features)
    torch.testing.assert_close(trained["predictions"][..., :4], trained["layer_boxes"][1])
    with pytest.raises(ValueError, match="eval_idx 3"):
        model.eval_idx = 3


def test_conversion_is_strict() -> None:
    state = _oracle().state_dict()
    converted = convert_ultralytics_rtdetr_decoder(state)
    assert len(converted) == len(state)
    assert "layers.1.cross_attention.value_projection.weight" in converted
    with pytest.raises(ValueError, match="unknown keys \\['extra.weight'\\]"):
        convert_ultralytics_rtdetr_decoder({**state, "extra.weight": torch.zeros(1)})
    incomplete = {key: value for key, value in state.items() if key != "decoder.layers.1.norm3.bias"}
    with pytest.raises(ValueError, match="missing keys \\['decoder.layers.1.norm3.bias'\\]"):
        convert_ultralytics_rtdetr_decoder(incomplete)
    with pytest.raises(ValueError, match="no Ultralytics RTDETRDecoder keys"):
        convert_ultralytics_rtdetr_decoder({"model.0.conv.weight": torch.zeros(1)})
    whole_model = {"model.0.conv.weight": torch.zeros(1), **{f"model.28.{k}": v for k, v in state.items()}}
    assert convert_ultralytics_rtdetr_decoder(whole_model, prefix="model.28.").keys() == converted.keys()


def test_presets_build_and_l_loads_ultralytics_default_decoder() -> None:
    assert len(RTDETRDecoder.from_preset("r18", num_classes=3).layers) == 3
    assert RTDETRDecoder.from_preset("r50m", num_classes=3).eval_idx == 2
    with pytest.raises(KeyError, match="known: r18"):
        RTDETRDecoder.from_preset("r9")
    oracle = ultralytics_head.RTDETRDecoder(nc=80, ch=RTDETR_PRESETS["l"]["in_channels"])
    model = RTDETRDecoder.from_preset("l", num_classes=80)
    model.load_state_dict(convert_ultralytics_rtdetr_decoder(oracle.state_dict()), strict=True)


def test_anchors_match_ultralytics() -> None:
    shapes = [(8, 6), (4, 3), (2, 2)]
    anchors, valid = proposal_anchors(shapes, torch.zeros(1))
    theirs_anchors, theirs_valid = ultralytics_head.RTDETRDecoder._generate_anchors(shapes, torch.zeros(1))
    assert torch.equal(valid, theirs_valid) and torch.equal(anchors, theirs_anchors)


def test_deformable_sampling_reads_pixel_centres() -> None:
    shapes = [(4, 5), (2, 3)]
    value = torch.randn(1, 26, 2, 3)  # [B, N, heads, head_dim]
    maps = [level.reshape(1, h, w, 2, 3) for level, (h, w) in zip(value.split([20, 6], dim=1), shapes)]
    # Head 0 reads pixel (row 1, col 3) of level 0; head 1 reads pixel (row 1, col 0) of level 1.
    locations = torch.tensor([[(3.5 / 5, 1.5 / 4), (0.0, 0.0)], [(0.0, 0.0), (0.5 / 3, 1.5 / 2)]])
    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    output = sample_multi_scale(value, shapes, locations[None, None], weights[None, None])
    expected = torch.cat((maps[0][0, 1, 3, 0], maps[1][0, 1, 0, 1]))
    torch.testing.assert_close(output[0, 0], expected)


def test_eval_decoder_exports_with_torch_export() -> None:
    model = _ours(_oracle()).eval()
    features = _features()
    exported = torch.export.export(model, (features,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(features)["predictions"], model(features)["predictions"])


def test_denoising_queries_without_noise_are_the_ground_truth() -> None:
    targets = _targets([2, 0, 1])
    embedding = torch.randn(NUM_CLASSES, 8)
    queries = contrastive_denoising_queries(
        targets, 3, embedding, num_queries=4, num_denoising=5, label_noise_ratio=0.0, box_noise_scale=0.0
    )
    assert queries.meta["dn_num_group"] == 2 and queries.meta["dn_num_split"] == [8, 4]  # 2 groups of 2 x 2 slots
    # Image 0's objects sit in slots 0, 1 of each positive (0-1, 4-5) and negative (2-3, 6-7) block.
    assert [index.tolist() for index in queries.meta["dn_pos_idx"]] == [[0, 1, 4, 5], [], [0, 4]]
    assert [index.tolist() for index in queries.meta["dn_gt_idx"]] == [[0, 1], [], [2]]
    for image, rows, slots in ((0, [0, 1], [0, 1, 2, 3]), (2, [2], [0, 2])):
        for block in (0, 4):
            block_slots = [slot + block for slot in slots]
            expected = targets["bboxes"][rows].repeat(len(slots) // len(rows), 1)
            torch.testing.assert_close(queries.reference[image, block_slots].sigmoid(), expected, atol=1e-5, rtol=0)
            expected = embedding[targets["cls"][rows]].repeat(len(slots) // len(rows), 1)
            torch.testing.assert_close(queries.embeddings[image, block_slots], expected)
    assert not queries.embeddings[1].any() and not queries.embeddings[2, [1, 3, 5, 7]].any()
    mask = queries.attention_mask
    assert mask.shape == (12, 12) and mask[8:, :8].all() and not mask[:, 8:].any()
    assert not mask[:4, :4].any() and mask[:4, 4:8].all() and mask[4:8, :4].all()
