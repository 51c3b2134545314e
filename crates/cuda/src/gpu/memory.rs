//! When device memory may be freed. With cudarc's event tracking off, a buffer dropped on the
//! host could still be in use on any of its rank's streams, so it is not freed at once: it
//! goes to the rank's [`Graveyard`], which records an event on each stream of the rank and
//! frees the buffers once all those events have completed. The host never waits for that
//! inside a step: completed batches are swept at each commit and after each compute by
//! polling the events.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::driver::{CudaContext, CudaEvent, CudaStream};

use crate::gpu::GpuError;
use crate::gpu::raw::Buf;

/// Buffers dropped on the host, waiting until no stream of their rank can still use them.
pub(crate) struct Graveyard {
    ctx: Arc<CudaContext>,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Dropped since the last seal.
    pending: Vec<Buf>,
    /// Sealed batches: freed when every event has completed.
    sealed: VecDeque<(Vec<CudaEvent>, Vec<Buf>)>,
    /// Completed events, reused for later seals.
    spare: Vec<CudaEvent>,
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

impl Graveyard {
    pub fn new(ctx: Arc<CudaContext>) -> Self {
        Graveyard {
            ctx,
            state: Mutex::new(State::default()),
        }
    }

    /// Takes a dropped buffer.
    pub fn bury(&self, buf: Buf) {
        lock(&self.state).pending.push(buf);
    }

    /// Closes the current batch of dropped buffers: records an event on each of `streams`
    /// (every stream that may have used them), after everything issued so far.
    pub fn seal(&self, streams: &[&Arc<CudaStream>]) -> Result<(), GpuError> {
        let mut state = lock(&self.state);
        if state.pending.is_empty() {
            return Ok(());
        }
        let mut events = Vec::with_capacity(streams.len());
        for stream in streams {
            let event = match state.spare.pop() {
                Some(event) => event,
                None => self
                    .ctx
                    .new_event(None)
                    .map_err(|e| GpuError::driver("creating an event", e))?,
            };
            event
                .record(stream)
                .map_err(|e| GpuError::driver("recording an event", e))?;
            events.push(event);
        }
        let buried = std::mem::take(&mut state.pending);
        state.sealed.push_back((events, buried));
        Ok(())
    }

    /// Frees the sealed batches whose events have all completed, oldest first; never waits.
    pub fn sweep(&self) -> Result<(), GpuError> {
        let mut state = lock(&self.state);
        while let Some((events, _)) = state.sealed.front() {
            let mut done = true;
            for event in events {
                if !event
                    .try_is_complete()
                    .map_err(|e| GpuError::driver("polling an event", e))?
                {
                    done = false;
                    break;
                }
            }
            if !done {
                break;
            }
            if let Some((events, buried)) = state.sealed.pop_front() {
                drop(buried);
                state.spare.extend(events);
            }
        }
        Ok(())
    }

    /// Frees everything; only after the host has waited for every stream of the rank.
    pub fn clear_after_sync(&self) {
        let mut state = lock(&self.state);
        let sealed = std::mem::take(&mut state.sealed);
        for (events, buried) in sealed {
            drop(buried);
            state.spare.extend(events);
        }
        state.pending.clear();
    }
}
