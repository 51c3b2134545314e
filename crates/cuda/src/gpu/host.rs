//! What the step driver needs of the GPU: the hook that waits for the devices and brings
//! losses and outputs to the host, and the errors of a step outside the interpreter.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dualpipe_executor::{Cause, Host, RankFailure, StepError};
use dualpipe_schedule::ValidSchedule;

use super::raw::NcclAbort;
use super::stage::GpuStage;
use super::{RankDevice, Tensor};

pub(crate) fn failure(rank: u32, e: impl std::fmt::Display) -> StepError {
    StepError::new(
        vec![RankFailure::on_rank(rank, Cause::Contract(e.to_string()))],
        Vec::new(),
    )
}

pub(crate) fn instructions(schedule: &ValidSchedule, ranks: impl Iterator<Item = u32>) -> usize {
    ranks
        .map(|r| schedule.schedule().ranks[r as usize].len())
        .sum()
}

/// Brings a step's losses and outputs from the devices of the ranks run here to the host,
/// after waiting for every one of their streams.
pub(crate) struct DeviceHost {
    /// The ranks run here with their devices.
    devs: Vec<(u32, Arc<RankDevice>)>,
    /// When issuing began.
    started: Instant,
    /// Host time spent issuing, set when every rank's list has been issued.
    pub dispatch_us: f64,
    /// Host time from the start of issuing to the end of the devices' work.
    pub step_us: f64,
    /// The longest the host waits for the devices at the end of the step.
    timeout: Option<Duration>,
    /// Aborted when that wait times out, so the stalled device work ends too.
    abort: Option<NcclAbort>,
}

impl DeviceHost {
    /// The host of a step over the ranks `devs` (with their devices), starting now.
    pub fn new(devs: Vec<(u32, Arc<RankDevice>)>) -> Self {
        DeviceHost {
            devs,
            started: Instant::now(),
            dispatch_us: 0.0,
            step_us: 0.0,
            timeout: None,
            abort: None,
        }
    }

    /// Waits for the devices at most `timeout` at the end of the step; past it, aborts
    /// `abort` (an NCCL communicator) and fails the step.
    pub fn with_timeout(mut self, timeout: Option<Duration>, abort: Option<NcclAbort>) -> Self {
        self.timeout = timeout;
        self.abort = abort;
        self
    }

    fn device(&self, rank: u32) -> Result<&RankDevice, RankFailure> {
        self.devs
            .iter()
            .find(|(r, _)| *r == rank)
            .map(|(_, dev)| dev.as_ref())
            .ok_or_else(|| {
                RankFailure::on_rank(rank, Cause::Contract(format!("no device for rank {rank}")))
            })
    }
}

/// The failure of a wait for `rank`'s device; a timeout aborts `abort` first.
pub(crate) fn stalled(abort: Option<&NcclAbort>, rank: u32, e: super::GpuError) -> RankFailure {
    if matches!(e, super::GpuError::Timeout(_))
        && let Some(abort) = abort
    {
        let _ = abort.abort();
    }
    device_failure(rank, e)
}

pub(crate) fn device_failure(rank: u32, e: impl std::fmt::Display) -> RankFailure {
    RankFailure::on_rank(rank, Cause::Contract(e.to_string()))
}

impl Host<GpuStage> for DeviceHost {
    type Buffer = Vec<f32>;
    type Loss = f32;

    fn settle(&mut self) -> Result<(), RankFailure> {
        self.dispatch_us = self.started.elapsed().as_secs_f64() * 1e6;
        // Each rank's plan ends with the host's wait for its streams; every rank is waited
        // for (and its plan ended) even when an earlier one failed.
        let mut first = None;
        for (rank, dev) in &self.devs {
            if let Err(e) = dev.finish_plan(self.timeout) {
                let failure = stalled(self.abort.as_ref(), *rank, e);
                first.get_or_insert(failure);
            }
        }
        if let Some(failure) = first {
            return Err(failure);
        }
        self.step_us = self.started.elapsed().as_secs_f64() * 1e6;
        Ok(())
    }

    fn loss(&mut self, rank: u32, loss: Tensor) -> Result<Option<f32>, RankFailure> {
        let values = self
            .device(rank)?
            .download(loss.buf())
            .map_err(|e| device_failure(rank, e))?;
        Ok(values.first().copied())
    }

    fn output(&mut self, rank: u32, output: Tensor) -> Result<Vec<f32>, RankFailure> {
        self.device(rank)?
            .download(output.buf())
            .map_err(|e| device_failure(rank, e))
    }
}
