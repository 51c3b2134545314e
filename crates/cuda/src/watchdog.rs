//! The host's limit on waiting for the GPU. A stalled NCCL operation (a peer process gone, or
//! one running a different schedule) never completes on the device, and a plain stream
//! synchronize would wait for it forever; the backend polls instead, and past the limit the
//! step fails (and an NCCL communicator is aborted, so the device work ends too).

use std::time::{Duration, Instant};

/// Why [`wait_within`] returned without the work done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Wait<E> {
    /// Asking whether the work was done failed.
    Failed(E),
    /// The limit passed first.
    TimedOut(Duration),
}

/// The longest pause between two polls.
const MAX_PAUSE: Duration = Duration::from_millis(1);

/// Polls `done` until it answers `true` (returns `Ok`), fails (`Wait::Failed`), or `limit` has
/// passed since the call (`Wait::TimedOut`); `done` is asked at least once, and once more at
/// the limit. The pause between polls starts at 10 us and doubles up to 1 ms, so a short wait
/// costs little latency and a long one little CPU.
pub fn wait_within<E>(
    limit: Duration,
    mut done: impl FnMut() -> Result<bool, E>,
) -> Result<(), Wait<E>> {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_micros(10);
    loop {
        if done().map_err(Wait::Failed)? {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(Wait::TimedOut(limit));
        }
        std::thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// The message of a step that ran past the host timeout `limit`.
pub fn timeout_message(limit: Duration) -> String {
    format!(
        "the GPU did not finish the step within the host timeout of {limit:?}: a peer process may have stopped, or run a different schedule; the NCCL communicator, if any, was aborted"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finished_work_returns_at_once_and_late_work_when_done() {
        assert_eq!(wait_within::<()>(Duration::ZERO, || Ok(true)), Ok(()));
        let mut polls = 0;
        let started = Instant::now();
        let waited = wait_within::<()>(Duration::from_secs(10), || {
            polls += 1;
            Ok(polls == 5)
        });
        assert_eq!(waited, Ok(()));
        assert_eq!(polls, 5);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_stall_becomes_an_error_at_the_limit() {
        let limit = Duration::from_millis(50);
        let started = Instant::now();
        let mut polls = 0;
        let waited = wait_within::<()>(limit, || {
            polls += 1;
            Ok(false)
        });
        let elapsed = started.elapsed();
        assert_eq!(waited, Err(Wait::TimedOut(limit)));
        assert!(elapsed >= limit, "{elapsed:?}");
        assert!(elapsed < Duration::from_secs(5), "{elapsed:?}");
        assert!(polls >= 2, "asked again at the limit: {polls}");
        assert!(timeout_message(limit).contains("host timeout of 50ms"));
    }

    #[test]
    fn a_failed_poll_is_returned_as_it_is() {
        assert_eq!(
            wait_within(Duration::from_secs(10), || Err::<bool, _>("device lost")),
            Err(Wait::Failed("device lost"))
        );
    }
}
