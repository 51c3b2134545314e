//! Finding a usable GPU without ever touching a library that is not there.

use crate::api::GpuInfo;
use crate::error::CudaError;

/// Which shared libraries were found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Libraries {
    /// `libcuda` (the driver).
    pub driver: bool,
    /// `libnvrtc` (kernels are compiled at run time).
    pub nvrtc: bool,
    /// `libcublas` (matrix products).
    pub cublas: bool,
    /// `libnccl` (multi-process runs only).
    pub nccl: bool,
}

/// Decides from what was found whether the backend can run; `devices` is the driver's device
/// count (or its error), asked only when the driver library exists. The reason names what is
/// missing.
pub fn diagnose(
    libraries: Libraries,
    devices: impl FnOnce() -> Result<usize, String>,
    ordinal: usize,
) -> Result<usize, CudaError> {
    if !libraries.driver {
        return Err(CudaError::NoGpu(
            "the CUDA driver library (libcuda.so) is not on the library path".into(),
        ));
    }
    let count = devices().map_err(|e| CudaError::NoGpu(format!("the CUDA driver reports {e}")))?;
    if count == 0 {
        return Err(CudaError::NoGpu("the CUDA driver sees no device".into()));
    }
    if ordinal >= count {
        return Err(CudaError::NoGpu(format!(
            "GPU {ordinal} was asked for, but the driver sees {count} (0 to {})",
            count - 1
        )));
    }
    for (found, name) in [
        (libraries.nvrtc, "NVRTC (libnvrtc.so)"),
        (libraries.cublas, "cuBLAS (libcublas.so)"),
    ] {
        if !found {
            return Err(CudaError::NoGpu(format!(
                "{name} from the CUDA toolkit is not on the library path"
            )));
        }
    }
    Ok(count)
}

/// Looks for GPU `ordinal` and the libraries the backend loads; never panics, and calls into
/// no library before knowing it exists.
pub fn probe(ordinal: usize) -> Result<GpuInfo, CudaError> {
    #[cfg(feature = "cuda")]
    {
        crate::gpu::pipeline::probe(ordinal)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ordinal;
        Err(CudaError::NotCompiled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: Libraries = Libraries {
        driver: true,
        nvrtc: true,
        cublas: true,
        nccl: true,
    };

    fn reason(libraries: Libraries, devices: Result<usize, String>, ordinal: usize) -> String {
        diagnose(libraries, || devices, ordinal)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn each_missing_piece_is_named() {
        assert_eq!(diagnose(ALL, || Ok(2), 1), Ok(2));
        let no_driver = Libraries {
            driver: false,
            ..ALL
        };
        assert_eq!(
            diagnose(no_driver, || panic!("the driver must not be asked"), 0)
                .unwrap_err()
                .to_string(),
            "no GPU found: the CUDA driver library (libcuda.so) is not on the library path"
        );
        assert_eq!(
            reason(ALL, Err("CUDA_ERROR_NO_DEVICE".into()), 0),
            "no GPU found: the CUDA driver reports CUDA_ERROR_NO_DEVICE"
        );
        assert_eq!(
            reason(ALL, Ok(0), 0),
            "no GPU found: the CUDA driver sees no device"
        );
        assert_eq!(
            reason(ALL, Ok(2), 2),
            "no GPU found: GPU 2 was asked for, but the driver sees 2 (0 to 1)"
        );
        assert_eq!(
            reason(
                Libraries {
                    nvrtc: false,
                    ..ALL
                },
                Ok(1),
                0
            ),
            "no GPU found: NVRTC (libnvrtc.so) from the CUDA toolkit is not on the library path"
        );
        assert_eq!(
            reason(
                Libraries {
                    cublas: false,
                    ..ALL
                },
                Ok(1),
                0
            ),
            "no GPU found: cuBLAS (libcublas.so) from the CUDA toolkit is not on the library path"
        );
        assert!(
            diagnose(Libraries { nccl: false, ..ALL }, || Ok(1), 0).is_ok(),
            "NCCL is optional"
        );
    }

    /// On any machine: probing answers instead of panicking, and without a driver it says so.
    #[test]
    fn probing_never_panics() {
        match probe(0) {
            Ok(info) => println!("found {info}"),
            Err(error) => {
                assert!(error.is_no_gpu(), "{error}");
                println!("no GPU here: {error}");
            }
        }
        #[cfg(feature = "cuda")]
        if !crate::gpu::raw::libraries().driver {
            assert_eq!(
                probe(0).unwrap_err().to_string(),
                "no GPU found: the CUDA driver library (libcuda.so) is not on the library path"
            );
        }
    }
}
