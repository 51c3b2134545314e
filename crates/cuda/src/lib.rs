//! The CUDA backend of the dualpipe executor.
//!
//! Work in progress: see the crate's guide, docs/gpu.md, for what has and has not yet run on a
//! GPU.

pub mod error;
pub mod kernels;
pub mod launch;
pub mod plan;
pub mod rendezvous;

pub use error::CudaError;
pub use launch::{LaunchEnv, LaunchError};
