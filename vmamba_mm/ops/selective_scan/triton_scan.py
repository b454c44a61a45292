"""Triton backend of the selective scan: forward and backward kernels and their host launchers.

This module imports Triton at import time, so the package imports it lazily (only when the
"triton" backend is used). Without a GPU it runs under ``TRITON_INTERPRET=1``.

Math (see ``naive.py``), per batch b, channel c in group k = c // D_per_group, state n, time t:

    delta_t = softplus(delta[c, t] + delta_bias[c]),   a_t = exp(delta_t * A[c, n])
    h_t     = a_t * h_{t-1} + b_t,                      b_t = delta_t * B[k, n, t] * u[c, t]
    y_t     = sum_n C[k, n, t] * h_t + D[c] * u[c, t]

Design
------
* Work split. One program owns a block of ``BLOCK_C`` channels of one group (so all of them read
  the same B[n, t] and C[n, t] vectors) times all ``N`` states (padded to ``NP``, a power of two,
  with masks), and walks time sequentially through chunks of ``chunk`` steps (a power of two
  passed as a runtime int). The state is a [BLOCK_C, NP] fp32 register tile; each step loads
  one time column of u, delta, B, C. L, H and W are never compile-time constants; only block
  sizes, NP and feature flags are.
* Checkpoints. The forward stores the state at the start of every chunk,
  ``h_ckpt[batch, K*D, N, n_chunks]`` (fp32, ``chunk`` times smaller than the full state); it
  is the only tensor saved for the backward. The backward recovers the chunk size from
  ``n_chunks``: ``next_pow2(ceil(L / n_chunks))`` is the only power-of-two chunk with that count.
* Two schedules, chosen by a host heuristic from the number of (batch, group, channel-block)
  tiles (no autotuning: it needs a GPU):
  - sequential: when those tiles already fill the GPU (and in the interpreter), one program walks
    all chunks of its channels, carrying the state in registers and writing each chunk-start
    checkpoint on the way: one read of the inputs.
  - chunk-parallel (batch 1, long sequences): (1) ``_chunk_local_kernel`` computes each chunk's
    end state from a zero start and the chunk's summed delta, in parallel over chunks;
    (2) ``_propagate_kernel`` walks the chunks once per channel,
    h_start[j+1] = exp(A * sum(delta over chunk j)) * h_start[j] + local_end[j];
    (3) the output kernel restarts every chunk from its checkpoint, in parallel over chunks.
* Backward. The state gradient g_t = dL/dh_t = a_{t+1} g_{t+1} + dy_t C_t runs backwards in time.
  Its carry into each chunk from the right comes from the same two schedules (the chunk-local
  kernel in reverse mode plus the propagation kernel, or one program walking its chunks in
  reverse). Inside a chunk the backward kernel recomputes the forward from the chunk's
  checkpoint into a per-program workspace (chunk x BLOCK_C x NP fp32; the grid is persistent
  and capped, so the workspace does not grow with L or batch) and then walks the chunk
  backwards. dA and d(delta) need a_t * h_{t-1}, taken as h_t - b_t: the kernels never divide
  by the decay, which underflows to 0 for strongly negative A.
* Reductions. dB and dC are shared by the channels of a group: each program sums over its channel
  block in registers and writes an fp32 partial per channel block ([batch, K, n_cblk, N, L]);
  torch sums the partials (deterministic, no atomics). dA, dD and d(delta_bias) are accumulated
  in fp32 registers and written as per-(batch, segment) partials, summed the same way.
* Numerics. All math in fp32 whatever the input dtype; softplus with threshold 20 written with
  tl.exp/tl.log (libdevice does not run in the interpreter); int64 offsets wherever channel * L
  or state * L products can pass 2**31; masks on channels, states and steps past L.
"""

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..triton_launch import next_pow2, num_sms, on_device

__all__ = ["triton_scan_forward", "triton_scan_backward", "triton_scan_forward_fake"]

DEFAULT_CHUNK = 64


@triton.jit
def _add(a, b):
    return a + b


# tl.sum is itself a @triton.jit function, and every such call costs the interpreter a full
# re-patch of triton.language; tl.reduce with Triton's own sum combiner is the same reduction
# (compiled identically on GPU) and runs as one NumPy sum in the interpreter.
_SUM = getattr(getattr(tl, "standard", None), "_sum_combine", None) or _add


@triton.jit
def _tile_coords(pid, K, n_cblk, n_seg):
    seg = pid % n_seg
    rest = pid // n_seg
    cblk = rest % n_cblk
    rest = rest // n_cblk
    k = rest % K
    b = rest // K
    return b, k, cblk, seg


# The per-step bodies below are written out in every kernel rather than shared through nested
# @triton.jit helpers: the interpreter re-patches the language on every helper call, which
# dominated its run time. The recurring pieces are:
#   v  = delta + bias;  dt = v <= 20 ? log(1 + exp(v)) : v  (softplus, fp32);
#   dt = 0 on masked lanes and steps, so they leave the recurrences alone (a_t = 1, b_t = 0).
# Loop trip counts never depend on program_id (the interpreter rejects that): every chunk loop
# runs `chunk` steps and masks the ones past L.


@triton.jit
def _chunk_local_kernel(
    x_ptr, delta_ptr, A_ptr, M_ptr, bias_ptr, loc_ptr, dsum_ptr,
    L, CH, Dg, K, N, n_chunks, chunk, n_cblk,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, REVERSE: tl.constexpr,
    BLOCK_C: tl.constexpr, NP: tl.constexpr,
):
    """End state of one chunk started from zero, and the chunk's summed delta.

    Forward (REVERSE=False): x = u, M = B, acc = a_t * acc + delta_t * u_t * B_t over the chunk.
    Reverse (REVERSE=True): x = dy, M = C, acc = a_t * (acc + dy_t * C_t) from the chunk end down
    to its start, i.e. the chunk's contribution to a_{t0} * g_{t0}.
    """
    pid = tl.program_id(0)
    b, k, cblk, j = _tile_coords(pid, K, n_cblk, n_chunks)
    d = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = d < Dg
    c = k * Dg + d
    n = tl.arange(0, NP)
    nmask = n < N
    mask2 = cmask[:, None] & nmask[None, :]

    row = (b * CH + c).to(tl.int64) * L  # [BLOCK_C]
    mrow = ((b * K + k) * N + n).to(tl.int64) * L  # [NP]
    A = tl.load(A_ptr + c[:, None].to(tl.int64) * N + n[None, :], mask=mask2, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=cmask, other=0.0)

    t0 = j * chunk
    acc = tl.zeros([BLOCK_C, NP], dtype=tl.float32)
    dsum = tl.zeros([BLOCK_C], dtype=tl.float32)
    for i in range(0, chunk):
        if REVERSE:
            t = t0 + chunk - 1 - i
        else:
            t = t0 + i
        ok = t < L
        m = cmask & ok
        mn = nmask & ok
        ot = row + t
        v = tl.load(delta_ptr + ot, mask=m, other=0.0).to(tl.float32)
        if HAS_BIAS:
            v += bias
        if SOFTPLUS:
            v = tl.where(v <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))), v)
        dt = tl.where(m, v, 0.0)
        x = tl.load(x_ptr + ot, mask=m, other=0.0).to(tl.float32)
        mv = tl.load(M_ptr + mrow + t, mask=mn, other=0.0).to(tl.float32)
        a = tl.exp(dt[:, None] * A)
        if REVERSE:
            acc = a * (acc + x[:, None] * mv[None, :])
        else:
            acc = a * acc + (dt * x)[:, None] * mv[None, :]
        dsum += dt

    out = ((b * CH + c)[:, None].to(tl.int64) * N + n[None, :]) * n_chunks + j
    tl.store(loc_ptr + out, acc, mask=mask2)
    tl.store(dsum_ptr + (b * CH + c).to(tl.int64) * n_chunks + j, dsum, mask=cmask)


@triton.jit
def _propagate_kernel(
    loc_ptr, dsum_ptr, A_ptr, out_ptr, CH, N, n_chunks,
    REVERSE: tl.constexpr, BLOCK_C: tl.constexpr, NP: tl.constexpr,
):
    """Carries chunk end states across chunks: out[j] = state entering chunk j.

    Forward: out[0] = 0, out[j+1] = exp(A * dsum[j]) * out[j] + loc[j].
    Reverse: out[n-1] = 0, out[j-1] = exp(A * dsum[j]) * out[j] + loc[j].
    """
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < CH
    n = tl.arange(0, NP)
    nmask = n < N
    mask2 = cmask[:, None] & nmask[None, :]
    A = tl.load(A_ptr + c[:, None].to(tl.int64) * N + n[None, :], mask=mask2, other=0.0)
    base = ((b * CH + c)[:, None].to(tl.int64) * N + n[None, :]) * n_chunks  # [BLOCK_C, NP]
    dbase = (b * CH + c).to(tl.int64) * n_chunks  # [BLOCK_C]
    state = tl.zeros([BLOCK_C, NP], dtype=tl.float32)
    for i in range(0, n_chunks):
        if REVERSE:
            j = n_chunks - 1 - i
        else:
            j = i
        tl.store(out_ptr + base + j, state, mask=mask2)
        dsum = tl.load(dsum_ptr + dbase + j, mask=cmask, other=0.0)
        loc = tl.load(loc_ptr + base + j, mask=mask2, other=0.0)
        state = tl.exp(dsum[:, None] * A) * state + loc


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, hck_ptr,
    L, CH, Dg, K, N, n_chunks, chunk, chunks_per_prog, n_cblk, n_seg,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    FROM_CKPT: tl.constexpr, BLOCK_C: tl.constexpr, NP: tl.constexpr,
):
    """Outputs y for a segment of consecutive chunks (one chunk, or all of them).

    FROM_CKPT: the segment starts from h_ckpt (filled by the propagation kernel); otherwise it
    starts from zero and writes the checkpoint at every chunk start it passes.
    """
    pid = tl.program_id(0)
    b, k, cblk, seg = _tile_coords(pid, K, n_cblk, n_seg)
    d = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = d < Dg
    c = k * Dg + d
    n = tl.arange(0, NP)
    nmask = n < N
    mask2 = cmask[:, None] & nmask[None, :]

    row = (b * CH + c).to(tl.int64) * L
    mrow = ((b * K + k) * N + n).to(tl.int64) * L
    A = tl.load(A_ptr + c[:, None].to(tl.int64) * N + n[None, :], mask=mask2, other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=cmask, other=0.0)
    if HAS_D:
        Dv = tl.load(D_ptr + c, mask=cmask, other=0.0)
    ck = ((b * CH + c)[:, None].to(tl.int64) * N + n[None, :]) * n_chunks

    j_first = seg * chunks_per_prog
    if FROM_CKPT:
        h = tl.load(hck_ptr + ck + j_first, mask=mask2, other=0.0)
    else:
        h = tl.zeros([BLOCK_C, NP], dtype=tl.float32)
    for jj in range(0, chunks_per_prog):
        j = j_first + jj
        if not FROM_CKPT:
            tl.store(hck_ptr + ck + j, h, mask=mask2)
        t0 = j * chunk
        for i in range(0, chunk):
            t = t0 + i
            ok = t < L
            m = cmask & ok
            mn = nmask & ok
            ot = row + t
            om = mrow + t
            v = tl.load(delta_ptr + ot, mask=m, other=0.0).to(tl.float32)
            if HAS_BIAS:
                v += bias
            if SOFTPLUS:
                v = tl.where(v <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))), v)
            dt = tl.where(m, v, 0.0)
            uu = tl.load(u_ptr + ot, mask=m, other=0.0).to(tl.float32)
            Bt = tl.load(B_ptr + om, mask=mn, other=0.0).to(tl.float32)
            Ct = tl.load(C_ptr + om, mask=mn, other=0.0).to(tl.float32)
            h = tl.exp(dt[:, None] * A) * h + (dt * uu)[:, None] * Bt[None, :]
            y = tl.reduce(h * Ct[None, :], 1, _SUM)
            if HAS_D:
                y += Dv * uu
            tl.store(y_ptr + ot, y, mask=m)


@triton.jit
def _scan_bwd_kernel(
    dy_ptr, u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, hck_ptr, gck_ptr, ws_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    L, CH, Dg, K, N, n_chunks, chunk, chunks_per_prog, n_cblk, n_seg, n_work, n_iter,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_GCK: tl.constexpr, BLOCK_C: tl.constexpr, NP: tl.constexpr,
):
    """Gradients for a segment of consecutive chunks, walked from the last chunk to the first.

    Persistent: program p handles work items p, p + nprog, ... (n_iter of them, the last ones
    masked when past n_work) and owns workspace slot p, which holds the recomputed states h_t of
    the chunk being processed ([chunk, BLOCK_C, NP] fp32).
    HAS_GCK: the carry a_{t1} * g_{t1} into the segment's last chunk comes from gck (filled by the
    propagation kernel); otherwise the segment ends at L and the carry starts at zero.
    """
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    n = tl.arange(0, NP)
    nmask = n < N
    cl = tl.arange(0, BLOCK_C)
    # The workspace is private to this program and fully written before it is read: no masks.
    ws = ws_ptr + pid.to(tl.int64) * chunk * BLOCK_C * NP + (cl[:, None] * NP + n[None, :])
    for it in range(0, n_iter):
        w = pid + it * nprog
        live = w < n_work
        b, k, cblk, seg = _tile_coords(w, K, n_cblk, n_seg)
        d = cblk * BLOCK_C + cl
        cmask = (d < Dg) & live
        nmask_w = nmask & live
        c = k * Dg + d
        mask2 = cmask[:, None] & nmask[None, :]
        row = (b * CH + c).to(tl.int64) * L
        mrow = ((b * K + k) * N + n).to(tl.int64) * L
        # dB/dC partials: [batch, K, n_cblk, N, L]
        prow = (((b * K + k) * n_cblk + cblk) * N + n).to(tl.int64) * L
        A = tl.load(A_ptr + c[:, None].to(tl.int64) * N + n[None, :], mask=mask2, other=0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + c, mask=cmask, other=0.0)
        if HAS_D:
            Dv = tl.load(D_ptr + c, mask=cmask, other=0.0)
        ck = ((b * CH + c)[:, None].to(tl.int64) * N + n[None, :]) * n_chunks

        j_last = seg * chunks_per_prog + chunks_per_prog - 1
        if HAS_GCK:
            g_next = tl.load(gck_ptr + ck + j_last, mask=mask2, other=0.0)
        else:
            g_next = tl.zeros([BLOCK_C, NP], dtype=tl.float32)
        dA_acc = tl.zeros([BLOCK_C, NP], dtype=tl.float32)
        dD_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for jj in range(0, chunks_per_prog):
            j = j_last - jj
            t0 = j * chunk
            # Recompute the chunk's states from its checkpoint.
            h = tl.load(hck_ptr + ck + j, mask=mask2, other=0.0)
            for i in range(0, chunk):
                t = t0 + i
                ok = t < L
                m = cmask & ok
                ot = row + t
                v = tl.load(delta_ptr + ot, mask=m, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    v += bias
                if SOFTPLUS:
                    v = tl.where(v <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))), v)
                dt = tl.where(m, v, 0.0)
                uu = tl.load(u_ptr + ot, mask=m, other=0.0).to(tl.float32)
                Bt = tl.load(B_ptr + mrow + t, mask=nmask_w & ok, other=0.0).to(tl.float32)
                h = tl.exp(dt[:, None] * A) * h + (dt * uu)[:, None] * Bt[None, :]
                tl.store(ws + i * (BLOCK_C * NP), h)
            # Other threads of this program read what was just written.
            tl.debug_barrier()
            # Walk the chunk backwards; steps past L come first, while g is still zero.
            for i in range(0, chunk):
                t = t0 + chunk - 1 - i
                ok = t < L
                m = cmask & ok
                mn = nmask_w & ok
                ot = row + t
                om = mrow + t
                v = tl.load(delta_ptr + ot, mask=m, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    v += bias
                if SOFTPLUS:
                    e = tl.exp(tl.minimum(v, 20.0))
                    dt = tl.where(v <= 20.0, tl.log(1.0 + e), v)
                    dsp = tl.where(v <= 20.0, e / (1.0 + e), 1.0)
                else:
                    dt = v
                dt = tl.where(m, dt, 0.0)
                uu = tl.load(u_ptr + ot, mask=m, other=0.0).to(tl.float32)
                gy = tl.load(dy_ptr + ot, mask=m, other=0.0)
                Bt = tl.load(B_ptr + om, mask=mn, other=0.0).to(tl.float32)[None, :]
                Ct = tl.load(C_ptr + om, mask=mn, other=0.0).to(tl.float32)[None, :]
                h = tl.load(ws + (chunk - 1 - i) * (BLOCK_C * NP))
                dt2 = dt[:, None]
                g = g_next + gy[:, None] * Ct
                dtu = (dt * uu)[:, None]
                # a_t * h_{t-1} without dividing by a_t.
                ah_prev = h - dtu * Bt
                gB = tl.reduce(g * Bt, 1, _SUM)
                du = dt * gB
                if HAS_D:
                    du += Dv * gy
                    dD_acc += gy * uu
                ddt = tl.reduce(g * A * ah_prev, 1, _SUM) + gB * uu
                dA_acc += g * ah_prev * dt2
                if SOFTPLUS:
                    ddt = ddt * dsp
                if HAS_BIAS:
                    dbias_acc += ddt
                tl.store(du_ptr + ot, du.to(du_ptr.dtype.element_ty), mask=m)
                tl.store(ddelta_ptr + ot, ddt.to(ddelta_ptr.dtype.element_ty), mask=m)
                tl.store(dB_ptr + prow + t, tl.reduce(g * dtu, 0, _SUM), mask=mn)
                tl.store(dC_ptr + prow + t, tl.reduce(h * gy[:, None], 0, _SUM), mask=mn)
                g_next = tl.exp(dt2 * A) * g
            # The next chunk overwrites the workspace: wait until every thread has read it.
            tl.debug_barrier()
        # Partials of dA/dD/d(delta_bias): [batch, n_seg, K*D(, N)]
        srow = (b * n_seg + seg).to(tl.int64) * CH + c
        tl.store(dA_ptr + srow[:, None] * N + n[None, :], dA_acc, mask=mask2)
        if HAS_D:
            tl.store(dD_ptr + srow, dD_acc, mask=cmask)
        if HAS_BIAS:
            tl.store(dbias_ptr + srow, dbias_acc, mask=cmask)


def _block_channels(d_group: int, n_pad: int) -> int:
    # At most 256 fp32 state values and 32 channels per program: the time loop is latency-bound,
    # so many small programs (more chunks and channel blocks in flight) beat few wide ones.
    return max(1, min(next_pow2(d_group), 32, 256 // n_pad))


def _num_warps(block_c: int, n_pad: int) -> int:
    # One warp per 64 state values, so small tiles do not leave threads holding copies.
    return max(1, min(4, (block_c * n_pad) // 64))


def _use_chunk_parallel(tiles: int, n_chunks: int, device: torch.device) -> bool:
    sms = num_sms(device)
    if sms is None or n_chunks == 1:
        # The interpreter runs programs one by one: fewer launches beat parallelism there.
        return False
    return tiles < 2 * sms


def _chunk_for(length: int, chunk_size: Optional[int]) -> int:
    chunk = DEFAULT_CHUNK if chunk_size is None else int(chunk_size)
    if chunk < 1 or chunk & (chunk - 1):
        raise ValueError(f"chunk_size must be a positive power of two, got {chunk_size}.")
    # A sequence shorter than one chunk gets a chunk just long enough: the kernels run `chunk`
    # (masked) steps per chunk whatever L is.
    return min(chunk, next_pow2(max(length, 1)))


def _geometry(u: torch.Tensor, A: torch.Tensor, B: torch.Tensor, block_channels: Optional[int]):
    batch, channels, length = u.shape
    groups, d_state = B.shape[1], A.shape[1]
    if channels % groups:
        raise ValueError(
            f"u has {channels} channels, which is not a multiple of the {groups} groups of B/C."
        )
    d_group = channels // groups
    n_pad = next_pow2(d_state)
    if block_channels is None:
        block_c = _block_channels(d_group, n_pad)
    elif block_channels < 1 or block_channels & (block_channels - 1):
        raise ValueError(f"block_channels must be a power of two, got {block_channels}.")
    else:
        block_c = int(block_channels)
    return batch, channels, length, groups, d_state, d_group, n_pad, block_c


def _opt(t: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    return like if t is None else t.contiguous().float()


def triton_scan_forward_fake(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    *,
    chunk_size: Optional[int] = None,
) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Shape-only twin of ``triton_scan_forward`` for fake/meta tensors (torch.library).

    Returns:
        (y, saved): empty fp32 tensors with the shapes and devices ``triton_scan_forward`` returns:
        y [batch, K*D, L] and saved = (h_ckpt [batch, K*D, N, n_chunks],).
    """
    batch, channels, length = u.shape
    chunk = _chunk_for(length, chunk_size)
    n_chunks = max(1, -(-length // chunk))
    y = u.new_empty((batch, channels, length), dtype=torch.float32)
    h_ckpt = u.new_empty((batch, channels, A.shape[1], n_chunks), dtype=torch.float32)
    return y, (h_ckpt,)


def triton_scan_forward(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    delta_bias: Optional[torch.Tensor] = None,
    delta_softplus: bool = False,
    *,
    chunk_size: Optional[int] = None,
    chunk_parallel: Optional[bool] = None,
    block_channels: Optional[int] = None,
) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """Runs the selective scan forward with the Triton kernels.

    Args:
        u: input, [batch, K*D, L], fp32/bf16/fp16.
        delta: time steps before bias/softplus, [batch, K*D, L], fp32/bf16/fp16.
        A: decay rates (<= 0), [K*D, N] fp32.
        B: input projections, [batch, K, N, L]; channel c uses group c // D.
        C: output projections, [batch, K, N, L].
        D: skip weights, [K*D] fp32, or None.
        delta_bias: added to delta before the softplus, [K*D] fp32, or None.
        delta_softplus: apply softplus (threshold 20) to delta + delta_bias.
        chunk_size: time steps per checkpoint (a power of two); default 64.
        chunk_parallel: force (True) or forbid (False) the chunk-parallel schedule; default: a
            heuristic on the GPU's size, sequential in the interpreter.
        block_channels: channels per program (a power of two); default: about 256 // N.

    Returns:
        (y, saved): y fp32 [batch, K*D, L]; saved = (h_ckpt,), the fp32 states at every chunk
        start [batch, K*D, N, n_chunks], to be passed back to ``triton_scan_backward``.
    """
    batch, channels, length, groups, d_state, d_group, n_pad, block_c = _geometry(
        u, A, B, block_channels
    )
    chunk = _chunk_for(length, chunk_size)
    n_chunks = max(1, triton.cdiv(length, chunk))
    u, delta = u.contiguous(), delta.contiguous()
    A, B, C = A.contiguous().float(), B.contiguous(), C.contiguous()
    D_, bias_ = _opt(D, A), _opt(delta_bias, A)

    y = torch.empty((batch, channels, length), device=u.device, dtype=torch.float32)
    h_ckpt = torch.empty(
        (batch, channels, d_state, n_chunks), device=u.device, dtype=torch.float32
    )
    if length == 0:
        h_ckpt.zero_()
        return y, (h_ckpt,)
    n_cblk = triton.cdiv(d_group, block_c)
    tiles = batch * groups * n_cblk
    if chunk_parallel is None:
        chunk_parallel = _use_chunk_parallel(tiles, n_chunks, u.device)
    chunk_parallel = bool(chunk_parallel) and n_chunks > 1
    with on_device(u.device):
        _launch_forward(
            u, delta, A, B, C, D_, bias_, y, h_ckpt, length, channels, d_group, groups, d_state,
            n_chunks, chunk, n_cblk, tiles, block_c, n_pad, chunk_parallel,
            has_d=D is not None, has_bias=delta_bias is not None, softplus=bool(delta_softplus),
        )
    return y, (h_ckpt,)


def _launch_forward(
    u, delta, A, B, C, D_, bias_, y, h_ckpt, length, channels, d_group, groups, d_state,
    n_chunks, chunk, n_cblk, tiles, block_c, n_pad, chunk_parallel, has_d, has_bias, softplus,
) -> None:
    batch = u.shape[0]
    flags = dict(HAS_BIAS=has_bias, SOFTPLUS=softplus)
    warps = _num_warps(block_c, n_pad)
    if chunk_parallel:
        loc = torch.empty_like(h_ckpt)
        dsum = torch.empty((batch, channels, n_chunks), device=u.device, dtype=torch.float32)
        _chunk_local_kernel[(tiles * n_chunks,)](
            u, delta, A, B, bias_, loc, dsum,
            length, channels, d_group, groups, d_state, n_chunks, chunk, n_cblk,
            REVERSE=False, BLOCK_C=block_c, NP=n_pad, num_warps=warps, **flags,
        )
        block_p = _block_channels(channels, n_pad)
        _propagate_kernel[(batch, triton.cdiv(channels, block_p))](
            loc, dsum, A, h_ckpt, channels, d_state, n_chunks,
            REVERSE=False, BLOCK_C=block_p, NP=n_pad,
        )
        chunks_per_prog = 1
    else:
        chunks_per_prog = n_chunks
    n_seg = triton.cdiv(n_chunks, chunks_per_prog)
    _scan_fwd_kernel[(tiles * n_seg,)](
        u, delta, A, B, C, D_, bias_, y, h_ckpt,
        length, channels, d_group, groups, d_state, n_chunks, chunk, chunks_per_prog,
        n_cblk, n_seg,
        HAS_D=has_d, FROM_CKPT=chunk_parallel, BLOCK_C=block_c, NP=n_pad,
        num_warps=warps, **flags,
    )


def triton_scan_backward(
    dy: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor],
    delta_bias: Optional[torch.Tensor],
    delta_softplus: bool,
    *saved: torch.Tensor,
    chunk_parallel: Optional[bool] = None,
    max_programs: Optional[int] = None,
    block_channels: Optional[int] = None,
) -> Tuple[Optional[torch.Tensor], ...]:
    """Gradients of the selective scan with the Triton kernels.

    Args:
        dy: gradient of y, [batch, K*D, L].
        u, delta, A, B, C, D, delta_bias, delta_softplus: the forward's inputs (see
            ``triton_scan_forward``).
        *saved: what ``triton_scan_forward`` returned as ``saved`` (h_ckpt).
        chunk_parallel: force or forbid the chunk-parallel schedule (default: heuristic).
        max_programs: cap on the persistent grid (default: 8 per SM on a GPU, 2 in the
            interpreter); each program owns a chunk x BLOCK_C x N fp32 workspace.
        block_channels: channels per program (need not match the forward's).

    Returns:
        (du, ddelta, dA, dB, dC, dD, ddelta_bias): du/ddelta in u's/delta's dtype [batch, K*D, L];
        dA fp32 [K*D, N]; dB/dC in B's/C's dtype [batch, K, N, L]; dD, ddelta_bias fp32 [K*D], or
        None when D / delta_bias is None.
    """
    if len(saved) != 1:
        raise ValueError(
            "triton_scan_backward expects the one tensor triton_scan_forward saved, "
            f"got {len(saved)}; pass the `saved` tuple of the matching forward."
        )
    (h_ckpt,) = saved
    batch, channels, length, groups, d_state, d_group, n_pad, block_c = _geometry(
        u, A, B, block_channels
    )
    n_chunks = h_ckpt.shape[-1]
    # The unique power-of-two chunk size that splits L into n_chunks chunks.
    chunk = next_pow2(max(1, triton.cdiv(length, n_chunks)))
    dev = u.device
    u_dtype, delta_dtype, B_dtype, C_dtype = u.dtype, delta.dtype, B.dtype, C.dtype
    dy = dy.contiguous().float()
    u, delta = u.contiguous(), delta.contiguous()
    A, B, C = A.contiguous().float(), B.contiguous(), C.contiguous()
    h_ckpt = h_ckpt.contiguous()
    D_, bias_ = _opt(D, A), _opt(delta_bias, A)

    n_cblk = triton.cdiv(d_group, block_c)
    tiles = batch * groups * n_cblk
    if chunk_parallel is None:
        chunk_parallel = _use_chunk_parallel(tiles, n_chunks, dev)
    chunk_parallel = bool(chunk_parallel) and n_chunks > 1
    flags = dict(HAS_BIAS=delta_bias is not None, SOFTPLUS=bool(delta_softplus))
    warps = _num_warps(block_c, n_pad)
    f32 = dict(device=dev, dtype=torch.float32)

    with on_device(dev):
        if chunk_parallel:
            loc = torch.empty_like(h_ckpt)
            dsum = torch.empty((batch, channels, n_chunks), **f32)
            _chunk_local_kernel[(tiles * n_chunks,)](
                dy, delta, A, C, bias_, loc, dsum,
                length, channels, d_group, groups, d_state, n_chunks, chunk, n_cblk,
                REVERSE=True, BLOCK_C=block_c, NP=n_pad, num_warps=warps, **flags,
            )
            g_ckpt = torch.empty_like(h_ckpt)
            block_p = _block_channels(channels, n_pad)
            _propagate_kernel[(batch, triton.cdiv(channels, block_p))](
                loc, dsum, A, g_ckpt, channels, d_state, n_chunks,
                REVERSE=True, BLOCK_C=block_p, NP=n_pad,
            )
            chunks_per_prog = 1
        else:
            g_ckpt = h_ckpt  # not read
            chunks_per_prog = n_chunks
        n_seg = triton.cdiv(n_chunks, chunks_per_prog)
        n_work = tiles * n_seg
        if max_programs is None:
            sms = num_sms(dev)
            max_programs = 8 * sms if sms is not None else 2
        n_prog = max(1, min(n_work, max_programs))

        du = torch.empty((batch, channels, length), device=dev, dtype=u_dtype)
        ddelta = torch.empty((batch, channels, length), device=dev, dtype=delta_dtype)
        dA_part = torch.empty((batch, n_seg, channels, d_state), **f32)
        dD_part = torch.empty((batch, n_seg, channels), **f32)
        dbias_part = torch.empty((batch, n_seg, channels), **f32)
        dB_part = torch.empty((batch, groups, n_cblk, d_state, length), **f32)
        dC_part = torch.empty((batch, groups, n_cblk, d_state, length), **f32)
        workspace = torch.empty((n_prog, chunk, block_c, n_pad), **f32)
        if length > 0:
            _scan_bwd_kernel[(n_prog,)](
                dy, u, delta, A, B, C, D_, bias_, h_ckpt, g_ckpt, workspace,
                du, ddelta, dA_part, dD_part, dbias_part, dB_part, dC_part,
                length, channels, d_group, groups, d_state, n_chunks, chunk, chunks_per_prog,
                n_cblk, n_seg, n_work, triton.cdiv(n_work, n_prog),
                HAS_D=D is not None, HAS_GCK=chunk_parallel, BLOCK_C=block_c, NP=n_pad,
                num_warps=warps, **flags,
            )
        else:
            for t in (dA_part, dD_part, dbias_part):
                t.zero_()
    dA = dA_part.sum((0, 1))
    dB = dB_part.sum(2).to(B_dtype)
    dC = dC_part.sum(2).to(C_dtype)
    dD = dD_part.sum((0, 1)) if D is not None else None
    ddelta_bias = dbias_part.sum((0, 1)) if delta_bias is not None else None
    return du, ddelta, dA, dB, dC, dD, ddelta_bias
