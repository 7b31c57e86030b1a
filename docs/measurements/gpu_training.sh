#!/usr/bin/env bash
# One device call (the lent H200, docs/measurements/gpu_training.md): the GPU test, then fold 0 of
# configs/shipped.toml with the same `nodule-edge train` on the GPU, then fold 0 with 4x batches.
# Needs .devcarry/sitk.tar.xz (SimpleITK 2.5.3's abi3 wheel, unpacked) and .devcarry/voi.tar.xz
# (../shared/data/lidc_voi with the .nii.gz unpacked, so xz compresses the voxels): the machine
# reaches no registry and only the repository travels.
set -uo pipefail
export PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $(( ${1} - ($(date +%s) - start) )); }
mkdir -p /tmp/site /tmp/data
tar xJf .devcarry/sitk.tar.xz -C /tmp/site
tar xJf .devcarry/voi.tar.xz -C /tmp/data
find /tmp/data -name '*.nii' -print0 | xargs -0 -P16 -n16 gzip -1
export PYTHONPATH=/tmp/site:$PWD
{ nvidia-smi -L; nproc; python3 -c "import torch, numpy, SimpleITK; print('torch', torch.__version__, torch.cuda.get_device_name(), 'bf16', torch.cuda.is_bf16_supported(), 'numpy', numpy.__version__, 'sitk', SimpleITK.Version_VersionString())"; } 2>&1 | tee $OUT/machine.txt
echo "setup $(( $(date +%s) - start )) s"
timeout 150 python3 -m pytest -m gpu tests/train/test_gpu.py -p no:cacheprovider -q -rA 2>&1 | tee $OUT/pytest_gpu.log
common=(--set data.voi_dir="/tmp/data/lidc_voi" --set data.cache_dir="/tmp/cache" --set cv.run_folds=[0] --set train.threads=16 --folds-only)
timeout "$(left 400)" python3 docs/measurements/gpu_training.py configs/shipped.toml "${common[@]}" \
  --set output_dir="/tmp/run_shipped" --set cv.export_dir="$OUT/shipped" 2>&1 | tee $OUT/shipped.log
if [ "$(left 520)" -gt 120 ]; then
  timeout "$(left 530)" python3 docs/measurements/gpu_training.py configs/shipped.toml "${common[@]}" \
    --set output_dir="/tmp/run_batch4x" --set cv.export_dir="$OUT/batch4x" \
    --set train.batch_sure=32 --set train.batch_unsure=16 --set train.lr=2e-3 2>&1 | tee $OUT/batch4x.log
fi
echo "total $(( $(date +%s) - start )) s"
