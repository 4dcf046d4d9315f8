"""The one strict state-dict loader: what fits loads, what does not is listed and counted."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vfmkd.utils.state_dict import (
    MAX_LISTED_KEYS,
    check_state_dict,
    list_keys,
    load_state_dict_strict,
    state_dict_problems,
)


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def test_a_fitting_state_dict_is_loaded() -> None:
    source, target = _model(), _model()
    load_state_dict_strict(target, source.state_dict(), source="test weights")
    for key, value in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[key], value)


def test_every_problem_is_counted_and_named_with_the_source_and_hint() -> None:
    model = _model()
    state = model.state_dict()
    state.pop("0.bias")
    state["extra.weight"] = torch.zeros(1)
    state["2.weight"] = torch.zeros(3, 4)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(ValueError) as error:
        load_state_dict_strict(model, state, source="weights a.pth", hint="Is it for another model?")
    assert str(error.value) == (
        "weights a.pth does not fit: 1 missing key: 0.bias; 1 unexpected key: extra.weight; "
        "1 shape mismatch: 2.weight (checkpoint (3, 4), model (2, 4)). Is it for another model?"
    )
    # nothing was copied
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


def test_a_hint_can_read_the_problems() -> None:
    model = _model()
    state = {**model.state_dict(), "2.bias": torch.zeros(5)}
    seen = []

    def hint(problems) -> str:
        seen.append(problems)
        return "another num_classes?" if "2.bias" in problems.mismatched else ""

    with pytest.raises(ValueError, match=r"\(checkpoint \(5,\), model \(2,\)\)\. another num_classes\?$"):
        check_state_dict(model, state, source="x", hint=hint)
    assert seen[0].mismatched == {"2.bias": ((5,), (2,))} and not seen[0].missing and not seen[0].unexpected


def test_long_lists_are_cut_and_counted() -> None:
    keys = [f"layer{index}.weight" for index in range(MAX_LISTED_KEYS + 3)]
    assert list_keys(keys) == ", ".join(keys[:MAX_LISTED_KEYS]) + " (+3 more)"
    assert list_keys(keys[:2]) == "layer0.weight, layer1.weight"
    problems = state_dict_problems({key: torch.zeros(1) for key in keys}, {})
    assert problems.describe().startswith(f"{MAX_LISTED_KEYS + 3} missing keys: layer0.weight, ")
    assert problems.describe(limit=1) == "13 missing keys: layer0.weight (+12 more)"
    assert not state_dict_problems({"a": torch.zeros(2)}, {"a": torch.ones(2)})


def test_a_module_on_the_meta_device_is_checked_without_memory() -> None:
    with torch.device("meta"):
        reference = _model()
    check_state_dict(reference, _model().state_dict(), source="weights")
    with pytest.raises(ValueError, match="2 missing keys: 1.running_mean, 1.running_var"):
        check_state_dict(reference, {key: value for key, value in _model().state_dict().items()
                                     if "running" not in key}, source="weights")
