//! What can go wrong before or around a step on the GPU.

/// A failure of the CUDA backend outside the interpreter (a failing step is a
/// [`StepError`](dualpipe_executor::StepError) instead).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CudaError {
    /// The crate was built without its `cuda` feature.
    #[error("this build has no CUDA support (built without the `cuda` feature of dualpipe-cuda)")]
    NotCompiled,
    /// No usable GPU: no driver library, no device, or a library the backend needs is missing.
    #[error("no GPU found: {0}")]
    NoGpu(String),
    /// A GPU is there, but a library the backend needs (NVRTC, cuBLAS) was not found or
    /// cannot be used; names it and every place it was looked for.
    #[error("a GPU is present, but {0}")]
    Library(String),
    /// A CUDA driver, NVRTC, cuBLAS or NCCL call failed; says which and with what code.
    #[error("{0}")]
    Device(String),
    /// The launch environment (RANK, WORLD_SIZE, ...) is missing or wrong.
    #[error(transparent)]
    Launch(#[from] crate::launch::LaunchError),
    /// The rendezvous that hands the NCCL id to every process failed.
    #[error(transparent)]
    Rendezvous(#[from] crate::rendezvous::RendezvousError),
    /// The request does not fit the schedule or the model (wrong world size, a dtype the
    /// model cannot use, ...); says what.
    #[error("{0}")]
    Usage(String),
}

impl CudaError {
    /// Whether the failure is the absence of a GPU or of CUDA support (tests skip on it,
    /// the command line reports it as a usage error).
    pub fn is_no_gpu(&self) -> bool {
        matches!(self, CudaError::NotCompiled | CudaError::NoGpu(_))
    }
}
