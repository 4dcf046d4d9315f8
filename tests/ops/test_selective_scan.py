"""The chunked selective scan against the paper's sequential recurrence, plus dispatch and validation."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from vfmkd.ops import selective_scan as selective_scan_module
from vfmkd.ops.selective_scan import selective_scan, selective_scan_chunked


def sequential_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mamba's discretised recurrence, one step at a time, in float64: (output, last state)."""
    u, delta, A = u.double(), delta.double(), A.double()
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    channels = u.shape[1]
    B, C = B.double(), C.double()
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    B = B.repeat_interleave(channels // B.shape[1], dim=1)  # [B, D, N, L]
    C = C.repeat_interleave(channels // C.shape[1], dim=1)
    state = u.new_zeros(u.shape[0], channels, A.shape[1])
    outputs = []
    for step in range(u.shape[2]):
        decay = torch.exp(delta[:, :, step, None] * A)
        state = decay * state + delta[:, :, step, None] * B[..., step] * u[:, :, step, None]
        outputs.append((state * C[..., step]).sum(-1))
    output = torch.stack(outputs, dim=-1)
    if D is not None:
        output = output + u * D.double()[:, None]
    if z is not None:
        output = output * F.silu(z.double())
    return output, state


def _inputs(
    batch: int = 2,
    channels: int = 8,
    length: int = 37,
    state_size: int = 4,
    groups: int | None = None,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    matrix_shape = (batch, state_size, length) if groups is None else (batch, groups, state_size, length)
    return {
        "u": randn(batch, channels, length),
        "delta": randn(batch, channels, length) * 0.5,
        "A": -torch.exp(randn(channels, state_size)),
        "B": randn(*matrix_shape),
        "C": randn(*matrix_shape),
        "D": randn(channels),
        "z": randn(batch, channels, length),
        "delta_bias": randn(channels) * 0.5,
    }


@pytest.mark.parametrize("length", [1, 5, 37, 64, 131])
@pytest.mark.parametrize("chunk_size", [None, 4, 16])
@pytest.mark.parametrize("groups", [None, 1, 2])
def test_chunked_scan_matches_sequential_recurrence(length: int, chunk_size: int | None, groups: int | None) -> None:
    inputs = _inputs(length=length, groups=groups)
    expected, expected_state = sequential_scan(**inputs, delta_softplus=True)
    output, last_state = selective_scan_chunked(
        **inputs, delta_softplus=True, return_last_state=True, chunk_size=chunk_size
    )
    assert output.shape == inputs["u"].shape and output.dtype == torch.float32
    assert last_state.shape == (2, 8, 4)
    torch.testing.assert_close(output.double(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(last_state.double(), expected_state, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"D": True},
        {"z": True},
        {"delta_bias": True},
        {"delta_softplus": True},
        {"D": True, "z": True, "delta_bias": True, "delta_softplus": True},
    ],
)
def test_optional_terms_match_sequential_recurrence(options: dict[str, bool]) -> None:
    inputs = _inputs(length=45, groups=4)
    if not options.get("delta_softplus"):
        inputs["delta"] = inputs["delta"].abs()  # raw steps must be non-negative without softplus
        inputs["delta_bias"] = inputs["delta_bias"].abs()
    kwargs = {key: inputs[key] for key in ("u", "delta", "A", "B", "C")}
    for key in ("D", "z", "delta_bias"):
        if options.get(key):
            kwargs[key] = inputs[key]
    softplus = options.get("delta_softplus", False)
    expected, _ = sequential_scan(**kwargs, delta_softplus=softplus)
    output = selective_scan(**kwargs, delta_softplus=softplus)
    torch.testing.assert_close(output.double(), expected, atol=1e-4, rtol=0)


def test_stiff_decays_and_long_sequence_stay_finite_and_exact() -> None:
    # Steps up to ~softplus(8) with |A| up to 16: per-step log decays near -130, far past exp's
    # float32 range when summed, which the log-space chunk summaries must survive.
    inputs = _inputs(channels=6, length=300, state_size=16, groups=2, seed=3)
    inputs["delta"] = inputs["delta"] * 8
    inputs["A"] = -torch.linspace(0.01, 16, 16).repeat(6, 1)
    expected, expected_state = sequential_scan(**inputs, delta_softplus=True)
    output, last_state = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    assert torch.isfinite(output).all()
    torch.testing.assert_close(output.double(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(last_state.double(), expected_state, atol=1e-4, rtol=0)


def test_gradients_match_sequential_recurrence() -> None:
    inputs = _inputs(length=70, groups=2, seed=1)
    leaves = {key: value.clone().requires_grad_(True) for key, value in inputs.items()}
    output = selective_scan_chunked(**leaves, delta_softplus=True, chunk_size=16)
    weights = torch.randn(output.shape, generator=torch.Generator().manual_seed(5))
    (output * weights).sum().backward()

    references = {key: value.double().requires_grad_(True) for key, value in inputs.items()}
    expected, _ = sequential_scan(**references, delta_softplus=True)
    (expected * weights.double()).sum().backward()
    for key in inputs:
        assert leaves[key].grad is not None, key
        torch.testing.assert_close(leaves[key].grad.double(), references[key].grad, atol=1e-3, rtol=1e-3, msg=key)


@pytest.mark.parametrize(("segment_length", "chunk_size"), [(1, 1), (10, 4), (16, 8), (33, None), (200, None)])
def test_segmented_scan_matches_sequential_recurrence(segment_length: int, chunk_size: int | None) -> None:
    inputs = _inputs(length=131, groups=2, seed=2)
    expected, expected_state = sequential_scan(**inputs, delta_softplus=True)
    output, last_state = selective_scan_chunked(
        **inputs, delta_softplus=True, return_last_state=True, segment_length=segment_length, chunk_size=chunk_size
    )
    torch.testing.assert_close(output.double(), expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(last_state.double(), expected_state, atol=1e-4, rtol=0)


@pytest.mark.parametrize("segment_length", [7, 16, 70])
def test_recomputed_gradients_match_sequential_recurrence(segment_length: int) -> None:
    # The loss reads the last state as well as the output, so the gradient arriving at the
    # last state must flow back through every segment's recomputation.
    inputs = _inputs(length=70, groups=2, seed=4)
    generator = torch.Generator().manual_seed(6)
    weights = torch.randn(inputs["u"].shape, generator=generator)
    state_weights = torch.randn(2, 8, 4, generator=generator)

    leaves = {key: value.clone().requires_grad_(True) for key, value in inputs.items()}
    output, last_state = selective_scan_chunked(
        **leaves, delta_softplus=True, return_last_state=True, segment_length=segment_length, chunk_size=4
    )
    ((output * weights).sum() + (last_state * state_weights).sum()).backward()

    references = {key: value.double().requires_grad_(True) for key, value in inputs.items()}
    expected, expected_state = sequential_scan(**references, delta_softplus=True)
    ((expected * weights.double()).sum() + (expected_state * state_weights.double()).sum()).backward()
    for key in inputs:
        assert leaves[key].grad is not None, key
        torch.testing.assert_close(leaves[key].grad.double(), references[key].grad, atol=1e-3, rtol=1e-3, msg=key)


def test_gradients_only_for_inputs_that_need_them() -> None:
    inputs = _inputs(length=40, seed=7)
    inputs["u"].requires_grad_(True)
    inputs["A"].requires_grad_(True)
    selective_scan_chunked(**inputs, delta_softplus=True, segment_length=16).sum().backward()
    assert inputs["u"].grad is not None and inputs["A"].grad is not None
    assert all(inputs[key].grad is None for key in ("delta", "B", "C", "D", "z", "delta_bias"))


def test_backward_keeps_inputs_and_segment_states_not_intermediates() -> None:
    # Autograd through the whole chunked scan would keep several [B, D, N, L] tensors; the
    # recomputed scan keeps its inputs plus one [B, D, N] state per segment.
    batch, channels, state_size, length, segment_length = 2, 8, 16, 512, 32
    inputs = _inputs(batch=batch, channels=channels, length=length, state_size=state_size, groups=2)
    leaves = {key: value.requires_grad_(True) for key, value in inputs.items()}
    saved: list[int] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = selective_scan_chunked(**leaves, delta_softplus=True, segment_length=segment_length)
    output.sum().backward()
    input_elements = sum(value.numel() for value in inputs.values())
    state_elements = (length // segment_length) * batch * channels * state_size
    assert sum(saved) <= input_elements + state_elements
    assert sum(saved) < batch * channels * state_size * length
    assert all(value.grad is not None for value in leaves.values())


def test_low_precision_input_gives_output_in_that_dtype() -> None:
    inputs = _inputs(length=20)
    inputs["u"] = inputs["u"].bfloat16()
    output = selective_scan(**inputs, delta_softplus=True)
    assert output.dtype == torch.bfloat16
    expected, _ = sequential_scan(**inputs, delta_softplus=True)
    torch.testing.assert_close(output.double(), expected, atol=5e-2, rtol=2e-2)


def test_scan_stays_float32_under_autocast() -> None:
    inputs = {key: value.requires_grad_(True) for key, value in _inputs(length=50, groups=2).items()}
    expected, _ = sequential_scan(**{key: value.detach() for key, value in inputs.items()}, delta_softplus=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = selective_scan(**inputs, delta_softplus=True)
    assert output.dtype == torch.float32
    torch.testing.assert_close(output.double(), expected, atol=1e-4, rtol=0)
    output.sum().backward()
    assert all(torch.isfinite(value.grad).all() for value in inputs.values())


def test_meta_tensors_give_shapes() -> None:
    inputs = {key: value.to("meta") for key, value in _inputs(length=40, groups=2).items()}
    output, last_state = selective_scan(**inputs, delta_softplus=True, return_last_state=True)
    assert output.device.type == "meta" and output.shape == (2, 8, 40) and last_state.shape == (2, 8, 4)


def test_cpu_tensors_never_reach_the_cuda_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def kernel(*args: object) -> None:
        raise AssertionError("the CUDA kernel was called for CPU tensors")

    monkeypatch.setattr(selective_scan_module, "_load_cuda_kernel", lambda: kernel)
    inputs = _inputs(length=10)
    selective_scan(**inputs)


def test_missing_mamba_ssm_means_no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    selective_scan_module._load_cuda_kernel.cache_clear()
    monkeypatch.setitem(sys.modules, "mamba_ssm", None)  # makes `import mamba_ssm...` raise ImportError
    try:
        assert selective_scan_module._load_cuda_kernel() is None
    finally:
        selective_scan_module._load_cuda_kernel.cache_clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_dispatch_matches_pytorch_scan() -> None:
    inputs = {key: value.cuda() for key, value in _inputs(channels=16, length=200, groups=4).items()}
    output = selective_scan(**inputs, delta_softplus=True)
    expected = selective_scan_chunked(**inputs, delta_softplus=True)
    torch.testing.assert_close(output, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"delta": torch.zeros(2, 8, 36)}, "delta shape"),
        ({"A": torch.zeros(7, 4)}, "A must be"),
        ({"B": torch.zeros(2, 3, 4, 37)}, "does not divide"),
        ({"C": torch.zeros(8, 4)}, "time-invariant"),
        ({"D": torch.zeros(3)}, "D must be"),
        ({"A": torch.zeros(8, 4, dtype=torch.complex64)}, "complex"),
    ],
)
def test_bad_shapes_are_named(change: dict[str, torch.Tensor], message: str) -> None:
    inputs = _inputs()
    inputs.update(change)
    with pytest.raises(ValueError, match=message):
        selective_scan_chunked(**inputs)
