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
    /// `loss[0] = sum((y - t)^2) / n`, one block, accumulated in `double`.
    MseLoss,
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
    pub const ALL: [Kernel; 10] = [
        Kernel::BiasGelu,
        Kernel::AddBias,
        Kernel::GeluBackward,
        Kernel::MseGrad,
        Kernel::MseLoss,
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
            Kernel::MseLoss => "mse_loss",
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

/// Threads per block of the one-block reduction ([`Kernel::MseLoss`]); a power of two.
pub const REDUCE_THREADS: u32 = 1024;

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

/* One block of REDUCE_THREADS threads: a fixed summation order, so the same bits every run. */
extern "C" __global__ void mse_loss_@(float* loss, const T* y, const T* t, long long n) {
    __shared__ double partial[REDUCE_THREADS];
    double sum = 0.0;
    for (long long i = threadIdx.x; i < n; i += blockDim.x) {
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
        loss[0] = (float)(partial[0] / (double)n);
    }
}

/* One thread per column, rows in order: deterministic, and reads are coalesced across threads. */
extern "C" __global__ void column_sums_add_@(float* sums, const T* x, long long rows, long long cols) {
    for (long long c = global_index(); c < cols; c += global_stride()) {
        double s = 0.0;
        for (long long r = 0; r < rows; ++r) {
            s += (double)ld(x, r * cols + c);
        }
        sums[c] += (float)s;
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
