#!/usr/bin/env bash
# Wheels that let benchmarks/attention.py time tokamax on the GPU machine, which has no package
# registry: run here (with pip), carry the folder, install it there. Usage:
#   bash benchmarks/fetch_peer_wheels.sh [DIR=.whl_tokamax]     # here; add DIR to .git/info/exclude
#   # on the device, with DIR in `carry`:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site DIR/*.whl &&
#     PYTHONPATH=.:/tmp/site:DIR/stub python3 benchmarks/attention.py --out=$OUT/attention.json
# tokamax 0.0.17 and its runtime needs (the image has jax, absl, tqdm). It imports xprof's
# kernel-stats tool at import time, used only by its own profiler: DIR/stub holds a stand-in.
set -euo pipefail
dir=${1:-.whl_tokamax}
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$dir" tokamax==0.0.17 einshape==1.0 pydantic==2.14.3 pydantic-core==2.50.4 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0 qwix==0.1.8 \
  immutabledict==4.3.1 tensorboardx==2.6.5 jaxtyping==0.3.11 wadler-lindig==0.1.8
tools="$dir/stub/xprof/cli/tools"
mkdir -p "$tools"
touch "$dir/stub/xprof/__init__.py" "$dir/stub/xprof/cli/__init__.py" "$tools/__init__.py"
cat > "$tools/get_kernel_stats_tool.py" <<'PY'
"""Stand-in: tokamax imports xprof's kernel-stats tool at import time; our benchmarks never call it."""


def compute_kernel_stats(*args, **kwargs):
    raise NotImplementedError("xprof is not installed; this is ccajax's import stand-in")
PY
echo "wheels in $dir; stand-in module in $dir/stub"
