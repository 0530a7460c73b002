"""ONNX export for any task: fp32 ONNX with a dynamic batch, int8 ONNX, and a parity check against PyTorch.

    report = export_and_check(wrapper, example, "model.onnx", input_names=["image"], output_names=["age", "p_female"])
    print(report.summary())

A task exposes it as a `predict.py` verb with `export_command(prepare)`, where `prepare(model, args)` returns an
`ExportSpec` (the module to trace, usually a small wrapper that turns raw outputs into what users want, plus inputs).

Every task also exports `--format safetensors`: the weights with the task and config as JSON metadata, no pickle
(`zoo.checkpoint.save_safetensors`); `load_model` and `predict.py --ckpt X.safetensors` open that file. A task without
an ONNX export gets that verb from `ZooModule.commands()` through `safetensors_command()`.
"""
from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from zoo.commands import Command
from zoo.errors import ZooError

DEFAULT_OPSET = 18


@dataclass
class ExportSpec:
    """What to export: `module(*example)` -> tensors, each with the batch as dim 0; `check` inputs for the parity test."""

    module: nn.Module
    example: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    check: tuple[torch.Tensor, ...] | None = None  # default: `example`
    metadata: dict[str, str] = field(default_factory=dict)  # stored in the file (preprocessing, units, ...)


@dataclass
class ExportReport:
    """Files written, their sizes in bytes, and the largest |ONNX - PyTorch| per output on the check batch."""

    onnx_path: str
    int8_path: str | None
    onnx_bytes: int
    int8_bytes: int | None
    fp32_max_abs_diff: dict[str, float]
    int8_max_abs_diff: dict[str, float] = field(default_factory=dict)
    opset: int = DEFAULT_OPSET
    check_batch: int = 0
    exporter: str = "torch.export"

    def summary(self) -> str:
        lines = [f"fp32 ONNX  {self.onnx_path}  {self.onnx_bytes / 2**20:.2f} MiB  (opset {self.opset}, dynamic batch, "
                 f"{self.exporter} exporter)",
                 f"  max |onnx - torch| on a batch of {self.check_batch}: " + _diffs(self.fp32_max_abs_diff)]
        if self.int8_path:
            lines += [f"int8 ONNX  {self.int8_path}  {self.int8_bytes / 2**20:.2f} MiB  "
                      f"({self.int8_bytes / self.onnx_bytes:.0%} of fp32)",
                      "  max |int8 - torch|: " + _diffs(self.int8_max_abs_diff)]
        return "\n".join(lines)


def _diffs(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3g}" for k, v in d.items())


def export_onnx(module: nn.Module, example: Sequence[torch.Tensor], path: str | Path, input_names: Sequence[str],
                output_names: Sequence[str], opset: int = DEFAULT_OPSET) -> str:
    """Write `module` to `path` (one self-contained file, batch dimension dynamic). Returns the exporter used.

    From opset 18 the torch.export-based exporter is tried first; older opsets, and models it cannot capture, use the
    TorchScript exporter.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module, example = module.eval(), tuple(example)
    names = dict(input_names=list(input_names), output_names=list(output_names))
    dynamo_error = None
    if opset >= 18:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                batch = torch.export.Dim("batch", min=1, max=4096)
                torch.onnx.export(module, example, str(path), **names, opset_version=opset, dynamo=True,
                                  dynamic_shapes=tuple({0: batch} for _ in example), external_data=False,
                                  verbose=False)
            return "torch.export"
        except Exception as e:  # noqa: BLE001 - retry with the other exporter, report both if it fails too
            dynamo_error = f"torch.export: {type(e).__name__}: {str(e)[:300]}; "
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
            torch.onnx.export(module, example, str(path), **names, opset_version=opset, dynamo=False,
                              dynamic_axes=axes)
        return "torchscript"
    except Exception as e:  # noqa: BLE001
        raise ZooError(f"ONNX export of {type(module).__name__} failed: {dynamo_error or ''}TorchScript: "
                       f"{type(e).__name__}: {str(e)[:300]}") from None


def write_metadata(path: str | Path, metadata: dict[str, str]) -> None:
    """Add key/value strings to an ONNX file's metadata_props (read back with onnxruntime's `get_modelmeta()`)."""
    import onnx

    model = onnx.load(str(path))
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(model, str(path))


def file_opset(path: str | Path) -> int:
    """The default-domain opset an ONNX file was written with."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def quantize_int8(src: str | Path, dst: str | Path) -> Path:
    """Dynamic int8 quantisation (int8 weights, activations quantised on the fly): no calibration data needed."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = Path(src), Path(dst)
    prepared = dst.with_name(dst.stem + ".pre.onnx")
    try:
        quant_pre_process(str(src), str(prepared))  # shape inference + graph clean-up, as onnxruntime recommends
    except Exception:  # noqa: BLE001 - optional optimisation; quantise the plain export instead
        prepared = src
    quiet = logging.getLogger()  # quantize_dynamic logs advice on the root logger
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        quantize_dynamic(str(prepared), str(dst), weight_type=QuantType.QInt8)
    finally:
        quiet.setLevel(level)
        if prepared != src:
            prepared.unlink(missing_ok=True)
    return dst


def run_onnx(path: str | Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of an ONNX file on the CPU with onnxruntime."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def torch_outputs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        out = module.eval()(*inputs)
    return (out,) if isinstance(out, torch.Tensor) else tuple(out)


def max_abs_diffs(path: str | Path, spec: ExportSpec, check: tuple[torch.Tensor, ...],
                  reference: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """max |ONNX - PyTorch| per output name."""
    outputs = run_onnx(path, {n: t.cpu().numpy() for n, t in zip(spec.input_names, check)})
    return {n: float(np.max(np.abs(o - r.cpu().numpy()))) if o.size else 0.0
            for n, o, r in zip(spec.output_names, outputs, reference)}


def export_and_check(spec: ExportSpec, out: str | Path, int8: bool = True, opset: int = DEFAULT_OPSET,
                     atol: float = 1e-3) -> ExportReport:
    """Export fp32 (+ int8) ONNX to `out` (+ `<stem>.int8.onnx`) and compare both with PyTorch on the check batch.

    Raises a `ZooError` when an fp32 output differs from PyTorch by more than `atol * max(1, max|output|)`; the int8
    differences are reported, not judged (they depend on the model and the data).
    """
    out = Path(out)
    spec.module.eval().cpu()
    exporter = export_onnx(spec.module, spec.example, out, spec.input_names, spec.output_names, opset)
    if spec.metadata:
        write_metadata(out, spec.metadata)
    check = spec.check if spec.check is not None else spec.example
    reference = torch_outputs(spec.module, check)
    fp32 = max_abs_diffs(out, spec, check, reference)
    for (name, diff), ref in zip(fp32.items(), reference):
        if not diff <= atol * max(1.0, float(ref.abs().max())):  # `not <=` also catches NaN
            raise ZooError(f"ONNX export {out}: output '{name}' differs from PyTorch by {diff:.3g} (tolerance "
                           f"{atol:g} relative to its scale). The export is wrong; do not ship it. Try another "
                           f"--opset, and report the model and the torch / onnx versions.")
    report = ExportReport(str(out), None, out.stat().st_size, None, fp32, opset=file_opset(out), exporter=exporter,
                          check_batch=int(check[0].shape[0]))
    if int8:
        q = quantize_int8(out, out.with_name(out.stem + ".int8.onnx"))
        report.int8_path, report.int8_bytes = str(q), q.stat().st_size
        report.int8_max_abs_diff = max_abs_diffs(q, spec, check, reference)
    return report


def write_safetensors(model, args: argparse.Namespace) -> int:
    """`export --format safetensors`: weights + task + config in one pickle-free file, then a check that it reopens
    to the same tensors."""
    from zoo.checkpoint import read_safetensors, save_safetensors

    out = Path(args.out) if args.out else Path(args.ckpt).with_suffix(".safetensors")
    if out.resolve() == Path(args.ckpt).resolve():
        raise ZooError(f"--out {out} is the checkpoint being exported; choose another file name.")
    save_safetensors(model, out)
    state, back = model.state_dict(), read_safetensors(out)["state_dict"]
    differ = [k for k, v in state.items() if k not in back or not same_tensor(v.cpu(), back[k])]
    if differ:
        raise ZooError(f"{out}: {len(differ)} tensors did not survive the export (first: {differ[0]}). Report it.")
    print(f"wrote {out} ({out.stat().st_size / 2**20:.2f} MiB, {len(state)} tensors, task '{model.TASK}'); open it "
          f"with `python predict.py --ckpt {out} ...` or zoo.checkpoint.load_model('{out}').")
    return 0


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal values, dtype and shape (NaN equals NaN)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point() or a.is_complex():
        return bool(torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))
    return torch.equal(a, b)


def _format_arguments(p: argparse.ArgumentParser, formats: Sequence[str], out_help: str) -> None:
    p.add_argument("--format", choices=list(formats), default=formats[0],
                   help=f"{' or '.join(formats)} (default {formats[0]}); safetensors = the weights and config in one "
                        f"file without pickle, for sharing")
    p.add_argument("--out", default=None, help=out_help)


def safetensors_command() -> Command:
    """The `export` verb of a task without an ONNX export: `--format safetensors` only."""

    def add_arguments(p: argparse.ArgumentParser) -> None:
        _format_arguments(p, ["safetensors"], "file to write (default: next to the checkpoint, .safetensors)")

    return Command("export", "write the weights + config as one .safetensors file (no pickle)", add_arguments,
                   write_safetensors, inference=False)


def export_command(prepare: Callable[[Any, argparse.Namespace], ExportSpec], help_extra: str = "") -> Command:
    """The `export` verb of `predict.py` for a task whose `prepare(model, args)` gives the `ExportSpec`:
    `--format onnx` (default) or `--format safetensors`.

    `prepare` may read `args.batch` (size of the parity-check batch) and `args.images` (optional real inputs).
    """

    def add_arguments(p: argparse.ArgumentParser) -> None:
        _format_arguments(p, ["onnx", "safetensors"], "file to write (default: next to the checkpoint, .onnx or "
                          ".safetensors); the int8 ONNX model goes beside it as <name>.int8.onnx")
        p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (>= 13; default {DEFAULT_OPSET})")
        p.add_argument("--no-int8", action="store_true", help="skip the int8 model")
        p.add_argument("--batch", type=int, default=4, help="size of the batch the outputs are compared on")
        p.add_argument("--images", nargs="*", default=[], help="real images to compare on (default: random inputs)")
        p.add_argument("--atol", type=float, default=1e-3, help="fp32 tolerance, relative to each output's scale")
        p.add_argument("--json", action="store_true", help="print the report as JSON")

    def run(model, args: argparse.Namespace) -> int:
        if args.format == "safetensors":
            return write_safetensors(model, args)
        if args.opset < 13:
            raise ZooError(f"--opset {args.opset}: use 13 or newer.")
        out = Path(args.out) if args.out else Path(args.ckpt).with_suffix(".onnx")
        report = export_and_check(prepare(model, args), out, int8=not args.no_int8, opset=args.opset,
                                  atol=args.atol)
        print(json.dumps(asdict(report), indent=2) if args.json else report.summary())
        return 0

    return Command("export", "write fp32 + int8 ONNX and check them against PyTorch, or --format safetensors"
                   + help_extra, add_arguments, run, inference=False)

