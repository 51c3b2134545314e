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
//! NVRTC ([`kernels`]), in `f32` or bf16. Streams are ordered only by each rank's stream
//! [`plan`], lowered once and issued operation by operation through the loop of [`issue`]
//! (which [`replay`] runs on the CPU too); cudarc's per-buffer event tracking is off.
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
pub mod issue;
pub mod kernels;
pub mod launch;
pub mod plan;
pub mod rendezvous;
pub mod replay;
pub mod watchdog;

#[cfg(not(feature = "cuda"))]
mod dummy;
#[cfg(feature = "cuda")]
mod gpu;

pub use api::{CommMode, DType, GpuConfig, GpuInfo, GpuStep};
pub use error::CudaError;
pub use launch::{LaunchEnv, LaunchError};

#[cfg(not(feature = "cuda"))]
pub use dummy::{CudaPipeline, CudaReference, GpuSequential, NcclRank};
#[cfg(feature = "cuda")]
pub use gpu::{
    nccl::NcclRank,
    pipeline::CudaPipeline,
    sequential::{CudaReference, GpuSequential},
};

/// Looks for GPU `ordinal` and the libraries the backend loads ([`detect`]); never panics,
/// and calls into no library before knowing it exists. Without the `cuda` feature,
/// [`CudaError::NotCompiled`].
pub fn probe(ordinal: usize) -> Result<GpuInfo, CudaError> {
    #[cfg(feature = "cuda")]
    {
        gpu::device::probe(ordinal)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(CudaError::NotCompiled)
    }
}

/// What `dualpipe gpu-info` shows: looks for the libraries (once per process) and the GPUs;
/// never panics. Without the `cuda` feature, no library and [`CudaError::NotCompiled`].
pub fn report() -> detect::Report {
    #[cfg(feature = "cuda")]
    {
        gpu::device::report()
    }
    #[cfg(not(feature = "cuda"))]
    {
        detect::Report {
            libraries: Vec::new(),
            driver_version: None,
            devices: Err(CudaError::NotCompiled),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(feature = "cuda")]
    use detect::Lib;

    /// On any machine: probing answers instead of panicking, and without a driver it says so.
    #[test]
    fn probing_never_panics() {
        match probe(0) {
            Ok(info) => println!("found {info}"),
            Err(error) => println!("no usable GPU here: {error}"),
        }
        let report = report();
        #[cfg(feature = "cuda")]
        {
            assert_eq!(report.libraries.len(), Lib::ALL.len());
            let driver = &report.libraries[0];
            if driver.found.is_none() {
                let error = probe(0).unwrap_err();
                assert!(error.is_no_gpu(), "{error}");
                assert!(
                    error
                        .to_string()
                        .starts_with("no GPU found: the CUDA driver (libcuda.so) was not found"),
                    "{error}"
                );
                assert!(report.devices.is_err());
            }
        }
        #[cfg(not(feature = "cuda"))]
        assert_eq!(report.devices.unwrap_err(), CudaError::NotCompiled);
    }
}
