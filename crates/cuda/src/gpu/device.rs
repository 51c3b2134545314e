//! Finding and opening a GPU: [`probe`] and [`report`] (the `cuda` build of the crate's
//! entry points of the same names) and [`open`], a context with the kernels compiled.

use std::panic::catch_unwind;
use std::sync::Arc;

use cudarc::driver::CudaContext;

use super::raw::{self, Kernels};
use crate::api::GpuInfo;
use crate::detect::{DeviceQueryError, Lib, Report, diagnose};
use crate::error::CudaError;

/// See [`crate::probe`].
pub(crate) fn probe(ordinal: usize) -> Result<GpuInfo, CudaError> {
    let libraries = raw::libraries();
    // Belt and braces: cudarc panics when a library it needs cannot be loaded; the checks
    // above should make that impossible, and a panic here still becomes an error.
    let answer = catch_unwind(|| -> Result<GpuInfo, CudaError> {
        let devices = diagnose(
            libraries,
            || {
                CudaContext::device_count()
                    .map(|n| n.max(0) as usize)
                    .map_err(device_query_error)
            },
            ordinal,
        )?;
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| CudaError::Device(format!("opening GPU {ordinal}: {e:?}")))?;
        let device =
            |e| CudaError::Device(format!("reading the properties of GPU {ordinal}: {e:?}"));
        let nccl = libraries
            .iter()
            .any(|s| s.lib == Lib::Nccl && s.problem().is_none());
        Ok(GpuInfo {
            ordinal,
            devices,
            name: ctx.name().map_err(device)?,
            compute_capability: ctx.compute_capability().map_err(device)?,
            memory_bytes: ctx.total_mem().map_err(device)?,
            nccl,
        })
    });
    answer.unwrap_or_else(|_| {
        Err(CudaError::Device(
            "a CUDA library could not be used (see the message above)".into(),
        ))
    })
}

/// No device (or a stub driver library) means no GPU; any other driver error is a GPU
/// machine whose driver does not work.
fn device_query_error(e: cudarc::driver::DriverError) -> DeviceQueryError {
    use cudarc::driver::sys::cudaError_enum as E;
    let text = format!("{e:?}");
    match e.0 {
        E::CUDA_ERROR_NO_DEVICE | E::CUDA_ERROR_STUB_LIBRARY => DeviceQueryError::Absent(text),
        _ => DeviceQueryError::Failed(text),
    }
}

/// See [`crate::report`].
pub(crate) fn report() -> Report {
    let libraries = raw::libraries().to_vec();
    let first = probe(0);
    let driver_version = match &first {
        Err(CudaError::NoGpu(_)) if libraries.first().is_none_or(|d| d.problem().is_some()) => None,
        _ => catch_unwind(raw::driver_version).ok().and_then(Result::ok),
    };
    let devices = first.and_then(|info| {
        let mut all = vec![info.clone()];
        for ordinal in 1..info.devices {
            all.push(probe(ordinal)?);
        }
        Ok(all)
    });
    Report {
        libraries,
        driver_version,
        devices,
    }
}

/// A context on one GPU with the kernels compiled, stream ordering owned by the backend.
pub(crate) struct Device {
    pub ctx: Arc<CudaContext>,
    pub kernels: Arc<Kernels>,
}

pub(crate) fn open(ordinal: usize) -> Result<Device, CudaError> {
    probe(ordinal)?;
    let ctx = CudaContext::new(ordinal)
        .map_err(|e| CudaError::NoGpu(format!("opening GPU {ordinal}: {e:?}")))?;
    // Before the first allocation: buffers made from here on carry no cudarc events.
    raw::own_stream_ordering(&ctx);
    raw::configure_memory_pool(&ctx)?;
    let kernels = Arc::new(Kernels::compile(&ctx)?);
    Ok(Device { ctx, kernels })
}
