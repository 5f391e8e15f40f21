#!/usr/bin/env bash
# Builds prefopt with the `cuda` feature on a machine with no GPU and no CUDA install.
#
#   scripts/build_cuda.sh                 # -> target-cuda/target/release/prefopt (--features cuda)
#   scripts/build_cuda.sh test --no-run ... # any other cargo command in the same environment
#
# candle's CUDA kernels are compiled by nvcc at build time; the binary links libcuda (the
# driver), cuBLAS, cuRAND, NVRTC and the CUDA runtime. Everything but the driver comes from
# PyPI, pinned to CUDA 13.0 (the lent GPU machine has CUDA 13.0, driver 580: PTX from a newer
# nvcc would not load there; nvidia-nvvm, which nvcc pulls in unpinned, is pinned too), into
# target-cuda/venv. The driver library exists only where a
# GPU does, so the link uses a stub libcuda.so.1 that defines the driver's symbols (as the CUDA
# toolkit's own lib64/stubs does); at run time the real driver's libcuda.so.1 is loaded instead.
# Compute capability 9.0 (H100/H200) unless CUDA_COMPUTE_CAP says otherwise.
#
# Not run by CI (it needs no GPU, but it downloads about 600 MB and compiles every kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
env_dir=${CUDA_ENV:-target-cuda}
python=${PYTHON:-python3}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

if [ ! -x "$env_dir/venv/bin/python" ]; then
  "$python" -m venv "$env_dir/venv"
fi
"$env_dir/venv/bin/pip" install -q \
  "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-crt==13.0.88" \
  "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-nvrtc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cublas>=13.0,<13.1" "nvidia-curand==10.4.0.35"
cuda=$("$env_dir/venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$cuda/bin/nvcc" ] || { echo "error: no nvcc under $cuda/bin" >&2; exit 1; }

# Unversioned names for the linker (the wheels ship only libX.so.13 and the like).
lib="$env_dir/lib"
mkdir -p "$lib"
for so in "$cuda"/lib/lib*.so.*; do
  base=$(basename "$so"); ln -sf "$so" "$lib/${base%%.so.*}.so"
done
# The driver stub: every cu* function cudarc declares, as an empty symbol.
cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 2>/dev/null | head -1)
if [ -z "$cudarc" ]; then cargo fetch --locked; cudarc=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10 | head -1); fi
# (the names of its `extern "C"` block: `fn cuInit(...)`, `fn cuMemAllocHost_v2(...)`, ...).
grep -ohE "^\s+fn cu[A-Za-z0-9_]+\(" "$cudarc/src/driver/sys/mod.rs" | sed -E 's/^\s+fn (cu[A-Za-z0-9_]+)\(/void \1(void) {}/' \
  | sort -u > "$lib/cuda_stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so" "$lib/cuda_stub.c"

export CUDA_HOME="$cuda" CUDA_PATH="$cuda" NVCC="$cuda/bin/nvcc" PATH="$cuda/bin:$PATH"
export LIBRARY_PATH="$lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
export CUDARC_CUDA_VERSION=13000
nvcc --version | tail -2 >&2
# Its own target folder, so the CPU build in target/ stays; no debug info (the binary is
# carried to the GPU machine).
export CARGO_TARGET_DIR="$env_dir/target" CARGO_PROFILE_RELEASE_DEBUG=0
start=$(date +%s)
if [ $# -eq 0 ]; then
  cargo build --release --locked --features cuda --bin prefopt
  echo "built $CARGO_TARGET_DIR/release/prefopt with --features cuda in $(( $(date +%s) - start )) s" >&2
else
  cargo "$@"
  echo "cargo $* with --features cuda's environment: $(( $(date +%s) - start )) s" >&2
fi
