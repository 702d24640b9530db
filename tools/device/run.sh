#!/bin/bash
# The device checks, run on a lent GPU machine as one call of the device tool:
#   run(command="bash .dev/run.sh 2>&1", carry=[".dev"], timeout_s=600)
# after `bash tools/device/prepare.sh` here. It installs the carried packages, checks faiss-gpu
# against faiss-cpu on one search, runs the GPU tests (index store and tests/test_cuda.py) and
# benchmarks/gpu_search.py; logs and JSON land under $OUT. Each step has its own time limit so
# that a hang in one still leaves the others' results.
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t0=$(date +%s); el() { echo "[t+$(( $(date +%s) - t0 ))s] $*"; }
mkdir -p /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .dev/whl/*.whl || exit 3
tar xJf .dev/faiss_gpu.tar.xz -C /tmp/site && cp -r .dev/site/* /tmp/site/
export PYTHONPATH=/tmp/site:$PWD
CU13=$(dirname "$(find /opt /usr/local -name 'libcublas.so.13*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH=$CU13:$LD_LIBRARY_PATH
el "installed; cublas13 in $CU13"
nvidia-smi -L; nproc
python3 - <<'PY' 2>&1 | tee $OUT/smoke.log
import time, numpy as np, torch, faiss
print("torch", torch.__version__, torch.cuda.get_device_name(0), "faiss", faiss.__version__, "gpus", faiss.get_num_gpus())
rng = np.random.default_rng(0); x = rng.standard_normal((200000, 512), dtype=np.float32); q = x[:500] + 0.01
cpu = faiss.IndexFlatIP(512); cpu.add(x); dc, ic = cpu.search(q, 10)
res = faiss.StandardGpuResources(); g = faiss.index_cpu_to_gpu(res, 0, cpu)
dg, ig = g.search(q, 10); print("gpu flat == cpu flat:", (ig == ic).mean(), float(np.abs(dg - dc).max()))
t = time.perf_counter(); g.search(q, 10); print("gpu flat 500q", round(time.perf_counter() - t, 4), "s")
PY
el "smoke done"
# a faiss-gpu that cannot search keeps the CUDA tests on faiss's CPU side rather than failing them
grep -q "gpu flat == cpu flat: 1.0" $OUT/smoke.log || { echo "faiss-gpu broken: index on CPU"; export RADLENS_INDEX_GPU=0; }
timeout 200 python3 -m pytest -p no:cacheprovider -m gpu tests/index/test_index_store.py -q -rA 2>&1 | tail -25 | tee $OUT/pytest_index_gpu.log
el "index gpu tests done"
timeout 330 python3 -m pytest -p no:cacheprovider -m gpu tests/test_cuda.py -q -rA --durations=10 2>&1 | tail -60 | tee $OUT/pytest_cuda.log
el "cuda tests done"
timeout 230 python3 benchmarks/gpu_search.py --out $OUT > $OUT/gpu_search_stdout.json 2> $OUT/gpu_search_stderr.log; echo "gpu_search rc=$?"
tail -15 $OUT/gpu_search_stderr.log; cat $OUT/gpu_search.json 2>/dev/null | head -80
el "all done"
