# Sourced by the scripts in this folder on the GPU machine: the device's torch libraries,
# a libnccl.so link cudarc can find (pip ships only libnccl.so.2), and NVLink multicast off.
S=/opt/torch/.venv/lib/python3.12/site-packages
mkdir -p /tmp/nccl && ln -sf "$S/nvidia/nccl/lib/libnccl.so.2" /tmp/nccl/libnccl.so
export LD_LIBRARY_PATH="$S/torch/lib:/tmp/nccl"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
