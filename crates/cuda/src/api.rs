//! Plain types of the public API, the same with or without the `cuda` feature.

use dualpipe_reference::HostStep;

pub use crate::kernels::DType;

/// What a send between virtual ranks on one GPU does with the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommMode {
    /// A device-to-device copy on the receiving rank's comm stream: what moving the data
    /// costs on one GPU.
    Copy,
    /// No copy: the receiving rank reads the sender's buffer once the sender's event has
    /// fired. Communication replaced by a no-op, to measure what it costs.
    Move,
}

/// How the GPU backend runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GpuConfig {
    /// The GPU (its ordinal); a multi-process run uses `LOCAL_RANK` instead.
    pub device: usize,
    /// The model's element type.
    pub dtype: DType,
    /// Sends between virtual ranks: copies or no-ops.
    pub comm: CommMode,
    /// Run the backward half of an `FB` on a second stream, overlapped with the forward.
    pub fb_two_streams: bool,
    /// The longest the host waits for the GPU to finish a step (or the gradient exchange)
    /// before the step fails; an NCCL run then aborts its communicator. `None`: no limit.
    pub host_timeout: Option<std::time::Duration>,
}

impl Default for GpuConfig {
    fn default() -> Self {
        GpuConfig {
            device: 0,
            dtype: DType::F32,
            comm: CommMode::Copy,
            fb_two_streams: true,
            host_timeout: None,
        }
    }
}

/// The GPU found by [`probe`](crate::probe).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GpuInfo {
    /// Its ordinal.
    pub ordinal: usize,
    /// How many GPUs the driver sees.
    pub devices: usize,
    /// The device's name.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Total memory in bytes.
    pub memory_bytes: usize,
    /// Whether NCCL was found (needed only for multi-process runs).
    pub nccl: bool,
}

impl std::fmt::Display for GpuInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GPU {} of {}: {} (compute capability {}.{}, {:.0} GiB){}",
            self.ordinal,
            self.devices,
            self.name,
            self.compute_capability.0,
            self.compute_capability.1,
            self.memory_bytes as f64 / (1u64 << 30) as f64,
            if self.nccl { "" } else { "; NCCL not found" }
        )
    }
}

/// What one step on the GPU returns, on the host: the [`HostStep`] of every backend.
pub type GpuStep = HostStep;
