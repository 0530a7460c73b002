"""Shared test set-up: CPU only, 2 threads, and mamba-ssm's pure-PyTorch references imported once per session."""
from __future__ import annotations

import os
import sys
import types

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`-n N`), the cores are shared between N workers: each takes its share, so two workers on two
# cores do not fight over OpenMP threads. Subprocesses the tests start inherit the same limit.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_THREADS = max(1, min(2, (os.cpu_count() or 1) // _WORKERS))
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))
torch.set_num_threads(_THREADS)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _import_mamba_ssm_refs() -> types.SimpleNamespace:
    """Import mamba-ssm's reference functions and modules on a machine without its CUDA extensions.

    mamba-ssm imports `selective_scan_cuda` and `causal_conv1d_cuda` at module load; empty stand-ins let the import
    succeed, and `causal_conv1d_fn = None` makes its modules take their pure-PyTorch conv path.
    """
    for name in ("selective_scan_cuda", "causal_conv1d_cuda"):
        sys.modules.setdefault(name, types.ModuleType(name))
    import mamba_ssm.modules.mamba2 as m2
    import mamba_ssm.modules.mamba_simple as m1
    import mamba_ssm.ops.selective_scan_interface as ssi
    from mamba_ssm.modules.ssd_minimal import ssd_minimal_discrete
    from mamba_ssm.ops.triton import layernorm_gated, ssd_combined
    from mamba_ssm.ops.triton.layer_norm import rms_norm_ref
    from mamba_ssm.ops.triton.layernorm_gated import rms_norm_ref as gated_rms_norm_ref
    from mamba_ssm.utils.generation import InferenceParams

    for mod in (m1, m2, ssi):
        if hasattr(mod, "causal_conv1d_fn"):
            mod.causal_conv1d_fn = None
        if hasattr(mod, "causal_conv1d_update"):
            mod.causal_conv1d_update = None
    try:
        from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref, causal_conv1d_update_ref
    except Exception:  # pragma: no cover - older causal-conv1d
        causal_conv1d_ref = causal_conv1d_update_ref = None
    return types.SimpleNamespace(
        Mamba=m1.Mamba,
        Mamba2=m2.Mamba2,
        selective_scan_ref=ssi.selective_scan_ref,
        mamba_inner_ref=ssi.mamba_inner_ref,
        ssd_minimal_discrete=ssd_minimal_discrete,
        mamba_split_conv1d_scan_ref=ssd_combined.mamba_split_conv1d_scan_ref,
        mamba_chunk_scan_combined=ssd_combined.mamba_chunk_scan_combined,
        ssd_combined=ssd_combined,
        layernorm_gated=layernorm_gated,
        rms_norm_ref=rms_norm_ref,
        gated_rms_norm_ref=gated_rms_norm_ref,
        causal_conv1d_ref=causal_conv1d_ref,
        causal_conv1d_update_ref=causal_conv1d_update_ref,
        InferenceParams=InferenceParams,
    )


@pytest.fixture(scope="session")
def mamba_ref() -> types.SimpleNamespace:
    """mamba-ssm's references (its modules and `*_ref` functions), imported once per test session (~5 s)."""
    return _import_mamba_ssm_refs()


@pytest.fixture(scope="session", autouse=True)
def _demo_and_checkpoints_in_tmp(tmp_path_factory):
    """Demo datasets are generated once per session (and once for all xdist workers) in a temporary folder; runs never
    write into the repo."""
    import zoo.trainer

    if os.environ.get("PYTEST_XDIST_WORKER"):  # one demo folder for every worker: demo sets are written atomically
        demo = tmp_path_factory.getbasetemp().parent / "demo"
        demo.mkdir(exist_ok=True)
    else:
        demo = tmp_path_factory.mktemp("demo")
    os.environ["ZOO_DEMO_DIR"] = str(demo)
    zoo.trainer.CHECKPOINT_ROOT = tmp_path_factory.mktemp("checkpoints")
    yield


@pytest.fixture
def toy_registered(tmp_path, monkeypatch):
    """Registers the test-only 'toy' task and points checkpoints and demo data at a temporary folder."""
    from toy_task import ENTRY

    import model_config
    import zoo.trainer

    monkeypatch.setitem(model_config.REGISTRY, "toy", ENTRY)
    monkeypatch.setattr(zoo.trainer, "CHECKPOINT_ROOT", tmp_path / "checkpoints")
    monkeypatch.setenv("ZOO_DEMO_DIR", str(tmp_path / "demo"))
    return tmp_path


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of micro networks: they gain nothing from more, and on a loaded CPU the
    OpenMP spin of a second thread costs up to 10x (`pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    """Under xdist, the `slow` tests go first, so that no 20-40 s test starts last while the other worker idles."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)
