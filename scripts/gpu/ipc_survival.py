"""Does memory mapped through CUDA IPC (cuIpcOpenMemHandle, as the learner maps vLLM's weights
in shared mode) stay readable and writable after the exporting process is SIGKILLed?
Run on the GPU machine: python3 scripts/gpu/ipc_survival.py"""
import ctypes, os, signal, subprocess, sys, time

import torch

if len(sys.argv) > 1 and sys.argv[1] == "producer":
    # Allocated through torch's caching allocator, exported as torch exports (what vLLM's
    # workers do with their parameters in shared mode).
    x = torch.arange(1 << 20, dtype=torch.float32, device="cuda")
    y = x[1000:]
    dev, handle, size, off, *_ = y.untyped_storage()._share_cuda_()
    # torch 2.11 prefixes the 64-byte cudaIpcMemHandle with a version byte and a kind byte.
    print(len(handle), handle[:2].hex(), file=sys.stderr, flush=True)
    if len(handle) == 66:
        handle = handle[2:]
    print(handle.hex(), size, off, y.storage_offset(), flush=True)
    time.sleep(600)
    sys.exit(0)

cuda = ctypes.CDLL("libcuda.so.1")
def ok(r, what):
    if r != 0:
        raise SystemExit(f"{what} failed: CUresult {r}")
torch.zeros(1, device="cuda")  # primary context current
p = subprocess.Popen([sys.executable, __file__, "producer"], stdout=subprocess.PIPE, text=True)
line = p.stdout.readline().split()
handle, size, off, soff = bytes.fromhex(line[0]), int(line[1]), int(line[2]), int(line[3])
class H(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * 64)]
h = H(); ctypes.memmove(ctypes.addressof(h), handle, 64)
ptr = ctypes.c_uint64()
ok(cuda.cuIpcOpenMemHandle_v2(ctypes.byref(ptr), h, ctypes.c_uint(1)), "cuIpcOpenMemHandle")
base = ptr.value + off
n = 64
buf = (ctypes.c_float * n)()
ok(cuda.cuMemcpyDtoH_v2(buf, ctypes.c_uint64(base + 4 * soff), ctypes.c_size_t(4 * n)), "read before")
print("before kill:", list(buf)[:4], "expected 1000.0 ...")
os.kill(p.pid, signal.SIGKILL); p.wait()
time.sleep(2)
r = cuda.cuMemcpyDtoH_v2(buf, ctypes.c_uint64(base + 4 * soff), ctypes.c_size_t(4 * n))
print("read after kill: CUresult", r, list(buf)[:4])
src = (ctypes.c_float * n)(*([7.0] * n))
r2 = cuda.cuMemcpyHtoD_v2(ctypes.c_uint64(base + 4 * soff), src, ctypes.c_size_t(4 * n))
r3 = cuda.cuMemcpyDtoH_v2(buf, ctypes.c_uint64(base + 4 * soff), ctypes.c_size_t(4 * n))
print("write+read after kill: CUresult", r2, r3, list(buf)[:4])
r4 = cuda.cuIpcCloseMemHandle(ctypes.c_uint64(ptr.value))
print("close: CUresult", r4)
t = torch.ones(4, device="cuda") * 3
torch.cuda.synchronize()
print("context still healthy:", t.tolist())
