"""The "torch" backend of ``ss2d_scan``: pure PyTorch for one-dimensional states, else a relayout
around one of ``selective_scan``'s backends.

Two paths, chosen by the inner selective-scan backend and the state size N:

* **step path** (inner backend "torch" and N = 1, every VMamba v2 model): the chunked scan of
  ``selective_scan``'s single-state torch backend (``torch_scan_single_state``: three levels,
  T about 1.2 L^(1/3) steps per chunk, nc chunks), run on all four routes at once in a
  channel-innermost step layout [T, nc, B, K, D]: step t of chunk j of route k is element
  [t, j, :, k, :]. Each input reaches that layout in ONE gather straight from its natural-order
  tensor (whole C-vectors, see ``routes.gather_rows``), so neither the four-route copy of x
  (cross-scan) nor a route-major copy of delta, B or C is ever made, and the four routes' outputs
  are summed back onto the image by one gather and a sum over K (cross-merge). The skip term
  D * u needs no route: sum_k D_k * u is added in natural order.
* **route-major path** (N > 1, or an inner backend other than "torch", i.e. Triton on CUDA):
  x, delta, B and C are gathered into each route's step order, [B, K, L, C] (one gather each,
  channels innermost, no flip for the backward routes), and the inner backend's forward/backward
  runs once per route on [B, D, L] / [B, 1, N, L] views of them: its own layout change (the
  torch backend's chunked step layout) then reads them in place, so no transposed route-major
  copy is made first. The routes' results are stacked and merged (y, dx) or put back per route
  (d delta, dB, dC) by strided copies.

Both paths compute the state in float32 (float64 for float64 inputs, for gradcheck), return y in
that dtype and never read tensor values on the host. When T does not divide L, the step path's
last chunk ends with padded steps that read the route's last position again. They come after
every real step of their route, so nothing they compute reaches a real step: their outputs are
never gathered back, and the backward zeroes dy on them so that no adjoint flows back from them.
Scratch tensors come from ``selective_scan.scratch``'s pool.
"""

import functools
from typing import List, NamedTuple, Optional, Tuple

import torch

from ..selective_scan import interface as scan_interface
from ..selective_scan.scratch import Scratch
from ..selective_scan.step_layout import LOG2E, chunk_scan, compute_dtype, softplus_grad
from ..selective_scan.torch_scan_single_state import single_state_chunking
from .routes import ROUTES, from_routes, gather_rows, merge_routes, route_positions, row_offsets

Tensor = torch.Tensor
Grads = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]


def uses_step_path(A: Tensor, scan_backend: str) -> bool:
    """Whether the step path runs (inner backend "torch" and d_state N = 1)."""
    return scan_backend == "torch" and A.shape[1] == 1


class _StepMaps(NamedTuple):
    """Where each element of the step layout [T, nc, B, K] comes from, and the way back.

    row, col: [T, nc, 1, K] image coordinates of each step (padded steps repeat the last step's).
    batch: [1, 1, B, 1]; route: [1, 1, 1, K].
    inverse: [B * L * K], for each natural (b, p, k) in that order, the row of the flattened
        step layout [T * nc * B * K, C] that holds route k's value at position p.
    """

    row: Tensor
    col: Tensor
    batch: Tensor
    route: Tensor
    inverse: Tensor


@functools.lru_cache(maxsize=32)
def _step_maps(batch: int, height: int, width: int, chunk: int, n_chunks: int,
               device: torch.device) -> _StepMaps:
    # Built outside inference mode: the maps are cached and later calls may train.
    with torch.inference_mode(False):
        return _build_step_maps(batch, height, width, chunk, n_chunks, device)


def _build_step_maps(batch: int, height: int, width: int, chunk: int, n_chunks: int,
                     device: torch.device) -> _StepMaps:
    length = height * width
    positions = route_positions(height, width, device)  # [K, L]
    steps = torch.arange(chunk * n_chunks, device=device).view(n_chunks, chunk).t()  # [T, nc]
    visited = positions[:, steps.clamp(max=length - 1)].permute(1, 2, 0)  # [T, nc, K]
    row = (visited // width).unsqueeze(2)
    col = (visited % width).unsqueeze(2)
    # Inverse of the route maps: the step at which route k visits position p.
    step_of = torch.empty_like(positions)
    step_of.scatter_(1, positions, torch.arange(length, device=device).expand(ROUTES, length))
    t, j = step_of % chunk, step_of // chunk  # [K, L]
    b = torch.arange(batch, device=device).view(batch, 1, 1)
    k = torch.arange(ROUTES, device=device).view(ROUTES, 1)
    inverse = ((t * n_chunks + j) * batch).t().unsqueeze(0) + b  # [B, L, K]
    inverse = inverse * ROUTES + k.t()
    return _StepMaps(row, col, b.view(1, 1, batch, 1), k.view(1, 1, 1, ROUTES),
                     inverse.flatten())


class _Steps:
    """Geometry of one call's step layout [T, nc, B, K, C] and the gathers into and out of it."""

    def __init__(self, x: Tensor):
        self.batch, self.height, self.width, self.dim = x.shape
        self.length = self.height * self.width
        self.chunk, self.n_chunks = single_state_chunking(self.length)
        self.dtype = compute_dtype(x)
        self.device = x.device
        self.maps = _step_maps(self.batch, self.height, self.width, self.chunk, self.n_chunks,
                               x.device)
        # Real steps in the last chunk; the steps after them are padding.
        self.rest = self.length - (self.n_chunks - 1) * self.chunk

    def shape(self, channels: int) -> Tuple[int, ...]:
        return (self.chunk, self.n_chunks, self.batch, ROUTES, channels)

    def gather(self, tensor: Tensor, out: Tensor) -> Tensor:
        """Every route's step of ``tensor`` into ``out`` [T, nc, B, K, C].

        ``tensor`` is [B, H, W, C] (read by every route) or [B, H, W, K, C] (route k reads
        slot k).
        """
        maps = self.maps
        route = maps.route if tensor.dim() == 5 else None
        offsets = row_offsets(tensor, maps.batch, maps.row, maps.col, route)
        return gather_rows(tensor, offsets, out)

    def merge(self, steps: Tensor, scratch: Scratch) -> Tensor:
        """Sums the four routes of ``steps`` [T, nc, B, K, C] onto the image: [B, H, W, C]."""
        rows = (self.batch * self.length * ROUTES, steps.shape[-1])
        return self.unroute(steps, scratch.take(rows, steps.dtype)).sum(3)

    def unroute(self, steps: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Route k's value at each position: [B, H, W, K, C], in ``out``'s memory if given.

        ``out`` is a contiguous tensor of B * L * K * C elements, steps' dtype.
        """
        channels = steps.shape[-1]
        rows = (self.batch * self.length * ROUTES, channels)
        out = torch.empty(rows, dtype=steps.dtype, device=steps.device) if out is None else out
        torch.index_select(steps.view(-1, channels), 0, self.maps.inverse, out=out.view(rows))
        return out.view(self.batch, self.height, self.width, ROUTES, channels)

    def zero_padded(self, steps: Tensor) -> None:
        """Zeroes the padded steps of ``steps`` [T, nc, ...]."""
        steps[self.rest:, -1].zero_()


class _Inputs:
    """The step-layout inputs shared by the forward and the backward of the step path."""

    def __init__(self, steps: _Steps, x, delta, A, B, C, delta_bias, delta_softplus,
                 scratch: Scratch, dt: Optional[Tensor] = None, keep_dt: bool = False):
        dtype, dim = steps.dtype, steps.dim
        self.A = A.to(dtype).view(ROUTES, dim)
        self.A_log2 = self.A * LOG2E
        self.u = steps.gather(x, scratch.take(steps.shape(dim), dtype))
        self.B = steps.gather(B, scratch.take(steps.shape(1), dtype))
        self.C = steps.gather(C, scratch.take(steps.shape(1), dtype))
        if dt is None:
            dt = torch.empty(steps.shape(dim), dtype=dtype, device=x.device) if keep_dt else \
                scratch.take(steps.shape(dim), dtype)
            steps.gather(delta, dt)
            if delta_bias is not None:
                dt.add_(delta_bias.to(dtype).view(ROUTES, dim))
            if delta_softplus:
                torch.ops.aten.softplus.out(dt, 1, 20, out=dt)  # in place; threshold 20
        self.dt = dt

    def decays(self, out: Tensor) -> Tensor:
        """a_t = exp(dt_t A) of every step, as exp2(dt_t A log2(e)) (cheaper on CPUs)."""
        return torch.mul(self.dt, self.A_log2, out=out).exp2_()

    def chunk_decays(self) -> Tensor:
        """The decay across each whole chunk, exp(A sum_t dt_t): [nc, B, K, D]."""
        return torch.exp2(self.dt.sum(0).mul_(self.A_log2))

    def states(self, a: Tensor, out: Tensor) -> Tensor:
        """The state h_t of every step into ``out`` [T, nc, B, K, D], given the decays a."""
        torch.mul(self.dt, self.u, out=out).mul_(self.B)  # the inputs dt_t B_t u_t
        h = out[0].clone()
        for t in range(1, out.shape[0]):  # level 1: each chunk's end state from zero
            torch.addcmul(out[t], a[t], h, out=h)
        entering = chunk_scan(h, self.chunk_decays(), reverse=False).movedim(-1, 0)  # level 2
        out[0].addcmul_(a[0], entering)
        for t in range(1, out.shape[0]):  # level 3: the true states
            out[t].addcmul_(a[t], out[t - 1])
        return out


def _adjoint(inputs: _Inputs, a: Tensor, g: Tensor) -> None:
    """Turns g (C_t dy_t) into the adjoint g_t = C_t dy_t + a_{t+1} g_{t+1}, in place.

    The same three levels as the forward, in reverse time (``torch_scan_single_state``).
    """
    last = g.shape[0] - 1
    local = g[last].clone()
    for t in range(last - 1, -1, -1):  # level 1: each chunk's adjoint at its first step
        torch.addcmul(g[t], a[t + 1], local, out=local)
    passed_back = local.mul_(a[0])  # what a chunk hands to the previous one
    g[last].add_(chunk_scan(passed_back, inputs.chunk_decays(), reverse=True).movedim(-1, 0))
    for t in range(last - 1, -1, -1):  # level 3: the true adjoint
        g[t].addcmul_(a[t + 1], g[t + 1])


def _skip(D: Optional[Tensor], dim: int, dtype: torch.dtype) -> Optional[Tensor]:
    """sum_k D_k: [D]. Every route adds D_k u at each position, so the merge adds this times u."""
    return None if D is None else D.to(dtype).view(ROUTES, dim).sum(0)


def _step_forward(x, delta, A, B, C, D, delta_bias, delta_softplus, keep):
    steps = _Steps(x)
    with Scratch(x.device) as scratch:
        inputs = _Inputs(steps, x, delta, A, B, C, delta_bias, delta_softplus, scratch,
                         keep_dt=keep)
        shape = steps.shape(steps.dim)
        a = inputs.decays(scratch.take(shape, steps.dtype))
        h = inputs.states(a, torch.empty(shape, dtype=steps.dtype, device=x.device) if keep
                          else scratch.take(shape, steps.dtype))
        y_steps = torch.mul(h, inputs.C, out=a)  # the decays are spent
        y = steps.merge(y_steps, scratch)
        skip = _skip(D, steps.dim, steps.dtype)
        if skip is not None:
            y.addcmul_(x.to(steps.dtype), skip)
    return y, ([inputs.dt, h] if keep else [])


def _step_backward(dy, x, delta, A, B, C, D, delta_bias, delta_softplus, *saved) -> Grads:
    steps = _Steps(x)
    dtype, dim = steps.dtype, steps.dim
    shape = steps.shape(dim)
    with Scratch(x.device) as scratch:
        inputs = _Inputs(steps, x, delta, A, B, C, delta_bias, delta_softplus, scratch,
                         dt=saved[0] if saved else None)
        a = inputs.decays(scratch.take(shape, dtype))
        h = saved[1] if saved else inputs.states(a, scratch.take(shape, dtype))
        u, dt = inputs.u, inputs.dt
        dy_steps = steps.gather(dy, scratch.take(shape, dtype))
        steps.zero_padded(dy_steps)  # nothing may flow back from a padded step
        g = torch.mul(dy_steps, inputs.C, out=scratch.take(shape, dtype))
        _adjoint(inputs, a, g)

        # a_t h_{t-1}: the previous state of a chunk's first step is the last of the chunk
        # before; nothing is ever divided by a decay.
        a[1:].mul_(h[:-1])
        a[0, 1:].mul_(h[-1, :-1])
        a[0, 0].zero_()
        dlog = a.mul_(g)  # d loss / d(dt_t A)
        spare = torch.mul(dlog, dt, out=scratch.take(shape, dtype))
        dA = spare.sum((0, 1, 2)).view(ROUTES * dim, 1)
        group = scratch.take(steps.shape(1), dtype)
        dC_steps = torch.sum(torch.mul(dy_steps, h, out=spare), -1, keepdim=True, out=group)
        dC = steps.unroute(dC_steps).to(C.dtype)
        torch.mul(dt, u, out=spare).mul_(g)
        dB_steps = torch.sum(spare, -1, keepdim=True, out=group)
        dB = steps.unroute(dB_steps).to(B.dtype)
        ddtu = g.mul_(inputs.B)  # d loss / d(dt_t u_t)
        ddt = dlog.mul_(inputs.A).addcmul_(ddtu, u)  # d loss / d(dt_t)
        du = steps.merge(torch.mul(ddtu, dt, out=spare), scratch)
        skip = _skip(D, dim, dtype)
        dD = None
        if skip is not None:
            dy_natural, x_natural = dy.to(dtype), x.to(dtype)
            du.addcmul_(dy_natural, skip)
            # Every route's D_k multiplies the same u: their gradients are equal.
            dD = (dy_natural * x_natural).sum((0, 1, 2)).repeat(ROUTES)
        if delta_softplus:
            ddt = softplus_grad(ddt, dt, scratch=ddtu, out=ddt)
        ddelta_bias = None if delta_bias is None else ddt.sum((0, 1, 2)).flatten()
        ddelta = steps.unroute(ddt).to(delta.dtype)
    return du.to(x.dtype), ddelta, dA, dB, dC, dD, ddelta_bias


@functools.lru_cache(maxsize=32)
def _route_maps(batch: int, height: int, width: int, device: torch.device) -> Tuple[Tensor, ...]:
    """(batch [B, 1, 1], row [1, K, L], col [1, K, L], route [1, K, 1]) of each route's steps."""
    with torch.inference_mode(False):  # cached: later calls may train
        positions = route_positions(height, width, device).unsqueeze(0)  # [1, K, L]
        return (torch.arange(batch, device=device).view(batch, 1, 1), positions // width,
                positions % width, torch.arange(ROUTES, device=device).view(1, ROUTES, 1))


def _in_route_order(tensor: Tensor, scratch: Scratch,
                    dtype: Optional[torch.dtype] = None) -> Tensor:
    """``tensor``'s C-vectors in each route's step order, [B, K, L, C] (one gather).

    ``tensor`` is [B, H, W, C] (read by every route) or [B, H, W, K, C] (route k reads slot k).
    The result is scratch memory, in ``dtype`` (default: tensor's).
    """
    batch, height, width = tensor.shape[:3]
    b, row, col, route = _route_maps(batch, height, width, tensor.device)
    offsets = row_offsets(tensor, b, row, col, route if tensor.dim() == 5 else None)
    shape = (batch, ROUTES, height * width, tensor.shape[-1])
    return gather_rows(tensor, offsets, scratch.take(shape, dtype or tensor.dtype))


class _RouteInputs:
    """x, delta, B and C in route order, and route k's arguments to a ``selective_scan`` backend.

    Route k's u and delta are [B, D, L] views of the [B, K, L, D] gathers (channel stride 1),
    its B and C [B, 1, N, L] views: the backend's own layout change reads them where they lie.
    """

    def __init__(self, x, delta, A, B, C, D, delta_bias, scratch: Scratch):
        self.dim = x.shape[-1]
        self.routes = [_in_route_order(t, scratch) for t in (x, delta, B, C)]
        self.A, self.D, self.delta_bias = A, D, delta_bias

    def args(self, k: int) -> Tuple[Optional[Tensor], ...]:
        """(u, delta, A, B, C, D, delta_bias) of route k."""
        x, delta, B, C = (t[:, k].transpose(1, 2) for t in self.routes)
        part = slice(k * self.dim, (k + 1) * self.dim)
        return (x, delta, self.A[part], B.unsqueeze(1), C.unsqueeze(1),
                None if self.D is None else self.D[part],
                None if self.delta_bias is None else self.delta_bias[part])


def _route_forward(x, delta, A, B, C, D, delta_bias, delta_softplus, scan_backend, keep):
    forward, _, _ = scan_interface._backend_functions(scan_backend)
    ys, saved = [], []
    # The backends save fresh tensors, never views of their inputs: the gathers are scratch.
    with Scratch(x.device) as scratch:
        inputs = _RouteInputs(x, delta, A, B, C, D, delta_bias, scratch)
        for k in range(ROUTES):
            y, kept = forward(*inputs.args(k), delta_softplus)  # [B, D, L] in route k's order
            ys.append(y)
            saved.extend(kept)
    y = merge_routes(torch.stack(ys, dim=1), x.shape[1], x.shape[2])
    return y, (saved if keep else [])


def _route_backward(dy, x, delta, A, B, C, D, delta_bias, delta_softplus, scan_backend,
                    *saved) -> Grads:
    forward, backward, _ = scan_interface._backend_functions(scan_backend)
    height, width = x.shape[1:3]
    per_route = len(saved) // ROUTES
    grads = []
    with Scratch(x.device) as scratch:
        inputs = _RouteInputs(x, delta, A, B, C, D, delta_bias, scratch)
        dy_routes = _in_route_order(dy, scratch, compute_dtype(x))  # [B, K, L, D]
        for k in range(ROUTES):
            args = inputs.args(k)
            kept = saved[k * per_route:(k + 1) * per_route] if saved else \
                forward(*args, delta_softplus)[1]
            grads.append(backward(dy_routes[:, k].transpose(1, 2), *args, delta_softplus, *kept))
    du, ddelta, dA, dB, dC, dD, ddelta_bias = zip(*grads)
    # Every route's gradient comes in its own step order: [B, D, L] / [B, 1, N, L].
    du = merge_routes(torch.stack(du, dim=1), height, width)
    ddelta = from_routes(torch.stack(ddelta, dim=1), height, width)
    dB = from_routes(torch.cat(dB, dim=1), height, width)
    dC = from_routes(torch.cat(dC, dim=1), height, width)
    dD = None if D is None else torch.cat(dD)
    ddelta_bias = None if delta_bias is None else torch.cat(ddelta_bias)
    return du, ddelta, torch.cat(dA), dB, dC, dD, ddelta_bias


def torch_ss2d_forward(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    scan_backend: str,
    keep: bool,
) -> Tuple[Tensor, List[Tensor]]:
    """The four-route scan and merge, forward only (no autograd).

    Args:
        x: [B, H, W, D], fp32/bf16/fp16 (fp64 is computed in fp64), any strides.
        delta: [B, H, W, K, D], x's dtype, any strides.
        A: [K*D, N] fp32. B, C: [B, H, W, K, N], x's dtype, any strides.
        D, delta_bias: [K*D] fp32 or None.
        delta_softplus: apply softplus to delta + delta_bias.
        scan_backend: the selective-scan backend of the route-major path ("torch"/"triton").
        keep: return what the backward needs (else the backward recomputes it).

    Returns:
        (y, saved): y [B, H, W, D], contiguous, fp32 (fp64 for fp64 inputs); saved, fresh
        tensors for ``torch_ss2d_backward``: on the step path dt and the states, each
        [T, nc, B, K, D]; on the route-major path what the inner backend saved for each route,
        route after route; empty unless ``keep``.
    """
    if uses_step_path(A, scan_backend):
        return _step_forward(x, delta, A, B, C, D, delta_bias, delta_softplus, keep)
    return _route_forward(x, delta, A, B, C, D, delta_bias, delta_softplus, scan_backend, keep)


def torch_ss2d_backward(
    dy: Tensor,
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    scan_backend: str,
    *saved: Tensor,
) -> Grads:
    """Gradients of ``torch_ss2d_forward`` (no autograd).

    Args:
        dy: gradient of y, [B, H, W, D], any float dtype and strides.
        x, delta, A, B, C, D, delta_bias, delta_softplus, scan_backend: the forward's inputs.
        *saved: what the forward returned as saved, or nothing (it is then recomputed). Never
            modified.

    Returns:
        (dx, ddelta, dA, dB, dC, dD, ddelta_bias): dx [B, H, W, D], ddelta [B, H, W, K, D],
        dB and dC [B, H, W, K, N], each contiguous in its input's dtype; dA [K*D, N], dD and
        ddelta_bias [K*D] in the compute dtype, None when D / delta_bias is None.
    """
    if uses_step_path(A, scan_backend):
        return _step_backward(dy, x, delta, A, B, C, D, delta_bias, delta_softplus, *saved)
    du, ddelta, dA, dB, dC, dD, ddelta_bias = _route_backward(
        dy, x, delta, A, B, C, D, delta_bias, delta_softplus, scan_backend, *saved
    )
    return (du.to(x.dtype), ddelta.to(delta.dtype), dA, dB.to(B.dtype), dC.to(C.dtype), dD,
            ddelta_bias)


def torch_ss2d_forward_fake(
    x: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Optional[Tensor],
    delta_bias: Optional[Tensor],
    delta_softplus: bool,
    scan_backend: str,
    keep: bool,
) -> Tuple[Tensor, List[Tensor]]:
    """Shape-only twin of ``torch_ss2d_forward`` for fake/meta tensors (torch.library tracing).

    Returns:
        (y, saved): empty tensors shaped like ``torch_ss2d_forward``'s results.
    """
    batch, height, width, dim = x.shape
    dtype = compute_dtype(x)
    y = x.new_empty((batch, height, width, dim), dtype=dtype)
    if not keep:
        return y, []
    length = int(height * width)  # the chunking depends on L's value: specialise on it
    if uses_step_path(A, scan_backend):
        chunk, n_chunks = single_state_chunking(length)
        shape = (chunk, n_chunks, batch, ROUTES, dim)
        return y, [x.new_empty(shape, dtype=dtype), x.new_empty(shape, dtype=dtype)]
    _, _, fake = scan_interface._backend_functions(scan_backend)
    d_state = A.shape[1]
    u = x.new_empty((batch, dim, length))
    routes = B.new_empty((batch, 1, d_state, length))
    saved = []
    for k in range(ROUTES):
        part = slice(k * dim, (k + 1) * dim)
        saved.extend(fake(u, delta.new_empty(u.shape), A[part], routes, routes,
                          None if D is None else D[part],
                          None if delta_bias is None else delta_bias[part], delta_softplus)[1])
    return y, saved
