//! The checks every backend must pass, written once over [`ReferenceBackend`]: a backend runs
//! the reference model under a schedule and in one process, and [`compare`] holds the two to
//! the reference implementation's own standard: losses (and forward-only outputs) bitwise
//! equal, gradients within [`CAL_DIFF_LIMIT`].

use dualpipe_schedule::ValidSchedule;

use dualpipe_executor::{Options, StageError, StepError};

use crate::backend::{Backend, CpuBackend};
use crate::model::{Batch, ModelSpec, Parameters, ReferenceStage, Sequential};

/// The largest gradient difference accepted, as `cal_diff` (the reference implementation's
/// own bound).
pub const CAL_DIFF_LIMIT: f64 = 1e-13;

/// Host copies of what one step of the reference model produced.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceRun {
    /// Loss of each micro-batch (`None` where none came back).
    pub losses: Vec<Option<f32>>,
    /// Model output of each micro-batch, row-major (`None` where none came back).
    pub outputs: Vec<Option<Vec<f32>>>,
    /// Weight gradients of each stage, copies summed; empty for a forward-only step.
    pub gradients: Vec<Parameters>,
    /// Saved activations or pending weight gradients left on any stage after the step.
    pub leftover: usize,
}

/// A backend able to run the reference model under a schedule and in one process, each from
/// fresh parameters: the test bodies of [`suite`](crate::suite) run unchanged on every such
/// backend.
pub trait ReferenceBackend {
    /// A short name for messages (`cpu`, `cuda`).
    fn name(&self) -> &'static str;

    /// One step of the model `spec` under `schedule` over `batch`, with fresh parameters.
    fn pipelined(
        &mut self,
        schedule: ValidSchedule,
        spec: &ModelSpec,
        batch: &Batch,
        options: Options,
    ) -> Result<ReferenceRun, StepError>;

    /// One step of the model `spec` in a single process, micro-batch after micro-batch.
    fn sequential(
        &mut self,
        spec: &ModelSpec,
        batch: &Batch,
        training: bool,
    ) -> Result<ReferenceRun, StageError>;
}

/// The CPU backend as a [`ReferenceBackend`].
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuReference;

impl ReferenceBackend for CpuReference {
    fn name(&self) -> &'static str {
        "cpu"
    }

    fn pipelined(
        &mut self,
        schedule: ValidSchedule,
        spec: &ModelSpec,
        batch: &Batch,
        options: Options,
    ) -> Result<ReferenceRun, StepError> {
        let mut backend = CpuBackend::new(schedule, options, spec)
            .map_err(|failure| StepError::new(vec![failure], Vec::new()))?;
        let step = backend.step(batch)?;
        let Ok(run) = backend.reference_run(step);
        Ok(run)
    }

    fn sequential(
        &mut self,
        spec: &ModelSpec,
        batch: &Batch,
        training: bool,
    ) -> Result<ReferenceRun, StageError> {
        Sequential::new(spec).reference_run(batch, training)
    }
}

impl Sequential {
    /// One step over `batch` from the current parameters (gradients accumulate), as a
    /// [`ReferenceRun`]: every loss and output, and after a training step every stage's
    /// gradients.
    pub fn reference_run(
        &mut self,
        batch: &Batch,
        training: bool,
    ) -> Result<ReferenceRun, StageError> {
        let step = self.step(batch, training)?;
        Ok(ReferenceRun {
            losses: step.losses.into_iter().map(Some).collect(),
            outputs: step
                .outputs
                .into_iter()
                .map(|m| Some(m.into_data()))
                .collect(),
            gradients: if training {
                self.stages.iter().map(|s| s.gradients().clone()).collect()
            } else {
                Vec::new()
            },
            leftover: self.stages.iter().map(ReferenceStage::pending).sum(),
        })
    }
}

/// The reference implementation's gradient check, `1 - 2 sum(x y) / sum(x^2 + y^2)`, in
/// `f64`: 0 for identical tensors, about half the squared relative error otherwise. Two zero
/// tensors give 0.
pub fn cal_diff(x: &[f32], y: &[f32]) -> f64 {
    let (mut xy, mut squares) = (0.0f64, 0.0f64);
    for (&a, &b) in x.iter().zip(y) {
        let (a, b) = (f64::from(a), f64::from(b));
        xy += a * b;
        squares += a * a + b * b;
    }
    if squares == 0.0 {
        return 0.0;
    }
    1.0 - 2.0 * xy / squares
}

/// How closely a pipelined step agreed with the single-process one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Agreement {
    /// Micro-batches whose losses were compared (all bitwise equal).
    pub losses: usize,
    /// Micro-batches whose outputs were compared (all bitwise equal).
    pub outputs: usize,
    /// The largest `cal_diff` over every gradient tensor of every stage (0 when none).
    pub max_cal_diff: f64,
}

/// Why a pipelined step was not accepted by [`compare`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    /// The pipelined step differs from the reference: a real failure.
    #[error("{0}")]
    Differs(String),
    /// The reference step itself produced a loss or gradient that is not finite: the training
    /// diverged (a learning rate too large, say), so there is nothing to compare.
    #[error("{0}")]
    Diverged(String),
    /// The reference cannot tell a right step from a wrong one here (a gradient that is zero
    /// everywhere).
    #[error("{0}")]
    Unchecked(String),
}

/// The first loss or gradient of the reference step that is not finite, if any.
fn diverged(reference: &ReferenceRun) -> Option<String> {
    if let Some((mb, loss)) = reference
        .losses
        .iter()
        .enumerate()
        .find_map(|(mb, l)| l.filter(|l| !l.is_finite()).map(|l| (mb, l)))
    {
        return Some(format!("micro-batch {mb}: the loss is {loss}"));
    }
    for (stage, gradients) in reference.gradients.iter().enumerate() {
        for (name, values) in gradients.tensors() {
            if let Some(v) = values.iter().find(|v| !v.is_finite()) {
                return Some(format!("stage {stage}: the gradient of {name} holds {v}"));
            }
        }
    }
    None
}

/// Holds `pipelined` to `reference`: every loss bitwise equal, every output the pipelined
/// run returned bitwise equal, every gradient tensor within [`CAL_DIFF_LIMIT`], and nothing
/// left saved on any stage. Says what differs, where, on failure.
pub fn compare(pipelined: &ReferenceRun, reference: &ReferenceRun) -> Result<Agreement, Mismatch> {
    if let Some(why) = diverged(reference) {
        return Err(Mismatch::Diverged(why));
    }
    if pipelined.losses.len() != reference.losses.len() {
        return Err(Mismatch::Differs(format!(
            "{} losses, but the reference has {}",
            pipelined.losses.len(),
            reference.losses.len()
        )));
    }
    for (mb, (ours, theirs)) in pipelined.losses.iter().zip(&reference.losses).enumerate() {
        match (ours, theirs) {
            (Some(a), Some(b)) if a.to_bits() == b.to_bits() => {}
            (Some(a), Some(b)) => {
                return Err(Mismatch::Differs(format!(
                    "micro-batch {mb}: loss {a:e}, but the reference has {b:e}"
                )));
            }
            _ => {
                return Err(Mismatch::Differs(format!(
                    "micro-batch {mb}: no loss came back"
                )));
            }
        }
    }
    let mut outputs = 0;
    for (mb, (ours, theirs)) in pipelined.outputs.iter().zip(&reference.outputs).enumerate() {
        if let (Some(a), Some(b)) = (ours, theirs) {
            let same =
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
            if !same {
                return Err(Mismatch::Differs(format!(
                    "micro-batch {mb}: the output differs from the reference"
                )));
            }
            outputs += 1;
        }
    }
    if pipelined.gradients.len() != reference.gradients.len() {
        return Err(Mismatch::Differs(format!(
            "gradients of {} stages, but the reference has {}",
            pipelined.gradients.len(),
            reference.gradients.len()
        )));
    }
    let mut max_cal_diff = 0.0f64;
    for (stage, (ours, theirs)) in pipelined
        .gradients
        .iter()
        .zip(&reference.gradients)
        .enumerate()
    {
        for ((name, a), (_, b)) in ours.tensors().into_iter().zip(theirs.tensors()) {
            if b.iter().all(|&v| v == 0.0) {
                return Err(Mismatch::Unchecked(format!(
                    "stage {stage}: the reference gradient of {name} is zero, so comparing it proves nothing"
                )));
            }
            let diff = cal_diff(a, b);
            if diff.is_nan() || diff >= CAL_DIFF_LIMIT {
                return Err(Mismatch::Differs(format!(
                    "stage {stage}: gradient of {name} has cal_diff {diff:e} against the reference (limit {CAL_DIFF_LIMIT:e})"
                )));
            }
            max_cal_diff = max_cal_diff.max(diff);
        }
    }
    if pipelined.leftover != 0 {
        return Err(Mismatch::Differs(format!(
            "{} saved activations or pending weight gradients were left after the step",
            pipelined.leftover
        )));
    }
    Ok(Agreement {
        losses: pipelined.losses.len(),
        outputs,
        max_cal_diff,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cal_diff_is_zero_for_equal_and_grows_with_difference() {
        let x = [1.0f32, -2.0, 3.0];
        assert_eq!(cal_diff(&x, &x), 0.0);
        assert_eq!(cal_diff(&[0.0; 3], &[0.0; 3]), 0.0);
        let small = cal_diff(&x, &[1.0, -2.0, 3.001]);
        let large = cal_diff(&x, &[1.0, -2.0, 3.1]);
        assert!(
            0.0 < small && small < large && large < 1e-3,
            "{small} {large}"
        );
        assert!((cal_diff(&x, &[-1.0, 2.0, -3.0]) - 2.0).abs() < 1e-12);
    }

    fn run(losses: &[f32], w1: f32) -> ReferenceRun {
        let mut gradients = Parameters::zeros(1);
        gradients.w1.fill(w1);
        gradients.b1.fill(1.0);
        gradients.w2.fill(1.0);
        gradients.b2.fill(1.0);
        ReferenceRun {
            losses: losses.iter().copied().map(Some).collect(),
            outputs: Vec::new(),
            gradients: vec![gradients],
            leftover: 0,
        }
    }

    #[test]
    fn divergence_and_unchecked_gradients_are_not_differences() {
        let good = run(&[0.5], 1.0);
        assert!(compare(&good, &good).is_ok());
        let nan = run(&[f32::NAN], 1.0);
        assert_eq!(
            compare(&nan, &nan),
            Err(Mismatch::Diverged("micro-batch 0: the loss is NaN".into()))
        );
        let inf = run(&[0.5], f32::INFINITY);
        assert_eq!(
            compare(&inf, &inf),
            Err(Mismatch::Diverged(
                "stage 0: the gradient of w1 holds inf".into()
            ))
        );
        let zero = run(&[0.5], 0.0);
        assert!(matches!(compare(&zero, &zero), Err(Mismatch::Unchecked(_))));
        assert!(matches!(
            compare(&run(&[0.25], 1.0), &good),
            Err(Mismatch::Differs(_))
        ));
    }
}
