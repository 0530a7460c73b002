#!/usr/bin/env bash
# One idempotent set-up: .venv (Python 3.11) with torch, every dependency of pyproject.toml, and mamba-ssm /
# causal-conv1d. Their CUDA kernels are built only where nvcc and a usable GPU exist; elsewhere the zoo runs on its
# own portable PyTorch path. A second run with nothing changed takes seconds.
#
#   ./setup.sh            set up or update .venv
#   FORCE=1 ./setup.sh    redo every step
#   PYTHON=python3.12 ./setup.sh   use another interpreter (3.10+)
set -euo pipefail
cd "$(dirname "$0")"

TORCH_VERSION=2.14.1
TORCHVISION_VERSION=0.29.1
VENV=.venv
PY=${PYTHON:-python3.11}

say()  { printf '\033[1m[setup]\033[0m %s\n' "$*"; }
fail() { printf '\033[31m[setup] FAILED:\033[0m %s\n' "$*" >&2; exit 1; }
trap 'fail "step \"${STEP:-?}\" exited with status $? (see the output above)"' ERR

# The stamp covers everything that decides what gets installed; when it matches, nothing is re-done.
stamp_now() { cat pyproject.toml setup.sh | sha256sum | cut -c1-16; }
STAMP_FILE=$VENV/.setup-stamp

STEP="check interpreter"
command -v "$PY" >/dev/null || fail "$PY not found. Install Python 3.11 or run PYTHON=/path/to/python3.x ./setup.sh"

if [[ -z "${FORCE:-}" && -f $STAMP_FILE && "$(cat $STAMP_FILE)" == "$(stamp_now)" ]] &&
   $VENV/bin/python -c "import torch, lightning, timm, importlib.util as u; assert u.find_spec('mamba_ssm')" 2>/dev/null; then
    say "up to date: $VENV matches pyproject.toml and setup.sh (FORCE=1 ./setup.sh to redo)"
    exit 0
fi

STEP="create $VENV"
if [[ ! -x $VENV/bin/python ]]; then
    say "creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
fi
PIP=(pip_install)
# pip warns once per package about find-links / index folders of some machines' pip config that do not exist;
# those lines are noise, every other line of pip's output is kept.
pip_install() {
    "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}

STEP="build tools"
say "installing build tools (pip, setuptools, wheel, packaging, ninja)"
"${PIP[@]}" -q --upgrade pip setuptools wheel packaging ninja

STEP="torch"
have_torch=$($VENV/bin/python -c "import torch, torchvision; print(torch.__version__.split('+')[0], torchvision.__version__.split('+')[0])" 2>/dev/null || true)
if [[ "$have_torch" != "$TORCH_VERSION $TORCHVISION_VERSION" ]]; then
    say "installing torch $TORCH_VERSION and torchvision $TORCHVISION_VERSION (large: ~5 GB with CUDA libraries)"
    "${PIP[@]}" -q "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION"
else
    say "torch $TORCH_VERSION / torchvision $TORCHVISION_VERSION already installed"
fi

STEP="project dependencies"
say "installing the zoo and its dependencies from pyproject.toml (editable, with dev extras)"
"${PIP[@]}" -q -e ".[dev]"

STEP="mamba-ssm"
cuda_ok=$($VENV/bin/python -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [[ "$cuda_ok" == 1 ]] && command -v nvcc >/dev/null; then
    say "CUDA GPU and nvcc found: building causal-conv1d and mamba-ssm with their CUDA kernels (several minutes)"
    "${PIP[@]}" -q --no-build-isolation "causal-conv1d>=1.4" "mamba-ssm>=2.2"
else
    why="no usable CUDA GPU"; [[ "$cuda_ok" == 1 ]] && why="no nvcc"
    if $VENV/bin/python -c "import importlib.util as u; assert u.find_spec('mamba_ssm') and u.find_spec('causal_conv1d')" 2>/dev/null; then
        say "mamba-ssm and causal-conv1d already installed ($why: the zoo uses its portable PyTorch path)"
    else
        say "$why: installing mamba-ssm and causal-conv1d without CUDA kernels (the zoo uses its portable PyTorch path)"
        MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE \
        CAUSAL_CONV1D_FORCE_BUILD=TRUE CAUSAL_CONV1D_SKIP_CUDA_BUILD=TRUE \
            "${PIP[@]}" -q --no-build-isolation "causal-conv1d>=1.4" "mamba-ssm>=2.2"
    fi
fi

STEP="check"
$VENV/bin/python - <<'PY'
import torch, lightning, timm, torchmetrics
print(f"[setup] torch {torch.__version__} (cuda available: {torch.cuda.is_available()}), "
      f"lightning {lightning.__version__}, timm {timm.__version__}, torchmetrics {torchmetrics.__version__}")
PY
stamp_now > "$STAMP_FILE"
say "done. Next: .venv/bin/python train.py --list"
