import math

import torch
from torch import nn

from vfmkd.core.ema import ModelEMA


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))


def test_decay_ramps_up_with_updates():
    ema = ModelEMA(_model(), decay=0.9, tau=5.0)
    decays = []
    for updates in (0, 5, 50):
        ema.updates = updates
        decays.append(ema.current_decay())
    assert decays[0] < decays[1] < decays[2] < 0.9
    assert math.isclose(decays[2], 0.9 * (1 - math.exp(-51 / 5.0)))


def test_update_blends_parameters_and_copies_buffers():
    model = _model()
    ema = ModelEMA(model, decay=0.9, tau=5.0)
    before = [p.detach().clone() for p in ema.module.parameters()]
    expected_decay = 0.9 * (1 - math.exp(-1 / 5.0))
    assert math.isclose(ema.current_decay(), expected_decay)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)
    model.train()
    model(torch.randn(8, 3))  # changes the BatchNorm running statistics
    ema.update(model)
    for old, ema_parameter, live in zip(before, ema.module.parameters(), model.parameters()):
        torch.testing.assert_close(ema_parameter, expected_decay * old + (1 - expected_decay) * live)
        assert not ema_parameter.requires_grad
    for ema_buffer, live_buffer in zip(ema.module.buffers(), model.buffers()):
        torch.testing.assert_close(ema_buffer, live_buffer)
    assert ema.updates == 1
    assert math.isclose(ema.current_decay(), 0.9 * (1 - math.exp(-2 / 5.0)))


def test_state_dict_round_trip():
    model = _model()
    ema = ModelEMA(model, decay=0.99, tau=2.0)
    ema.update(model)
    ema.update(model)
    restored = ModelEMA(_model(), decay=0.99, tau=2.0)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 2
    for name, value in ema.module.state_dict().items():
        torch.testing.assert_close(restored.module.state_dict()[name], value)
