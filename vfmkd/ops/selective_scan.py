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

The PyTorch path never loops over the sequence length. It cuts the sequence into chunks
of ``T`` steps and works on all chunks at once:

1. Chunk summaries in log space: with ``S_t`` the cumulative sum of ``delta * A`` inside a
   chunk, the state a chunk produces from a zero start is ``sum_s exp(S_T - S_s) deltaB_u_s``
   and its total decay is ``exp(S_T)``. Differences of cumulative sums within one chunk
   are never positive (``delta >= 0``, ``A <= 0``), so nothing overflows, and they stay
   small enough in float32 that no precision is lost to cancellation.
2. A loop over the ``L / T`` chunks carries the state from chunk to chunk (tensors of
   ``[B, D, N]`` per step).
3. A loop over the ``T`` positions of a chunk, run for every chunk in parallel from its
   carried state, gives the outputs; it multiplies decays no larger than one, exactly as
   the sequential recurrence does.

So the Python loops run ``T + L / T`` times (``T`` near ``sqrt(L)`` by default) instead of
``L`` times, all arithmetic is float32, and autograd gives the gradients.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["selective_scan", "selective_scan_chunked"]

logger = logging.getLogger(__name__)

MIN_CHUNK_SIZE = 8
MAX_CHUNK_SIZE = 128

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
) -> ScanResult:
    """The selective scan in PyTorch, chunked (see the module docstring); any device.

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
        chunk_size: Steps per chunk; default a power of two near ``sqrt(L)`` within
            ``[8, 128]`` (``L`` itself when shorter). Results do not depend on it beyond float32 rounding.

    Returns:
        ``[B, D, L]`` output in ``u``'s dtype, and with ``return_last_state`` also the
        ``[B, D, N]`` float32 last state.
    """
    batch, channels, length = _check_shapes(u, delta, A, B, C, D, z, delta_bias)
    state_size = A.shape[1]
    if chunk_size is None:
        chunk_size = _default_chunk_size(length)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    num_chunks = max(1, math.ceil(length / chunk_size))
    padding = num_chunks * chunk_size - length

    input_float = u.float()
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

    # Time-major layout [T, chunks, B, D, N]: each step of the loops below reads one
    # contiguous slab, and unbind (whose backward is a single stack) splits them.
    step_t = _time_major(step, num_chunks, chunk_size)  # [T, c, B, D]
    stepped_input_t = _time_major(stepped_input, num_chunks, chunk_size)  # [T, c, B, D]
    input_matrix_t = _time_major(input_matrix, num_chunks, chunk_size)  # [T, c, B, G_b, N]
    output_matrix_t = _time_major(output_matrix, num_chunks, chunk_size)  # [T, c, B, G_c, N]
    groups_in, groups_out = input_matrix_t.shape[3], output_matrix_t.shape[3]
    grid = (chunk_size, num_chunks, batch)

    log_decay = step_t.unsqueeze(-1) * A.float()  # [T, c, B, D, N]
    state_inputs = (
        stepped_input_t.view(*grid, groups_in, channels // groups_in, 1) * input_matrix_t.unsqueeze(-2)
    ).view(*grid, channels, state_size)  # [T, c, B, D, N]

    # 1. What each chunk adds to the state, and how much it decays a state passing through.
    cumulative_log_decay = torch.cumsum(log_decay, dim=0)
    chunk_end_log_decay = cumulative_log_decay[-1]  # [c, B, D, N]
    chunk_states = (torch.exp(chunk_end_log_decay - cumulative_log_decay) * state_inputs).sum(dim=0)
    chunk_decays = torch.exp(chunk_end_log_decay)

    # 2. Carry the state across chunks.
    start_states = [torch.zeros_like(chunk_states[0])]
    for chunk_decay, chunk_state in zip(chunk_decays.unbind(0)[:-1], chunk_states.unbind(0)[:-1]):
        start_states.append(chunk_decay * start_states[-1] + chunk_state)
    state = torch.stack(start_states, dim=0)  # [c, B, D, N]

    # 3. Every chunk in parallel from its start state, one position at a time.
    outputs = []
    output_view = (num_chunks, batch, groups_out, channels // groups_out, state_size)
    for decay, state_input, output_row in zip(
        torch.exp(log_decay).unbind(0), state_inputs.unbind(0), output_matrix_t.unbind(0)
    ):
        state = decay * state + state_input
        outputs.append(torch.matmul(state.view(output_view), output_row.unsqueeze(-1)))  # [c, B, G_c, D / G_c, 1]
    output = torch.stack(outputs, dim=0).view(chunk_size, num_chunks, batch, channels)
    output = output.permute(2, 3, 1, 0).reshape(batch, channels, num_chunks * chunk_size)[..., :length]

    if D is not None:
        output = output + input_float * D.float()[:, None]
    if z is not None:
        output = output * F.silu(z.float())
    output = output.to(u.dtype)
    if return_last_state:
        return output, state[-1]
    return output


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
