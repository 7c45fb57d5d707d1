#!/usr/bin/env bash
# One short session on a lent CUDA machine (docs/benchmarks.md, "H200"): what only a GPU shows.
#
#   1. gsplat's CUDA extension JIT-compiled for this torch (in the background, logged);
#   2. full-size orbit model (SV3D_p architecture, random weights): latency and peak memory of one
#      asset's diffusion (bench/bench_diffusion.py), meanwhile;
#   3. gsplat parity against the reference rasterizer (the `gpu` tests) and its speed (bench_rasterizer);
#   4. the mesh-fidelity objects fitted with gsplat on the GPU, and one standard-preset reconstruct.
#
# Runs from the repository root with the wheels the project pins in .whl/ (carried: the device
# image has torch but not diffusers, gsplat, ...). Everything it prints also lands in $OUT.
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/backend
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/machine.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$OUT/machine.txt"

# 1. gsplat extension (sm_90 only; all cores)
( export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=14
  start=$(date +%s)
  timeout 330 python3 -c "from gsplat.cuda._backend import _C; print('gsplat _C', _C)" > "$OUT/gsplat_build.log" 2>&1
  echo "rc=$? seconds=$(( $(date +%s) - start ))" >> "$OUT/gsplat_build.log" ) &
build=$!

# 2. full-size diffusion (GPU while the compile uses the CPUs)
timeout 240 python3 bench/bench_diffusion.py --size sv3d --steps 50 --strengths 0.5 0.3 2>&1 | tee "$OUT/diffusion.txt" | tail -12

wait $build
tail -3 "$OUT/gsplat_build.log"

# 3. parity + speed
timeout 90 python3 -m pytest -q -m gpu tests/test_rasterize.py -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/parity.txt"
for spec in 10000x16x128 100000x16x256 300000x8x512; do
  timeout 40 python3 bench/bench_rasterizer.py --worker gsplat "$spec" --repeats 5 2>&1 | tail -1 | tee -a "$OUT/raster.jsonl"
done

# 4. fits on the GPU: fidelity objects (fast preset) and one standard reconstruct
timeout 120 python3 bench/bench_mesh_fidelity.py --work /tmp/fid --no-docs 2>&1 | tee "$OUT/fidelity.txt" | tail -14
start=$(date +%s)
timeout 60 python3 -m im3d reconstruct out/fidelity_data/mug --preset standard --set recon.lpips_weight=0 --out /tmp/std > "$OUT/standard.log" 2>&1
echo "standard reconstruct rc=$? wall=$(( $(date +%s) - start )) s" | tee -a "$OUT/standard.log"
cp /tmp/std/metrics.json "$OUT/standard_metrics.json" 2>/dev/null
exit 0
