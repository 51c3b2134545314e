//! The interface a model implements to run under the executor: one [`Stage`] per layer group.

/// What a stage's methods return on failure. Any error type converts into it with `?`, and a
/// plain message with `.into()`.
pub type StageError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A buffer that crosses a stage boundary: an activation travelling towards the loss or a
/// gradient travelling back. The executor checks its shape against the schedule's message
/// shape before it leaves the stage that produced it and when it arrives.
pub trait Payload {
    /// The shape of the buffer, outermost dimension first.
    fn shape(&self) -> &[usize];
}

/// The arguments of a forward pass.
#[derive(Debug)]
pub struct Forward<B> {
    /// The micro-batch.
    pub mb: u32,
    /// The step input (stage 0) or the previous stage's output for this micro-batch.
    pub input: B,
    /// At the last stage, the micro-batch's target, from which the stage computes its loss;
    /// `None` elsewhere (and at the last stage when the step was given no targets).
    pub target: Option<B>,
    /// `false` in a forward-only step: nothing needs to be kept for a backward.
    pub training: bool,
}

/// What a forward pass returns.
#[derive(Debug)]
pub struct Forwarded<B, L> {
    /// The stage's output: sent on to the next stage, or, at the last stage, the model output.
    pub output: B,
    /// The loss; `Some` exactly at the last stage when a target was given.
    pub loss: Option<L>,
}

/// The arguments of a backward pass.
#[derive(Debug)]
pub struct Backward<B> {
    /// The micro-batch.
    pub mb: u32,
    /// The gradient of the loss with respect to this stage's output; `None` at the last stage,
    /// whose backward starts from the loss it computed in its forward.
    pub output_grad: Option<B>,
    /// Compute only the input gradient now and keep what the weight gradient needs for a
    /// later [`Stage::backward_weight`] of the same micro-batch.
    pub defer_w: bool,
}

/// What an overlapped forward and backward return.
#[derive(Debug)]
pub struct Overlapped<B, L> {
    /// The forward half's result.
    pub forwarded: Forwarded<B, L>,
    /// The backward half's input gradient, as [`Stage::backward`] returns it.
    pub input_grad: Option<B>,
}

/// One stage of a model (a consecutive group of layers) as the executor drives it.
///
/// A rank holds one value per stage it runs; DualPipe keeps two copies of each stage on two
/// ranks, and the executor sums their gradients after the step with
/// [`Stage::sum_gradients`]. Buffers move in and out by value, so a backend can hand them
/// from stage to stage without copying.
///
/// The order of calls per micro-batch is `forward`, then `backward`, then (only when that
/// backward had `defer_w`) `backward_weight`; different micro-batches interleave as the
/// schedule says. A forward-only step calls only `forward`.
///
/// ```
/// use std::collections::HashMap;
/// use dualpipe_executor::{Backward, Forward, Forwarded, Payload, Stage, StageError};
///
/// /// `y = w x`; the last stage's loss is `(y - t)^2`.
/// #[derive(Default)]
/// struct Scale { w: f32, grad: f32, saved: HashMap<u32, (f32, f32)>, deferred: HashMap<u32, (f32, f32)> }
///
/// struct Scalar(f32);
/// impl Payload for Scalar {
///     fn shape(&self) -> &[usize] { &[] }
/// }
///
/// impl Stage for Scale {
///     type Buffer = Scalar;
///     type Loss = f32;
///
///     fn forward(&mut self, f: Forward<Scalar>) -> Result<Forwarded<Scalar, f32>, StageError> {
///         let (x, y) = (f.input.0, self.w * f.input.0);
///         let (loss, loss_grad) = match f.target {
///             Some(t) => (Some((y - t.0).powi(2)), 2.0 * (y - t.0)),
///             None => (None, 0.0),
///         };
///         if f.training {
///             self.saved.insert(f.mb, (x, loss_grad));
///         }
///         Ok(Forwarded { output: Scalar(y), loss })
///     }
///
///     fn backward(&mut self, b: Backward<Scalar>) -> Result<Option<Scalar>, StageError> {
///         let (x, loss_grad) = self.saved.remove(&b.mb).ok_or("backward before forward")?;
///         let dy = b.output_grad.map_or(loss_grad, |g| g.0);
///         if b.defer_w {
///             self.deferred.insert(b.mb, (x, dy));
///         } else {
///             self.grad += x * dy;
///         }
///         Ok(Some(Scalar(self.w * dy)))
///     }
///
///     fn backward_weight(&mut self, mb: u32) -> Result<(), StageError> {
///         let (x, dy) = self.deferred.remove(&mb).ok_or("no deferred backward")?;
///         self.grad += x * dy;
///         Ok(())
///     }
///
///     fn sum_gradients(copies: &mut [&mut Self]) -> Result<(), StageError> {
///         let total: f32 = copies.iter().map(|s| s.grad).sum();
///         copies.iter_mut().for_each(|copy| copy.grad = total);
///         Ok(())
///     }
/// }
///
/// let mut stage = Scale { w: 3.0, ..Scale::default() };
/// let out = stage.forward(Forward { mb: 0, input: Scalar(2.0), target: Some(Scalar(5.0)), training: true }).unwrap();
/// assert_eq!((out.output.0, out.loss), (6.0, Some(1.0)));
/// let dx = stage.backward(Backward { mb: 0, output_grad: None, defer_w: true }).unwrap().unwrap();
/// assert_eq!((dx.0, stage.grad), (6.0, 0.0));
/// stage.backward_weight(0).unwrap();
/// assert_eq!(stage.grad, 4.0);
/// ```
pub trait Stage {
    /// Activations and gradients.
    type Buffer: Payload;
    /// What the last stage's loss is (a host number on the CPU, a device scalar on a GPU).
    type Loss;

    /// Runs the forward of one micro-batch. At the last stage, computes the loss from
    /// `target` when one is given.
    fn forward(
        &mut self,
        forward: Forward<Self::Buffer>,
    ) -> Result<Forwarded<Self::Buffer, Self::Loss>, StageError>;

    /// Runs the backward of one micro-batch: returns the gradient with respect to the stage's
    /// input (`None` is accepted only from the first stage, whose input gradient nobody
    /// needs), and accumulates the weight gradients now, or keeps what they need for
    /// [`Stage::backward_weight`] when `defer_w` is set.
    fn backward(
        &mut self,
        backward: Backward<Self::Buffer>,
    ) -> Result<Option<Self::Buffer>, StageError>;

    /// Accumulates the weight gradients of an earlier backward of `mb` that had `defer_w`.
    fn backward_weight(&mut self, mb: u32) -> Result<(), StageError>;

    /// Runs a forward of one micro-batch and a full backward of another, overlapped however
    /// the model can (an `FB` instruction). `self` runs the forward; the backward runs on
    /// `backward_stage`, or on `self` when that is `None` (both halves on the same stage). The
    /// two halves never depend on each other.
    ///
    /// The default runs the forward and then the backward, which gives the same results as
    /// any overlapped implementation must.
    fn forward_backward(
        &mut self,
        forward: Forward<Self::Buffer>,
        backward_stage: Option<&mut Self>,
        backward: Backward<Self::Buffer>,
    ) -> Result<Overlapped<Self::Buffer, Self::Loss>, StageError>
    where
        Self: Sized,
    {
        let forwarded = self.forward(forward)?;
        let input_grad = match backward_stage {
            Some(other) => other.backward(backward)?,
            None => self.backward(backward)?,
        };
        Ok(Overlapped {
            forwarded,
            input_grad,
        })
    }

    /// Makes every copy of one stage hold the sum of their weight gradients (copies are given
    /// in ascending rank order). Called after a training step for each stage that the schedule
    /// places on more than one rank, as DualPipe does.
    fn sum_gradients(copies: &mut [&mut Self]) -> Result<(), StageError>
    where
        Self: Sized;
}
