#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py, cnnjax.lab.bench.gpu_check), runnable without network.
#
# On a machine with network, once (about 12 MB of wheels into .whl/, which git ignores):
#   bash scripts/gpu_check.sh fetch
# On the GPU machine (Python 3.12, with JAX, flax, optax, orbax and PyTorch installed), from the
# repository root with .whl/ beside it:
#   bash scripts/gpu_check.sh --json=gpu_check.json --log=gpu_check.log
#   bash scripts/gpu_check.sh --dry_run ...   (tiny sizes, any host: what tests/test_gpu_check.py runs)
# The wheels are what such a machine lacks (grain, tensorflow-datasets, array-record, ml_collections
# and their dependencies that are not on it, pinned to the versions the tests pass with); they are
# installed with --no-index --no-deps into a private folder that goes first on PYTHONPATH, so the
# machine's own packages are left as they are. PYTHON chooses the interpreter (default python3).
# The GPU decoder's wheels (nvImageCodec and nvJPEG, about 29 MB, `fetch` puts them in .whl/gpu_decode/)
# go into a second private folder, nvJPEG beside nvImageCodec: a nvidia/cu13 folder ahead of the
# machine's would hide JAX's own CUDA libraries, which JAX loads from the first nvidia/cu13 on the path.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
WHEELS="${CNNJAX_WHEELS:-.whl}"
SITE="${CNNJAX_WHEELS_SITE:-${TMPDIR:-/tmp}/cnnjax-gpu-check-site}"
# Python 3.12 on x86-64 Linux: the GPU machine's interpreter, whatever fetches them.
TARGET=(--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# What a GPU image with JAX, flax, optax, orbax and PyTorch typically lacks, with the dependencies of
# those that are not on it either. protobuf is pinned too: googleapis-common-protos needs >= 6.33.5.
PINNED=(grain==0.2.18 array_record==0.8.6 tensorflow-datasets==4.9.10 ml_collections==1.1.0
        dm-tree==0.1.10 immutabledict==4.3.1 simple-parsing==0.1.9 docstring_parser==0.18.0
        tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 protobuf==7.36.2 termcolor==3.3.0
        toml==0.10.2 portpicker==1.6.0 importlib_resources==6.5.2)
# promise (a TFDS dependency) has no wheel on PyPI; its pure-Python wheel is built from the sdist.
BUILT=(promise==2.3)
# The GPU decoder (data.decoder=gpu, the gpu_decode section): what `pip install 'cnnjax[cuda]'` adds to JAX.
DECODE_WHEELS="$WHEELS/gpu_decode"
DECODE_SITE="${CNNJAX_DECODE_SITE:-${TMPDIR:-/tmp}/cnnjax-gpu-decode-site}"
DECODE=(nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43)

if [[ "${1:-}" == "fetch" ]]; then
  mkdir -p "$WHEELS"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$WHEELS" "${PINNED[@]}"
  "$PYTHON" -m pip wheel -q --no-deps -w "$WHEELS" "${BUILT[@]}"
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$DECODE_WHEELS" "${DECODE[@]}"
  du -sh "$WHEELS" "$DECODE_WHEELS"
  exit 0
fi

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels in $WHEELS/: using the interpreter's own packages" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if compgen -G "$DECODE_WHEELS/*.whl" > /dev/null; then
  rm -rf "$DECODE_SITE"
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$DECODE_SITE" \
    "$DECODE_WHEELS"/*.whl
  mv "$DECODE_SITE"/nvidia/cu13/lib/libnvjpeg.so.* "$DECODE_SITE"/nvidia/nvimgcodec/  # its RUNPATH has $ORIGIN
  rm -rf "$DECODE_SITE"/nvidia/cu13
  export PYTHONPATH="$DECODE_SITE:$PYTHONPATH"
else
  echo "no wheels in $DECODE_WHEELS/: the GPU decoder runs only if the interpreter has nvImageCodec" >&2
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
