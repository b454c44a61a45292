"""Triton kernels of the fused four-route scan (``ss2d_scan(..., backend="triton")``).

The host side (tile sizes, schedules, buffers) is in ``triton_ss2d.py``; the math is that of
``naive.py``. Every kernel works on *tiles*: a program owns ``BLOCK_C`` consecutive channels of one
route (or of several routes, one after the other: route groups, below) and walks the route
``T`` steps at a time. For each tile it
loads, for the ``T`` positions the route visits, the channel vectors of x, delta, dy ([T, BLOCK_C]
tiles whose rows are contiguous in the channel-last tensors: coalesced, whatever the route) and
the B/C vectors ([T, NP]), then solves the recurrence over the tile with an associative scan
instead of a step-by-step loop, so each tile's loads are all in flight at once.

Routes and positions (``routes.py``): the positions of an H x W image are numbered in two base
orders, row-major (q = h * W + w) and column-major (q = w * H + h). Route k walks base order k % 2,
forwards for k < 2 and backwards for k >= 2. Position chunk j holds the base indices
[j * T, j * T + T); a forward route meets the chunks in the order 0, 1, ..., a backward route in
the order n - 1, ..., 0, and inside a chunk it visits the base indices from the top. "Route chunk
r" is the r-th chunk a route meets; its checkpoint is the state entering it.

Route groups. The output kernels walk several routes per program, one after the other, and
add each route's y (or dx) to what the routes before it stored, in place: the sum over the routes
needs no atomics and has a fixed order. In the sequential schedule a program walks all four routes
of its channel block (``ROUTES_PER_PROGRAM = 4``, order 0, 2, 1, 3) and y is written once. The
chunk-parallel schedule splits the routes into chunks, and routes 0 and 1 meet different
positions in a chunk, so a program there walks a pair of routes o and o + 2
(``ROUTES_PER_PROGRAM = 2``), which visit the same positions; pair 0 (``GROUP = 0``) and pair 1
(``GROUP = 1``) run as two launches, and the second adds to what the first stored (the stream
orders them), so y is still written into one tensor without atomics.

Checkpoints. ``hck`` ([batch, 4, n_chunks - 1, D, N] fp32) holds the state entering route chunks
1 .. n - 1 (slot r - 1); the state entering route chunk 0 is zero and is not stored. The
chunk-parallel gradient carries (``gck``, same shape) hold the state gradient entering route
chunks 0 .. n - 2 (slot r); the last route chunk's is zero.

Scans. Forward state h_t = a_t h_{t-1} + b_t (a_t = exp(dt_t A), b_t = dt_t x_t B_t) is a
forward scan of (a, b) pairs. The backward state gradient g_t = c_t + a_{t+1} g_{t+1} (c_t = C_t
dy_t) runs the other way: the kernels flip the tile (``tl.flip``) and run a forward scan whose
elements carry the decay of the step before (``_grad_combine``), which keeps the combine's
argument order that of the forward scan (Triton's ``reverse=True`` scan has had operand-order
bugs with non-commutative combines). a_t h_{t-1} is taken as h_t - b_t, never by dividing by a_t,
which underflows to 0 for strongly negative A.

All math is fp32 whatever the input dtype; softplus has threshold 20. Offsets are int64. Masked
rows (past the end of the image) and channels get dt = 0, so they leave the recurrences alone.
"""

import triton
import triton.language as tl


@triton.jit
def _state_combine(a_left, h_left, a_right, h_right):
    """Composes two spans of h -> a h + b: the left span first."""
    return a_left * a_right, a_right * h_left + h_right


@triton.jit
def _grad_combine(last_left, before_left, g_left, last_right, before_right, g_right):
    """Composes two spans of the flipped gradient recurrence g_i = c_i + a_{i-1} g_{i-1}.

    A span keeps its last row's decay (``last``), the product of its other rows' decays
    (``before``) and its value ``g``; the left span comes first.
    """
    carry = before_right * last_left
    return last_right, carry * before_left, g_right + carry * g_left


@triton.jit
def _softplus(v):
    return tl.where(v <= 20.0, tl.log(1.0 + tl.exp(tl.minimum(v, 20.0))), v)


@triton.jit
def _last_row(tile, rows, T: tl.constexpr):
    """tile[T - 1] of a [T, ...] tile (a masked sum: rows are spread over threads)."""
    return tl.sum(tl.where(rows[:, None, None] == T - 1, tile, 0.0), 0)


@triton.jit
def _route_rows(r, n_chunks, L, FORWARD, T: tl.constexpr):
    """Base indices [T] visited by route chunk r, in the route's step order, and their mask."""
    i = tl.arange(0, T)
    q = tl.where(FORWARD, r * T + i, (n_chunks - 1 - r) * T + (T - 1 - i))
    return q, q < L


@triton.jit
def _position_offsets(q, ok, order, H, W, b_offset, stride_h, stride_w):
    """int64 element offsets [T] of the positions with base indices q in base order ``order``."""
    q = tl.where(ok, q, 0)
    h = tl.where(order == 0, q // W, q % H)
    w = tl.where(order == 0, q % W, q // H)
    return b_offset + h.to(tl.int64) * stride_h + w.to(tl.int64) * stride_w


@triton.jit
def _channels(cblk, BLOCK_C: tl.constexpr):
    d = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    return tl.max_contiguous(tl.multiple_of(d, BLOCK_C), BLOCK_C)


@triton.jit
def _load_tile(ptr, rows, cols, mask):
    """fp32 tile ptr[rows[:, None] + cols[None, :]]; rows int64 offsets, cols offsets."""
    return tl.load(ptr + rows[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _time_steps(delta_tile, bias, ok_tile, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """dt = softplus(delta + bias) (or delta + bias), 0 on masked entries; and d dt / d delta."""
    v = delta_tile
    if HAS_BIAS:
        v += bias[None, :]
    if SOFTPLUS:
        e = tl.exp(tl.minimum(v, 20.0))
        dt = tl.where(v <= 20.0, tl.log(1.0 + e), v)
        dsp = tl.where(v <= 20.0, e / (1.0 + e), 1.0)
    else:
        dt = v
        dsp = tl.full(v.shape, 1.0, tl.float32)
    return tl.where(ok_tile, dt, 0.0), dsp


@triton.jit
def _tile_states(dt, x, A, Bt, h_in):
    """States h [T, BLOCK_C, NP] of a tile entered with h_in [BLOCK_C, NP]; also a and b."""
    a = tl.exp(dt[:, :, None] * A[None, :, :])
    b = (dt * x)[:, :, None] * Bt[:, None, :]
    a_cum, h_local = tl.associative_scan((a, b), 0, _state_combine)
    return h_local + a_cum * h_in[None, :, :], a, b


@triton.jit
def _decode_tile(pid, n_cblk, n_seg):
    """(batch, channel block, segment) of an output-kernel program."""
    seg = pid % n_seg
    rest = pid // n_seg
    return rest // n_cblk, rest % n_cblk, seg


@triton.jit
def _group_route(o, i: tl.constexpr):
    """The i-th route a program of route group o walks: o, o + 2 (then 1, 3 for a group of four).

    A route and its reverse come one after the other: they visit the same positions chunk by
    chunk, and the backward route (i odd) meets the chunks from the last.
    """
    return o + 2 * (i % 2) + i // 2


@triton.jit
def _checkpoint(ptr, ck, slot, valid, DIM, N, mask):
    """The [BLOCK_C, NP] state in checkpoint ``slot`` (zeros where not ``valid``)."""
    slot = tl.maximum(slot, 0).to(tl.int64)
    return tl.load(ptr + ck + slot * DIM * N, mask=mask & valid, other=0.0)


@triton.jit
def _decode_route_chunk(pid, n_cblk, n_chunks):
    r = pid % n_chunks
    rest = pid // n_chunks
    cblk = rest % n_cblk
    rest = rest // n_cblk
    return rest // 4, rest % 4, cblk, r


@triton.jit
def _gather(ptr, q, ok, order, H, W, base, stride_h, stride_w, cols, col_mask):
    """fp32 tile [T, len(cols)]: row i is the vector at base index q[i] (base order ``order``)."""
    rows = _position_offsets(q, ok, order, H, W, base, stride_h, stride_w)
    return _load_tile(ptr, rows, cols, ok[:, None] & col_mask[None, :])


@triton.jit
def _route_params(A_ptr, D_ptr, bias_ptr, k, d, cmask, n, nmask, DIM, N,
                  HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Route k's A [BLOCK_C, NP], delta_bias [BLOCK_C] and D [BLOCK_C] (zeros when absent)."""
    c = k * DIM + d
    A = tl.load(A_ptr + c[:, None].to(tl.int64) * N + n[None, :],
                mask=cmask[:, None] & nmask[None, :], other=0.0)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + c, mask=cmask, other=0.0)
    else:
        bias = tl.zeros(d.shape, dtype=tl.float32)
    if HAS_D:
        Dv = tl.load(D_ptr + c, mask=cmask, other=0.0)
    else:
        Dv = tl.zeros(d.shape, dtype=tl.float32)
    return A, bias, Dv


@triton.jit
def ss2d_forward_kernel(
    x_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, y_ptr, hck_ptr,
    sx_b, sx_h, sx_w, sx_d,
    sd_b, sd_h, sd_w, sd_k, sd_d,
    sB_b, sB_h, sB_w, sB_k, sB_n,
    sC_b, sC_h, sC_w, sC_k, sC_n,
    H, W, L, DIM, N, n_chunks, chunks_per_prog, n_cblk, n_seg,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    FROM_CKPT: tl.constexpr, ROUTES_PER_PROGRAM: tl.constexpr, GROUP: tl.constexpr,
    T: tl.constexpr, BLOCK_C: tl.constexpr, NP: tl.constexpr,
):
    """y of a group of routes over a segment of position chunks.

    Program (batch, channel block, segment) walks the routes of group GROUP in turn
    (``_group_route``) over the segment's position chunks, adding each route's y to ``y_ptr``
    ([batch, H, W, DIM] fp32); only group 0's first route stores without adding.
    FROM_CKPT: every route chunk starts from its checkpoint (the chunk-parallel schedule, one
    chunk per segment); otherwise the walk starts from zero and writes the checkpoint of each
    route chunk it enters after the first. hck: [batch, 4, n_chunks - 1, DIM, N].
    """
    b, cblk, seg = _decode_tile(tl.program_id(0), n_cblk, n_seg)
    d = _channels(cblk, BLOCK_C)
    cmask = d < DIM
    n = tl.arange(0, NP)
    nmask = n < N
    rows = tl.arange(0, T)
    state_mask = cmask[:, None] & nmask[None, :]
    b64 = b.to(tl.int64)
    y_base = b64 * L * DIM
    for i in tl.static_range(ROUTES_PER_PROGRAM):
        k = _group_route(GROUP, i)
        order = k % 2
        A, bias, Dv = _route_params(A_ptr, D_ptr, bias_ptr, k, d, cmask, n, nmask, DIM, N,
                                    HAS_D, HAS_BIAS)
        ck = ((b64 * 4 + k) * (n_chunks - 1) * DIM + d[:, None]) * N + n[None, :]
        if i % 2 == 0:
            r_first = seg * chunks_per_prog
        else:
            r_first = n_chunks - (seg + 1) * chunks_per_prog
        if FROM_CKPT:
            h = _checkpoint(hck_ptr, ck, r_first - 1, r_first > 0, DIM, N, state_mask)
        else:
            h = tl.zeros([BLOCK_C, NP], dtype=tl.float32)
        for rr in range(0, chunks_per_prog):
            r = r_first + rr
            if not FROM_CKPT:
                tl.store(hck_ptr + ck + tl.maximum(r - 1, 0).to(tl.int64) * DIM * N, h,
                         mask=state_mask & (r > 0))
            q, ok = _route_rows(r, n_chunks, L, i % 2 == 0, T)
            x = _gather(x_ptr, q, ok, order, H, W, b64 * sx_b, sx_h, sx_w, d * sx_d, cmask)
            v = _gather(delta_ptr, q, ok, order, H, W, b64 * sd_b + k * sd_k, sd_h, sd_w,
                        d * sd_d, cmask)
            Bt = _gather(B_ptr, q, ok, order, H, W, b64 * sB_b + k * sB_k, sB_h, sB_w,
                         n * sB_n, nmask)
            Ct = _gather(C_ptr, q, ok, order, H, W, b64 * sC_b + k * sC_k, sC_h, sC_w,
                         n * sC_n, nmask)
            ok_tile = ok[:, None] & cmask[None, :]
            dt, _ = _time_steps(v, bias, ok_tile, HAS_BIAS, SOFTPLUS)
            states, _, _ = _tile_states(dt, x, A, Bt, h)
            y = tl.sum(states * Ct[:, None, :], 2) + Dv[None, :] * x
            y_rows = _position_offsets(q, ok, order, H, W, y_base, W * DIM, DIM)
            y_ptrs = y_ptr + y_rows[:, None] + d[None, :]
            if GROUP > 0 or i > 0:
                y += tl.load(y_ptrs, mask=ok_tile, other=0.0)
            tl.store(y_ptrs, y, mask=ok_tile)
            h = _last_row(states, rows, T)
        if i + 1 < ROUTES_PER_PROGRAM:
            # The next route adds to what other threads of this program stored for this one.
            tl.debug_barrier()


@triton.jit
def ss2d_chunk_state_kernel(
    x_ptr, delta_ptr, M_ptr, A_ptr, bias_ptr, loc_ptr, dsum_ptr,
    sx_b, sx_h, sx_w, sx_d,
    sd_b, sd_h, sd_w, sd_k, sd_d,
    sM_b, sM_h, sM_w, sM_k, sM_n,
    H, W, L, DIM, N, n_chunks, n_cblk,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, GRADIENT: tl.constexpr,
    T: tl.constexpr, BLOCK_C: tl.constexpr, NP: tl.constexpr,
):
    """What one route chunk adds to the carried state, from a zero carry; and its summed dt.

    Program (batch, route k, channel block, route chunk r); loc: [BATCH, 4, n_chunks, DIM, N],
    dsum: [BATCH, 4, n_chunks, DIM].
    Forward (GRADIENT=False; x = x, M = B): the chunk's end state.
    Gradient (GRADIENT=True; x = dy, M = C): a_first * g_first, the chunk's share of the state
    gradient carried into the route chunk before it.
    """
    b, k, cblk, r = _decode_route_chunk(tl.program_id(0), n_cblk, n_chunks)
    d = _channels(cblk, BLOCK_C)
    cmask = d < DIM
    n = tl.arange(0, NP)
    nmask = n < N
    rows = tl.arange(0, T)
    b64 = b.to(tl.int64)
    order = k % 2
    A, bias, _ = _route_params(A_ptr, A_ptr, bias_ptr, k, d, cmask, n, nmask, DIM, N,
                               False, HAS_BIAS)
    q, ok = _route_rows(r, n_chunks, L, k < 2, T)
    x = _gather(x_ptr, q, ok, order, H, W, b64 * sx_b, sx_h, sx_w, d * sx_d, cmask)
    v = _gather(delta_ptr, q, ok, order, H, W, b64 * sd_b + k * sd_k, sd_h, sd_w, d * sd_d, cmask)
    Mt = _gather(M_ptr, q, ok, order, H, W, b64 * sM_b + k * sM_k, sM_h, sM_w, n * sM_n, nmask)
    dt, _ = _time_steps(v, bias, ok[:, None] & cmask[None, :], HAS_BIAS, SOFTPLUS)
    if GRADIENT:
        a_f = tl.exp(tl.flip(dt, 0)[:, :, None] * A[None, :, :])
        c_f = tl.flip(Mt, 0)[:, None, :] * tl.flip(x, 0)[:, :, None]
        _, _, g_f = tl.associative_scan((a_f, tl.full(a_f.shape, 1.0, tl.float32), c_f), 0,
                                        _grad_combine)
        carry = _last_row(a_f * g_f, rows, T)
    else:
        states, _, _ = _tile_states(dt, x, A, Mt, tl.zeros([BLOCK_C, NP], dtype=tl.float32))
        carry = _last_row(states, rows, T)
    chunk_row = (b64 * 4 + k) * n_chunks + r
    tl.store(loc_ptr + (chunk_row * DIM + d[:, None]) * N + n[None, :], carry,
             mask=cmask[:, None] & nmask[None, :])
    tl.store(dsum_ptr + chunk_row * DIM + d, tl.sum(dt, 0), mask=cmask)


@triton.jit
def ss2d_propagate_kernel(
    loc_ptr, dsum_ptr, A_ptr, out_ptr, DIM, N, n_chunks,
    GRADIENT: tl.constexpr, BLOCK_C: tl.constexpr, NP: tl.constexpr,
):
    """Carries the chunk contributions along each route: ``out`` [BATCH, 4, n_chunks - 1, DIM, N].

    Program (batch * 4 + route k, channel block). Forward: with s_0 = 0 and
    s_{r+1} = exp(A dsum[r]) s_r + loc[r], the state entering route chunk r >= 1 goes to slot
    r - 1. Gradient (from the route's end): with g_{n-1} = 0 and
    g_{r-1} = exp(A dsum[r]) g_r + loc[r], the gradient entering route chunk r <= n - 2 goes to
    slot r. The zero carries at the walk's start are not stored.
    """
    route_row = tl.program_id(0).to(tl.int64)  # batch * 4 + k
    k = tl.program_id(0) % 4
    d = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = d < DIM
    n = tl.arange(0, NP)
    nmask = n < N
    mask = cmask[:, None] & nmask[None, :]
    A, _, _ = _route_params(A_ptr, A_ptr, A_ptr, k, d, cmask, n, nmask, DIM, N, False, False)
    state = tl.zeros([BLOCK_C, NP], dtype=tl.float32)
    for i in range(0, n_chunks - 1):
        if GRADIENT:
            r = n_chunks - 1 - i
            slot = r - 1
        else:
            r = i
            slot = r
        chunk_row = route_row * n_chunks + r
        offsets = (chunk_row * DIM + d[:, None]) * N + n[None, :]
        dsum = tl.load(dsum_ptr + chunk_row * DIM + d, mask=cmask, other=0.0)
        state = tl.exp(dsum[:, None] * A) * state + tl.load(loc_ptr + offsets, mask=mask, other=0.0)
        out_row = route_row * (n_chunks - 1) + slot
        tl.store(out_ptr + (out_row * DIM + d[:, None]) * N + n[None, :], state, mask=mask)


@triton.jit
def ss2d_backward_kernel(
    dy_ptr, x_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, bias_ptr, hck_ptr, gck_ptr,
    dx_ptr, ddelta_ptr, dA_ptr, dD_ptr, dbias_ptr, dB_ptr, dC_ptr,
    sg_b, sg_h, sg_w, sg_d,
    sx_b, sx_h, sx_w, sx_d,
    sd_b, sd_h, sd_w, sd_k, sd_d,
    sB_b, sB_h, sB_w, sB_k, sB_n,
    sC_b, sC_h, sC_w, sC_k, sC_n,
    BATCH, H, W, L, DIM, N, n_chunks, chunks_per_prog, n_cblk, n_seg,
    HAS_D: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    FROM_CKPT: tl.constexpr, ROUTES_PER_PROGRAM: tl.constexpr, GROUP: tl.constexpr,
    T: tl.constexpr, BLOCK_C: tl.constexpr, NP: tl.constexpr,
):
    """Gradients of a group of routes over a segment of position chunks.

    Program (batch, channel block, segment) walks the routes of group GROUP in turn
    (``_group_route``), each over the segment's route chunks from the last to the first. Each
    chunk recomputes its states from hck, runs the state gradient back through the chunk (dy is
    read once per route: y is the routes' sum), and writes:

    * dx: ``dx_ptr`` [BATCH, H, W, DIM] fp32, added to (only group 0's first route stores);
    * d(delta): ``ddelta_ptr`` [BATCH, H, W, 4, DIM] (delta's dtype), route k's slot;
    * dB, dC: per channel block, ``dB_ptr``/``dC_ptr`` [n_cblk, BATCH, H, W, 4, N] fp32;
    * dA, dD, d(delta_bias): per (batch, segment), [BATCH, n_seg, 4 * DIM(, N)] fp32.

    FROM_CKPT: the state gradient entering each segment comes from gck (chunk-parallel
    schedule); otherwise the segment ends the route and it starts from zero.
    """
    b, cblk, seg = _decode_tile(tl.program_id(0), n_cblk, n_seg)
    d = _channels(cblk, BLOCK_C)
    cmask = d < DIM
    n = tl.arange(0, NP)
    nmask = n < N
    rows = tl.arange(0, T)
    state_mask = cmask[:, None] & nmask[None, :]
    b64 = b.to(tl.int64)
    dx_base = b64 * L * DIM
    part_base = (cblk * BATCH + b64) * L * 4 * N
    for i in tl.static_range(ROUTES_PER_PROGRAM):
        k = _group_route(GROUP, i)
        order = k % 2
        A, bias, Dv = _route_params(A_ptr, D_ptr, bias_ptr, k, d, cmask, n, nmask, DIM, N,
                                    HAS_D, HAS_BIAS)
        ck = ((b64 * 4 + k) * (n_chunks - 1) * DIM + d[:, None]) * N + n[None, :]
        if i % 2 == 0:
            r_last = seg * chunks_per_prog + chunks_per_prog - 1
        else:
            r_last = n_chunks - seg * chunks_per_prog - 1
        if FROM_CKPT:
            g_in = _checkpoint(gck_ptr, ck, r_last, r_last < n_chunks - 1, DIM, N, state_mask)
        else:
            g_in = tl.zeros([BLOCK_C, NP], dtype=tl.float32)
        dA_acc = tl.zeros([BLOCK_C, NP], dtype=tl.float32)
        dD_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        dbias_acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for rr in range(0, chunks_per_prog):
            r = r_last - rr
            q, ok = _route_rows(r, n_chunks, L, i % 2 == 0, T)
            ok_tile = ok[:, None] & cmask[None, :]
            ok_state = ok[:, None] & nmask[None, :]
            x = _gather(x_ptr, q, ok, order, H, W, b64 * sx_b, sx_h, sx_w, d * sx_d, cmask)
            v = _gather(delta_ptr, q, ok, order, H, W, b64 * sd_b + k * sd_k, sd_h, sd_w,
                        d * sd_d, cmask)
            Bt = _gather(B_ptr, q, ok, order, H, W, b64 * sB_b + k * sB_k, sB_h, sB_w,
                         n * sB_n, nmask)
            Ct = _gather(C_ptr, q, ok, order, H, W, b64 * sC_b + k * sC_k, sC_h, sC_w,
                         n * sC_n, nmask)
            gy = _gather(dy_ptr, q, ok, order, H, W, b64 * sg_b, sg_h, sg_w, d * sg_d, cmask)
            dt, dsp = _time_steps(v, bias, ok_tile, HAS_BIAS, SOFTPLUS)
            h_in = _checkpoint(hck_ptr, ck, r - 1, r > 0, DIM, N, state_mask)
            states, a, bx = _tile_states(dt, x, A, Bt, h_in)
            # The state gradient, in flipped step order (row i is step T - 1 - i).
            a_f = tl.flip(a, 0)
            c_f = tl.flip(Ct, 0)[:, None, :] * tl.flip(gy, 0)[:, :, None]
            _, before_f, g_f = tl.associative_scan(
                (a_f, tl.full(a_f.shape, 1.0, tl.float32), c_f), 0, _grad_combine)
            g = tl.flip(g_f + before_f * g_in[None, :, :], 0)
            ah_prev = states - bx  # a_t h_{t-1}
            gB = tl.sum(g * Bt[:, None, :], 2)
            dx = dt * gB + Dv[None, :] * gy
            ddt = (tl.sum(g * A[None, :, :] * ah_prev, 2) + gB * x) * dsp
            ddt = tl.where(ok_tile, ddt, 0.0)
            dA_acc += tl.sum(g * ah_prev * dt[:, :, None], 0)
            dD_acc += tl.sum(gy * x, 0)
            dbias_acc += tl.sum(ddt, 0)
            dtx = dt * x
            dB_t = tl.sum(g * dtx[:, :, None], 1)
            dC_t = tl.sum(states * gy[:, :, None], 1)

            dx_rows = _position_offsets(q, ok, order, H, W, dx_base, W * DIM, DIM)
            dx_ptrs = dx_ptr + dx_rows[:, None] + d[None, :]
            if GROUP > 0 or i > 0:
                dx += tl.load(dx_ptrs, mask=ok_tile, other=0.0)
            tl.store(dx_ptrs, dx, mask=ok_tile)
            dd_rows = _position_offsets(q, ok, order, H, W, b64 * L * 4 * DIM + k * DIM,
                                        W * 4 * DIM, 4 * DIM)
            tl.store(ddelta_ptr + dd_rows[:, None] + d[None, :],
                     ddt.to(ddelta_ptr.dtype.element_ty), mask=ok_tile)
            part_rows = _position_offsets(q, ok, order, H, W, part_base + k * N, W * 4 * N,
                                          4 * N)
            tl.store(dB_ptr + part_rows[:, None] + n[None, :], dB_t, mask=ok_state)
            tl.store(dC_ptr + part_rows[:, None] + n[None, :], dC_t, mask=ok_state)
            # Carried into the route chunk before this one: a_first * g_first.
            g_in = tl.sum(tl.where(rows[:, None, None] == 0, a * g, 0.0), 0)
        seg_row = (b64 * n_seg + seg) * 4 * DIM + k * DIM + d
        tl.store(dA_ptr + seg_row[:, None] * N + n[None, :], dA_acc, mask=state_mask)
        tl.store(dD_ptr + seg_row, dD_acc, mask=cmask)
        tl.store(dbias_ptr + seg_row, dbias_acc, mask=cmask)
        if i + 1 < ROUTES_PER_PROGRAM:
            # The next route adds to the dx that other threads of this program stored.
            tl.debug_barrier()
