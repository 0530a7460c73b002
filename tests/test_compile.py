"""`--compile`: the compiled network computes what the eager one does, and a compiled run's checkpoints are an eager
run's (same state-dict keys: they open with `load_from_checkpoint` and resume without compiling)."""
from __future__ import annotations

import pytest
import torch

import predict
import train
from callbacks.compile import compile_network

pytestmark = pytest.mark.usefixtures("one_thread")


def _small_demansia2():
    """DeMansia 2 micro cut to one Mamba-2 layer and one attention layer at 32 px: every op of the network (stem,
    bidirectional SSD scan, causal conv, gated RMSNorm, rotary attention, heads), compiled in seconds."""
    import timm

    import models  # noqa: F401  (registers the zoo's timm names)

    torch.manual_seed(0)
    return timm.create_model("demansia2_micro", pretrained=False, img_size=32, depth=2, attn_layers=(1,))


class _Holder(torch.nn.Module):
    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net


def test_compiled_network_equals_eager_forward_and_backward():
    """Training's graphs (forward and backward) through AOTAutograd, the part of `torch.compile` that captures and
    differentiates the network; inductor's code generation is checked on inference below."""
    holder = _Holder(_small_demansia2()).eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    eager = holder.net(x)
    eager.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in holder.net.named_parameters()}
    x_grad, x.grad = x.grad.clone(), None
    holder.net.zero_grad()

    times = compile_network(holder, "aot_eager")
    out = holder.net(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x_grad, rtol=1e-4, atol=1e-5)
    for name, p in holder.net.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert len(times.seconds) == 1 and times.summary("call").startswith("first call")


@pytest.mark.slow  # inductor writes and builds C++ for the graph: ~40 s on one core with an empty cache
def test_inductor_compiled_network_equals_eager_under_inference_mode():
    """The default backend, as predict.py's verbs run it (inference mode): generated kernels, same outputs."""
    holder = _Holder(_small_demansia2()).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        eager = holder.net(x)
    times = compile_network(holder, "inductor")
    with torch.inference_mode():
        torch.testing.assert_close(holder.net(x), eager, rtol=1e-5, atol=1e-5)
    assert len(times.seconds) == 1 and times.summary("call").startswith("first call")


class _TwoEntries(torch.nn.Module):
    """A network with a second entry point, as DeMansia 2's `forward_train`."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x).relu()

    def forward_train(self, x):
        return self.lin(x).tanh(), self.lin.weight.sum()


def test_forward_methods_are_compiled_too_and_a_copy_keeps_its_own_weights():
    import copy

    from torch._dynamo.testing import CompileCounter

    from callbacks.compile import compile_in_place

    net, x, counter = _TwoEntries(), torch.randn(5, 4), CompileCounter()
    eager, eager_train = net(x), net.forward_train(x)
    compile_in_place(net, counter)
    torch.testing.assert_close(net(x), eager)
    torch.testing.assert_close(net.forward_train(x), eager_train)
    assert counter.frame_count == 2  # the call and forward_train, each one graph
    assert sorted(net.state_dict()) == ["lin.bias", "lin.weight"]

    twin = copy.deepcopy(net)  # as an EMA copies the network
    with torch.no_grad():
        twin.lin.weight.mul_(-1.0)
    torch.testing.assert_close(twin.forward_train(x)[1], -eager_train[1])  # the copy's weights, not the original's
    torch.testing.assert_close(net.forward_train(x), eager_train)


@pytest.mark.parametrize("batch, loops", [(1, False), (4, True)])
def test_a_looping_scan_runs_uncompiled_inside_a_compiled_block(batch, loops):
    """SS2D (d_model 16, d_state 16, 4 directions: 2,048 states per image and token) on 8x8 tokens: at batch 4 the
    scan's rows reach SEQUENTIAL_ROW_ELEMENTS and it loops over the 64 time steps. Compiled, such a scan runs as it
    is, a graph break either side, instead of unrolling into ops per time step; a parallel scan is traced whole.
    Outputs and gradients equal eager's either way."""
    from torch._dynamo.testing import CompileCounter

    from models.blocks.ops import selective_scan
    from models.blocks.ss2d import SS2D

    torch.manual_seed(0)
    block = SS2D(16, d_state=16)
    x = torch.randn(batch, 8, 8, 16, requires_grad=True)
    assert (batch * 2048 >= selective_scan.SEQUENTIAL_ROW_ELEMENTS) == loops
    eager = block(x)
    eager.square().sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in block.parameters()]
    x.grad = None
    block.zero_grad()

    counter = CompileCounter()
    block.compile(backend=counter)
    out = block(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)
    for got, want in zip([x.grad] + [p.grad for p in block.parameters()], grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (counter.frame_count > 1) == loops  # graphs around the scan, or one graph
    assert counter.op_count < 100  # 70-73 ops: not one or more per time step (64) on top


def test_compiled_run_writes_eager_checkpoints_that_resume_without_compiling(toy_registered, capsys):
    from toy_task import ToyModule

    common = ["--model", "toy", "--logger", "none", "--progress", "none"]
    out = train.run([*common, "--compile-backend", "aot_eager", "--max-steps", "11"])
    printed = capsys.readouterr().out
    assert "[compile] torch.compile (aot_eager) of the network: first training step" in printed
    assert "median of 10" in printed and "first validation batch" in printed
    assert out["model"].net._compiled_call_impl is not None  # the run was compiled

    last = out["run_dir"] / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert sorted(state) == sorted(ToyModule().state_dict())  # no `_orig_mod.` anywhere
    model = ToyModule.load_from_checkpoint(str(last))
    x = torch.randn(5, 4)
    torch.testing.assert_close(model.eval()(x), out["model"].eval()(x))

    resumed = train.run([*common, "--resume", str(last)])
    assert resumed["trainer"].global_step > 11  # it trained on from step 11
    assert resumed["model"].net._compiled_call_impl is None  # eager


def test_unknown_backend_is_one_line_naming_the_flag(capsys):
    assert train.main(["--model", "toy", "--compile-backend", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--compile-backend nope: not a torch.compile backend" in err and "inductor" in err
    assert "Traceback" not in err


def test_predict_compile_reports_the_network_calls(toy_registered, capsys, tmp_path):
    out = train.run(["--model", "toy", "--logger", "none", "--progress", "none", "--max-steps", "2"])
    capsys.readouterr()
    assert predict.main(["--ckpt", str(out["run_dir"] / "last.ckpt"), "--compile", "export", "--format",
                         "safetensors", "--out", str(tmp_path / "toy.safetensors")]) == 0
    assert "[predict] torch.compile (inductor) of the network: the command did not call it" in capsys.readouterr().err

    from toy_task import ToyModule

    model = ToyModule.load_from_checkpoint(str(out["run_dir"] / "last.ckpt")).eval()
    x = torch.randn(5, 4)
    eager = model(x)
    times = compile_network(model, "aot_eager")
    with torch.inference_mode():
        torch.testing.assert_close(model(x), eager)
        model(x)
    assert times.summary("call").startswith("first call") and "(median of 1)" in times.summary("call")
