//! Every unsafe call of the backend, each behind a safe function that checks what the call
//! relies on (lengths, shapes, element types) before making it. Nothing outside this module
//! uses `unsafe`.
#![allow(unsafe_code)]

use std::panic::catch_unwind;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys as cublas_sys};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use half::bf16;

use crate::detect::{self, Candidate, Lib, LibraryStatus};
use crate::gpu::GpuError;
use crate::kernels::{DType, REDUCE_THREADS};

/// Looks for every library of [`Lib::ALL`] once per process (see [`crate::detect`]) and
/// loads each one found, so that cudarc's later open by name gets it; then checks that
/// cudarc reaches each (by making cudarc load it now) and which files ended up mapped.
pub(crate) fn libraries() -> &'static [LibraryStatus] {
    static LIBRARIES: OnceLock<Vec<LibraryStatus>> = OnceLock::new();
    LIBRARIES.get_or_init(|| {
        let env = detect::env_dirs(std::env::var_os(detect::LIBS_VAR).as_deref());
        let mut site_packages: Option<Result<Vec<PathBuf>, String>> = None;
        let mut python = || {
            site_packages
                .get_or_insert_with(detect::python_site_packages)
                .clone()
        };
        Lib::ALL
            .iter()
            .map(|&lib| {
                let mut status = detect::find(lib, &env, &mut python, &mut open_global);
                if let Some((path, _)) = &status.found {
                    status.reachable = cudarc_reaches(lib);
                    let ours = std::fs::canonicalize(path).unwrap_or_else(|_| path.clone());
                    status.also_mapped = detect::mapped_now(lib)
                        .into_iter()
                        .filter(|p| *p != ours)
                        .collect();
                }
                status
            })
            .collect()
    })
}

/// Loads `candidate` for the whole process with its symbols global (NVRTC's builtins
/// first, from the same directory), and returns the file loaded.
fn open_global(lib: Lib, candidate: &Candidate) -> Result<PathBuf, String> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    let open = |file: &std::ffi::OsStr| {
        // SAFETY: loading a CUDA library runs its initialisers, which only set up the
        // library's own state; the handle is kept for the life of the process (forgotten
        // below), as cudarc keeps its own, so nothing is unloaded while in use.
        unsafe { Library::open(Some(file), RTLD_NOW | RTLD_GLOBAL) }
            .map(std::mem::forget)
            .map_err(|e| {
                // libloading's own text is "dlopen failed"; the loader's message is its source.
                std::error::Error::source(&e).map_or_else(|| e.to_string(), |s| s.to_string())
            })
    };
    match candidate {
        Candidate::File(path) => {
            if let (Some(prefix), Some(dir)) = (lib.companion_prefix(), path.parent()) {
                for companion in detect::files_with_prefix(dir, prefix) {
                    // A companion that does not load leaves the library to find its own.
                    let _ = open(companion.as_os_str());
                }
            }
            open(path.as_os_str())?;
            Ok(path.clone())
        }
        Candidate::Name(name) => {
            let before = detect::mapped_now(lib);
            open(std::ffi::OsStr::new(name))?;
            let after = detect::mapped_now(lib);
            let new = after.iter().find(|p| !before.contains(p));
            Ok(new
                .or(after.first())
                .cloned()
                .unwrap_or_else(|| PathBuf::from(name)))
        }
    }
}

/// Whether cudarc finds `lib` by the names it tries; when it does, cudarc loads it now (its
/// first open, which would otherwise come with the first call).
fn cudarc_reaches(lib: Lib) -> bool {
    type Present = unsafe fn() -> bool;
    type Load = unsafe fn() -> &'static libloading::Library;
    let (present, load): (Present, Load) = match lib {
        Lib::Driver => (
            cudarc::driver::sys::is_culib_present,
            cudarc::driver::sys::culib,
        ),
        Lib::Nvrtc => (
            cudarc::nvrtc::sys::is_culib_present,
            cudarc::nvrtc::sys::culib,
        ),
        Lib::Cublas => (
            cudarc::cublas::sys::is_culib_present,
            cudarc::cublas::sys::culib,
        ),
        // cudarc never opens these: cuBLAS opens cuBLASLt through the loader, and NCCL is
        // opened here by the path found (`nccl_api`).
        Lib::CublasLt | Lib::Nccl => return true,
    };
    // SAFETY: `is_culib_present` opens libraries by name and closes them again; `culib` opens
    // the first present one and keeps it, exactly as the first call into the library would.
    // `culib` panics only when no name resolves, which `is_culib_present` has just excluded;
    // the catch_unwind makes even that a plain `false`.
    catch_unwind(|| unsafe {
        present() && {
            load();
            true
        }
    })
    .unwrap_or(false)
}

/// The CUDA version the driver supports, as (major, minor).
pub(crate) fn driver_version() -> Result<(i32, i32), GpuError> {
    let mut version: std::ffi::c_int = 0;
    // SAFETY: called only after `libraries()` found the driver reachable; cuDriverGetVersion
    // writes one int through the pointer, which points at a live local.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut version) }
        .result()
        .map_err(|e| GpuError::driver("asking the driver for its version", e))?;
    Ok((version / 1000, (version % 1000) / 10))
}

/// Turns off cudarc's per-buffer event tracking for buffers allocated from now on in `ctx`:
/// the backend orders its streams with its own events (see `plan`) and frees memory only once
/// events recorded after every use have completed (see `memory::Graveyard`).
pub(crate) fn own_stream_ordering(ctx: &CudaContext) {
    // SAFETY: the obligations cudarc lists (no free before a use on another stream ends, no use
    // on another stream before the allocation, no concurrent writes) are the backend's: every
    // cross-stream use is ordered by an event wait (plan.rs), every buffer is freed through the
    // graveyard, and no two streams write one buffer.
    unsafe { ctx.disable_event_tracking() }
}

/// Sets up the device's current memory pool (the one cudarc's stream-ordered allocations
/// draw from) for the backend's pattern of many short-lived buffers:
/// - release threshold "never": memory freed in a step stays in the pool when a stream or the
///   host synchronises, instead of going back to the driver and being mapped again next step;
/// - no reuse with internal dependencies: the driver may otherwise hand a block freed on one
///   stream to an allocation on another by making the second wait for the first, an ordering
///   the schedule does not ask for. Buffers are freed only after events on every stream of
///   their rank have completed (the graveyard), so reuse without such waits is safe.
///
/// A device without memory pools (cudarc then allocates synchronously) is left as it is.
pub(crate) fn configure_memory_pool(ctx: &CudaContext) -> Result<(), GpuError> {
    use cudarc::driver::sys;
    let pools = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MEMORY_POOLS_SUPPORTED)
        .map_err(|e| GpuError::driver("asking for memory pool support", e))?;
    if pools == 0 {
        return Ok(());
    }
    ctx.bind_to_thread()
        .map_err(|e| GpuError::driver("binding the context", e))?;
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    // SAFETY: cuDeviceGetMemPool writes one pool handle through a pointer to a live local; the
    // device handle comes from a live context.
    unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) }
        .result()
        .map_err(|e| GpuError::driver("getting the memory pool", e))?;
    let mut threshold: u64 = u64::MAX;
    // SAFETY: the release threshold is a cuuint64_t, read through a pointer to a live u64; the
    // pool belongs to the device and lives as long as the process.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .result()
    .map_err(|e| GpuError::driver("setting the pool's release threshold", e))?;
    let mut internal: std::ffi::c_int = 0;
    // SAFETY: this attribute is an int, read through a pointer to a live c_int; same pool.
    unsafe {
        sys::cuMemPoolSetAttribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_REUSE_ALLOW_INTERNAL_DEPENDENCIES,
            (&mut internal as *mut std::ffi::c_int).cast(),
        )
    }
    .result()
    .map_err(|e| GpuError::driver("turning off the pool's reuse with dependencies", e))
}

/// A device buffer of either element type.
#[derive(Debug)]
pub(crate) enum Buf {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

impl Buf {
    pub fn len(&self) -> usize {
        match self {
            Buf::F32(s) => s.len(),
            Buf::Bf16(s) => s.len(),
        }
    }

    pub fn dtype(&self) -> DType {
        match self {
            Buf::F32(_) => DType::F32,
            Buf::Bf16(_) => DType::Bf16,
        }
    }
}

/// `len` elements of `dtype` on `stream`, not initialised (every use writes before it reads).
pub(crate) fn alloc(stream: &Arc<CudaStream>, dtype: DType, len: usize) -> Result<Buf, GpuError> {
    // SAFETY: the memory is uninitialised; callers only pass it as the output of a gemm with
    // beta 0, a copy, or a kernel that writes every element before reading it.
    let buf = unsafe {
        match dtype {
            DType::F32 => stream.alloc::<f32>(len).map(Buf::F32),
            DType::Bf16 => stream.alloc::<bf16>(len).map(Buf::Bf16),
        }
    };
    buf.map_err(|e| GpuError::driver("allocating device memory", e))
}

/// A row-major `rows x cols` matrix stored in `buf`, read as stored or transposed.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub buf: &'a Buf,
    pub rows: usize,
    pub cols: usize,
    pub transposed: bool,
}

impl<'a> Mat<'a> {
    pub fn new(buf: &'a Buf, rows: usize, cols: usize) -> Self {
        Mat {
            buf,
            rows,
            cols,
            transposed: false,
        }
    }

    pub fn t(self) -> Self {
        Mat {
            transposed: !self.transposed,
            ..self
        }
    }

    fn shape(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }
}

fn int(value: usize, what: &str) -> Result<i32, GpuError> {
    i32::try_from(value)
        .map_err(|_| GpuError::Shape(format!("{what} = {value} is too large for cuBLAS")))
}

/// `out = a b` (row-major, `out` overwritten), on the stream of `blas`.
///
/// cuBLAS is column-major: a row-major matrix is its transpose there, so `out^T = b^T a^T`
/// is computed with the operands swapped.
pub(crate) fn matmul(
    blas: &CudaBlas,
    out: &mut Buf,
    a: Mat<'_>,
    b: Mat<'_>,
) -> Result<(), GpuError> {
    let (m, k) = a.shape();
    let (k2, n) = b.shape();
    let fits = |mat: &Mat<'_>| mat.buf.len() == mat.rows * mat.cols;
    if k != k2 || out.len() != m * n || !fits(&a) || !fits(&b) {
        return Err(GpuError::Shape(format!(
            "matmul of {m}x{k} by {k2}x{n} into {} values (operands hold {} and {})",
            out.len(),
            a.buf.len(),
            b.buf.len()
        )));
    }
    if a.buf.dtype() != out.dtype() || b.buf.dtype() != out.dtype() {
        return Err(GpuError::Shape(
            "matmul operands of different element types".into(),
        ));
    }
    let op = |t: bool| {
        if t {
            cublas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            cublas_sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    let (transa, transb) = (op(b.transposed), op(a.transposed));
    let (mm, nn, kk) = (int(n, "columns")?, int(m, "rows")?, int(k, "inner size")?);
    let (lda, ldb, ldc) = (
        int(b.cols, "leading dimension")?,
        int(a.cols, "leading dimension")?,
        mm,
    );
    let failed = |e| GpuError::Library(format!("cuBLAS gemm ({m}x{k} by {k}x{n}) failed: {e:?}"));
    match (out, a.buf, b.buf) {
        (Buf::F32(c), Buf::F32(a), Buf::F32(b)) => {
            let cfg = GemmConfig {
                transa,
                transb,
                m: mm,
                n: nn,
                k: kk,
                alpha: 1.0f32,
                lda,
                ldb,
                beta: 0.0f32,
                ldc,
            };
            // SAFETY: the shapes were checked above: `b` holds k x n (read with lda = its
            // stored columns), `a` holds m x k (ldb likewise) and `c` exactly m x n, so cuBLAS
            // reads and writes in bounds; beta is 0, so `c` need not be initialised.
            unsafe { blas.gemm(cfg, b, a, c) }.map_err(failed)
        }
        (Buf::Bf16(c), Buf::Bf16(a), Buf::Bf16(b)) => {
            let cfg = GemmConfig {
                transa,
                transb,
                m: mm,
                n: nn,
                k: kk,
                alpha: bf16::ONE,
                lda,
                ldb,
                beta: bf16::ZERO,
                ldc,
            };
            // SAFETY: as for f32 above; cudarc runs bf16 through cublasGemmEx computing in f32.
            unsafe { blas.gemm(cfg, b, a, c) }.map_err(failed)
        }
        _ => unreachable!("element types checked above"),
    }
}

/// `out += a b` (row-major) into f32, on `stream` (the stream `blas` is bound to): one gemm
/// with beta 1 whose output is f32 whatever the operands' type (`cublasGemmEx` with bf16
/// inputs, f32 output, f32 compute), so a weight gradient needs no temporary and no separate
/// add, and a micro-batch's share is never rounded to bf16 on its way into the sum.
pub(crate) fn matmul_add_f32(
    blas: &CudaBlas,
    stream: &CudaStream,
    out: &mut CudaSlice<f32>,
    a: Mat<'_>,
    b: Mat<'_>,
) -> Result<(), GpuError> {
    use cudarc::driver::{DevicePtr, DevicePtrMut};
    let (m, k) = a.shape();
    let (k2, n) = b.shape();
    let fits = |mat: &Mat<'_>| mat.buf.len() == mat.rows * mat.cols;
    if k != k2 || out.len() != m * n || !fits(&a) || !fits(&b) {
        return Err(GpuError::Shape(format!(
            "matmul of {m}x{k} by {k2}x{n} added to {} values (operands hold {} and {})",
            out.len(),
            a.buf.len(),
            b.buf.len()
        )));
    }
    let op = |t: bool| {
        if t {
            cublas_sys::cublasOperation_t::CUBLAS_OP_T
        } else {
            cublas_sys::cublasOperation_t::CUBLAS_OP_N
        }
    };
    // Column-major, operands swapped, as in `matmul`.
    let (transa, transb) = (op(b.transposed), op(a.transposed));
    let (mm, nn, kk) = (int(n, "columns")?, int(m, "rows")?, int(k, "inner size")?);
    let (lda, ldb, ldc) = (
        int(b.cols, "leading dimension")?,
        int(a.cols, "leading dimension")?,
        mm,
    );
    let failed = |e| {
        GpuError::Library(format!(
            "cuBLAS gemm ({m}x{k} by {k}x{n}, added) failed: {e:?}"
        ))
    };
    match (a.buf, b.buf) {
        (Buf::F32(a), Buf::F32(b)) => {
            let cfg = GemmConfig {
                transa,
                transb,
                m: mm,
                n: nn,
                k: kk,
                alpha: 1.0f32,
                lda,
                ldb,
                beta: 1.0f32,
                ldc,
            };
            // SAFETY: shapes checked above as in `matmul`; `out` holds exactly m x n values,
            // initialised (beta is 1, so cuBLAS reads them).
            unsafe { blas.gemm(cfg, b, a, out) }.map_err(failed)
        }
        (Buf::Bf16(a), Buf::Bf16(b)) => {
            let (alpha, beta) = (1.0f32, 1.0f32);
            let (pa, _a) = b.device_ptr(stream);
            let (pb, _b) = a.device_ptr(stream);
            let (pc, _c) = out.device_ptr_mut(stream);
            // SAFETY: shapes checked above: cuBLAS's A (our `b`, bf16) holds k x n read with
            // lda, its B (our `a`, bf16) m x k read with ldb, and C (`out`, f32) exactly m x n
            // with ldc = n; alpha and beta are f32 values that outlive the call, as
            // CUBLAS_COMPUTE_32F requires. bf16 inputs with f32 output and compute are a
            // combination cublasGemmEx supports. The handle runs on `stream`, where the
            // pointers were taken (event tracking is off, so taking them records nothing).
            unsafe {
                cudarc::cublas::result::gemm_ex(
                    *blas.handle(),
                    transa,
                    transb,
                    mm,
                    nn,
                    kk,
                    (&alpha as *const f32).cast(),
                    pa as *const std::ffi::c_void,
                    cublas_sys::cudaDataType_t::CUDA_R_16BF,
                    lda,
                    pb as *const std::ffi::c_void,
                    cublas_sys::cudaDataType_t::CUDA_R_16BF,
                    ldb,
                    (&beta as *const f32).cast(),
                    pc as *mut std::ffi::c_void,
                    cublas_sys::cudaDataType_t::CUDA_R_32F,
                    ldc,
                    cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(failed)
        }
        _ => Err(GpuError::Shape(
            "matmul operands of different element types".into(),
        )),
    }
}

/// Launch geometry of the grid-stride kernels.
fn grid(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 4096) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One kernel argument.
pub(crate) enum Arg<'a> {
    Buf(&'a Buf),
    Grad(&'a CudaSlice<f32>),
    Wide(&'a CudaSlice<f64>),
    Int(&'a i64),
    Float(&'a f32),
}

/// Launches `func` with `args`.
///
/// # Safety
/// `args` must match the kernel's parameter list in number, order and type (`Buf` for a `T*`
/// of the instance's element type, `Grad` for a `float*`, `Wide` for a `double*`, `Int` for a
/// `long long`, `Float` for a `float`), and every buffer must hold at least as many elements as the kernel touches for
/// the sizes passed.
unsafe fn launch(
    stream: &CudaStream,
    func: &CudaFunction,
    cfg: LaunchConfig,
    args: &[Arg<'_>],
) -> Result<(), GpuError> {
    let mut builder = stream.launch_builder(func);
    for arg in args {
        match arg {
            Arg::Buf(Buf::F32(s)) => builder.arg(s),
            Arg::Buf(Buf::Bf16(s)) => builder.arg(s),
            Arg::Grad(s) => builder.arg(*s),
            Arg::Wide(s) => builder.arg(*s),
            Arg::Int(v) => builder.arg(*v),
            Arg::Float(v) => builder.arg(*v),
        };
    }
    // SAFETY: the caller's obligation (above).
    unsafe { builder.launch(cfg) }
        .map(|_| ())
        .map_err(|e| GpuError::driver("launching a kernel", e))
}

/// An NVRTC program, destroyed when dropped.
struct Program(cudarc::nvrtc::sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: the program was created by `create_program` and is destroyed only here.
        // A failure to destroy it leaks a little host memory, which is all it can do.
        let _ = unsafe { cudarc::nvrtc::result::destroy_program(self.0) };
    }
}

/// Compiles `source` with NVRTC straight to a CUBIN for `arch` (`sm_90`), so that the driver
/// loads machine code and never has to read PTX, whose version a driver older than NVRTC
/// refuses (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`).
fn compile_cubin(source: &str, arch: &str) -> Result<Vec<u8>, GpuError> {
    use cudarc::nvrtc::{result, sys};
    let nvrtc = |what: &str, e: result::NvrtcError| {
        GpuError::Library(format!("NVRTC {what} for {arch} failed: {:?}", e.0))
    };
    let src = std::ffi::CString::new(source)
        .map_err(|_| GpuError::Library("the kernel source holds a NUL byte".into()))?;
    let program = Program(result::create_program(&src, None).map_err(|e| nvrtc("create", e))?);
    let options = [format!("--gpu-architecture={arch}")];
    // SAFETY: `program` is live (destroyed only on drop) and `src` outlives it.
    let compiled = unsafe { result::compile_program(program.0, &options) };
    if let Err(e) = compiled {
        // SAFETY: as above; the log is a NUL-terminated string NVRTC wrote into our buffer.
        let log = unsafe { result::get_program_log(program.0) }
            .map(|chars| {
                let bytes: Vec<u8> = chars
                    .iter()
                    .map(|&c| c as u8)
                    .take_while(|&b| b != 0)
                    .collect();
                String::from_utf8_lossy(&bytes).into_owned()
            })
            .unwrap_or_default();
        return Err(GpuError::Library(format!(
            "NVRTC could not compile the kernels for {arch}: {:?}\n{log}",
            e.0
        )));
    }
    let mut size = 0usize;
    // SAFETY: `program` was compiled above; NVRTC writes the size through a live local.
    unsafe { sys::nvrtcGetCUBINSize(program.0, &mut size) }
        .result()
        .map_err(|e| nvrtc("CUBIN size", e))?;
    if size == 0 {
        return Err(GpuError::Library(format!(
            "NVRTC produced no CUBIN for {arch} (the architecture may be virtual)"
        )));
    }
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` holds exactly the `size` bytes NVRTC asked for above.
    unsafe { sys::nvrtcGetCUBIN(program.0, cubin.as_mut_ptr().cast()) }
        .result()
        .map_err(|e| nvrtc("CUBIN", e))?;
    Ok(cubin)
}

/// The compiled kernels of one context.
pub(crate) struct Kernels {
    functions: std::collections::HashMap<(crate::kernels::Kernel, DType), CudaFunction>,
}

impl Kernels {
    /// Compiles [`crate::kernels::source`] with NVRTC to a CUBIN for the device of `ctx` and
    /// loads every kernel.
    pub fn compile(ctx: &Arc<CudaContext>) -> Result<Kernels, GpuError> {
        use crate::kernels::Kernel;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| GpuError::driver("reading the compute capability", e))?;
        let arch = format!("sm_{major}{minor}");
        let cubin = compile_cubin(&crate::kernels::source(), &arch)?;
        let module = ctx
            .load_module(cudarc::nvrtc::Ptx::from_binary(cubin))
            .map_err(|e| {
                GpuError::driver(&format!("loading the kernels compiled for {arch}"), e)
            })?;
        let mut functions = std::collections::HashMap::new();
        for dtype in [DType::F32, DType::Bf16] {
            for kernel in Kernel::ALL {
                let name = kernel.name(dtype);
                let function = module
                    .load_function(&name)
                    .map_err(|e| GpuError::driver(&format!("loading kernel {name}"), e))?;
                functions.insert((kernel, dtype), function);
            }
        }
        Ok(Kernels { functions })
    }

    fn get(&self, kernel: crate::kernels::Kernel, dtype: DType) -> &CudaFunction {
        &self.functions[&(kernel, dtype)]
    }

    fn check(what: &str, ok: bool) -> Result<(), GpuError> {
        if ok {
            Ok(())
        } else {
            Err(GpuError::Shape(format!(
                "{what}: buffer sizes do not match"
            )))
        }
    }

    /// `a += bias` per row, then `g = gelu(a)`; `a` and `g` are `rows x cols`.
    pub fn bias_gelu(
        &self,
        stream: &CudaStream,
        a: &mut Buf,
        g: &mut Buf,
        bias: &Buf,
        rows: usize,
        cols: usize,
    ) -> Result<(), GpuError> {
        let n = rows * cols;
        let dtype = a.dtype();
        Self::check(
            "bias_gelu",
            a.len() == n
                && g.len() == n
                && bias.len() == cols
                && g.dtype() == dtype
                && bias.dtype() == dtype,
        )?;
        let (r, c) = (rows as i64, cols as i64);
        // SAFETY: bias_gelu_T(T* a, T* g, const T* bias, long long rows, long long cols)
        // touches rows*cols elements of a and g and cols of bias, as checked.
        unsafe {
            launch(
                stream,
                self.get(crate::kernels::Kernel::BiasGelu, dtype),
                grid(n),
                &[
                    Arg::Buf(a),
                    Arg::Buf(g),
                    Arg::Buf(bias),
                    Arg::Int(&r),
                    Arg::Int(&c),
                ],
            )
        }
    }

    /// `y += bias` per row; `y` is `rows x cols`.
    pub fn add_bias(
        &self,
        stream: &CudaStream,
        y: &mut Buf,
        bias: &Buf,
        rows: usize,
        cols: usize,
    ) -> Result<(), GpuError> {
        let n = rows * cols;
        let dtype = y.dtype();
        Self::check(
            "add_bias",
            y.len() == n && bias.len() == cols && bias.dtype() == dtype,
        )?;
        let (r, c) = (rows as i64, cols as i64);
        // SAFETY: add_bias_T(T* y, const T* bias, long long rows, long long cols), sizes checked.
        unsafe {
            launch(
                stream,
                self.get(crate::kernels::Kernel::AddBias, dtype),
                grid(n),
                &[Arg::Buf(y), Arg::Buf(bias), Arg::Int(&r), Arg::Int(&c)],
            )
        }
    }

    /// `d *= gelu'(a)` element-wise.
    pub fn gelu_backward(&self, stream: &CudaStream, d: &mut Buf, a: &Buf) -> Result<(), GpuError> {
        let n = d.len();
        let dtype = d.dtype();
        Self::check("gelu_backward", a.len() == n && a.dtype() == dtype)?;
        let count = n as i64;
        // SAFETY: gelu_backward_T(T* d, const T* a, long long n), sizes checked.
        unsafe {
            launch(
                stream,
                self.get(crate::kernels::Kernel::GeluBackward, dtype),
                grid(n),
                &[Arg::Buf(d), Arg::Buf(a), Arg::Int(&count)],
            )
        }
    }

    /// The gradient of the mean squared error of `y` against `t` into `grad`, and the loss into
    /// `loss` (one `f32`).
    pub fn mse(
        &self,
        stream: &Arc<CudaStream>,
        grad: &mut Buf,
        loss: &mut CudaSlice<f32>,
        y: &Buf,
        t: &Buf,
    ) -> Result<(), GpuError> {
        let n = y.len();
        let dtype = y.dtype();
        Self::check(
            "mse",
            grad.len() == n
                && t.len() == n
                && loss.len() == 1
                && t.dtype() == dtype
                && grad.dtype() == dtype,
        )?;
        let count = n as i64;
        // SAFETY: mse_grad_T(T* grad, const T* y, const T* t, long long n), sizes checked.
        unsafe {
            launch(
                stream,
                self.get(crate::kernels::Kernel::MseGrad, dtype),
                grid(n),
                &[Arg::Buf(grad), Arg::Buf(y), Arg::Buf(t), Arg::Int(&count)],
            )?
        };
        let blocks = crate::kernels::mse_blocks(n);
        // Used on `stream` only, so dropping it at the end (a free ordered on `stream`, after
        // both passes) is safe.
        let partials = stream
            .alloc_zeros::<f64>(blocks as usize)
            .map_err(|e| GpuError::driver("allocating the loss's partial sums", e))?;
        let block_count = i64::from(blocks);
        // SAFETY: mse_partial_T(double* partials, const T* y, const T* t, long long n) reads n
        // elements of y and t and writes partials[blockIdx.x] for each of the `blocks` blocks
        // (`partials` holds `blocks`); it needs exactly REDUCE_THREADS threads per block.
        unsafe {
            launch(
                stream,
                self.get(crate::kernels::Kernel::MsePartial, dtype),
                LaunchConfig {
                    grid_dim: (blocks, 1, 1),
                    block_dim: (REDUCE_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                },
                &[
                    Arg::Wide(&partials),
                    Arg::Buf(y),
                    Arg::Buf(t),
                    Arg::Int(&count),
                ],
            )?
        };
        // SAFETY: mse_finish_T(float* loss, const double* partials, long long blocks,
        // long long n) reads `blocks` partials and writes loss[0] only; one block of exactly
        // REDUCE_THREADS threads.
        unsafe {
            launch(
                stream,
                self.get(crate::kernels::Kernel::MseFinish, dtype),
                LaunchConfig {
                    grid_dim: (1, 1, 1),
                    block_dim: (REDUCE_THREADS, 1, 1),
                    shared_mem_bytes: 0,
                },
                &[
                    Arg::Grad(loss),
                    Arg::Wide(&partials),
                    Arg::Int(&block_count),
                    Arg::Int(&count),
                ],
            )
        }
    }

    /// `sums[c] += sum over rows of x[r, c]`.
    pub fn column_sums_add(
        &self,
        stream: &CudaStream,
        sums: &mut CudaSlice<f32>,
        x: &Buf,
        rows: usize,
        cols: usize,
    ) -> Result<(), GpuError> {
        Self::check(
            "column_sums_add",
            x.len() == rows * cols && sums.len() == cols,
        )?;
        let (r, c) = (rows as i64, cols as i64);
        let tiles = LaunchConfig {
            grid_dim: (crate::kernels::column_blocks(cols), 1, 1),
            block_dim: (crate::kernels::COLUMN_TILE, crate::kernels::ROW_LANES, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: column_sums_add_T(float* sums, const T* x, long long rows, long long cols),
        // sizes checked; it needs blockDim == (COLUMN_TILE, ROW_LANES), as given.
        unsafe {
            launch(
                stream,
                self.get(crate::kernels::Kernel::ColumnSumsAdd, x.dtype()),
                tiles,
                &[Arg::Grad(sums), Arg::Buf(x), Arg::Int(&r), Arg::Int(&c)],
            )
        }
    }

    /// `acc += x` element-wise (`acc` in f32).
    pub fn accumulate(
        &self,
        stream: &CudaStream,
        acc: &mut CudaSlice<f32>,
        x: &Buf,
    ) -> Result<(), GpuError> {
        Self::check("accumulate", acc.len() == x.len())?;
        let count = x.len() as i64;
        // SAFETY: accumulate_T(float* acc, const T* x, long long n), sizes checked.
        unsafe {
            launch(
                stream,
                self.get(crate::kernels::Kernel::Accumulate, x.dtype()),
                grid(x.len()),
                &[Arg::Grad(acc), Arg::Buf(x), Arg::Int(&count)],
            )
        }
    }

    /// `p -= lr grad`.
    pub fn sgd(
        &self,
        stream: &CudaStream,
        p: &mut Buf,
        grad: &CudaSlice<f32>,
        lr: f32,
    ) -> Result<(), GpuError> {
        Self::check("sgd", p.len() == grad.len())?;
        let count = p.len() as i64;
        // SAFETY: sgd_T(T* p, const float* grad, float lr, long long n), sizes checked.
        unsafe {
            launch(
                stream,
                self.get(crate::kernels::Kernel::Sgd, p.dtype()),
                grid(p.len()),
                &[
                    Arg::Buf(p),
                    Arg::Grad(grad),
                    Arg::Float(&lr),
                    Arg::Int(&count),
                ],
            )
        }
    }

    /// `out = x` converted from f32.
    pub fn convert_from_f32(
        &self,
        stream: &CudaStream,
        out: &mut Buf,
        x: &CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        Self::check("from_f32", out.len() == x.len())?;
        let count = x.len() as i64;
        // SAFETY: from_f32_T(T* out, const float* x, long long n), sizes checked.
        unsafe {
            launch(
                stream,
                self.get(crate::kernels::Kernel::FromF32, out.dtype()),
                grid(x.len()),
                &[Arg::Buf(out), Arg::Grad(x), Arg::Int(&count)],
            )
        }
    }

    /// `out = x` converted to f32.
    pub fn convert_to_f32(
        &self,
        stream: &CudaStream,
        out: &mut CudaSlice<f32>,
        x: &Buf,
    ) -> Result<(), GpuError> {
        Self::check("to_f32", out.len() == x.len())?;
        let count = x.len() as i64;
        // SAFETY: to_f32_T(float* out, const T* x, long long n), sizes checked.
        unsafe {
            launch(
                stream,
                self.get(crate::kernels::Kernel::ToF32, x.dtype()),
                grid(x.len()),
                &[Arg::Grad(out), Arg::Buf(x), Arg::Int(&count)],
            )
        }
    }
}

/// NCCL's unique id, passed by value to `ncclCommInitRank`.
#[repr(C)]
#[derive(Clone, Copy)]
struct NcclUniqueId {
    internal: [std::ffi::c_char; 128],
}

/// An NCCL communicator handle (`ncclComm_t`).
type NcclCommHandle = *mut std::ffi::c_void;

/// The NCCL functions the backend calls, from the file detection found. NCCL is opened here
/// rather than through cudarc, which asks the loader only for `libnccl.so`, while NCCL's own
/// name (its `SONAME`, and the file in PyTorch's `nvidia/nccl/lib`) is `libnccl.so.2`.
struct NcclApi {
    path: PathBuf,
    get_unique_id: unsafe extern "C" fn(*mut NcclUniqueId) -> std::ffi::c_int,
    comm_init_rank: unsafe extern "C" fn(
        *mut NcclCommHandle,
        std::ffi::c_int,
        NcclUniqueId,
        std::ffi::c_int,
    ) -> std::ffi::c_int,
    comm_destroy: unsafe extern "C" fn(NcclCommHandle) -> std::ffi::c_int,
    comm_abort: unsafe extern "C" fn(NcclCommHandle) -> std::ffi::c_int,
    send: unsafe extern "C" fn(
        *const std::ffi::c_void,
        usize,
        std::ffi::c_int,
        std::ffi::c_int,
        NcclCommHandle,
        cudarc::driver::sys::CUstream,
    ) -> std::ffi::c_int,
    recv: unsafe extern "C" fn(
        *mut std::ffi::c_void,
        usize,
        std::ffi::c_int,
        std::ffi::c_int,
        NcclCommHandle,
        cudarc::driver::sys::CUstream,
    ) -> std::ffi::c_int,
    group_start: unsafe extern "C" fn() -> std::ffi::c_int,
    group_end: unsafe extern "C" fn() -> std::ffi::c_int,
    error_string: unsafe extern "C" fn(std::ffi::c_int) -> *const std::ffi::c_char,
}

/// NCCL's `ncclFloat32` and `ncclBfloat16`.
const NCCL_FLOAT32: std::ffi::c_int = 7;
const NCCL_BFLOAT16: std::ffi::c_int = 9;

/// NCCL, opened once per process from the file [`libraries`] found.
fn nccl_api() -> Result<&'static NcclApi, GpuError> {
    static API: OnceLock<Result<NcclApi, String>> = OnceLock::new();
    API.get_or_init(|| {
        let status = libraries()
            .iter()
            .find(|s| s.lib == Lib::Nccl)
            .ok_or("NCCL was not looked for")?;
        let Some((path, _)) = &status.found else {
            return Err(status.problem().unwrap_or_default());
        };
        use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
        // SAFETY: the file was already loaded by `libraries()` (this only adds a reference);
        // the handle is leaked below, so the library and every pointer taken from it stay
        // valid for the life of the process.
        let library = unsafe { Library::open(Some(path.as_os_str()), RTLD_NOW | RTLD_GLOBAL) }
            .map_err(|e| format!("opening NCCL at {}: {e}", path.display()))?;
        let library: &'static Library = Box::leak(Box::new(library));
        macro_rules! symbol {
            ($name:literal) => {
                // SAFETY: the field's type is the function's C signature in nccl.h (NCCL 2.x);
                // the pointer stays valid because the library is never unloaded.
                *unsafe { library.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| format!("NCCL at {} lacks {}: {e}", path.display(), $name))?
            };
        }
        Ok(NcclApi {
            path: path.clone(),
            get_unique_id: symbol!("ncclGetUniqueId"),
            comm_init_rank: symbol!("ncclCommInitRank"),
            comm_destroy: symbol!("ncclCommDestroy"),
            comm_abort: symbol!("ncclCommAbort"),
            send: symbol!("ncclSend"),
            recv: symbol!("ncclRecv"),
            group_start: symbol!("ncclGroupStart"),
            group_end: symbol!("ncclGroupEnd"),
            error_string: symbol!("ncclGetErrorString"),
        })
    })
    .as_ref()
    .map_err(|e| GpuError::Library(e.clone()))
}

impl NcclApi {
    /// `Ok` for `ncclSuccess`, else an error naming the call and NCCL's reason.
    fn check(&self, what: &str, code: std::ffi::c_int) -> Result<(), GpuError> {
        if code == 0 {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let text = unsafe {
            let p = (self.error_string)(code);
            if p.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        Err(GpuError::Library(format!(
            "NCCL {what} failed: {text} (ncclResult_t {code}, {})",
            self.path.display()
        )))
    }
}

/// A fresh NCCL unique id (rank 0 makes it; the rendezvous hands it to the others).
pub(crate) fn nccl_unique_id() -> Result<[u8; 128], GpuError> {
    let api = nccl_api()?;
    let mut id = NcclUniqueId { internal: [0; 128] };
    // SAFETY: ncclGetUniqueId writes one ncclUniqueId through a pointer to a live local.
    api.check("get unique id", unsafe { (api.get_unique_id)(&mut id) })?;
    Ok(id.internal.map(|c| c as u8))
}

/// Starts a group of NCCL operations (one commit).
pub(crate) fn nccl_group_start() -> Result<(), GpuError> {
    let api = nccl_api()?;
    // SAFETY: no arguments; NCCL keeps the group per thread.
    api.check("group start", unsafe { (api.group_start)() })
}

/// Ends the group started by [`nccl_group_start`], launching its operations.
pub(crate) fn nccl_group_end() -> Result<(), GpuError> {
    let api = nccl_api()?;
    // SAFETY: no arguments; called after `nccl_group_start` on the same thread.
    api.check("group end", unsafe { (api.group_end)() })
}

/// Runs `body` between [`nccl_group_start`] and [`nccl_group_end`]. The group is ended even
/// when `body` fails: NCCL keeps the group open per thread, and a group left open would take in
/// the next commit's operations. `body`'s error comes first; `wrap` turns NCCL's own errors
/// into the caller's.
pub(crate) fn nccl_group<T, E>(
    wrap: impl Fn(GpuError) -> E,
    body: impl FnOnce() -> Result<T, E>,
) -> Result<T, E> {
    nccl_group_start().map_err(&wrap)?;
    let result = body();
    let ended = nccl_group_end().map_err(&wrap);
    let value = result?;
    ended?;
    Ok(value)
}

/// The communicator handle, shared between its [`NcclComm`] and any [`NcclAbort`]; null once
/// aborted. Operations hold the read lock while NCCL takes them (queueing only, inside a
/// group); an abort takes the write lock, so no operation uses a handle being freed.
struct CommCell {
    api: &'static NcclApi,
    handle: std::sync::RwLock<NcclCommHandle>,
}

// SAFETY: NCCL lets a communicator be used from any thread; every use of the handle goes
// through the lock above, and `ncclCommAbort` (the one call made from another thread, to end a
// stall) is documented as safe to call while operations of the communicator are in flight.
unsafe impl Send for CommCell {}
// SAFETY: as for `Send`: the handle is only read or replaced under the lock.
unsafe impl Sync for CommCell {}

impl CommCell {
    /// Calls `f` with the live handle, or fails if the communicator was aborted.
    fn with<T>(
        &self,
        f: impl FnOnce(NcclCommHandle) -> Result<T, GpuError>,
    ) -> Result<T, GpuError> {
        let handle = self.handle.read().unwrap_or_else(|p| p.into_inner());
        if handle.is_null() {
            return Err(GpuError::Library(
                "the NCCL communicator was aborted".into(),
            ));
        }
        f(*handle)
    }

    /// `ncclCommAbort`, once: the other ranks' pending operations with this one fail (or
    /// stop at their own timeout) instead of waiting for it forever. Returns whether this
    /// call aborted it.
    fn abort(&self) -> Result<bool, GpuError> {
        let mut handle = self.handle.write().unwrap_or_else(|p| p.into_inner());
        let comm = std::mem::replace(&mut *handle, std::ptr::null_mut());
        if comm.is_null() {
            return Ok(false);
        }
        // SAFETY: `comm` came from ncclCommInitRank and was live until the line above; it is
        // no longer reachable through the cell, so it is neither used nor destroyed again.
        let code = unsafe { (self.api.comm_abort)(comm) };
        self.api.check("communicator abort", code)?;
        Ok(true)
    }
}

impl Drop for CommCell {
    fn drop(&mut self) {
        let comm = *self.handle.get_mut().unwrap_or_else(|p| p.into_inner());
        if comm.is_null() {
            return;
        }
        // SAFETY: `comm` came from ncclCommInitRank and was not aborted; this is the last
        // reference to it. A failure leaves the communicator to the process's end, which is
        // all that can be done.
        let _ = unsafe { (self.api.comm_destroy)(comm) };
    }
}

/// A handle that aborts an [`NcclComm`] from any thread (the host timeout's way out of a
/// stalled step).
#[derive(Clone)]
pub(crate) struct NcclAbort(Arc<CommCell>);

impl NcclAbort {
    /// Aborts the communicator; `Ok(false)` if it already was.
    pub fn abort(&self) -> Result<bool, GpuError> {
        self.0.abort()
    }
}

/// One rank's NCCL communicator; its operations go to `stream`.
pub(crate) struct NcclComm {
    api: &'static NcclApi,
    cell: Arc<CommCell>,
    stream: Arc<CudaStream>,
}

impl NcclComm {
    /// Joins rank `rank` of `world_size` to the communicator of `id`; the context of `stream`
    /// must be current on this thread. Blocks until every rank has joined.
    pub fn init_rank(
        stream: Arc<CudaStream>,
        rank: usize,
        world_size: usize,
        id: [u8; 128],
    ) -> Result<NcclComm, GpuError> {
        let api = nccl_api()?;
        let int = |v: usize, what: &str| {
            std::ffi::c_int::try_from(v)
                .map_err(|_| GpuError::Library(format!("NCCL {what} {v} does not fit an int")))
        };
        let (rank, world_size) = (int(rank, "rank")?, int(world_size, "world size")?);
        let id = NcclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };
        let mut comm: NcclCommHandle = std::ptr::null_mut();
        // SAFETY: ncclCommInitRank writes the new communicator through a pointer to a live
        // local; the id is passed by value as its C signature says.
        let code = unsafe { (api.comm_init_rank)(&mut comm, world_size, id, rank) };
        api.check(&format!("init of rank {rank} of {world_size}"), code)?;
        let cell = Arc::new(CommCell {
            api,
            handle: std::sync::RwLock::new(comm),
        });
        Ok(NcclComm { api, cell, stream })
    }

    /// A handle that can abort this communicator from another thread.
    pub fn abort_handle(&self) -> NcclAbort {
        NcclAbort(self.cell.clone())
    }

    /// `ncclCommAbort`, once: see `CommCell::abort`. Later operations fail.
    pub fn abort(&self) -> Result<bool, GpuError> {
        self.cell.abort()
    }

    /// Queues a send of all of `buf` to `peer` on the communicator's stream.
    pub fn send(&self, buf: &Buf, peer: u32) -> Result<(), GpuError> {
        use cudarc::driver::DevicePtr;
        let (ptr, dtype, _sync) = match buf {
            Buf::F32(s) => {
                let (p, sync) = s.device_ptr(&self.stream);
                (p, NCCL_FLOAT32, sync)
            }
            Buf::Bf16(s) => {
                let (p, sync) = s.device_ptr(&self.stream);
                (p, NCCL_BFLOAT16, sync)
            }
        };
        let peer = std::ffi::c_int::try_from(peer)
            .map_err(|_| GpuError::Library(format!("NCCL peer {peer} does not fit an int")))?;
        self.cell.with(|comm| {
            // SAFETY: `ptr` addresses `buf.len()` elements of `dtype` that stay allocated
            // until the stream has passed this send (buffers are freed only through the
            // graveyard, after events on every stream of the rank); `comm` is live while the
            // cell's read lock is held.
            let code = unsafe {
                (self.api.send)(
                    ptr as *const std::ffi::c_void,
                    buf.len(),
                    dtype,
                    peer,
                    comm,
                    self.stream.cu_stream(),
                )
            };
            self.api.check(&format!("send to rank {peer}"), code)
        })
    }

    /// Queues a send of all of the f32 values `grads` to `peer` (gradients).
    pub fn send_f32(&self, grads: &CudaSlice<f32>, peer: u32) -> Result<(), GpuError> {
        use cudarc::driver::DevicePtr;
        let (ptr, _sync) = grads.device_ptr(&self.stream);
        let peer = std::ffi::c_int::try_from(peer)
            .map_err(|_| GpuError::Library(format!("NCCL peer {peer} does not fit an int")))?;
        self.cell.with(|comm| {
            // SAFETY: as for `send`: `ptr` addresses `grads.len()` f32 values that outlive the
            // operation on the stream; `comm` is live under the read lock.
            let code = unsafe {
                (self.api.send)(
                    ptr as *const std::ffi::c_void,
                    grads.len(),
                    NCCL_FLOAT32,
                    peer,
                    comm,
                    self.stream.cu_stream(),
                )
            };
            self.api.check(&format!("send to rank {peer}"), code)
        })
    }

    /// Queues a receive from `peer` into all of `buf` on the communicator's stream.
    pub fn recv(&self, buf: &mut Buf, peer: u32) -> Result<(), GpuError> {
        use cudarc::driver::DevicePtrMut;
        let len = buf.len();
        let (ptr, dtype, _sync) = match buf {
            Buf::F32(s) => {
                let (p, sync) = s.device_ptr_mut(&self.stream);
                (p, NCCL_FLOAT32, sync)
            }
            Buf::Bf16(s) => {
                let (p, sync) = s.device_ptr_mut(&self.stream);
                (p, NCCL_BFLOAT16, sync)
            }
        };
        let peer = std::ffi::c_int::try_from(peer)
            .map_err(|_| GpuError::Library(format!("NCCL peer {peer} does not fit an int")))?;
        self.cell.with(|comm| {
            // SAFETY: as for `send`; `buf` is borrowed mutably, so nothing else writes it
            // here; `comm` is live under the read lock.
            let code = unsafe {
                (self.api.recv)(
                    ptr as *mut std::ffi::c_void,
                    len,
                    dtype,
                    peer,
                    comm,
                    self.stream.cu_stream(),
                )
            };
            self.api.check(&format!("receive from rank {peer}"), code)
        })
    }
}
