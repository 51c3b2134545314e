//! The stand-in built without the `cuda` feature: the same API, every constructor returning
//! [`CudaError::NotCompiled`], so callers compile the same either way. The pipelines
//! implement the same [`Backend`] trait as the real ones, so the compiler checks that part of
//! the interface; the constructors and the few inherent methods mirror the `cuda` build's.

use std::time::Duration;

use dualpipe_executor::{Executor, Options, StageError, StepError};
use dualpipe_reference::Backend;
use dualpipe_reference::conformance::{ReferenceBackend, ReferenceRun};
use dualpipe_reference::model::{Batch, ModelSpec, Parameters};
use dualpipe_schedule::ValidSchedule;

use crate::api::{GpuConfig, GpuStep};
use crate::error::CudaError;
use crate::launch::LaunchEnv;

/// See the `cuda` build: a schedule on one GPU with virtual ranks. Never constructed here.
pub enum CudaPipeline {}

impl CudaPipeline {
    /// Always [`CudaError::NotCompiled`].
    pub fn new(
        _: ValidSchedule,
        _: Options,
        _: &ModelSpec,
        _: GpuConfig,
    ) -> Result<Self, CudaError> {
        Err(CudaError::NotCompiled)
    }
    /// Unreachable: no value exists.
    pub fn device_name(&self) -> String {
        match *self {}
    }
}

impl Backend for CudaPipeline {
    type Error = CudaError;

    fn name(&self) -> &'static str {
        match *self {}
    }
    fn executor(&self) -> &Executor {
        match *self {}
    }
    fn ranks(&self) -> Vec<u32> {
        match *self {}
    }
    fn step(&mut self, _: &Batch) -> Result<GpuStep, StepError> {
        match *self {}
    }
    fn gradients(&self, _: u32) -> Result<Option<Parameters>, CudaError> {
        match *self {}
    }
    fn leftover(&self) -> usize {
        match *self {}
    }
    fn sgd(&mut self, _: f32) -> Result<(), CudaError> {
        match *self {}
    }
}

/// See the `cuda` build: the single-stream reference. Never constructed here.
pub enum GpuSequential {}

impl GpuSequential {
    /// Always [`CudaError::NotCompiled`].
    pub fn new(_: &ModelSpec, _: GpuConfig) -> Result<Self, CudaError> {
        Err(CudaError::NotCompiled)
    }
    /// Unreachable: no value exists.
    pub fn step(&mut self, _: &Batch, _: bool) -> Result<GpuStep, CudaError> {
        match *self {}
    }
    /// Unreachable: no value exists.
    pub fn gradients(&self, _: u32) -> Result<Parameters, CudaError> {
        match *self {}
    }
    /// Unreachable: no value exists.
    pub fn leftover(&self) -> usize {
        match *self {}
    }
}

/// See the `cuda` build: one process of an NCCL run. Never constructed here.
pub enum NcclRank {}

impl NcclRank {
    /// Always [`CudaError::NotCompiled`].
    pub fn new(
        _: &LaunchEnv,
        _: ValidSchedule,
        _: Options,
        _: &ModelSpec,
        _: GpuConfig,
        _: Duration,
    ) -> Result<Self, CudaError> {
        Err(CudaError::NotCompiled)
    }
    /// Unreachable: no value exists.
    pub fn rank(&self) -> u32 {
        match *self {}
    }
    /// Unreachable: no value exists.
    pub fn stages(&self) -> Vec<u32> {
        match *self {}
    }
}

impl Backend for NcclRank {
    type Error = CudaError;

    fn name(&self) -> &'static str {
        match *self {}
    }
    fn executor(&self) -> &Executor {
        match *self {}
    }
    fn ranks(&self) -> Vec<u32> {
        match *self {}
    }
    fn step(&mut self, _: &Batch) -> Result<GpuStep, StepError> {
        match *self {}
    }
    fn gradients(&self, _: u32) -> Result<Option<Parameters>, CudaError> {
        match *self {}
    }
    fn leftover(&self) -> usize {
        match *self {}
    }
    fn sgd(&mut self, _: f32) -> Result<(), CudaError> {
        match *self {}
    }
}

/// See the `cuda` build: the backend under the conformance tests.
pub enum CudaReference {}

impl CudaReference {
    /// Always [`CudaError::NotCompiled`].
    pub fn new(_: GpuConfig) -> Result<Self, CudaError> {
        Err(CudaError::NotCompiled)
    }
}

impl ReferenceBackend for CudaReference {
    fn name(&self) -> &'static str {
        match *self {}
    }
    fn pipelined(
        &mut self,
        _: ValidSchedule,
        _: &ModelSpec,
        _: &Batch,
        _: Options,
    ) -> Result<ReferenceRun, StepError> {
        match *self {}
    }
    fn sequential(
        &mut self,
        _: &ModelSpec,
        _: &Batch,
        _: bool,
    ) -> Result<ReferenceRun, StageError> {
        match *self {}
    }
}
