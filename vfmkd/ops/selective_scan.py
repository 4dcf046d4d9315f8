"""Selective scan: the input-dependent state-space recurrence (S6) of Mamba.

Gu and Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces",
arXiv:2312.00752 (Algorithm 2, eqs. 2 and 4). Same signature and semantics as
``selective_scan_fn`` / ``selective_scan_ref`` in ``mamba_ssm.ops.selective_scan_interface``
of https://github.com/state-spaces/mamba, for real ``A`` and input-dependent ``B``, ``C``.
Per channel ``d`` and state index ``n``, with ``delta`` the step size:

    deltaA_t   = exp(delta_t * A)                    (zero-order hold for A)
    deltaB_u_t = delta_t * B_t * u_t                 (Euler step for B, as the reference)
    h_t        = deltaA_t * h_{t-1} + deltaB_u_t,    h_{-1} = 0
    y_t        = sum_n C_t * h_t  (+ D * u_t)        and, with a gate, y_t * silu(z_t)

:func:`selective_scan` calls mamba_ssm's CUDA kernel when that package is importable and
the tensors live on a CUDA device, and :func:`selective_scan_chunked` otherwise.

The PyTorch path never loops over the sequence length. It cuts the sequence into
segments (sized so that one segment's ``[steps, B, D, N]`` intermediates stay small,
:data:`SEGMENT_ELEMENTS`), scans the segments one
after another, carrying the state, and cuts each segment into chunks of ``T`` steps that
it works on all at once:

1. Chunk summaries: a loop over the ``T`` positions, run for every chunk in parallel from
   a zero state, gives the state each chunk adds; ``exp`` of the chunk's summed
   ``delta * A`` is how much it decays a state passing through.
2. A loop over the chunks carries the state from chunk to chunk (tensors of
   ``[B, D, N]`` per step).
3. A loop over the ``T`` positions of a chunk, run for every chunk in parallel from its
   carried state, gives the states, and one batched product with ``C`` the outputs.

All decays multiplied are at most one, exactly as in the sequential recurrence, and all
arithmetic is float32. The Python loops run about ``2T + S / T`` times for a segment of
``S`` steps, the whole sequence when ``B * D * N * L`` is small; a long sequence takes more
segments, but every loop step then works on ``[S / T, B, D, N]`` tensors of at least
``SEGMENT_ELEMENTS / T`` elements, so the interpreter's share of the time stays small.

Backward keeps only the inputs and one ``[B, D, N]`` state per segment: it recomputes one
segment at a time from its saved start state and lets autograd differentiate it
(:class:`_RecomputedScan`). Autograd over the whole sequence would instead keep several
``[B, D, N, L]`` tensors per call, more memory than a CPU has for a VMamba at 640 px.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F

__all__ = ["selective_scan", "selective_scan_chunked"]

logger = logging.getLogger(__name__)

MIN_CHUNK_SIZE = 8
MAX_CHUNK_SIZE = 128
SEGMENT_ELEMENTS = 1 << 22
"""Default segment size: steps per segment times ``B * D * N`` stays under this (16 MiB per
float32 intermediate; on a 2-core CPU, 4 to 32 MiB ran fastest, 4x larger took twice as long)."""
SEGMENT_ELEMENTS_CUDA = 1 << 26
"""The same on a GPU without mamba_ssm (256 MiB per intermediate): there every loop step is a
kernel launch, so fewer, larger segments win. Chosen by that reasoning, not yet timed."""

ScanResult = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanResult:
    """Run the selective scan with mamba_ssm's CUDA kernel when available, else in PyTorch.

    Argument names and meaning follow ``mamba_ssm``'s ``selective_scan_fn`` (the kernel wants
    ``delta``, ``B`` and ``C`` in ``u``'s dtype and ``A``, ``D``, ``delta_bias`` in float32;
    the PyTorch path accepts any float dtypes).

    Args:
        u: ``[B, D, L]`` input sequence.
        delta: ``[B, D, L]`` step sizes (before ``delta_bias`` and softplus).
        A: ``[D, N]`` real state matrix (diagonal per channel; negative for a decaying state).
        B: ``[B, N, L]`` input matrix, or ``[B, G, N, L]`` with one per group of ``D / G``
            consecutive channels.
        C: ``[B, N, L]`` or ``[B, G, N, L]`` output matrix, grouped like ``B``.
        D: ``[D]`` skip gains: ``y += D * u``.
        z: ``[B, D, L]`` gate: the output is multiplied by ``silu(z)``.
        delta_bias: ``[D]`` added to ``delta`` before the softplus.
        delta_softplus: Apply softplus to ``delta + delta_bias``.
        return_last_state: Also return the state after the last step.

    Returns:
        ``[B, D, L]`` output in ``u``'s dtype, and with ``return_last_state`` also the
        ``[B, D, N]`` float32 last state (the kernel passes no gradient through it).
    """
    if u.is_cuda:
        kernel = _load_cuda_kernel()
        if kernel is not None:
            return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    return selective_scan_chunked(
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias=delta_bias,
        delta_softplus=delta_softplus,
        return_last_state=return_last_state,
    )


@functools.lru_cache(maxsize=1)
def _load_cuda_kernel() -> Callable[..., ScanResult] | None:
    """``mamba_ssm``'s ``selective_scan_fn``, or None when the package or its kernel is missing."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError as error:
        logger.debug("mamba_ssm selective scan kernel unavailable (%s); using the PyTorch scan", error)
        return None
    logger.info("selective scan: using the mamba_ssm CUDA kernel for CUDA tensors")
    return selective_scan_fn


def selective_scan_chunked(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    *,
    chunk_size: int | None = None,
    segment_length: int | None = None,
) -> ScanResult:
    """The selective scan in PyTorch, chunked and segmented (see the module docstring); any device.

    Args:
        u: ``[B, D, L]`` input sequence.
        delta: ``[B, D, L]`` step sizes.
        A: ``[D, N]`` real state matrix.
        B: ``[B, N, L]`` or grouped ``[B, G, N, L]`` input matrix.
        C: ``[B, N, L]`` or grouped ``[B, G, N, L]`` output matrix.
        D: ``[D]`` skip gains.
        z: ``[B, D, L]`` gate.
        delta_bias: ``[D]`` step-size bias.
        delta_softplus: Apply softplus to ``delta + delta_bias``.
        return_last_state: Also return the last state.
        chunk_size: Steps per chunk; default a power of two near ``sqrt(segment_length)``
            within ``[8, 128]`` (the segment length itself when shorter).
        segment_length: Steps per segment; default as many as keep one ``[B, D, N]`` tensor
            per step under :data:`SEGMENT_ELEMENTS` elements (:data:`SEGMENT_ELEMENTS_CUDA`
            on a GPU). Results depend on neither size beyond float32 rounding.

    Returns:
        ``[B, D, L]`` output in ``u``'s dtype, and with ``return_last_state`` also the
        ``[B, D, N]`` float32 last state.
    """
    batch, channels, length = _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    state_size = A.shape[1]
    if segment_length is None:
        budget = SEGMENT_ELEMENTS_CUDA if u.is_cuda else SEGMENT_ELEMENTS
        segment_length = max(MIN_CHUNK_SIZE, budget // max(batch * channels * state_size, 1))
    elif segment_length < 1:
        raise ValueError(f"segment_length must be positive, got {segment_length}")
    segment_length = min(segment_length, max(length, 1))
    if chunk_size is None:
        chunk_size = _default_chunk_size(segment_length)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")

    tensors = (u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(tensor is not None and tensor.requires_grad for tensor in tensors):
        output, last_state = _RecomputedScan.apply(*tensors, delta_softplus, segment_length, chunk_size)
    else:
        output, last_state, _ = _scan_segments(*tensors, delta_softplus, segment_length, chunk_size)
    if return_last_state:
        return output, last_state
    return output


class _RecomputedScan(torch.autograd.Function):
    """The segmented scan, keeping only its inputs and one state per segment for backward.

    Backward walks the segments last to first: it reruns one segment's forward from its
    saved start state with autograd on, back-propagates the output gradient together with
    the gradient arriving at the segment's last state, and hands the gradient of the start
    state to the segment before. Peak memory is one segment's intermediates.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        u: torch.Tensor,
        delta: torch.Tensor,
        A: torch.Tensor,
        B: torch.Tensor,
        C: torch.Tensor,
        D: torch.Tensor | None,
        z: torch.Tensor | None,
        delta_bias: torch.Tensor | None,
        delta_softplus: bool,
        segment_length: int,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        output, last_state, start_states = _scan_segments(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, segment_length, chunk_size
        )
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, *start_states)
        ctx.options = (delta_softplus, segment_length, chunk_size)
        return output, last_state

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_output: torch.Tensor, grad_last_state: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        u, delta, A, B, C, D, z, delta_bias, *start_states = ctx.saved_tensors
        delta_softplus, segment_length, chunk_size = ctx.options
        sequences = {"u": u, "delta": delta, "B": B, "C": C, "z": z}
        shared = {"A": A, "D": D, "delta_bias": delta_bias}
        order = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
        needs = dict(zip(order, ctx.needs_input_grad))
        shared_leaves = {
            name: None if tensor is None else tensor.detach().requires_grad_(needs[name])
            for name, tensor in shared.items()
        }
        sequence_grads: dict[str, list[torch.Tensor]] = {name: [] for name in sequences}
        shared_grads: dict[str, torch.Tensor | None] = dict.fromkeys(shared)
        grad_state = grad_last_state
        length = u.shape[-1]
        for index, start in reversed(list(enumerate(range(0, length, segment_length)))):
            end = min(start + segment_length, length)
            leaves = {
                name: None
                if tensor is None
                else tensor.detach()[..., start:end].requires_grad_(needs[name])
                for name, tensor in sequences.items()
            }
            initial_state = None if index == 0 else start_states[index - 1].detach().requires_grad_(True)
            with torch.enable_grad():
                output, last_state = _scan_chunks(
                    **leaves,  # type: ignore[arg-type]
                    **shared_leaves,  # type: ignore[arg-type]
                    delta_softplus=delta_softplus,
                    initial_state=initial_state,
                    chunk_size=chunk_size,
                )
                targets = {
                    name: tensor
                    for name, tensor in (*leaves.items(), *shared_leaves.items())
                    if tensor is not None and tensor.requires_grad
                }
                if initial_state is not None:
                    targets["initial_state"] = initial_state
                results = torch.autograd.grad(
                    (output, last_state),
                    tuple(targets.values()),
                    (grad_output[..., start:end], grad_state),
                    allow_unused=True,
                )
            gradients = dict(zip(targets, results))
            for name in sequences:
                if name in gradients:
                    sequence_grads[name].append(_or_zeros(gradients[name], leaves[name]))
            for name in shared:
                if name in gradients:
                    gradient = _or_zeros(gradients[name], shared_leaves[name])
                    previous = shared_grads[name]
                    shared_grads[name] = gradient if previous is None else previous + gradient
            grad_state = gradients.get("initial_state")
        merged = {name: torch.cat(grads[::-1], dim=-1) if grads else None for name, grads in sequence_grads.items()}
        merged.update(shared_grads)
        return (*(merged[name] for name in order), None, None, None)


def _or_zeros(gradient: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor:
    assert like is not None
    return torch.zeros_like(like) if gradient is None else gradient


def _scan_segments(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    segment_length: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Scan segment after segment; return the output, the last state and each later segment's start state."""
    length = u.shape[-1]
    outputs: list[torch.Tensor] = []
    start_states: list[torch.Tensor] = []
    state: torch.Tensor | None = None
    for start in range(0, max(length, 1), segment_length):  # an empty sequence is one empty segment
        end = min(start + segment_length, length)
        if state is not None:
            start_states.append(state)
        output, state = _scan_chunks(
            u[..., start:end],
            delta[..., start:end],
            A,
            B[..., start:end],
            C[..., start:end],
            D,
            None if z is None else z[..., start:end],
            delta_bias,
            delta_softplus=delta_softplus,
            initial_state=state,
            chunk_size=chunk_size,
        )
        outputs.append(output)
    assert state is not None
    return torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0], state, start_states


def _scan_chunks(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    *,
    delta_softplus: bool,
    initial_state: torch.Tensor | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One segment: the chunked scan from ``initial_state`` (zero when None); (output, last state).

    Autocast is off inside: the scan is float32 whatever the caller's autocast, so the
    backward recomputation (which runs outside any autocast) rebuilds the same values.
    """
    # NOTE: keep the order in which the helpers create tensors: autograd accumulates
    # gradients in that order, so reordering would change the gradients' float rounding.
    with _autocast_off(u.device.type):
        length = u.shape[-1]
        num_chunks = max(1, math.ceil(length / chunk_size))
        input_float = u.float()
        step_t, stepped_input_t, input_matrix_t, output_matrix_t = _time_major_inputs(
            input_float, delta, B, C, delta_bias, delta_softplus, num_chunks, chunk_size
        )
        log_decay, decay_rows, input_rows = _discretize(step_t, stepped_input_t, input_matrix_t, A)
        chunk_states, chunk_decays = _chunk_summaries(log_decay, decay_rows, input_rows)
        start_states, last_state = _carry_across_chunks(chunk_states, chunk_decays, initial_state)
        output = _chunk_outputs(decay_rows, input_rows, start_states, output_matrix_t)[..., :length]
        if D is not None:
            output = output + input_float * D.float()[:, None]
        if z is not None:
            output = output * F.silu(z.float())
        return output.to(u.dtype), last_state


def _time_major_inputs(
    input_float: torch.Tensor,
    delta: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    num_chunks: int,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The float32 scan inputs, padded to ``c * T`` steps, in time-major chunks.

    Args:
        input_float: ``[B, D, L]`` float32 input sequence.
        delta: ``[B, D, L]`` step sizes.
        B: ``[B, N, L]`` or ``[B, G_b, N, L]`` input matrix.
        C: ``[B, N, L]`` or ``[B, G_c, N, L]`` output matrix.
        delta_bias: ``[D]`` step-size bias.
        delta_softplus: Apply softplus to ``delta + delta_bias``.
        num_chunks: ``c``, with ``c * T >= L``.
        chunk_size: ``T``.

    Returns:
        Steps ``delta`` and ``delta * u``, each ``[T, c, B, D]``; the input and output
        matrices, ``[T, c, B, G_b, N]`` and ``[T, c, B, G_c, N]``. Layout [T, c, ...]: each
        step of the scan loops reads one contiguous slab, and unbind (whose backward is a
        single stack) splits them.
    """
    length = input_float.shape[-1]
    padding = num_chunks * chunk_size - length
    step = delta.float()
    if delta_bias is not None:
        step = step + delta_bias.float()[:, None]
    if delta_softplus:
        step = F.softplus(step)
    input_matrix = _grouped(B).float()
    output_matrix = _grouped(C).float()
    if padding:
        # A zero step leaves the state untouched (decay exp(0) = 1, input 0), so padded
        # positions change neither the outputs kept nor the last state.
        step = F.pad(step, (0, padding))
        stepped_input = F.pad(step[..., :length] * input_float, (0, padding))
        input_matrix = F.pad(input_matrix, (0, padding))
        output_matrix = F.pad(output_matrix, (0, padding))
    else:
        stepped_input = step * input_float
    return (
        _time_major(step, num_chunks, chunk_size),
        _time_major(stepped_input, num_chunks, chunk_size),
        _time_major(input_matrix, num_chunks, chunk_size),
        _time_major(output_matrix, num_chunks, chunk_size),
    )


def _discretize(
    step_t: torch.Tensor, stepped_input_t: torch.Tensor, input_matrix_t: torch.Tensor, A: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The per-step decay ``exp(delta * A)`` and state input ``delta * B * u``.

    Args:
        step_t: ``[T, c, B, D]`` steps ``delta``.
        stepped_input_t: ``[T, c, B, D]`` ``delta * u``.
        input_matrix_t: ``[T, c, B, G_b, N]`` input matrix.
        A: ``[D, N]`` state matrix.

    Returns:
        ``[T, c, B, D, N]`` log decays ``delta * A``; ``T`` decays and ``T`` state inputs, ``[c, B, D, N]``.
    """
    chunk_size, num_chunks, batch, channels = step_t.shape
    groups_in, state_size = input_matrix_t.shape[3], A.shape[1]
    grid = (chunk_size, num_chunks, batch)
    log_decay = step_t.unsqueeze(-1) * A.float()  # [T, c, B, D, N]
    decays = torch.exp(log_decay)
    state_inputs = (
        stepped_input_t.view(*grid, groups_in, channels // groups_in, 1) * input_matrix_t.unsqueeze(-2)
    ).view(*grid, channels, state_size)  # [T, c, B, D, N]
    return log_decay, decays.unbind(0), state_inputs.unbind(0)


def _chunk_summaries(
    log_decay: torch.Tensor, decay_rows: tuple[torch.Tensor, ...], input_rows: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 1: what each chunk adds to a zero state, and how much it decays a state passing through.

    Args:
        log_decay: ``[T, c, B, D, N]`` ``delta * A``.
        decay_rows: ``T`` decays of ``[c, B, D, N]``.
        input_rows: ``T`` state inputs of ``[c, B, D, N]``.

    Returns:
        ``[c, B, D, N]`` chunk states and ``[c, B, D, N]`` chunk decays.
    """
    chunk_states = input_rows[0]
    for decay, state_input in zip(decay_rows[1:], input_rows[1:]):
        chunk_states = torch.addcmul(state_input, decay, chunk_states)
    chunk_decays = torch.exp(log_decay.sum(dim=0))  # [c, B, D, N]
    return chunk_states, chunk_decays


def _carry_across_chunks(
    chunk_states: torch.Tensor, chunk_decays: torch.Tensor, initial_state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2: carry the state from chunk to chunk.

    Args:
        chunk_states: ``[c, B, D, N]`` what each chunk adds to a zero state.
        chunk_decays: ``[c, B, D, N]`` how much each chunk decays a state passing through.
        initial_state: ``[B, D, N]`` state before the first chunk (zero when None).

    Returns:
        ``[c, B, D, N]`` float32 state before each chunk and the ``[B, D, N]`` last state.
    """
    if initial_state is None:
        initial_state = torch.zeros_like(chunk_states[0])
    start_states = [initial_state.float()]
    for chunk_decay, chunk_state in zip(chunk_decays.unbind(0), chunk_states.unbind(0)):
        start_states.append(torch.addcmul(chunk_state, chunk_decay, start_states[-1]))
    last_state = start_states.pop()
    return torch.stack(start_states, dim=0), last_state


def _chunk_outputs(
    decay_rows: tuple[torch.Tensor, ...],
    input_rows: tuple[torch.Tensor, ...],
    start_states: torch.Tensor,
    output_matrix_t: torch.Tensor,
) -> torch.Tensor:
    """Step 3: every chunk in parallel from its start state, one position at a time; then
    all outputs ``y_t = C_t . h_t`` in one batched product.

    Args:
        decay_rows: ``T`` decays of ``[c, B, D, N]``.
        input_rows: ``T`` state inputs of ``[c, B, D, N]``.
        start_states: ``[c, B, D, N]`` state before each chunk.
        output_matrix_t: ``[T, c, B, G_c, N]`` output matrix.

    Returns:
        ``[B, D, c * T]`` outputs (padded positions included).
    """
    chunk_size, num_chunks, batch, groups_out, state_size = output_matrix_t.shape
    channels = start_states.shape[2]
    grid = (chunk_size, num_chunks, batch)
    state = start_states
    states = []
    for decay, state_input in zip(decay_rows, input_rows):
        state = torch.addcmul(state_input, decay, state)
        states.append(state)
    all_states = torch.stack(states, dim=0).view(*grid, groups_out, channels // groups_out, state_size)
    output = torch.matmul(all_states, output_matrix_t.unsqueeze(-1))  # [T, c, B, G_c, D / G_c, 1]
    output = output.view(chunk_size, num_chunks, batch, channels)
    return output.permute(2, 3, 1, 0).reshape(batch, channels, num_chunks * chunk_size)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """``autocast(enabled=False)``, or nothing for device types without autocast (e.g. meta)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _default_chunk_size(length: int) -> int:
    if length <= MIN_CHUNK_SIZE:
        return max(length, 1)
    return int(min(MAX_CHUNK_SIZE, max(MIN_CHUNK_SIZE, 2 ** round(math.log2(math.sqrt(length))))))


def _grouped(matrix: torch.Tensor) -> torch.Tensor:
    """``[B, N, L]`` -> ``[B, 1, N, L]``; ``[B, G, N, L]`` unchanged."""
    return matrix.unsqueeze(1) if matrix.dim() == 3 else matrix


def _time_major(sequence: torch.Tensor, num_chunks: int, chunk_size: int) -> torch.Tensor:
    """``[B, *rest, c * T]`` -> contiguous ``[T, c, B, *rest]``."""
    leading = sequence.shape[:-1]
    chunked = sequence.reshape(*leading, num_chunks, chunk_size)
    order = (chunked.dim() - 1, chunked.dim() - 2, *range(len(leading)))
    return chunked.permute(order).contiguous()


def _check_shapes(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> tuple[int, int, int]:
    """Validate the argument shapes; return ``(batch, channels, length)``."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be [B, D, L], got shape {tuple(u.shape)}")
    batch, channels, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective_scan: delta shape {tuple(delta.shape)} differs from u shape {tuple(u.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"selective_scan: z shape {tuple(z.shape)} differs from u shape {tuple(u.shape)}")
    if A.is_complex():
        raise ValueError("selective_scan: complex A is not supported by the PyTorch scan; pass a real [D, N] A")
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"selective_scan: A must be [D, N] with D = {channels}, got shape {tuple(A.shape)}")
    state_size = A.shape[1]
    for name, matrix in (("B", B), ("C", C)):
        if matrix.dim() == 3:
            expected = (batch, state_size, length)
            actual = tuple(matrix.shape)
        elif matrix.dim() == 4:
            groups = matrix.shape[1]
            if groups == 0 or channels % groups:
                raise ValueError(
                    f"selective_scan: {name} has {groups} groups, which does not divide D = {channels}"
                )
            expected = (batch, groups, state_size, length)
            actual = tuple(matrix.shape)
        else:
            raise ValueError(
                f"selective_scan: {name} must be [B, N, L] or [B, G, N, L] (input-dependent); got shape "
                f"{tuple(matrix.shape)}. The time-invariant [D, N] form is not supported by the PyTorch scan"
            )
        if actual != expected:
            raise ValueError(f"selective_scan: {name} must have shape {expected}, got {actual}")
    for name, vector in (("D", D), ("delta_bias", delta_bias)):
        if vector is not None and tuple(vector.shape) != (channels,):
            raise ValueError(f"selective_scan: {name} must be [D] = ({channels},), got {tuple(vector.shape)}")
    return batch, channels, length
