"""The portable selective scan against mamba-ssm's `selective_scan_ref`: outputs, final states and every gradient."""
from __future__ import annotations

import contextlib

import pytest
import torch

from models.blocks.ops.dispatch import route_kernels
from models.blocks.ops.selective_scan import linear_scan_, selective_scan_fn, selective_state_update

TOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.bfloat16: 3e-2}


@contextlib.contextmanager
def float64_ref():
    """Let `selective_scan_ref` compute in float64: it calls `.float()` on its inputs, which would drop to float32."""
    orig = torch.Tensor.float

    def keep64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else orig(self, *args, **kwargs)

    torch.Tensor.float = keep64
    try:
        yield
    finally:
        torch.Tensor.float = orig


def make_inputs(batch, dim, dstate, length, groups, dtype, seed, with_d=True, with_z=True, with_bias=True):
    """Random scan inputs as leaf tensors; groups=0 means shared B/C of shape (B, N, L)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset).to(dtype)

    bc_shape = (batch, dstate, length) if groups == 0 else (batch, groups, dstate, length)
    inputs = {
        "u": rnd(batch, dim, length),
        "delta": rnd(batch, dim, length, scale=0.5, offset=-1.0),
        # A spans gentle to very strong decays (exp(delta * A) underflows in float32 for the largest).
        "A": -torch.exp(rnd(dim, dstate, scale=2.0)).clamp(max=300.0).to(torch.float32 if dtype != torch.float64 else dtype),
        "B": rnd(*bc_shape),
        "C": rnd(*bc_shape),
        "D": rnd(dim).float() if dtype != torch.float64 else rnd(dim) if with_d else None,
        "z": rnd(batch, dim, length) if with_z else None,
        "delta_bias": (rnd(dim, scale=0.5).float() if dtype != torch.float64 else rnd(dim, scale=0.5))
        if with_bias
        else None,
    }
    if not with_d:
        inputs["D"] = None
    return {k: (v.requires_grad_() if v is not None else None) for k, v in inputs.items()}


def run_both(fn_a, fn_b, inputs, extra, dtype):
    """Forward + backward of both scans on clones of `inputs`; returns (outs, grads) pairs."""
    results = []
    for fn in (fn_a, fn_b):
        leaves = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in inputs.items()}
        ctx = float64_ref() if (fn is not fn_a and dtype == torch.float64) else contextlib.nullcontext()
        with ctx:
            out, last = fn(**leaves, **extra, return_last_state=True)
        g = torch.Generator().manual_seed(1)
        w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
        w_last = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.dtype)
        ((out.to(last.dtype) * w_out.to(last.dtype)).sum() + (last * w_last).sum()).backward()
        grads = {k: v.grad for k, v in leaves.items() if v is not None}
        results.append((out, last, grads))
    return results


def assert_close(a, b, tol, what):
    a, b = a.double(), b.double()
    scale = b.abs().max().clamp(min=1e-3)
    err = (a - b).abs().max() / scale
    assert err <= tol, f"{what}: max error {err:.3g} (relative to max |ref| {scale:.3g}) > {tol}"


@pytest.mark.parametrize(
    "batch,dim,dstate,length,groups,dtype,flags",
    [
        (2, 4, 3, 1, 0, torch.float64, (True, True, True, True)),
        (2, 6, 4, 37, 0, torch.float64, (True, True, True, True)),
        (1, 4, 5, 64, 2, torch.float64, (False, False, False, False)),
        (2, 8, 2, 129, 4, torch.float64, (True, False, True, True)),
        (3, 4, 16, 50, 0, torch.float32, (True, True, True, True)),
        (2, 6, 8, 197, 3, torch.float32, (True, True, False, True)),
        (2, 4, 4, 3, 1, torch.float32, (False, True, True, False)),
        (2, 8, 16, 70, 0, torch.bfloat16, (True, True, True, True)),
    ],
)
def test_matches_selective_scan_ref(mamba_ref, batch, dim, dstate, length, groups, dtype, flags):
    with_d, with_z, with_bias, softplus = flags
    torch.manual_seed(0)
    inputs = make_inputs(batch, dim, dstate, length, groups, dtype, seed=length, with_d=with_d, with_z=with_z,
                         with_bias=with_bias)
    if not softplus:  # keep delta positive without softplus, like a real model would
        inputs["delta"] = inputs["delta"].detach().abs().requires_grad_()
    extra = {"delta_softplus": softplus}
    (out, last, grads), (rout, rlast, rgrads) = run_both(selective_scan_fn, mamba_ref.selective_scan_ref, inputs,
                                                         extra, dtype)
    tol = TOL[dtype]
    assert out.dtype == dtype and out.shape == rout.shape
    assert_close(out, rout, tol, "out")
    assert_close(last, rlast, tol, "last state")
    assert set(grads) == set(rgrads)
    for name in grads:
        assert_close(grads[name], rgrads[name], tol * (4 if dtype == torch.bfloat16 else 1), f"d{name}")


@pytest.mark.parametrize("groups", [0, 2])
def test_initial_state_chains_like_one_long_sequence(mamba_ref, groups):
    """Scanning [0, s) then [s, L) from the carried state equals the reference on [0, L), gradients included."""
    torch.manual_seed(0)
    length, split = 45, 19
    inputs = make_inputs(2, 4, 6, length, groups, torch.float64, seed=3)
    with float64_ref():
        ref_out, ref_last = mamba_ref.selective_scan_ref(**inputs, delta_softplus=True, return_last_state=True)
    (ref_out.sum() + ref_last.square().sum()).backward()
    ref_grads = {k: v.grad.clone() for k, v in inputs.items() if v is not None}
    for v in inputs.values():
        if v is not None:
            v.grad = None

    def part(sl, h0):
        kw = {k: (v[..., sl] if k in ("u", "delta", "B", "C", "z") else v) for k, v in inputs.items()}
        return selective_scan_fn(**kw, delta_softplus=True, return_last_state=True, initial_state=h0)

    out1, h1 = part(slice(0, split), None)
    out2, h2 = part(slice(split, length), h1)
    out = torch.cat([out1, out2], dim=-1)
    assert_close(out, ref_out, 1e-6, "chained out")
    assert_close(h2, ref_last, 1e-6, "chained last state")
    (out.sum() + h2.square().sum()).backward()
    for k, g in ref_grads.items():
        assert_close(inputs[k].grad, g, 1e-6, f"chained d{k}")


def test_initial_state_gradient_by_finite_differences():
    torch.manual_seed(0)
    inputs = make_inputs(1, 2, 3, 7, 0, torch.float64, seed=5)
    h0 = torch.randn(1, 2, 3, dtype=torch.float64, requires_grad=True)
    ins = {k: v.detach() for k, v in inputs.items() if v is not None}

    def f(h):
        out, last = selective_scan_fn(**ins, delta_softplus=True, return_last_state=True, initial_state=h)
        return out.sum() + last.sum()

    assert torch.autograd.gradcheck(f, (h0,))


def test_strong_decay_is_stable():
    """exp(delta * A) underflows to 0 in float32: no inf/nan, the state restarts from the current input."""
    u = torch.randn(1, 2, 300)
    delta = torch.full_like(u, 5.0)
    A = torch.full((2, 4), -1000.0)
    B, C = torch.randn(1, 4, 300), torch.randn(1, 4, 300)
    out, last = selective_scan_fn(u, delta, A, B, C, return_last_state=True)
    expected = (delta * u).unsqueeze(2) * B.unsqueeze(1)  # state = this step's input only
    assert torch.isfinite(out).all()
    torch.testing.assert_close(last, expected[..., -1])
    torch.testing.assert_close(out, (expected * C.unsqueeze(1)).sum(2))


@pytest.mark.parametrize("length", [1, 2, 5, 16, 33, 100])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("width", [3, 8192])  # the parallel scan; rows wide enough for the loop over time
def test_linear_scan_matches_a_loop(length, reverse, width):
    from models.blocks.ops import selective_scan as scan

    assert (width >= scan.SEQUENTIAL_ROW_ELEMENTS) == (width == 8192)
    g = torch.Generator().manual_seed(length)
    a = torch.rand(length, width, generator=g, dtype=torch.float64)
    b = torch.randn(length, width, generator=g, dtype=torch.float64)
    ref, h = torch.empty_like(b), torch.zeros(width, dtype=torch.float64)
    for t in (range(length - 1, -1, -1) if reverse else range(length)):
        h = a[t] * h + b[t]
        ref[t] = h
    torch.testing.assert_close(linear_scan_(a.clone(), b.clone(), reverse), ref)


@pytest.mark.parametrize("heads", [False, True])
def test_state_update_steps_equal_the_scan(mamba_ref, heads):
    """Decoding token by token with selective_state_update reproduces the parallel scan and its final state."""
    torch.manual_seed(0)
    batch, dim, dstate, length = 2, 6, 4, 9
    inputs = {k: (v.detach() if v is not None else None) for k, v in
              make_inputs(batch, dim, dstate, length, 0, torch.float64, seed=7).items()}
    out, last = selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True)
    state = torch.zeros(batch, dim, dstate, dtype=torch.float64)
    A, D, bias = inputs["A"], inputs["D"], inputs["delta_bias"]
    if heads:  # the same scan written with nheads=3 heads of headdim 2
        state, A, D, bias = state.view(batch, 3, 2, dstate), A.view(3, 2, dstate), D.view(3, 2), bias.view(3, 2)
    steps = []
    for t in range(length):
        x, dt, z = (inputs[k][..., t] for k in ("u", "delta", "z"))
        Bt, Ct = inputs["B"][..., t], inputs["C"][..., t]
        if heads:
            x, dt, z, Bt, Ct = x.view(batch, 3, 2), dt.view(batch, 3, 2), z.view(batch, 3, 2), Bt[:, None], Ct[:, None]
        y = selective_state_update(state, x, dt, A, Bt, Ct, D, z=z, dt_bias=bias, dt_softplus=True)
        steps.append(y.reshape(batch, dim))
    torch.testing.assert_close(torch.stack(steps, -1), out)
    torch.testing.assert_close(state.reshape(batch, dim, dstate), last)


def test_kernel_route_gets_every_argument(mamba_ref):
    """Under route_kernels the call goes to the routed kernel with the same arguments (here: the reference)."""
    inputs = make_inputs(2, 4, 3, 10, 2, torch.float32, seed=11)
    seen = []

    def spy(*args, **kwargs):
        seen.append((args, kwargs))
        return mamba_ref.selective_scan_ref(*args, **kwargs)

    with route_kernels({"selective_scan_fn": spy}):
        out_k, last_k = selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True)
    out, last = selective_scan_fn(**inputs, delta_softplus=True, return_last_state=True)
    assert len(seen) == 1
    torch.testing.assert_close(out_k, out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last_k, last, rtol=1e-4, atol=1e-4)


def test_segment_length_rule(monkeypatch):
    """The automatic rule: segments of near-equal length, at least 16 rows, one segment when the state fits."""
    from models.blocks.ops import selective_scan as scan

    monkeypatch.setattr(scan, "SEGMENT_BYTES", 1)
    assert scan.segment_length(75, 10**6) == 15
    monkeypatch.setattr(scan, "SEGMENT_BYTES", 12 * 2**20)
    assert scan.segment_length(197, 1000) == 197
    assert scan.segment_length(3136, 4 * 768 * 16 * 4) == 64


@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("groups,seg", [(0, 1), (2, 7), (0, 15), (2, 16), (0, 74), (2, 75)])
def test_time_segments_match_the_reference(mamba_ref, monkeypatch, groups, seg, recompute):
    """Long inputs are scanned in time segments with the state carried across, and (recompute) the backward
    recomputes each segment's states from the state entering it: force `seg`-row segments at L=75 (1 and 75: the
    extremes; 7, 16 and 74 leave a shorter last segment) and check outputs, final state and all gradients."""
    from models.blocks.ops import selective_scan as scan

    monkeypatch.setattr(scan, "segment_length", lambda length, row_bytes: seg)
    monkeypatch.setattr(scan, "RECOMPUTE_BYTES", 0 if recompute else 2**40)
    inputs = make_inputs(2, 4, 5, 75, groups, torch.float64, seed=21)
    (out, last, grads), (rout, rlast, rgrads) = run_both(selective_scan_fn, mamba_ref.selective_scan_ref, inputs,
                                                         {"delta_softplus": True}, torch.float64)
    assert_close(out, rout, 1e-6, "out")
    assert_close(last, rlast, 1e-6, "last state")
    assert set(grads) == set(rgrads)
    for name in grads:
        assert_close(grads[name], rgrads[name], 1e-6, f"d{name}")


@pytest.mark.parametrize("seg", [1, 6, 13])
def test_time_segments_with_initial_state(monkeypatch, seg):
    """With an initial state, segmented (recomputing) and single-segment scans agree, d(initial state) included."""
    from models.blocks.ops import selective_scan as scan

    inputs = {k: v.detach() for k, v in make_inputs(2, 4, 3, 40, 2, torch.float64, seed=5).items() if v is not None}
    h0 = torch.randn(2, 4, 3, dtype=torch.float64)
    monkeypatch.setattr(scan, "RECOMPUTE_BYTES", 0)
    results = []
    for rows in (seg, 40):
        monkeypatch.setattr(scan, "segment_length", lambda length, row_bytes, rows=rows: rows)
        leaves = {k: v.clone().requires_grad_() for k, v in {**inputs, "initial_state": h0}.items()}
        out, last = selective_scan_fn(**leaves, delta_softplus=True, return_last_state=True)
        (out.sin().sum() + last.square().sum()).backward()
        results.append((out, last, {k: v.grad for k, v in leaves.items()}))
    (out, last, grads), (rout, rlast, rgrads) = results
    assert_close(out, rout, 1e-10, "out")
    assert_close(last, rlast, 1e-10, "last state")
    for name in rgrads:
        assert_close(grads[name], rgrads[name], 1e-10, f"d{name}")
