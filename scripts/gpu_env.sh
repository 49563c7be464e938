#!/usr/bin/env bash
# The Python packages the GPU check needs, on a machine whose image already holds a CUDA build of torch.
#
#   bash scripts/gpu_env.sh fetch            # here, with a package registry: the wheels the GPU image lacks
#                                            # (bitsandbytes, jsonargparse; Python 3.12, x86-64) into .whl/
#   bash scripts/gpu_env.sh install [PYTHON] # there: whatever PYTHON cannot import goes into .gpu-site/, from
#                                            # .whl/ (no registry needed), else from the registry
#
# The GPU machine of this workplace reaches no registry: its image has torch (CUDA), transformers, lightning,
# peft, pytest, safetensors and torchmetrics, and lacks bitsandbytes and jsonargparse, which travel as wheels
# (.whl/, about 43 MB). scripts/gpu_check.sh runs `install` as its first step and puts .gpu-site on PYTHONPATH.
set -uo pipefail
cd "$(dirname "$0")/.."
cmd="${1:-install}"
# import name -> pip name of everything the CUDA tests and the GPU benchmark import
NEEDED="torch:torch transformers:transformers lightning:lightning peft:peft bitsandbytes:bitsandbytes
jsonargparse:jsonargparse safetensors:safetensors torchmetrics:torchmetrics pytest:pytest yaml:pyyaml
accelerate:accelerate"

case "$cmd" in
fetch)
    py="${2:-python}"
    mkdir -p .whl
    for name in bitsandbytes jsonargparse; do
        version=$("$py" -c "import importlib.metadata as m; print(m.version('$name'))")
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform any -d .whl "$name==$version" || exit 1
    done
    ls -l .whl
    ;;
install)
    py="${2:-python3}"
    export PYTHONPATH="$PWD/.gpu-site${PYTHONPATH:+:$PYTHONPATH}"
    missing() {  # the pip names of the modules PYTHON cannot find (found, not imported: fast)
        "$py" -c "
import importlib.util, sys
for pair in sys.argv[1:]:
    module, name = pair.split(':')
    if importlib.util.find_spec(module) is None:
        print(name)" $NEEDED
    }
    todo=$(missing | tr '\n' ' ')
    echo "python: $("$py" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
    echo "missing before setup: ${todo:-nothing}"
    if [ -n "$todo" ] && compgen -G ".whl/*.whl" >/dev/null; then
        for name in $todo; do
            wheel=$(ls .whl/"$name"-*.whl 2>/dev/null | head -1)
            [ -n "$wheel" ] && "$py" -m pip install -q --no-index --no-deps --no-compile --target .gpu-site "$wheel"
        done
        todo=$(missing | tr '\n' ' ')
    fi
    if [ -n "$todo" ]; then  # from the registry, if this machine reaches one (an unpinned torch is a CUDA build)
        echo "from the registry: $todo"
        # shellcheck disable=SC2086
        "$py" -m pip install -q --timeout 15 --retries 1 --target .gpu-site $todo
        todo=$(missing | tr '\n' ' ')
    fi
    "$py" - <<'EOF'
import importlib.metadata as m

import torch

names = ["torch", "transformers", "lightning", "peft", "bitsandbytes", "jsonargparse", "pytest"]
found = []
for n in names:
    try:
        found.append(f"{n} {m.version(n)}")
    except m.PackageNotFoundError:
        found.append(f"{n} ?")
print(", ".join(found) + f"; torch CUDA build: {torch.version.cuda}, CUDA available: {torch.cuda.is_available()}")
EOF
    if [ -n "$todo" ]; then
        echo "still missing: $todo" >&2
        exit 1
    fi
    ;;
*)
    echo "usage: bash scripts/gpu_env.sh fetch [PYTHON] | install [PYTHON]" >&2
    exit 2
    ;;
esac
