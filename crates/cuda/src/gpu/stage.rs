//! The reference model's stage on the GPU: `Linear(h, 4h) -> GELU -> Linear(4h, h)`, mean
//! squared error at the last stage, the same math and the same order of operations as the CPU
//! model (`dualpipe_reference::model`), with matrix products on cuBLAS and the rest in the NVRTC
//! kernels. Parameters start as the CPU model's (the same seed), so both can be compared.
//! Weight gradients accumulate in `f32` whatever the model's type.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, CudaStream};
use dualpipe_executor::{Backward, Forward, Forwarded, Overlapped, Stage, StageError};
use dualpipe_reference::model::{ModelSpec, Parameters, ReferenceStage};

use dualpipe_schedule::Work;

use super::raw::{Buf, Mat};
use super::{GpuError, RankDevice, Tensor};
use crate::issue::Want;
use crate::plan::{Part, Stream};

/// The stream a computation goes to, with the cuBLAS handle bound to it.
#[derive(Clone, Copy)]
struct Lane<'a> {
    stream: &'a Arc<CudaStream>,
    blas: &'a CudaBlas,
}

struct Saved {
    x: Tensor,
    a: Tensor,
    g: Tensor,
    loss_grad: Option<Tensor>,
}

struct Deferred {
    x: Tensor,
    g: Tensor,
    dy: Tensor,
    da: Tensor,
}

/// One stage of the reference model on one rank's device.
pub(crate) struct GpuStage {
    dev: Arc<RankDevice>,
    index: u32,
    first: bool,
    last: bool,
    hidden: usize,
    /// w1 (h x 4h), b1 (4h), w2 (4h x h), b2 (h).
    params: [Buf; 4],
    /// Their gradients, in f32.
    grads: [CudaSlice<f32>; 4],
    saved: HashMap<u32, Saved>,
    deferred: HashMap<u32, Deferred>,
}

impl GpuStage {
    /// Stage `index` of `spec` with the CPU model's initial parameters.
    pub fn new(dev: &Arc<RankDevice>, spec: &ModelSpec, index: u32) -> Result<Self, GpuError> {
        dev.bind()?;
        let cpu = ReferenceStage::new(spec, index);
        let h = spec.hidden;
        let p = cpu.parameters();
        let mut params = Vec::with_capacity(4);
        let mut grads = Vec::with_capacity(4);
        for (values, len) in [
            (&p.w1, h * 4 * h),
            (&p.b1, 4 * h),
            (&p.w2, 4 * h * h),
            (&p.b2, h),
        ] {
            debug_assert_eq!(values.len(), len);
            let param = dev.upload(values, [1, len])?.into_buf().ok_or_else(|| {
                GpuError::Shape(format!(
                    "stage {index}: an uploaded parameter has no buffer"
                ))
            })?;
            params.push(param);
            grads.push(
                dev.main
                    .alloc_zeros::<f32>(len)
                    .map_err(|e| GpuError::driver("allocating gradients", e))?,
            );
        }
        let [w1, b1, w2, b2]: [Buf; 4] = params
            .try_into()
            .map_err(|_| GpuError::Shape("four parameters".into()))?;
        let grads: [CudaSlice<f32>; 4] = grads
            .try_into()
            .map_err(|_| GpuError::Shape("four gradients".into()))?;
        Ok(GpuStage {
            dev: dev.clone(),
            index,
            first: index == 0,
            last: index + 1 == spec.stages,
            hidden: h,
            params: [w1, b1, w2, b2],
            grads,
            saved: HashMap::new(),
            deferred: HashMap::new(),
        })
    }

    /// Micro-batches still holding saved activations or a pending weight gradient.
    pub fn pending(&self) -> usize {
        self.saved.len() + self.deferred.len()
    }

    /// The accumulated gradients on the host (waits for main).
    pub fn gradients(&self) -> Result<Parameters, GpuError> {
        let get = |g: &CudaSlice<f32>| {
            self.dev
                .main
                .clone_dtoh(g)
                .map_err(|e| GpuError::driver("copying gradients to the host", e))
        };
        Ok(Parameters {
            w1: get(&self.grads[0])?,
            b1: get(&self.grads[1])?,
            w2: get(&self.grads[2])?,
            b2: get(&self.grads[3])?,
        })
    }

    /// Adds `other`'s gradients into this copy's, on main; both ranks' streams must be idle
    /// (called between steps).
    pub fn add_gradients_of(&mut self, other: &GpuStage) -> Result<(), GpuError> {
        self.dev.bind()?;
        for (mine, theirs) in self.grads.iter_mut().zip(&other.grads) {
            let copy = self
                .dev
                .main
                .clone_dtod(theirs)
                .map_err(|e| GpuError::driver("copying gradients", e))?;
            let copy = Buf::F32(copy);
            self.dev.kernels.accumulate(&self.dev.main, mine, &copy)?;
            self.dev.graveyard.bury(copy);
        }
        Ok(())
    }

    /// Sets this copy's gradients to `other`'s (between steps).
    pub fn copy_gradients_of(&mut self, other: &GpuStage) -> Result<(), GpuError> {
        for (mine, theirs) in self.grads.iter_mut().zip(&other.grads) {
            self.dev
                .main
                .memcpy_dtod(theirs, mine)
                .map_err(|e| GpuError::driver("copying gradients", e))?;
        }
        Ok(())
    }

    /// The gradients themselves, for the NCCL exchange between copies.
    pub fn gradient_buffers_mut(&mut self) -> &mut [CudaSlice<f32>; 4] {
        &mut self.grads
    }

    /// One step of plain gradient descent; clears the gradients.
    pub fn sgd(&mut self, lr: f32) -> Result<(), GpuError> {
        self.dev.bind()?;
        for (p, g) in self.params.iter_mut().zip(self.grads.iter_mut()) {
            self.dev.kernels.sgd(&self.dev.main, p, g, lr)?;
        }
        self.zero_gradients()
    }

    /// Sets the gradients to zero.
    pub fn zero_gradients(&mut self) -> Result<(), GpuError> {
        for g in self.grads.iter_mut() {
            self.dev
                .main
                .memset_zeros(g)
                .map_err(|e| GpuError::driver("clearing gradients", e))?;
        }
        Ok(())
    }

    fn check(&self, what: &str, t: &Tensor, rows: Option<usize>) -> Result<(), GpuError> {
        if t.cols() != self.hidden || rows.is_some_and(|r| r != t.rows()) {
            return Err(GpuError::Shape(format!(
                "stage {}: {what} has shape [{}, {}], expected [{}, {}]",
                self.index,
                t.rows(),
                t.cols(),
                rows.map_or("rows".to_string(), |r| r.to_string()),
                self.hidden
            )));
        }
        Ok(())
    }

    fn forward_on(
        &mut self,
        lane: Lane<'_>,
        forward: Forward<Tensor>,
    ) -> Result<Forwarded<Tensor, Tensor>, GpuError> {
        let Forward {
            mb,
            input: x,
            target,
            training,
        } = forward;
        self.check("the input", &x, None)?;
        let (r, h) = (x.rows(), self.hidden);
        let dev = self.dev.clone();
        let mut a = dev.alloc(lane.stream, [r, 4 * h])?;
        super::raw::matmul(
            lane.blas,
            a.buf_mut(),
            Mat::new(x.buf(), r, h),
            Mat::new(&self.params[0], h, 4 * h),
        )?;
        let mut g = dev.alloc(lane.stream, [r, 4 * h])?;
        dev.kernels.bias_gelu(
            lane.stream,
            a.buf_mut(),
            g.buf_mut(),
            &self.params[1],
            r,
            4 * h,
        )?;
        let mut y = dev.alloc(lane.stream, [r, h])?;
        super::raw::matmul(
            lane.blas,
            y.buf_mut(),
            Mat::new(g.buf(), r, 4 * h),
            Mat::new(&self.params[2], 4 * h, h),
        )?;
        dev.kernels
            .add_bias(lane.stream, y.buf_mut(), &self.params[3], r, h)?;
        let (loss, loss_grad) = match target {
            Some(t) if self.last => {
                self.check("the target", &t, Some(r))?;
                let mut grad = dev.alloc(lane.stream, [r, h])?;
                let mut loss = lane
                    .stream
                    .alloc_zeros::<f32>(1)
                    .map_err(|e| GpuError::driver("allocating the loss", e))?;
                dev.kernels
                    .mse(lane.stream, grad.buf_mut(), &mut loss, y.buf(), t.buf())?;
                (Some(dev.tensor(Buf::F32(loss), [1, 1])), Some(grad))
            }
            _ => (None, None),
        };
        if training {
            self.saved.insert(mb, Saved { x, a, g, loss_grad });
        }
        Ok(Forwarded { output: y, loss })
    }

    fn backward_on(
        &mut self,
        lane: Lane<'_>,
        backward: Backward<Tensor>,
    ) -> Result<Option<Tensor>, GpuError> {
        let Backward {
            mb,
            output_grad,
            defer_w,
        } = backward;
        let Saved { x, a, g, loss_grad } = self.saved.remove(&mb).ok_or_else(|| {
            GpuError::Shape(format!(
                "stage {}: backward of micro-batch {mb} without its forward",
                self.index
            ))
        })?;
        let (r, h) = (x.rows(), self.hidden);
        let dev = self.dev.clone();
        let dy = match (output_grad, loss_grad) {
            (Some(grad), _) => {
                self.check("the output gradient", &grad, Some(r))?;
                grad
            }
            (None, Some(grad)) => grad,
            (None, None) => {
                return Err(GpuError::Shape(format!(
                    "stage {}: backward of micro-batch {mb} got no output gradient and has no loss",
                    self.index
                )));
            }
        };
        let mut da = dev.alloc(lane.stream, [r, 4 * h])?;
        super::raw::matmul(
            lane.blas,
            da.buf_mut(),
            Mat::new(dy.buf(), r, h),
            Mat::new(&self.params[2], 4 * h, h).t(),
        )?;
        dev.kernels
            .gelu_backward(lane.stream, da.buf_mut(), a.buf())?;
        let dx = if self.first {
            None
        } else {
            let mut dx = dev.alloc(lane.stream, [r, h])?;
            super::raw::matmul(
                lane.blas,
                dx.buf_mut(),
                Mat::new(da.buf(), r, 4 * h),
                Mat::new(&self.params[0], h, 4 * h).t(),
            )?;
            Some(dx)
        };
        if defer_w {
            self.deferred.insert(mb, Deferred { x, g, dy, da });
        } else {
            self.accumulate(lane, &x, &g, &dy, &da)?;
        }
        Ok(dx)
    }

    /// Adds one micro-batch's weight gradients to the f32 sums: each weight's product is added
    /// by its gemm (beta 1, f32 output, so a bf16 model's share is not rounded to bf16 first),
    /// each bias's column sums by the reduction kernel.
    fn accumulate(
        &mut self,
        lane: Lane<'_>,
        x: &Tensor,
        g: &Tensor,
        dy: &Tensor,
        da: &Tensor,
    ) -> Result<(), GpuError> {
        let (r, h) = (x.rows(), self.hidden);
        let dev = self.dev.clone();
        // Each weight gradient is one gemm adding straight into the f32 sum (beta 1).
        super::raw::matmul_add_f32(
            lane.blas,
            lane.stream,
            &mut self.grads[2],
            Mat::new(g.buf(), r, 4 * h).t(),
            Mat::new(dy.buf(), r, h),
        )?;
        dev.kernels
            .column_sums_add(lane.stream, &mut self.grads[3], dy.buf(), r, h)?;
        super::raw::matmul_add_f32(
            lane.blas,
            lane.stream,
            &mut self.grads[0],
            Mat::new(x.buf(), r, h).t(),
            Mat::new(da.buf(), r, 4 * h),
        )?;
        dev.kernels
            .column_sums_add(lane.stream, &mut self.grads[1], da.buf(), r, 4 * h)?;
        Ok(())
    }
}

fn stage_error(e: GpuError) -> StageError {
    e.to_string().into()
}

impl GpuStage {
    /// The lane of `stream`: main or side with its cuBLAS handle; comm runs no compute.
    fn lane(dev: &RankDevice, stream: Stream) -> Result<Lane<'_>, GpuError> {
        match stream {
            Stream::Main => Ok(Lane {
                stream: &dev.main,
                blas: &dev.blas_main,
            }),
            Stream::Side => Ok(Lane {
                stream: &dev.side,
                blas: &dev.blas_side,
            }),
            Stream::Comm => Err(GpuError::Plan(
                "the plan puts a compute on the comm stream".into(),
            )),
        }
    }

    fn work(&self, mb: u32) -> Work {
        Work::new(self.index, mb)
    }
}

/// Each call issues the rank's stream plan up to the compute it runs (the plan's waits for
/// its data), checks that the plan's next compute is this one, and issues its kernels on the
/// stream the plan names (main when no plan runs: the single-stream reference).
impl Stage for GpuStage {
    type Buffer = Tensor;
    type Loss = Tensor;

    fn forward(
        &mut self,
        forward: Forward<Tensor>,
    ) -> Result<Forwarded<Tensor, Tensor>, StageError> {
        self.dev.bind().map_err(stage_error)?;
        let dev = self.dev.clone();
        let (stream, _) = dev
            .plan_compute(Want::Forward(self.work(forward.mb)))
            .map_err(stage_error)?;
        let lane = Self::lane(&dev, stream).map_err(stage_error)?;
        let forwarded = self.forward_on(lane, forward).map_err(stage_error)?;
        dev.seal_and_sweep().map_err(stage_error)?;
        Ok(forwarded)
    }

    fn backward(&mut self, backward: Backward<Tensor>) -> Result<Option<Tensor>, StageError> {
        self.dev.bind().map_err(stage_error)?;
        let dev = self.dev.clone();
        let (stream, _) = dev
            .plan_compute(Want::Backward(self.work(backward.mb)))
            .map_err(stage_error)?;
        let lane = Self::lane(&dev, stream).map_err(stage_error)?;
        let input_grad = self.backward_on(lane, backward).map_err(stage_error)?;
        dev.seal_and_sweep().map_err(stage_error)?;
        Ok(input_grad)
    }

    fn backward_weight(&mut self, mb: u32) -> Result<(), StageError> {
        self.dev.bind().map_err(stage_error)?;
        let dev = self.dev.clone();
        let (stream, _) = dev
            .plan_compute(Want::Weight(self.work(mb)))
            .map_err(stage_error)?;
        let Deferred { x, g, dy, da } = self.deferred.remove(&mb).ok_or_else(|| {
            format!(
                "stage {}: weight gradient of micro-batch {mb} without a deferred backward",
                self.index
            )
        })?;
        let lane = Self::lane(&dev, stream).map_err(stage_error)?;
        self.accumulate(lane, &x, &g, &dy, &da)
            .map_err(stage_error)?;
        // The micro-batch's saved buffers go to the graveyard now, and with them every
        // temporary whose stream work is done is freed: a step without commits (one rank)
        // would otherwise keep all of them until its end.
        drop((x, g, dy, da));
        dev.seal_and_sweep().map_err(stage_error)
    }

    /// As the plan lays it out: both halves on one stream, or the forward on main and the
    /// backward on side after `fb start` (and side's wait for the backward's received
    /// gradient), joined by `fb join`, so that the two overlap on the device and the forward
    /// never waits for the backward's input.
    fn forward_backward(
        &mut self,
        forward: Forward<Tensor>,
        backward_stage: Option<&mut Self>,
        backward: Backward<Tensor>,
    ) -> Result<Overlapped<Tensor, Tensor>, StageError> {
        let dev = self.dev.clone();
        dev.bind().map_err(stage_error)?;
        let want = Want::ForwardBackward {
            f: self.work(forward.mb),
            b: Work::new(
                backward_stage
                    .as_ref()
                    .map_or(self.index, |other| other.index),
                backward.mb,
            ),
        };
        let (first, planned) = dev.plan_compute(want).map_err(stage_error)?;
        let forwarded = self
            .forward_on(Self::lane(&dev, first).map_err(stage_error)?, forward)
            .map_err(stage_error)?;
        let second = match planned {
            // Split: the plan's next compute is the backward half of the same instruction.
            Some((index, Part::Forward)) => {
                let (stream, half) = dev.plan_compute(want).map_err(stage_error)?;
                if half != Some((index, Part::Backward)) {
                    return Err(stage_error(GpuError::Plan(format!(
                        "the plan runs the forward half of instruction {index} alone, then {half:?}"
                    ))));
                }
                stream
            }
            Some((index, Part::Backward)) => {
                return Err(stage_error(GpuError::Plan(format!(
                    "the plan runs the backward half of instruction {index} before its forward"
                ))));
            }
            Some((_, Part::Whole)) | None => first,
        };
        let side = Self::lane(&dev, second).map_err(stage_error)?;
        let input_grad = match backward_stage {
            Some(other) => other.backward_on(side, backward),
            None => self.backward_on(side, backward),
        }
        .map_err(stage_error)?;
        if let Some((index, _)) = planned {
            // `fb join` on side and main's wait for it.
            dev.plan_close(index).map_err(stage_error)?;
        }
        dev.seal_and_sweep().map_err(stage_error)?;
        Ok(Overlapped {
            forwarded,
            input_grad,
        })
    }

    fn sum_gradients(copies: &mut [&mut Self]) -> Result<(), StageError> {
        let Some((first, rest)) = copies.split_first_mut() else {
            return Ok(());
        };
        // Each copy's gradients live on its own rank's streams: the sum is complete on the
        // first copy's device before any other copy reads it, and each copy is complete
        // before the next step.
        for other in rest.iter() {
            first.add_gradients_of(other).map_err(stage_error)?;
        }
        first.dev.synchronize().map_err(stage_error)?;
        for other in rest.iter_mut() {
            other.copy_gradients_of(first).map_err(stage_error)?;
            other.dev.synchronize().map_err(stage_error)?;
        }
        Ok(())
    }
}
