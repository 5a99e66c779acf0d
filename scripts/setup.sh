#!/usr/bin/env bash
# Set up stepcache in ./.venv (or $STEPCACHE_VENV) with every extra, CPU-only.
#
# torch is installed first, pinned to the CPU build this machine's package index serves, because
# an unpinned torch (asked for by a dependency) pulls several GB of CUDA packages. An existing
# torch in the venv is kept.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${STEPCACHE_VENV:-.venv}
TORCH_SPEC=${STEPCACHE_TORCH:-torch==2.13.0}
# Extra pip arguments for the torch install only, e.g. a CPU wheel index:
#   STEPCACHE_TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
read -r -a TORCH_PIP_ARGS <<< "${STEPCACHE_TORCH_PIP_ARGS:-}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# pip's noisy "is ignored: it is neither ..." lines are filtered out, but pip's exit status decides
# whether the install worked, not grep's (grep exits 1 when it has nothing left to print).
pip_install() {
    local status
    set +e
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither"
    status=${PIPESTATUS[0]}
    set -e
    if [ "$status" -ne 0 ]; then
        echo "setup: pip install $* failed (exit status $status)" >&2
        return "$status"
    fi
}

if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "setup: installing $TORCH_SPEC ${STEPCACHE_TORCH_PIP_ARGS:-}"
    pip_install "$TORCH_SPEC" "${TORCH_PIP_ARGS[@]}"
    # numpy comes with the extras below: torch's warning that it is missing means nothing yet.
    "$VENV/bin/python" -W "ignore::UserWarning" -c "import torch; print('setup: torch', torch.__version__, '(CUDA build)' if torch.version.cuda else '(CPU build)')"
fi
echo "setup: installing stepcache with all extras"
pip_install -e ".[all]"
# The real openpi robot client, for the websocket tests and benchmarks. It declares numpy<2 but runs on numpy 2
# (it only uses ndarray, frombuffer-style construction and dtype strings): installed without its dependency
# resolution, which would downgrade numpy; what it imports comes with the "openpi" extra above. Pinned: the tests
# exercise this version. pip skips it when it is already installed.
pip_install --no-deps "openpi-client==0.1.2"
"$VENV/bin/python" -c "import torch, stepcache; print(f'setup: stepcache {stepcache.__version__}, torch {torch.__version__}')"
