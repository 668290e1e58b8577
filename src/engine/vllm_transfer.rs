//! vLLM 0.26's weight-transfer engines as we drive them: the vLLM plugin that registers the two
//! we use, the `/update_weights` body that points vLLM's workers at a learner's GPU memory
//! (CUDA IPC, same GPU), and the chunking of vLLM's packed NCCL receive (another GPU). Pure: no
//! CUDA here (the learner exports and broadcasts, see `sync::ipc_publish` and
//! `sync::nccl_publish`); the sidecar only builds requests.
//!
//! vLLM's `ipc` backend imports `ray` at module level although its worker side never uses it,
//! and 0.26 does not depend on ray. The plugin registers the same engine as `grpo_ipc` with a
//! stand-in `ray` module present only while it is imported. The handles travel as vLLM's
//! `ipc_handles_pickled`: a pickle of one `{gpu_uuid: rebuild_cuda_tensor args}` dict per
//! tensor, built here from a fixed template (vLLM refuses it unless the server runs with
//! `VLLM_ALLOW_INSECURE_SERIALIZATION=1`, which the supervisor sets in this mode only).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{json, Value};

/// The weight-transfer backend names the plugin registers: CUDA IPC, and NCCL from a unique id.
pub const BACKEND: &str = "grpo_ipc";
pub const NCCL_BACKEND: &str = "grpo_nccl";
/// The worker extension (`--worker-extension-cls`) of shared mode, not a transfer backend.
pub const SHARED_EXTENSION: &str = "grpo_vllm_plugin.SharedWeights";

const PLUGIN_INIT: &str = r#""""grpo-node's vLLM plugin (vLLM 0.26). Registers two weight-transfer engines:
- "grpo_ipc": vLLM's own CUDA IPC engine. Its module imports ray at module level (only its
  trainer-side helper uses it) and 0.26 does not depend on ray, so a stand-in module is present
  during that import only.
- "grpo_nccl": vLLM's own NCCL engine, joined from a raw ncclUniqueId (std base64) sent over
  HTTP instead of a TCPStore rendezvous (the wire contract vLLM 0.32 has natively)."""
import sys
import types


def _ipc_engine():
    stand_in = "ray" not in sys.modules
    if stand_in:
        sys.modules["ray"] = types.ModuleType("ray")
    try:
        from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferEngine
    finally:
        if stand_in:
            del sys.modules["ray"]
    return IPCWeightTransferEngine


def _nccl_engine():
    import base64
    import ctypes
    from dataclasses import dataclass

    import torch
    from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
    from vllm.distributed.device_communicators.pynccl_wrapper import ncclUniqueId
    from vllm.distributed.utils import StatelessProcessGroup
    from vllm.distributed.weight_transfer.base import WeightTransferInitInfo
    from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine

    @dataclass
    class UidInitInfo(WeightTransferInitInfo):
        nccl_unique_id_b64: str
        rank_offset: int
        world_size: int

    class UidGroup(StatelessProcessGroup):
        # PyNcclCommunicator asks rank 0 for the unique id through broadcast_obj; the id came
        # over HTTP, so every rank already has it.
        def broadcast_obj(self, obj, src):
            return self.uid

    class GrpoNcclEngine(NCCLWeightTransferEngine):
        init_info_cls = UidInitInfo

        def init_transfer_engine(self, init_info):
            pc = self.parallel_config
            rank = pc.data_parallel_index * pc.world_size + pc.rank + init_info.rank_offset
            raw = base64.b64decode(init_info.nccl_unique_id_b64, validate=True)
            if len(raw) != 128:
                raise ValueError(f"an ncclUniqueId has 128 bytes, got {len(raw)}")
            uid = ncclUniqueId()
            ctypes.memmove(ctypes.addressof(uid.internal), raw, 128)
            group = UidGroup(rank=rank, world_size=init_info.world_size, store=None)
            group.uid = uid
            self.model_update_group = PyNcclCommunicator(
                group, device=torch.accelerator.current_device_index()
            )

    return GrpoNcclEngine


class SharedWeights:
    """Worker extension (--worker-extension-cls grpo_vllm_plugin.SharedWeights) for shared mode:
    the learner on the same GPU maps vLLM's own parameter memory and trains it in place.
    grpo_shared_export, called through /collective_rpc, describes every parameter: its name in
    vLLM (fused qkv_proj / gate_up_proj), dtype, shape, strides, element offset in its storage
    and, on CUDA, the storage's allocation as torch exports it (the 64-byte cudaIpcMemHandle of
    the caching allocator's segment, the storage's byte offset in that segment and its size)."""

    def grpo_shared_export(self):
        import base64
        import os

        import torch

        runner = self.model_runner
        model = runner.get_model() if hasattr(runner, "get_model") else runner.model
        tensors = []
        for name, p in model.named_parameters():
            t = p.data
            entry = {
                "name": name,
                "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape),
                "stride": list(t.stride()),
                "storage_offset": t.storage_offset(),
            }
            if t.is_cuda:
                _, handle, size, offset, *_ = t.untyped_storage()._share_cuda_()
                # torch 2.11 prefixes the handle with a format version and a kind byte; kind
                # "c" is a plain cudaMalloc segment (an expandable segment cannot be mapped so).
                if len(handle) == 66:
                    if handle[1:2] != b"c":
                        raise RuntimeError(
                            f"{name}: its memory is not a plain cudaMalloc segment (expandable "
                            "segments cannot be shared; unset PYTORCH_CUDA_ALLOC_CONF)"
                        )
                    handle = handle[2:]
                entry["handle"] = base64.b64encode(handle).decode()
                entry["alloc_offset_bytes"] = offset
                entry["storage_bytes"] = size
            tensors.append(entry)
        uuid = ""
        if torch.cuda.is_available() and any(p.is_cuda for p in model.parameters()):
            uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
        return {"pid": os.getpid(), "gpu_uuid": uuid, "tensors": tensors}


def register():
    from vllm.distributed.weight_transfer import WeightTransferEngineFactory as factory

    if "grpo_ipc" not in factory._registry:
        factory.register_engine("grpo_ipc", _ipc_engine())
    if "grpo_nccl" not in factory._registry:
        factory.register_engine("grpo_nccl", _nccl_engine())
"#;

const PLUGIN_METADATA: &str = "Metadata-Version: 2.1\nName: grpo-vllm-plugin\nVersion: 0.1\n";
const PLUGIN_ENTRY_POINTS: &str = "[vllm.general_plugins]\ngrpo_ipc = grpo_vllm_plugin:register\n";

/// Writes the plugin (a package plus the dist-info vLLM discovers its entry point through)
/// under `dir`, and returns the directory to put on vLLM's `PYTHONPATH`.
pub fn install_plugin(dir: &Path) -> std::io::Result<PathBuf> {
    let package = dir.join("grpo_vllm_plugin");
    let info = dir.join("grpo_vllm_plugin-0.1.dist-info");
    std::fs::create_dir_all(&package)?;
    std::fs::create_dir_all(&info)?;
    std::fs::write(package.join("__init__.py"), PLUGIN_INIT)?;
    std::fs::write(info.join("METADATA"), PLUGIN_METADATA)?;
    std::fs::write(info.join("entry_points.txt"), PLUGIN_ENTRY_POINTS)?;
    Ok(dir.to_path_buf())
}

/// Where a version's weights are in the learner's GPU memory.
#[derive(Debug, Clone, PartialEq)]
pub struct IpcExport {
    /// `cuDeviceGetUuid` as lowercase 8-4-4-4-12 hex (torch's `str(props.uuid)`).
    pub gpu_uuid: String,
    /// `cuIpcGetMemHandle` of the allocation's base (64 bytes).
    pub handle: Vec<u8>,
    /// Bytes of the whole allocation.
    pub alloc_bytes: u64,
    pub tensors: Vec<IpcTensor>,
}

/// One contiguous, row-major tensor inside the exported allocation.
#[derive(Debug, Clone, PartialEq)]
pub struct IpcTensor {
    /// HF name (unfused, unsharded).
    pub name: String,
    pub dtype: IpcDtype,
    pub shape: Vec<i64>,
    /// Byte offset from the allocation's base.
    pub offset_bytes: u64,
}

impl IpcTensor {
    /// Its size in bytes; `None` for a negative or overflowing shape.
    pub fn bytes(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, &d| u64::try_from(d).ok().and_then(|d| acc.checked_mul(d)))
            .and_then(|n| n.checked_mul(self.dtype.size()))
    }
}

/// The dtypes that travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpcDtype {
    BFloat16,
    Float32,
}

impl IpcDtype {
    /// vLLM's `dtype_names` entry, and the `torch.<name>` global in the pickle.
    pub fn torch_name(self) -> &'static str {
        match self {
            IpcDtype::BFloat16 => "bfloat16",
            IpcDtype::Float32 => "float32",
        }
    }

    pub fn size(self) -> u64 {
        match self {
            IpcDtype::BFloat16 => 2,
            IpcDtype::Float32 => 4,
        }
    }

    /// The wire name of the sync protocol ("bf16" / "f32").
    pub fn parse(wire: &str) -> Option<Self> {
        match wire {
            "bf16" => Some(IpcDtype::BFloat16),
            "f32" => Some(IpcDtype::Float32),
            _ => None,
        }
    }

    pub fn wire(self) -> &'static str {
        match self {
            IpcDtype::BFloat16 => "bf16",
            IpcDtype::Float32 => "f32",
        }
    }
}

/// A request that cannot describe valid memory.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IpcError {
    #[error("the IPC handle has {0} bytes, not 64")]
    Handle(usize),
    #[error("the GPU UUID {0:?} is not 8-4-4-4-12 lowercase hex")]
    Uuid(String),
    #[error("tensor {name:?} ({bytes} bytes at {offset}) lies outside the {alloc} byte allocation")]
    OutOfBounds {
        name: String,
        offset: u64,
        bytes: u64,
        alloc: u64,
    },
    #[error("tensor {0:?} has a negative or overflowing shape")]
    Shape(String),
    #[error("tensor {0:?} starts at an offset its dtype does not align to")]
    Misaligned(String),
    #[error("no tensors")]
    Empty,
}

impl IpcExport {
    /// Checks that every tensor lies inside the allocation, aligned, with a sane shape.
    pub fn validate(&self) -> Result<(), IpcError> {
        if self.handle.len() != 64 {
            return Err(IpcError::Handle(self.handle.len()));
        }
        if !is_uuid(&self.gpu_uuid) {
            return Err(IpcError::Uuid(self.gpu_uuid.clone()));
        }
        if self.tensors.is_empty() {
            return Err(IpcError::Empty);
        }
        for t in &self.tensors {
            let bytes = t.bytes().ok_or_else(|| IpcError::Shape(t.name.clone()))?;
            if t.offset_bytes % t.dtype.size() != 0 {
                return Err(IpcError::Misaligned(t.name.clone()));
            }
            if t.offset_bytes
                .checked_add(bytes)
                .is_none_or(|end| end > self.alloc_bytes)
            {
                return Err(IpcError::OutOfBounds {
                    name: t.name.clone(),
                    offset: t.offset_bytes,
                    bytes,
                    alloc: self.alloc_bytes,
                });
            }
        }
        Ok(())
    }

    /// The `update_info` of `POST /update_weights` (unpacked: one handle dict per tensor, all
    /// naming the same allocation at their own offsets).
    pub fn update_info(&self) -> Result<Value, IpcError> {
        self.validate()?;
        let pickled = base64::engine::general_purpose::STANDARD.encode(self.pickle());
        Ok(json!({
            "names": self.tensors.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
            "dtype_names": self.tensors.iter().map(|t| t.dtype.torch_name()).collect::<Vec<_>>(),
            "shapes": self.tensors.iter().map(|t| t.shape.clone()).collect::<Vec<_>>(),
            "packed": false,
            "ipc_handles_pickled": pickled,
        }))
    }

    /// Pickle (protocol 4) of `[{uuid: args}, ...]`, `args` being the 15 arguments of
    /// `torch.multiprocessing.reductions.rebuild_cuda_tensor`.
    fn pickle(&self) -> Vec<u8> {
        let mut p = Pickle(vec![0x80, 4]);
        p.0.extend([0x5D, 0x28]); // EMPTY_LIST, MARK
        for t in &self.tensors {
            p.0.push(0x7D); // EMPTY_DICT
            p.str(&self.gpu_uuid);
            self.rebuild_args(&mut p, t);
            p.0.push(0x73); // SETITEM
        }
        p.0.extend([0x65, 0x2E]); // APPENDS, STOP
        p.0
    }

    fn rebuild_args(&self, p: &mut Pickle, t: &IpcTensor) {
        p.0.push(0x28); // MARK
        p.global("torch", "Tensor");
        p.int_tuple(&t.shape);
        p.int_tuple(&row_major_strides(&t.shape));
        p.int(0); // the tensor's offset in its storage, in elements
        p.global("torch", "UntypedStorage");
        p.global("torch", t.dtype.torch_name());
        p.int(0); // device (vLLM overwrites it with the worker's)
        p.bytes(&self.handle);
        // The storage is this tensor's bytes, opened at its offset from the allocation's base.
        p.int(t.bytes().unwrap_or(0) as i64);
        p.int(t.offset_bytes as i64);
        p.0.push(0x89); // requires_grad False
        p.bytes(b"/grpo-node-ipc"); // ref counter name: release is best effort
        p.int(0);
        p.bytes(b""); // no event handle
        p.0.push(0x89); // event_sync_required False
        p.0.push(0x74); // TUPLE
    }
}

/// vLLM's packed NCCL receive (`packed_nccl_broadcast_consumer`): tensors are taken in order
/// into one chunk until the chunk's bytes exceed `buffer_bytes` (the tensor that crosses it is
/// included), then the chunk is one uint8 broadcast; the rest is the last chunk. Returns each
/// chunk's (first byte, bytes) in the tensors' concatenation.
pub fn vllm_nccl_chunks(tensor_bytes: &[u64], buffer_bytes: u64) -> Vec<(u64, u64)> {
    let mut chunks = Vec::new();
    let (mut start, mut size) = (0u64, 0u64);
    let mut open = false;
    for &b in tensor_bytes {
        size += b;
        open = true;
        if size > buffer_bytes {
            chunks.push((start, size));
            start += size;
            size = 0;
            open = false;
        }
    }
    if open {
        chunks.push((start, size));
    }
    chunks
}

/// Element strides of a contiguous tensor.
fn row_major_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        strides[i] = strides[i + 1] * shape[i + 1].max(1);
    }
    strides
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
}

/// The few pickle opcodes the template needs.
struct Pickle(Vec<u8>);

impl Pickle {
    fn int(&mut self, v: i64) {
        self.0.extend([0x8A, 8]); // LONG1, 8 bytes
        self.0.extend(v.to_le_bytes());
    }

    fn int_tuple(&mut self, vs: &[i64]) {
        self.0.push(0x28);
        for &v in vs {
            self.int(v);
        }
        self.0.push(0x74);
    }

    fn bytes(&mut self, b: &[u8]) {
        self.0.push(0x42); // BINBYTES, u32 length
        self.0.extend((b.len() as u32).to_le_bytes());
        self.0.extend(b);
    }

    fn str(&mut self, s: &str) {
        self.0.push(0x58); // BINUNICODE, u32 length
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
    }

    fn global(&mut self, module: &str, name: &str) {
        self.0.push(0x63);
        self.0.extend(format!("{module}\n{name}\n").as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> IpcExport {
        IpcExport {
            gpu_uuid: "0a1b2c3d-0000-1111-2222-333344445555".into(),
            handle: (0..64).collect(),
            alloc_bytes: 4096,
            tensors: vec![
                IpcTensor {
                    name: "model.embed_tokens.weight".into(),
                    dtype: IpcDtype::BFloat16,
                    shape: vec![8, 16],
                    offset_bytes: 0,
                },
                IpcTensor {
                    name: "model.norm.weight".into(),
                    dtype: IpcDtype::BFloat16,
                    shape: vec![16],
                    offset_bytes: 256,
                },
            ],
        }
    }

    #[test]
    fn nccl_chunks_close_after_the_tensor_that_crosses_the_buffer() {
        assert_eq!(vllm_nccl_chunks(&[4, 4, 4], 7), vec![(0, 8), (8, 4)]);
        assert_eq!(vllm_nccl_chunks(&[4, 4], 8), vec![(0, 8)]);
        assert_eq!(vllm_nccl_chunks(&[20, 1, 1], 8), vec![(0, 20), (20, 2)]);
        assert_eq!(vllm_nccl_chunks(&[9, 9], 8), vec![(0, 9), (9, 9)]);
        assert!(vllm_nccl_chunks(&[], 8).is_empty());
    }

    #[test]
    fn strides_are_row_major() {
        assert_eq!(row_major_strides(&[2, 3, 4]), vec![12, 4, 1]);
        assert_eq!(row_major_strides(&[5]), vec![1]);
        assert!(row_major_strides(&[]).is_empty());
    }

    #[test]
    fn bad_exports_are_refused_before_vllm_sees_them() {
        let mut e = export();
        e.handle.pop();
        assert_eq!(e.update_info(), Err(IpcError::Handle(63)));
        let mut e = export();
        e.gpu_uuid = "GPU-0a1b2c3d-0000-1111-2222-333344445555".into();
        assert!(matches!(e.update_info(), Err(IpcError::Uuid(_))));
        let mut e = export();
        e.tensors[1].offset_bytes = 4096 - 2;
        assert!(matches!(e.update_info(), Err(IpcError::OutOfBounds { .. })));
        let mut e = export();
        e.tensors[1].offset_bytes = 255;
        assert!(matches!(e.update_info(), Err(IpcError::Misaligned(_))));
        let mut e = export();
        e.tensors[0].shape = vec![-1, 16];
        assert!(matches!(e.update_info(), Err(IpcError::Shape(_))));
        let mut e = export();
        e.tensors[0].shape = vec![i64::MAX, i64::MAX];
        assert!(matches!(e.update_info(), Err(IpcError::Shape(_))));
    }

    #[test]
    fn the_update_info_names_every_tensor_in_order() {
        let info = export().update_info().expect("valid");
        assert_eq!(info["names"][1], "model.norm.weight");
        assert_eq!(info["dtype_names"][0], "bfloat16");
        assert_eq!(info["shapes"][0], json!([8, 16]));
        assert_eq!(info["packed"], false);
        assert!(info["ipc_handles_pickled"].as_str().is_some_and(|s| !s.is_empty()));
    }
}
