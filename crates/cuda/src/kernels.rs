//! The reference model's element-wise and reduction kernels, as CUDA C++ source compiled at
//! run time with NVRTC. Matrix products go to cuBLAS; everything else is here.
//!
//! One body per kernel is written over an element type `T` and instantiated for `float` and
//! for bfloat16 (stored as `unsigned short`, converted by hand so that no CUDA header is
//! needed: NVRTC then compiles the source with no include path). Arithmetic is in `float`;
//! reductions accumulate in `double` in a fixed order, so every run gives the same bits.

/// The element types the kernels are instantiated for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit IEEE float.
    F32,
    /// bfloat16 (8 exponent bits, 7 mantissa bits), computed in `float`.
    Bf16,
}

impl DType {
    /// The name used in kernel names and messages: `f32`, `bf16`.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::Bf16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::Bf16 => 2,
        }
    }

    fn c_type(self) -> &'static str {
        match self {
            DType::F32 => "float",
            DType::Bf16 => "bf16_t",
        }
    }
}

impl std::str::FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "fp32" | "float32" => Ok(DType::F32),
            "bf16" | "bfloat16" => Ok(DType::Bf16),
            _ => Err(format!("unknown dtype `{s}`; use f32 or bf16")),
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Every kernel, by the name its body has before the element type is appended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    /// `a[r, c] += bias[c]; g[r, c] = gelu(a[r, c])`.
    BiasGelu,
    /// `y[r, c] += bias[c]`.
    AddBias,
    /// `d[i] *= gelu'(a[i])`.
    GeluBackward,
    /// `grad[i] = 2 (y[i] - t[i]) / n`.
    MseGrad,
    /// First pass of the loss: `partials[b]` = block `b`'s share of `sum((y - t)^2)`, in
    /// `double`, over [`mse_blocks`] blocks of [`REDUCE_THREADS`] threads.
    MsePartial,
    /// Second pass, one block: `loss[0] = sum(partials) / n`.
    MseFinish,
    /// `sums[c] += sum over r of x[r, c]` into `float` gradients, accumulated in `double`.
    ColumnSumsAdd,
    /// `acc[i] += x[i]` into `float` gradients.
    Accumulate,
    /// `p[i] -= lr * grad[i]`.
    Sgd,
    /// `out[i] = x[i]` converted from `float` (loads host data into a bf16 model).
    FromF32,
    /// `out[i] = x[i]` converted to `float` (reads results back).
    ToF32,
}

impl Kernel {
    /// Every kernel.
    pub const ALL: [Kernel; 11] = [
        Kernel::BiasGelu,
        Kernel::AddBias,
        Kernel::GeluBackward,
        Kernel::MseGrad,
        Kernel::MsePartial,
        Kernel::MseFinish,
        Kernel::ColumnSumsAdd,
        Kernel::Accumulate,
        Kernel::Sgd,
        Kernel::FromF32,
        Kernel::ToF32,
    ];

    /// The body's name.
    pub fn base(self) -> &'static str {
        match self {
            Kernel::BiasGelu => "bias_gelu",
            Kernel::AddBias => "add_bias",
            Kernel::GeluBackward => "gelu_backward",
            Kernel::MseGrad => "mse_grad",
            Kernel::MsePartial => "mse_partial",
            Kernel::MseFinish => "mse_finish",
            Kernel::ColumnSumsAdd => "column_sums_add",
            Kernel::Accumulate => "accumulate",
            Kernel::Sgd => "sgd",
            Kernel::FromF32 => "from_f32",
            Kernel::ToF32 => "to_f32",
        }
    }

    /// The name of the instance for `dtype`, as loaded from the compiled module.
    pub fn name(self, dtype: DType) -> String {
        format!("{}_{}", self.base(), dtype.name())
    }
}

/// Threads per block of the loss's two passes ([`Kernel::MsePartial`], [`Kernel::MseFinish`]);
/// a power of two.
pub const REDUCE_THREADS: u32 = 1024;

/// Columns per block of [`Kernel::ColumnSumsAdd`] (`blockDim.x`).
pub const COLUMN_TILE: u32 = 32;

/// Row lanes per block of [`Kernel::ColumnSumsAdd`] (`blockDim.y`): lane `k` sums rows
/// `k, k + ROW_LANES, ...` of its column, then lane 0 adds the lanes' sums in order.
pub const ROW_LANES: u32 = 16;

/// Blocks of the loss's first pass over `n` elements: at least 4 elements per thread, at most
/// [`REDUCE_THREADS`] blocks (so the second pass gives each thread at most one partial). It
/// depends on `n` alone, so the summation order, and the result, is the same every run.
pub fn mse_blocks(n: usize) -> u32 {
    let per_block = REDUCE_THREADS as usize * 4;
    n.div_ceil(per_block).clamp(1, REDUCE_THREADS as usize) as u32
}

/// Blocks of [`Kernel::ColumnSumsAdd`] over `cols` columns (the kernel strides over tiles when
/// there are more).
pub fn column_blocks(cols: usize) -> u32 {
    cols.div_ceil(COLUMN_TILE as usize).clamp(1, 65_535) as u32
}

/// A block's shared `double` values summed as the kernels' tree does: `v[i] += v[i + half]`
/// for `half` = len/2, len/4, ..., 1; returns `v[0]`. `v.len()` is a power of two.
fn tree_sum(mut v: Vec<f64>) -> f64 {
    let mut half = v.len() / 2;
    while half > 0 {
        for i in 0..half {
            v[i] += v[i + half];
        }
        half /= 2;
    }
    v.first().copied().unwrap_or(0.0)
}

/// What [`Kernel::MsePartial`] then [`Kernel::MseFinish`] compute, in the same order on the
/// CPU: the GPU checks hold the kernels to it.
pub fn mse_reference(y: &[f32], t: &[f32]) -> f32 {
    let n = y.len().min(t.len());
    let threads = REDUCE_THREADS as usize;
    let blocks = mse_blocks(n) as usize;
    let stride = blocks * threads;
    let partials: Vec<f64> = (0..blocks)
        .map(|b| {
            let lanes = (0..threads)
                .map(|tid| {
                    let mut sum = 0.0f64;
                    let mut i = b * threads + tid;
                    while i < n {
                        let diff = y[i] - t[i];
                        sum += f64::from(diff * diff);
                        i += stride;
                    }
                    sum
                })
                .collect();
            tree_sum(lanes)
        })
        .collect();
    let lanes = (0..threads)
        .map(|tid| {
            let mut sum = 0.0f64;
            let mut j = tid;
            while j < blocks {
                sum += partials[j];
                j += threads;
            }
            sum
        })
        .collect();
    (tree_sum(lanes) / n.max(1) as f64) as f32
}

/// What [`Kernel::ColumnSumsAdd`] adds to `sums` for the row-major `rows x cols` matrix `x`,
/// in the same order on the CPU.
pub fn column_sums_reference(sums: &mut [f32], x: &[f32], rows: usize, cols: usize) {
    let lanes = ROW_LANES as usize;
    for (c, sum) in sums.iter_mut().enumerate().take(cols) {
        let mut total = 0.0f64;
        for k in 0..lanes {
            let mut lane = 0.0f64;
            let mut r = k;
            while r < rows {
                lane += f64::from(x[r * cols + c]);
                r += lanes;
            }
            total += lane;
        }
        *sum += total as f32;
    }
}

const PRELUDE: &str = r#"
typedef unsigned short bf16_t;

__device__ __forceinline__ float ld(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ void st(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ float ld(const bf16_t* p, long long i) {
    return __uint_as_float(((unsigned int)p[i]) << 16);
}
/* Round to nearest even; NaN stays NaN. */
__device__ __forceinline__ void st(bf16_t* p, long long i, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) {
        p[i] = (bf16_t)((u >> 16) | 0x0040u);
        return;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    p[i] = (bf16_t)(u >> 16);
}

/* GELU, tanh approximation, as the CPU reference model computes it. */
__device__ __forceinline__ float gelu(float x) {
    const float c = 0.7978846f;
    return 0.5f * x * (1.0f + tanhf(c * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float gelu_grad(float x) {
    const float c = 0.7978846f;
    float t = tanhf(c * (x + 0.044715f * x * x * x));
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * c * (1.0f + 3.0f * 0.044715f * x * x);
}

__device__ __forceinline__ long long global_index() {
    return (long long)blockIdx.x * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long global_stride() {
    return (long long)gridDim.x * blockDim.x;
}
"#;

/// The kernel bodies over `T`; `@` stands for the instance suffix (`f32`, `bf16`).
const BODIES: &str = r#"
extern "C" __global__ void bias_gelu_@(T* a, T* g, const T* bias, long long rows, long long cols) {
    long long n = rows * cols;
    for (long long i = global_index(); i < n; i += global_stride()) {
        float v = ld(a, i) + ld(bias, i % cols);
        st(a, i, v);
        st(g, i, gelu(ld(a, i)));
    }
}

extern "C" __global__ void add_bias_@(T* y, const T* bias, long long rows, long long cols) {
    long long n = rows * cols;
    for (long long i = global_index(); i < n; i += global_stride()) {
        st(y, i, ld(y, i) + ld(bias, i % cols));
    }
}

extern "C" __global__ void gelu_backward_@(T* d, const T* a, long long n) {
    for (long long i = global_index(); i < n; i += global_stride()) {
        st(d, i, ld(d, i) * gelu_grad(ld(a, i)));
    }
}

extern "C" __global__ void mse_grad_@(T* grad, const T* y, const T* t, long long n) {
    float count = (float)n;
    for (long long i = global_index(); i < n; i += global_stride()) {
        float diff = ld(y, i) - ld(t, i);
        st(grad, i, 2.0f * diff / count);
    }
}

/* First pass of the loss: block b sums elements b*blockDim.x + tid, then every
 * gridDim.x*blockDim.x further, per thread in double, then the block's threads as a tree. The
 * grid (mse_blocks) depends on n only: a fixed summation order, the same bits every run.
 * Needs blockDim.x == REDUCE_THREADS. */
extern "C" __global__ void mse_partial_@(double* partials, const T* y, const T* t, long long n) {
    __shared__ double partial[REDUCE_THREADS];
    double sum = 0.0;
    long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        float diff = ld(y, i) - ld(t, i);
        sum += (double)(diff * diff);
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            partial[threadIdx.x] += partial[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        partials[blockIdx.x] = partial[0];
    }
}

/* Second pass, one block of REDUCE_THREADS threads: thread tid sums partials tid, tid +
 * blockDim.x, ... in order, then the tree as above. It reads no T: its two instances are the
 * same code under two names, as every kernel has one per type. */
extern "C" __global__ void mse_finish_@(float* loss, const double* partials, long long blocks, long long n) {
    __shared__ double partial[REDUCE_THREADS];
    double sum = 0.0;
    for (long long j = threadIdx.x; j < blocks; j += blockDim.x) {
        sum += partials[j];
    }
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (unsigned int half = blockDim.x / 2; half > 0; half /= 2) {
        if (threadIdx.x < half) {
            partial[threadIdx.x] += partial[threadIdx.x + half];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        loss[0] = (float)(partial[0] / (double)n);
    }
}

/* Blocks of COLUMN_TILE x ROW_LANES threads: thread (x, k) of the block at tile b sums column
 * b*COLUMN_TILE + x over rows k, k + ROW_LANES, ... in double; lane 0 then adds the ROW_LANES
 * sums in order. Reads are coalesced along x; the order is fixed, so the same bits every run.
 * Needs blockDim == (COLUMN_TILE, ROW_LANES). Tiles beyond the grid are strided over; the loop
 * bound is the same for every thread of a block, so every thread reaches each barrier. */
extern "C" __global__ void column_sums_add_@(float* sums, const T* x, long long rows, long long cols) {
    __shared__ double lanes[ROW_LANES][COLUMN_TILE];
    for (long long tile = blockIdx.x; tile * COLUMN_TILE < cols; tile += gridDim.x) {
        long long c = tile * COLUMN_TILE + threadIdx.x;
        double s = 0.0;
        if (c < cols) {
            for (long long r = threadIdx.y; r < rows; r += ROW_LANES) {
                s += (double)ld(x, r * cols + c);
            }
        }
        lanes[threadIdx.y][threadIdx.x] = s;
        __syncthreads();
        if (threadIdx.y == 0 && c < cols) {
            double total = 0.0;
            for (int k = 0; k < ROW_LANES; ++k) {
                total += lanes[k][threadIdx.x];
            }
            sums[c] += (float)total;
        }
        __syncthreads();
    }
}

extern "C" __global__ void accumulate_@(float* acc, const T* x, long long n) {
    for (long long i = global_index(); i < n; i += global_stride()) {
        acc[i] += ld(x, i);
    }
}

extern "C" __global__ void sgd_@(T* p, const float* grad, float lr, long long n) {
    for (long long i = global_index(); i < n; i += global_stride()) {
        st(p, i, ld(p, i) - lr * grad[i]);
    }
}

extern "C" __global__ void from_f32_@(T* out, const float* x, long long n) {
    for (long long i = global_index(); i < n; i += global_stride()) {
        st(out, i, x[i]);
    }
}

extern "C" __global__ void to_f32_@(float* out, const T* x, long long n) {
    for (long long i = global_index(); i < n; i += global_stride()) {
        out[i] = ld(x, i);
    }
}
"#;

/// The whole program: the prelude and every kernel for every element type.
pub fn source() -> String {
    let mut text = String::with_capacity(PRELUDE.len() + 2 * BODIES.len() + 64);
    text.push_str(&format!("#define REDUCE_THREADS {REDUCE_THREADS}\n"));
    text.push_str(&format!("#define COLUMN_TILE {COLUMN_TILE}\n"));
    text.push_str(&format!("#define ROW_LANES {ROW_LANES}\n"));
    text.push_str(PRELUDE);
    for dtype in [DType::F32, DType::Bf16] {
        text.push_str(&format!("\n/* ---- {} ---- */\n", dtype.name()));
        text.push_str(
            &BODIES
                .replace("_@(", &format!("_{}(", dtype.name()))
                .replace("(T* ", &format!("({}* ", dtype.c_type()))
                .replace(" T* ", &format!(" {}* ", dtype.c_type())),
        );
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_launched_kernel_is_defined_exactly_once() {
        let text = source();
        for dtype in [DType::F32, DType::Bf16] {
            for kernel in Kernel::ALL {
                let header = format!("extern \"C\" __global__ void {}(", kernel.name(dtype));
                assert_eq!(
                    text.matches(&header).count(),
                    1,
                    "{} in\n{text}",
                    kernel.name(dtype)
                );
            }
        }
        assert_eq!(
            text.matches("extern \"C\" __global__ void ").count(),
            2 * Kernel::ALL.len(),
            "a kernel the Rust side does not know of"
        );
    }

    #[test]
    fn the_instances_are_fully_substituted() {
        let text = source();
        assert!(!text.contains('@'), "a placeholder left over");
        assert!(
            !text.contains("(T* ") && !text.contains(" T* "),
            "a T left over"
        );
        let bf16 = &text[text.find("---- bf16 ----").unwrap()..];
        assert!(bf16.contains("bias_gelu_bf16(bf16_t* a, bf16_t* g, const bf16_t* bias,"));
        assert!(text.contains("bias_gelu_f32(float* a, float* g, const float* bias,"));
        // Gradients, losses and host-side conversions stay in float in both instances.
        assert!(bf16.contains("float* sums") && bf16.contains("const float* grad"));
    }

    #[test]
    fn the_source_is_balanced_and_needs_no_header() {
        let text = source();
        for (open, close) in [('{', '}'), ('(', ')'), ('[', ']')] {
            let mut depth = 0i64;
            for c in text.chars() {
                if c == open {
                    depth += 1;
                } else if c == close {
                    depth -= 1;
                }
                assert!(depth >= 0, "`{close}` before its `{open}`");
            }
            assert_eq!(depth, 0, "unbalanced `{open}{close}`");
        }
        assert!(!text.contains("#include"), "NVRTC is given no include path");
        assert_eq!(text.matches("/*").count(), text.matches("*/").count());
    }

    /// The CPU emulations of the reductions (which the GPU checks hold the kernels to) are
    /// right: close to a plain sum, for sizes around every block and lane boundary.
    #[test]
    fn the_reduction_references_sum_what_they_should() {
        let value = |i: usize| ((i * 7919 % 1000) as f32 - 500.0) / 256.0;
        for n in [
            1usize,
            2,
            1023,
            1024,
            4096,
            4097,
            70_000,
            4 * 1024 * 1024 + 3,
        ] {
            let y: Vec<f32> = (0..n).map(value).collect();
            let t: Vec<f32> = (0..n).map(|i| value(i + 17)).collect();
            let plain = y
                .iter()
                .zip(&t)
                .map(|(a, b)| f64::from((a - b) * (a - b)))
                .sum::<f64>()
                / n as f64;
            let ours = f64::from(mse_reference(&y, &t));
            assert!(
                (ours - plain).abs() <= 1e-6 * plain.abs().max(1e-30),
                "n {n}: {ours} against {plain}"
            );
            assert!(mse_blocks(n) >= 1 && mse_blocks(n) <= REDUCE_THREADS);
        }
        for (rows, cols) in [(1usize, 1usize), (15, 33), (16, 32), (17, 64), (1000, 70)] {
            let x: Vec<f32> = (0..rows * cols).map(value).collect();
            let mut sums = vec![1.0f32; cols];
            column_sums_reference(&mut sums, &x, rows, cols);
            for (c, sum) in sums.iter().enumerate() {
                let plain = 1.0 + (0..rows).map(|r| f64::from(x[r * cols + c])).sum::<f64>();
                assert!(
                    (f64::from(*sum) - plain).abs() <= 1e-5 * plain.abs().max(1.0),
                    "{rows}x{cols} column {c}: {sum} against {plain}"
                );
            }
            assert_eq!(column_blocks(cols) as usize, cols.div_ceil(32));
        }
    }

    #[test]
    fn dtypes_parse_and_print() {
        assert_eq!("bf16".parse::<DType>(), Ok(DType::Bf16));
        assert_eq!("fp32".parse::<DType>(), Ok(DType::F32));
        assert_eq!(
            "f16".parse::<DType>(),
            Err("unknown dtype `f16`; use f32 or bf16".into())
        );
        assert_eq!(
            (DType::Bf16.size(), DType::F32.to_string()),
            (2, "f32".into())
        );
    }
}
