//! The CUDA backend of the dualpipe executor.
//!
//! - [`CudaPipeline`]: a schedule on one GPU, every rank a *virtual rank* (one context, three
//!   streams per rank, one host thread per rank, sends as device-to-device copies ordered by
//!   events);
//! - [`NcclRank`]: one process per GPU (torchrun-style [`LaunchEnv`]), NCCL between them, the
//!   NCCL id handed out by a small TCP [`rendezvous`];
//! - [`GpuSequential`]: the reference model in one stream, the GPU's numerical reference;
//! - [`CudaReference`]: the backend under the executor's shared conformance tests.
//!
//! The reference model runs on cuBLAS (matrix products) and kernels compiled at run time with
//! NVRTC ([`kernels`]), in `f32` or bf16. Streams are ordered by the backend's own events, as
//! laid out in [`plan`]; cudarc's per-buffer event tracking is off.
//!
//! Nothing here needs CUDA to build: cudarc loads the driver, NVRTC and cuBLAS at run time,
//! and the backend itself loads NCCL, and [`probe`] finds them first ([`detect`]: `DUALPIPE_CUDA_LIBS`, the loader's search
//! path, PyTorch's NVIDIA wheels) before anything calls into them, so a machine without a GPU
//! gets [`CudaError::NoGpu`] and a GPU with a library missing [`CudaError::Library`], never a
//! panic. Without the `cuda` feature every constructor returns [`CudaError::NotCompiled`].
//!
//! **Status**: the device code has not yet run on a GPU; see docs/gpu.md.

pub mod api;
pub mod detect;
pub mod error;
pub mod kernels;
pub mod launch;
pub mod plan;
pub mod rendezvous;
pub mod timeline;

#[cfg(not(feature = "cuda"))]
mod dummy;
#[cfg(feature = "cuda")]
mod gpu;

pub use api::{CommMode, DType, GpuConfig, GpuInfo, GpuStep};
pub use detect::probe;
pub use error::CudaError;
pub use launch::{LaunchEnv, LaunchError};

#[cfg(not(feature = "cuda"))]
pub use dummy::{CudaPipeline, CudaReference, GpuSequential, NcclRank};
#[cfg(feature = "cuda")]
pub use gpu::pipeline::{CudaPipeline, CudaReference, GpuSequential, NcclRank};
