#!/usr/bin/env bash
# The GPU check of issue 15 in one prepared run (bench/gpu_check.py): random-weight FLUX.1-dev and Wan2.1-1.3B
# geometry, full vs TC-Padé "balanced"/"fast", eager / inductor / CUDA-graph options / TensorRT where it imports,
# CUDA-event timings, speedup vs ideal, host syncs per step, peak memory; writes the report (default bench/GPU.md).
#
#   bash bench/gpu_check.sh --prepare-wheels out/wheels   # HERE (registry access): the wheels the GPU machine lacks
#   bash bench/gpu_check.sh [--wheels out/wheels] [gpu_check.py options]     # ON THE GPU MACHINE, ~10 minutes
#   bash bench/gpu_check.sh --smoke                        # the same on the CPU with tiny sizes (installs nothing)
#
# The GPU machine has CUDA torch and no diffusers and no network: the wheels folder (carried with the working tree)
# is installed with --no-deps, each wheel only where its distribution is missing and only where it fits this Python;
# tcpade-fx itself is installed from this checkout with --no-deps. Its output folder: $OUT when set, else bench/.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=out/wheels
SMOKE=0
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --prepare-wheels)
      dest="${2:?--prepare-wheels needs a folder}"; mkdir -p "$dest"
      # pure-Python wheels of diffusers and what it imports that a bare CUDA torch image may lack
      pure=$(python - <<'PY'
import importlib.metadata as m
names = ["diffusers", "huggingface_hub", "requests", "urllib3", "idna", "certifi", "charset_normalizer", "tqdm",
         "importlib_metadata", "zipp", "httpx", "httpcore", "h11", "anyio", "sniffio", "packaging", "filelock",
         "typing_extensions", "fsspec"]
out = []
for n in names:
    try:
        out.append(f"{n}=={m.version(n)}")
    except m.PackageNotFoundError:
        pass
print(" ".join(out))
PY
)
      # shellcheck disable=SC2086
      pip download --no-deps --only-binary=:all: -d "$dest" $pure
      # compiled ones, for the CPython versions a CUDA torch image is likely to run
      for py in 3.10 3.11 3.12 3.13; do
        pip download --no-deps --only-binary=:all: --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
          --python-version "$py" --implementation cp -d "$dest" regex safetensors pyyaml pillow || true
      done
      du -sh "$dest"; exit 0 ;;
    --wheels) WHEELS="${2:?--wheels needs a folder}"; shift 2 ;;
    --smoke) SMOKE=1; ARGS+=("$1"); shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

OUT_DIR="${OUT:-bench}"
if [[ $SMOKE == 0 ]]; then
  python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device: use --smoke on the CPU'"
  if [[ -d "$WHEELS" ]]; then
    for whl in "$WHEELS"/*.whl; do
      dist=$(basename "$whl" | cut -d- -f1)
      if python -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null; then
        continue  # installed already: keep the machine's own
      fi
      pip install --no-deps --no-index -q "$whl" 2>/dev/null || echo "skipped $whl (not for this Python/platform)"
    done
  fi
  python -c "import diffusers" || { echo "diffusers does not import: carry its wheels (bash bench/gpu_check.sh --prepare-wheels $WHEELS)"; exit 2; }
  pip install --no-deps --no-build-isolation -q -e . 2>/dev/null \
    || echo "tcpade-fx not pip-installed (no setuptools here?): bench/gpu_check.py imports it from this checkout"
  mkdir -p "$OUT_DIR"
  ARGS+=(--out "$OUT_DIR/GPU.md" --jsonl "$OUT_DIR/gpu_check.jsonl")
fi
exec timeout 590 python bench/gpu_check.py "${ARGS[@]}"
