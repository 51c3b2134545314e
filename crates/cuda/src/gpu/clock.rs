//! The CUDA-event clock of a rank.

use std::sync::Arc;

use cudarc::driver::CudaEvent;
use dualpipe_executor::Clock;
use dualpipe_schedule::Lane;

use super::RankDevice;

/// Marks on CUDA events: computes on main, commits from the transport's own timed events
/// (recorded after the comm stream's wait for the data to send, so a commit's span is the
/// batch itself). Resolved against one origin event after the step.
pub(crate) struct EventClock {
    dev: Arc<RankDevice>,
    origin: Arc<CudaEvent>,
    events: Vec<CudaEvent>,
    comm_marks: usize,
}

impl EventClock {
    /// A clock of the rank on `dev` whose zero is `origin`.
    pub fn new(dev: Arc<RankDevice>, origin: Arc<CudaEvent>) -> Self {
        EventClock {
            dev,
            origin,
            events: Vec::new(),
            comm_marks: 0,
        }
    }
}

/// A mark of [`EventClock`].
#[derive(Clone, Copy)]
pub(crate) enum Mark {
    Event(usize),
    CommitStart(usize),
    CommitEnd(usize),
    Missing,
}

impl Clock for EventClock {
    type Mark = Mark;

    fn mark(&mut self, lane: Lane) -> Mark {
        match lane {
            Lane::Compute => {
                let Ok(event) = self.dev.event(true) else {
                    return Mark::Missing;
                };
                if event.record(&self.dev.main).is_err() {
                    return Mark::Missing;
                }
                self.events.push(event);
                Mark::Event(self.events.len() - 1)
            }
            Lane::Comm => {
                // The interpreter marks before and after every commit.
                let n = self.comm_marks;
                self.comm_marks += 1;
                if n % 2 == 0 {
                    Mark::CommitStart(n / 2)
                } else {
                    Mark::CommitEnd(n / 2)
                }
            }
        }
    }

    fn micros(&mut self, mark: &Mark) -> f64 {
        let since = |event: &CudaEvent| {
            self.origin
                .elapsed_ms(event)
                .map_or(0.0, |ms| f64::from(ms) * 1e3)
        };
        match *mark {
            Mark::Event(i) => since(&self.events[i]),
            Mark::CommitStart(k) | Mark::CommitEnd(k) => {
                let times = self
                    .dev
                    .commit_times
                    .lock()
                    .unwrap_or_else(|p| p.into_inner());
                match times.get(k) {
                    Some((start, end)) => since(if matches!(mark, Mark::CommitStart(_)) {
                        start
                    } else {
                        end
                    }),
                    None => 0.0,
                }
            }
            Mark::Missing => 0.0,
        }
    }
}
