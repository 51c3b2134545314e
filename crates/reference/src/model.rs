//! The reference model the executor is tested and demonstrated with: per stage
//! `Linear(h, 4h) -> GELU -> Linear(4h, h)`, mean squared error at the last stage, in `f32`.
//!
//! The backward is split for real: a `defer_w` backward computes only the input gradient and
//! keeps what the weight gradient needs, and the `W` computes the weight gradient later.
//! Parameters are drawn from a seed, so every copy of a stage starts identical, and
//! [`Sequential`] runs the same stages in one process, micro-batch after micro-batch, as the
//! numerical reference for any schedule. Matrix products go through `matrixmultiply`.
//!
//! GELU uses the tanh approximation.

use std::collections::HashMap;

use dualpipe_executor::{Backward, Forward, Forwarded, Payload, Stage, StageError};

/// A row-major `f32` matrix: the activations and gradients of the reference model.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    shape: [usize; 2],
    data: Vec<f32>,
}

impl Matrix {
    /// A `rows x cols` matrix over `data` (row-major).
    ///
    /// # Panics
    /// If `data` does not hold `rows * cols` values.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "a {rows} x {cols} matrix needs {} values",
            rows * cols
        );
        Matrix {
            shape: [rows, cols],
            data,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.shape[0]
    }

    /// Number of columns.
    pub fn cols(&self) -> usize {
        self.shape[1]
    }

    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The values, row-major.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }
}

impl Payload for Matrix {
    fn shape(&self) -> &[usize] {
        &self.shape
    }
}

/// The size of the reference model and its seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelSpec {
    /// Hidden size h: each stage maps `rows x h` to `rows x h` through `4h`.
    pub hidden: usize,
    /// Rows per micro-batch (micro-batch size times sequence length).
    pub rows: usize,
    /// Number of stages.
    pub stages: u32,
    /// Seed of the parameters and of the synthetic data.
    pub seed: u64,
}

impl ModelSpec {
    /// The shape of every activation and gradient between stages: `[rows, hidden]`.
    pub fn message_shape(&self) -> Vec<usize> {
        vec![self.rows, self.hidden]
    }

    /// Number of parameters of one stage.
    pub fn parameters_per_stage(&self) -> usize {
        let h = self.hidden;
        2 * h * 4 * h + 4 * h + h
    }
}

/// The micro-batches of one step: inputs and targets, indexed by micro-batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// Input of each micro-batch, `rows x hidden`.
    pub inputs: Vec<Matrix>,
    /// Target of each micro-batch, `rows x hidden`.
    pub targets: Vec<Matrix>,
}

impl Batch {
    /// Synthetic data for step `step`: inputs uniform in [-1, 1), targets a fixed smooth
    /// function of the inputs (so that training lowers the loss).
    pub fn synthetic(spec: &ModelSpec, microbatches: u32, step: u64) -> Batch {
        let (rows, h) = (spec.rows, spec.hidden);
        let mut inputs = Vec::with_capacity(microbatches as usize);
        let mut targets = Vec::with_capacity(microbatches as usize);
        for mb in 0..microbatches {
            let mut rng = SplitMix64::new(spec.seed, 0xda7a, step << 32 | u64::from(mb));
            let x: Vec<f32> = (0..rows * h).map(|_| rng.uniform()).collect();
            let t: Vec<f32> = x.iter().map(|&v| 0.5 * (2.0 * v).sin() + 0.25).collect();
            inputs.push(Matrix::new(rows, h, x));
            targets.push(Matrix::new(rows, h, t));
        }
        Batch { inputs, targets }
    }
}

/// The four parameter tensors of a stage (or their gradients), row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Parameters {
    /// First linear layer, `h x 4h` (input-major: `y = x w1 + b1`).
    pub w1: Vec<f32>,
    /// First bias, `4h`.
    pub b1: Vec<f32>,
    /// Second linear layer, `4h x h`.
    pub w2: Vec<f32>,
    /// Second bias, `h`.
    pub b2: Vec<f32>,
}

impl Parameters {
    pub(crate) fn zeros(h: usize) -> Self {
        Parameters {
            w1: vec![0.0; h * 4 * h],
            b1: vec![0.0; 4 * h],
            w2: vec![0.0; 4 * h * h],
            b2: vec![0.0; h],
        }
    }

    /// The tensors with their names: `w1`, `b1`, `w2`, `b2`.
    pub fn tensors(&self) -> [(&'static str, &[f32]); 4] {
        [
            ("w1", &self.w1),
            ("b1", &self.b1),
            ("w2", &self.w2),
            ("b2", &self.b2),
        ]
    }

    fn tensors_mut(&mut self) -> [&mut Vec<f32>; 4] {
        [&mut self.w1, &mut self.b1, &mut self.w2, &mut self.b2]
    }
}

/// What a forward keeps for the backward.
#[derive(Debug)]
struct Saved {
    x: Matrix,
    /// Pre-activation `x w1 + b1`.
    a: Vec<f32>,
    /// `gelu(a)`.
    g: Vec<f32>,
    /// At the last stage, the gradient of the loss with respect to the output.
    loss_grad: Option<Vec<f32>>,
}

/// What a deferred weight gradient needs.
#[derive(Debug)]
struct Deferred {
    x: Matrix,
    g: Vec<f32>,
    dy: Vec<f32>,
    da: Vec<f32>,
}

/// One stage of the reference model.
#[derive(Debug)]
pub struct ReferenceStage {
    index: u32,
    first: bool,
    last: bool,
    hidden: usize,
    parameters: Parameters,
    gradients: Parameters,
    /// One micro-batch's weight gradients, before they are added to `gradients`.
    scratch: Parameters,
    saved: HashMap<u32, Saved>,
    deferred: HashMap<u32, Deferred>,
}

impl ReferenceStage {
    /// Stage `index` of the model `spec`. Every call with the same arguments gives the same
    /// parameters.
    ///
    /// Each stage starts close to the identity, so that activations and gradients keep their
    /// size through any number of stages (with torch's `nn.Linear` initialisation alone the
    /// gradient shrinks about twentyfold per stage and is zero in `f32` at 32 stages). Since
    /// `gelu(x) - gelu(-x) = x`, hidden unit `j` of the first `h` copies input `j`, unit
    /// `h + j` its negation, and the second layer adds the two back. On top of that every
    /// tensor gets the random values torch's `nn.Linear` draws (uniform in
    /// `[-1/sqrt(fan_in), 1/sqrt(fan_in))`), scaled by `1/sqrt(stages)` so that the
    /// perturbations of all stages together stay of the same size at any depth.
    pub fn new(spec: &ModelSpec, index: u32) -> Self {
        let h = spec.hidden;
        let depth_scale = 1.0 / (spec.stages.max(1) as f32).sqrt();
        let mut parameters = Parameters::zeros(h);
        for (tensor, values) in parameters.tensors_mut().into_iter().enumerate() {
            let fan_in = if tensor < 2 { h } else { 4 * h };
            let bound = depth_scale / (fan_in as f32).sqrt();
            let mut rng = SplitMix64::new(spec.seed, u64::from(index), tensor as u64);
            values.iter_mut().for_each(|v| *v = bound * rng.uniform());
        }
        for j in 0..h {
            // w1 is h x 4h, w2 is 4h x h, both row-major.
            parameters.w1[j * 4 * h + j] += 1.0;
            parameters.w1[j * 4 * h + h + j] -= 1.0;
            parameters.w2[j * h + j] += 1.0;
            parameters.w2[(h + j) * h + j] -= 1.0;
        }
        ReferenceStage {
            index,
            first: index == 0,
            last: index + 1 == spec.stages,
            hidden: h,
            parameters,
            gradients: Parameters::zeros(h),
            scratch: Parameters::zeros(h),
            saved: HashMap::new(),
            deferred: HashMap::new(),
        }
    }

    /// The stage index.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// The parameters.
    pub fn parameters(&self) -> &Parameters {
        &self.parameters
    }

    /// The accumulated weight gradients.
    pub fn gradients(&self) -> &Parameters {
        &self.gradients
    }

    /// How many micro-batches still hold saved activations or a pending weight gradient
    /// (0 after every complete training step).
    pub fn pending(&self) -> usize {
        self.saved.len() + self.deferred.len()
    }

    /// One step of plain gradient descent with learning rate `lr`; clears the gradients.
    pub fn sgd(&mut self, lr: f32) {
        let gradients = self.gradients.tensors();
        for (values, (_, grads)) in self.parameters.tensors_mut().into_iter().zip(gradients) {
            values
                .iter_mut()
                .zip(grads)
                .for_each(|(value, grad)| *value -= lr * grad);
        }
        self.zero_gradients();
    }

    /// Sets the gradients to zero.
    pub fn zero_gradients(&mut self) {
        for values in self.gradients.tensors_mut() {
            values.iter_mut().for_each(|v| *v = 0.0);
        }
    }

    /// Copies the parameters of `other` (a stage of the same size).
    pub fn load_parameters(&mut self, other: &ReferenceStage) {
        self.parameters.clone_from(&other.parameters);
    }

    fn check(&self, what: &str, m: &Matrix, rows: Option<usize>) -> Result<(), StageError> {
        if m.cols() != self.hidden || rows.is_some_and(|r| r != m.rows()) {
            return Err(format!(
                "stage {}: {what} has shape {:?}, expected [{}, {}]",
                self.index,
                m.shape(),
                rows.map_or("rows".to_string(), |r| r.to_string()),
                self.hidden
            )
            .into());
        }
        Ok(())
    }

    /// Adds the weight gradients of one micro-batch. Each is computed whole first and then
    /// added, as autograd accumulates `.grad`, so that reordering micro-batches only
    /// reorders a short sum of per-micro-batch terms.
    fn accumulate(&mut self, x: &Matrix, g: &[f32], dy: &[f32], da: &[f32]) {
        let (r, h) = (x.rows(), self.hidden);
        let one = &mut self.scratch;
        matmul(
            &mut one.w2,
            View::new(g, r, 4 * h).t(),
            View::new(dy, r, h),
            false,
        );
        column_sums(&mut one.b2, dy);
        matmul(
            &mut one.w1,
            View::new(&x.data, r, h).t(),
            View::new(da, r, 4 * h),
            false,
        );
        column_sums(&mut one.b1, da);
        for (sum, (_, add)) in self.gradients.tensors_mut().into_iter().zip(one.tensors()) {
            sum.iter_mut().zip(add).for_each(|(s, a)| *s += a);
        }
    }
}

impl Stage for ReferenceStage {
    type Buffer = Matrix;
    type Loss = f32;

    fn forward(&mut self, forward: Forward<Matrix>) -> Result<Forwarded<Matrix, f32>, StageError> {
        let Forward {
            mb,
            input: x,
            target,
            training,
        } = forward;
        self.check("the input", &x, None)?;
        let (r, h) = (x.rows(), self.hidden);
        let p = &self.parameters;
        let mut a = vec![0.0; r * 4 * h];
        matmul(
            &mut a,
            View::new(&x.data, r, h),
            View::new(&p.w1, h, 4 * h),
            false,
        );
        add_rows(&mut a, &p.b1);
        let g: Vec<f32> = a.iter().map(|&v| gelu(v)).collect();
        let mut y = vec![0.0; r * h];
        matmul(
            &mut y,
            View::new(&g, r, 4 * h),
            View::new(&p.w2, 4 * h, h),
            false,
        );
        add_rows(&mut y, &p.b2);
        let (loss, loss_grad) = match &target {
            Some(t) if self.last => {
                self.check("the target", t, Some(r))?;
                let n = (r * h) as f32;
                let mut sum = 0.0f64;
                let grad: Vec<f32> = y
                    .iter()
                    .zip(&t.data)
                    .map(|(&out, &want)| {
                        let diff = out - want;
                        sum += f64::from(diff * diff);
                        2.0 * diff / n
                    })
                    .collect();
                (Some((sum / f64::from(n)) as f32), Some(grad))
            }
            _ => (None, None),
        };
        if training {
            self.saved.insert(mb, Saved { x, a, g, loss_grad });
        }
        Ok(Forwarded {
            output: Matrix::new(r, h, y),
            loss,
        })
    }

    fn backward(&mut self, backward: Backward<Matrix>) -> Result<Option<Matrix>, StageError> {
        let Backward {
            mb,
            output_grad,
            defer_w,
        } = backward;
        let Saved { x, a, g, loss_grad } = self.saved.remove(&mb).ok_or_else(|| {
            format!(
                "stage {}: backward of micro-batch {mb} without its forward",
                self.index
            )
        })?;
        let (r, h) = (x.rows(), self.hidden);
        let dy = match (output_grad, loss_grad) {
            (Some(grad), _) => {
                self.check("the output gradient", &grad, Some(r))?;
                grad.data
            }
            (None, Some(grad)) => grad,
            (None, None) => {
                return Err(format!(
                    "stage {}: backward of micro-batch {mb} got no output gradient and has no loss",
                    self.index
                )
                .into());
            }
        };
        let p = &self.parameters;
        let mut da = vec![0.0; r * 4 * h];
        matmul(
            &mut da,
            View::new(&dy, r, h),
            View::new(&p.w2, 4 * h, h).t(),
            false,
        );
        da.iter_mut()
            .zip(&a)
            .for_each(|(d, &pre)| *d *= gelu_grad(pre));
        let dx = (!self.first).then(|| {
            let mut dx = vec![0.0; r * h];
            matmul(
                &mut dx,
                View::new(&da, r, 4 * h),
                View::new(&p.w1, h, 4 * h).t(),
                false,
            );
            Matrix::new(r, h, dx)
        });
        if defer_w {
            self.deferred.insert(mb, Deferred { x, g, dy, da });
        } else {
            self.accumulate(&x, &g, &dy, &da);
        }
        Ok(dx)
    }

    fn backward_weight(&mut self, mb: u32) -> Result<(), StageError> {
        let Deferred { x, g, dy, da } = self.deferred.remove(&mb).ok_or_else(|| {
            format!(
                "stage {}: weight gradient of micro-batch {mb} without a deferred backward",
                self.index
            )
        })?;
        self.accumulate(&x, &g, &dy, &da);
        Ok(())
    }

    fn sum_gradients(copies: &mut [&mut Self]) -> Result<(), StageError> {
        let Some((first, rest)) = copies.split_first_mut() else {
            return Ok(());
        };
        for other in rest.iter() {
            if other.hidden != first.hidden {
                return Err("copies of one stage differ in size".into());
            }
            let theirs = other.gradients.tensors();
            for (sum, (_, add)) in first.gradients.tensors_mut().into_iter().zip(theirs) {
                sum.iter_mut().zip(add).for_each(|(s, a)| *s += a);
            }
        }
        for other in rest.iter_mut() {
            other.gradients.clone_from(&first.gradients);
        }
        Ok(())
    }
}

/// The whole model in one process: the numerical reference for every schedule.
#[derive(Debug)]
pub struct Sequential {
    /// Stage 0 to the last.
    pub stages: Vec<ReferenceStage>,
}

/// What a [`Sequential`] step returns.
#[derive(Clone, Debug, PartialEq)]
pub struct SequentialStep {
    /// The loss of each micro-batch.
    pub losses: Vec<f32>,
    /// The model output of each micro-batch.
    pub outputs: Vec<Matrix>,
}

impl Sequential {
    /// The model `spec`, with the same parameters as every [`ReferenceStage::new`] of it.
    pub fn new(spec: &ModelSpec) -> Self {
        Sequential {
            stages: (0..spec.stages)
                .map(|s| ReferenceStage::new(spec, s))
                .collect(),
        }
    }

    /// One step: every micro-batch in order through every stage, then (when `training`) its
    /// full backward, accumulating the weight gradients.
    pub fn step(&mut self, batch: &Batch, training: bool) -> Result<SequentialStep, StageError> {
        let mut losses = Vec::with_capacity(batch.inputs.len());
        let mut outputs = Vec::with_capacity(batch.inputs.len());
        for (mb, (input, target)) in batch.inputs.iter().zip(&batch.targets).enumerate() {
            let mb = mb as u32;
            let mut x = input.clone();
            let mut loss = None;
            for stage in &mut self.stages {
                let target = stage.last.then(|| target.clone());
                let forwarded = stage.forward(Forward {
                    mb,
                    input: x,
                    target,
                    training,
                })?;
                x = forwarded.output;
                loss = loss.or(forwarded.loss);
            }
            losses.push(loss.ok_or("the last stage computed no loss")?);
            outputs.push(x);
            if training {
                let mut grad = None;
                for stage in self.stages.iter_mut().rev() {
                    grad = stage.backward(Backward {
                        mb,
                        output_grad: grad,
                        defer_w: false,
                    })?;
                }
            }
        }
        Ok(SequentialStep { losses, outputs })
    }
}

fn gelu(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
}

fn gelu_grad(x: f32) -> f32 {
    const C: f32 = 0.797_884_6;
    let t = (C * (x + 0.044_715 * x * x * x)).tanh();
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * C * (1.0 + 3.0 * 0.044_715 * x * x)
}

/// Adds `bias` to every row of the row-major `values`.
fn add_rows(values: &mut [f32], bias: &[f32]) {
    for row in values.chunks_exact_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
    }
}

/// The column sums of the row-major `values`, summed in `f64`.
fn column_sums(sums: &mut [f32], values: &[f32]) {
    let mut wide = vec![0.0f64; sums.len()];
    for row in values.chunks_exact(sums.len()) {
        wide.iter_mut()
            .zip(row)
            .for_each(|(s, &v)| *s += f64::from(v));
    }
    sums.iter_mut().zip(wide).for_each(|(s, w)| *s = w as f32);
}

/// A row-major `rows x cols` matrix, read as stored or transposed.
#[derive(Clone, Copy)]
struct View<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    transposed: bool,
}

impl<'a> View<'a> {
    fn new(data: &'a [f32], rows: usize, cols: usize) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix view out of bounds");
        View {
            data,
            rows,
            cols,
            transposed: false,
        }
    }

    fn t(self) -> Self {
        View {
            transposed: !self.transposed,
            ..self
        }
    }

    /// Rows and columns as read.
    fn shape(&self) -> (usize, usize) {
        if self.transposed {
            (self.cols, self.rows)
        } else {
            (self.rows, self.cols)
        }
    }

    /// Row and column strides as read.
    fn strides(&self) -> (isize, isize) {
        if self.transposed {
            (1, self.cols as isize)
        } else {
            (self.cols as isize, 1)
        }
    }
}

/// `out = a b` (or `out += a b` when `accumulate`), `out` row-major.
///
/// # Panics
/// If the shapes do not agree (a bug in this module: stage inputs are checked before).
#[allow(unsafe_code)]
fn matmul(out: &mut [f32], a: View<'_>, b: View<'_>, accumulate: bool) {
    let (m, k) = a.shape();
    let (k2, n) = b.shape();
    assert_eq!(k, k2, "inner dimensions differ");
    assert_eq!(out.len(), m * n, "output size differs");
    let (rsa, csa) = a.strides();
    let (rsb, csb) = b.strides();
    let beta = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: the views were checked to cover exactly `rows * cols` values of their slices,
    // so every element sgemm reads through (m, k, rsa, csa) and (k, n, rsb, csb) is in
    // bounds; `out` holds exactly m x n values written with strides (n, 1) and does not
    // alias the inputs (it is a distinct `&mut`).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.data.as_ptr(),
            rsa,
            csa,
            b.data.as_ptr(),
            rsb,
            csb,
            beta,
            out.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// A small, fast, seedable generator (SplitMix64); the same seed gives the same numbers on
/// every platform.
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64, stream: u64, index: u64) -> Self {
        let mut rng = SplitMix64(seed ^ 0x9e37_79b9_7f4a_7c15);
        let a = rng.next();
        let mut rng = SplitMix64(a ^ stream.wrapping_mul(0xbf58_476d_1ce4_e5b9));
        let b = rng.next();
        SplitMix64(b ^ index.wrapping_mul(0x94d0_49bb_1331_11eb))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    fn uniform(&mut self) -> f32 {
        // 24 random bits give every representable step of [0, 1) in f32.
        let unit = (self.next() >> 40) as f32 / (1u64 << 24) as f32;
        2.0 * unit - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0.0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                for l in 0..k {
                    out[i * n + j] += f64::from(a[i * k + l]) * f64::from(b[l * n + j]);
                }
            }
        }
        out.into_iter().map(|v| v as f32).collect()
    }

    fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        (0..cols)
            .flat_map(|j| (0..rows).map(move |i| a[i * cols + j]))
            .collect()
    }

    #[test]
    fn matmul_matches_the_definition_in_every_layout() {
        let (m, k, n) = (5, 7, 3);
        let mut rng = SplitMix64::new(1, 2, 3);
        let a: Vec<f32> = (0..m * k).map(|_| rng.uniform()).collect();
        let b: Vec<f32> = (0..k * n).map(|_| rng.uniform()).collect();
        let want = naive(&a, &b, m, k, n);
        let (at, bt) = (transpose(&a, m, k), transpose(&b, k, n));
        let cases = [
            (View::new(&a, m, k), View::new(&b, k, n)),
            (View::new(&at, k, m).t(), View::new(&b, k, n)),
            (View::new(&a, m, k), View::new(&bt, n, k).t()),
            (View::new(&at, k, m).t(), View::new(&bt, n, k).t()),
        ];
        for (case, (va, vb)) in cases.into_iter().enumerate() {
            let mut out = vec![1.0; m * n];
            matmul(&mut out, va, vb, false);
            for (x, y) in out.iter().zip(&want) {
                assert!((x - y).abs() < 1e-5, "case {case}: {x} vs {y}");
            }
            matmul(&mut out, va, vb, true);
            for (x, y) in out.iter().zip(&want) {
                assert!((x - 2.0 * y).abs() < 1e-5, "case {case} accumulated");
            }
        }
    }

    /// The analytic backward against central differences of the loss, in f64 on a tiny model.
    #[test]
    fn backward_matches_finite_differences() {
        let spec = ModelSpec {
            hidden: 3,
            rows: 2,
            stages: 2,
            seed: 7,
        };
        let batch = Batch::synthetic(&spec, 1, 0);
        let loss_of = |model: &mut Sequential| -> f64 {
            f64::from(model.step(&batch, false).unwrap().losses[0])
        };
        let mut model = Sequential::new(&spec);
        model.step(&batch, true).unwrap();
        let eps = 1e-2f32;
        for stage in 0..2 {
            for tensor in 0..4 {
                let analytic = model.stages[stage].gradients.tensors()[tensor].1.to_vec();
                for (i, &grad) in analytic.iter().enumerate().take(4) {
                    let mut probe = Sequential::new(&spec);
                    probe.stages[stage].parameters.tensors_mut()[tensor][i] += eps;
                    let up = loss_of(&mut probe);
                    probe.stages[stage].parameters.tensors_mut()[tensor][i] -= 2.0 * eps;
                    let down = loss_of(&mut probe);
                    let numeric = (up - down) / (2.0 * f64::from(eps));
                    assert!(
                        (numeric - f64::from(grad)).abs() < 2e-3,
                        "stage {stage} tensor {tensor} [{i}]: numeric {numeric}, analytic {grad}"
                    );
                }
            }
        }
    }

    #[test]
    fn deferred_weight_gradient_equals_the_full_backward() {
        let spec = ModelSpec {
            hidden: 4,
            rows: 3,
            stages: 1,
            seed: 3,
        };
        let batch = Batch::synthetic(&spec, 1, 0);
        let run = |defer_w: bool| {
            let mut stage = ReferenceStage::new(&spec, 0);
            stage
                .forward(Forward {
                    mb: 0,
                    input: batch.inputs[0].clone(),
                    target: Some(batch.targets[0].clone()),
                    training: true,
                })
                .unwrap();
            stage
                .backward(Backward {
                    mb: 0,
                    output_grad: None,
                    defer_w,
                })
                .unwrap();
            let before = stage.gradients.clone();
            if defer_w {
                stage.backward_weight(0).unwrap();
            }
            assert_eq!(stage.pending(), 0);
            (before, stage.gradients.clone())
        };
        let (deferred_before, deferred) = run(true);
        let (_, full) = run(false);
        assert_eq!(
            deferred_before,
            Parameters::zeros(4),
            "B defer_w left weights alone"
        );
        assert_eq!(deferred, full);
    }

    #[test]
    fn stages_are_deterministic_and_distinct() {
        let spec = ModelSpec {
            hidden: 4,
            rows: 2,
            stages: 3,
            seed: 11,
        };
        assert_eq!(
            ReferenceStage::new(&spec, 1).parameters,
            ReferenceStage::new(&spec, 1).parameters
        );
        assert_ne!(
            ReferenceStage::new(&spec, 1).parameters,
            ReferenceStage::new(&spec, 2).parameters
        );
    }

    #[test]
    fn wrong_shapes_are_errors_that_say_so() {
        let spec = ModelSpec {
            hidden: 4,
            rows: 2,
            stages: 1,
            seed: 1,
        };
        let mut stage = ReferenceStage::new(&spec, 0);
        let error = stage
            .forward(Forward {
                mb: 0,
                input: Matrix::new(2, 3, vec![0.0; 6]),
                target: None,
                training: true,
            })
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "stage 0: the input has shape [2, 3], expected [rows, 4]"
        );
        let error = stage.backward_weight(5).unwrap_err();
        assert!(error.to_string().contains("without a deferred backward"));
    }

    #[test]
    fn gradients_stay_alive_at_depth() {
        // 128 stages: with torch's initialisation alone the gradient of stage 0 is zero in f32.
        let spec = ModelSpec {
            hidden: 8,
            rows: 4,
            stages: 128,
            seed: 233,
        };
        let mut model = Sequential::new(&spec);
        let batch = Batch::synthetic(&spec, 1, 0);
        let step = model.step(&batch, true).unwrap();
        assert!(
            step.losses[0].is_finite() && step.losses[0] < 10.0,
            "{:?}",
            step.losses
        );
        let norm = |s: &ReferenceStage| {
            s.gradients()
                .w1
                .iter()
                .map(|&g| f64::from(g) * f64::from(g))
                .sum::<f64>()
                .sqrt()
        };
        let (first, last) = (norm(&model.stages[0]), norm(&model.stages[127]));
        assert!(first > 0.0 && last > 0.0);
        let ratio = first / last;
        assert!(
            (1e-2..1e2).contains(&ratio),
            "stage 0 / stage 127 gradient: {ratio}"
        );
    }
}
