"""NCCL reference for weight sync between two GPUs: torch.distributed broadcast of a flat buffer
from rank 0 to rank 1 (what an NCCL weight-update group does per sync, minus packing).

Two processes via torch.multiprocessing (no torchrun), init_process_group("nccl") over
tcp://127.0.0.1:<free port>. Per size in --gib: a random buffer of GiB * 2^30 bytes on each GPU
(bf16 by default, like the weights), 2 warmup + --iters timed broadcasts. Each timed broadcast sits
between torch.cuda.synchronize() + barrier on both ranks, and rank 0 times it with
time.perf_counter() from before the broadcast to after the closing synchronize + barrier.
Reports median seconds and GB/s = bytes / 1e9 / s, checks that rank 1 received rank 0's bytes,
prints `RESULT {json}` and writes --out.
"""
import os

for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
               ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

WORLD = 2
WARMUP = 2


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synced():
    torch.cuda.synchronize()
    dist.barrier()


def fingerprint(buf):
    """Sum of a strided sample of the bytes (int64), to compare ranks after the broadcast."""
    b = buf.view(torch.uint8)
    return b[:: max(1, b.numel() // (1 << 22))].to(torch.int64).sum().view(1)


def nccl_version():
    v = torch.cuda.nccl.version()
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def worker(rank, args, port):
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, device_id=dev)
    dtype = {"bf16": torch.bfloat16, "uint8": torch.uint8}[args.dtype]
    esize = torch.tensor([], dtype=dtype).element_size()
    out = []
    for gib in args.gib:
        numel = int(gib * 2**30) // esize
        g = torch.Generator(device=dev).manual_seed(1234 + rank)
        if dtype == torch.uint8:
            buf = torch.randint(0, 256, (numel,), dtype=dtype, device=dev, generator=g)
        else:
            buf = torch.randn(numel, dtype=dtype, device=dev, generator=g)
        times = []
        for it in range(WARMUP + args.iters):
            synced()
            t0 = time.perf_counter()
            dist.broadcast(buf, src=0)
            synced()
            if it >= WARMUP:
                times.append(time.perf_counter() - t0)
        fp = fingerprint(buf)
        fps = [torch.zeros_like(fp) for _ in range(WORLD)]
        dist.all_gather(fps, fp)
        nbytes = numel * esize
        med = statistics.median(times)
        rec = {"gib": gib, "bytes": nbytes, "median_s": med, "gb_per_s": nbytes / 1e9 / med,
               "times_s": times, "verified": bool(torch.equal(fps[0], fps[1]))}
        if rank == 0:
            print(f"{gib} GiB: median {med * 1e3:.1f} ms, {rec['gb_per_s']:.1f} GB/s, "
                  f"verified={rec['verified']}", flush=True)
        out.append(rec)
        del buf
        torch.cuda.empty_cache()
    if rank == 0:
        result = {"world_size": WORLD, "dtype": args.dtype, "warmup": WARMUP, "iters": args.iters,
                  "sizes": out, "torch": torch.__version__,
                  "nccl": nccl_version(),
                  "device": torch.cuda.get_device_name(dev),
                  "env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                         "NVSHMEM_DISABLE_NVLS")}}
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print("RESULT " + json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, nargs="+", default=[3.1, 15.2], help="buffer sizes in GiB")
    p.add_argument("--iters", type=int, default=5, help="timed broadcasts per size")
    p.add_argument("--dtype", choices=["bf16", "uint8"], default="bf16")
    p.add_argument("--out", default="broadcast.json")
    args = p.parse_args()
    if torch.cuda.device_count() < WORLD:
        p.error(f"needs {WORLD} GPUs, found {torch.cuda.device_count()}")
    mp.spawn(worker, args=(args, free_port()), nprocs=WORLD, join=True)


if __name__ == "__main__":
    main()
