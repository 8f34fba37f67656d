#!/usr/bin/env bash
# Install dcl-embed and one dependency set into a new virtual environment.
#
# Usage: deploy/install.sh TARGET VENV_DIR
#   TARGET    serve-cpu | serve-gpu | train
#   VENV_DIR  folder for the new virtual environment (must not exist yet)
#
# The Dockerfile and tests/deploy run this same script, so an image and the test
# get the same packages. It installs the project from the folder that contains
# this script's parent (pyproject.toml and the packages), never from an index,
# with the versions pinned in deploy/constraints.txt.
#
# Environment:
#   PYTHON              interpreter that creates the venv (default: python3.11)
#   TORCH_INDEX_URL     train only: extra index for torch and torchvision, for
#                       example the PyTorch CPU wheel index for a smaller image
set -euo pipefail

usage() {
    echo "usage: $0 serve-cpu|serve-gpu|train VENV_DIR" >&2
    exit 2
}

[[ $# -eq 2 ]] || usage
target=$1
venv=$2
project_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
constraints="$project_dir/deploy/constraints.txt"
python=${PYTHON:-python3.11}

case $target in
    serve-cpu | serve-gpu | train) ;;
    *)
        echo "invalid TARGET '$target': use serve-cpu, serve-gpu or train" >&2
        usage
        ;;
esac

if [[ -e $venv ]]; then
    echo "VENV_DIR '$venv' already exists: pass a new folder" >&2
    exit 2
fi

"$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check --no-input)

case $target in
    serve-cpu)
        "${pip[@]}" install -c "$constraints" "$project_dir[serve]"
        ;;
    serve-gpu)
        # onnxruntime and onnxruntime-gpu install the same `onnxruntime` module.
        # Removing the CPU wheel after both are in deletes files that the GPU
        # wheel shares with it, so the GPU wheel is reinstalled last.
        "${pip[@]}" install -c "$constraints" "$project_dir[serve,gpu]"
        "${pip[@]}" uninstall --yes onnxruntime
        "${pip[@]}" install -c "$constraints" --force-reinstall --no-deps onnxruntime-gpu
        ;;
    train)
        extra_index=()
        if [[ -n ${TORCH_INDEX_URL:-} ]]; then
            extra_index=(--extra-index-url "$TORCH_INDEX_URL")
        fi
        "${pip[@]}" install "${extra_index[@]}" -c "$constraints" "$project_dir[train]"
        ;;
esac

"$venv/bin/dcl" --help >/dev/null
echo "installed dcl-embed ($target) into $venv"
