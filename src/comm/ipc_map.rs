//! Another process's GPU memory in ours, through CUDA IPC: shared mode maps vLLM's parameter
//! allocations (`cuIpcOpenMemHandle`) and trains them in place. A mapping stays valid after the
//! exporting process dies (measured on the H200, `scripts/gpu/ipc_survival.py`: the memory
//! stays readable and writable until it is closed), so a learner whose vLLM died copies its
//! weights out before it lets go.

use std::sync::Arc;

use cudarc::driver::sys as cu;
use cudarc::driver::CudaContext;

use super::nccl::device_context;
use super::CommError;

fn cuda(e: cudarc::driver::DriverError) -> CommError {
    CommError::Cuda(e.to_string())
}

/// A device UUID as torch prints it: lowercase 8-4-4-4-12 hex, no `GPU-` prefix.
pub fn uuid_text(bytes: &[std::ffi::c_char; 16]) -> String {
    let h: String = bytes.iter().map(|&b| format!("{:02x}", b as u8)).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The UUID of device `gpu`, as [`uuid_text`] writes it.
pub fn device_uuid(gpu: usize) -> Result<String, CommError> {
    let ctx = device_context(gpu)?;
    let uuid = ctx.uuid().map_err(cuda)?;
    Ok(uuid_text(&uuid.bytes))
}

/// One allocation of another process, mapped into device `gpu`'s primary context; closed on
/// drop.
pub struct Mapping {
    ctx: Arc<CudaContext>,
    base: u64,
}

impl Mapping {
    /// Opens the 64-byte cudaIpcMemHandle `handle` on device `gpu`.
    pub fn open(gpu: usize, handle: &[u8]) -> Result<Self, CommError> {
        let bytes: [u8; 64] = handle
            .try_into()
            .map_err(|_| CommError::Cuda(format!("a cudaIpcMemHandle has 64 bytes, got {}", handle.len())))?;
        let ctx = device_context(gpu)?;
        ctx.bind_to_thread().map_err(cuda)?;
        let handle = cu::CUipcMemHandle_st {
            reserved: bytes.map(|b| b as std::ffi::c_char),
        };
        let mut base: cu::CUdeviceptr = 0;
        // SAFETY: the context is bound; `handle` is a plain 64-byte value; the driver writes the
        // mapped address into `base`.
        unsafe {
            cu::cuIpcOpenMemHandle_v2(
                &mut base,
                handle,
                cu::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
            )
        }
        .result()
        .map_err(|e| CommError::Cuda(format!("cuIpcOpenMemHandle: {e}")))?;
        Ok(Self { ctx, base })
    }

    /// The mapped allocation's first byte, in this process.
    pub fn base(&self) -> u64 {
        self.base
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.ctx.bind_to_thread().is_ok() {
            // Nothing queued may still touch the memory once it is unmapped.
            if let Err(e) = self.ctx.synchronize() {
                tracing::warn!(error = %e, "synchronizing before closing a CUDA IPC mapping failed");
            }
            // SAFETY: `base` came from cuIpcOpenMemHandle in this context and is closed once.
            let closed = unsafe { cu::cuIpcCloseMemHandle(self.base) }.result();
            if let Err(e) = closed {
                tracing::warn!(error = %e, "closing a CUDA IPC mapping failed");
            }
        }
    }
}
