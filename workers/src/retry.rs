//! The retry schedule: how long a job waits before its next attempt.
//!
//! Delays grow exponentially with jitter, set per queue (`[queues.NAME.retry]`): the wait
//! after attempt `n` is `initial_delay · multiplier^(n-1)`, capped at `max_delay`, then drawn
//! uniformly within ±`jitter` of that (so jobs that failed together do not all return at once).
//! The wait itself happens in the broker's delay queues (`warren_core::delay`), never in a
//! worker, so a waiting job holds no worker slot and survives worker restarts.

use std::time::Duration;

use rand::Rng;
use warren_core::config::RetryConfig;

/// What to do after attempt `attempt` failed with a retryable error.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Next {
    /// Run attempt `attempt` after `delay`.
    Retry { attempt: u32, delay: Duration },
    /// No attempts left.
    GiveUp,
}

/// Decides the next step after attempt `attempt` (1-based) failed.
pub fn next(retry: &RetryConfig, attempt: u32) -> Next {
    if attempt >= retry.max_attempts {
        return Next::GiveUp;
    }
    Next::Retry {
        attempt: attempt + 1,
        delay: delay_after(retry, attempt),
    }
}

/// The jittered delay after attempt `attempt` failed.
pub fn delay_after(retry: &RetryConfig, attempt: u32) -> Duration {
    let exponent = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
    let base = retry.initial_delay.as_secs_f64() * retry.multiplier.powi(exponent);
    let capped = base.min(retry.max_delay.as_secs_f64());
    let spread = capped * retry.jitter.clamp(0.0, 1.0);
    let seconds = match spread > 0.0 {
        true => rand::thread_rng().gen_range(capped - spread..=capped + spread),
        false => capped,
    };
    Duration::try_from_secs_f64(seconds).unwrap_or(retry.max_delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(jitter: f64) -> RetryConfig {
        RetryConfig {
            max_attempts: 4,
            initial_delay: Duration::from_secs(1),
            multiplier: 2.0,
            max_delay: Duration::from_secs(5),
            jitter,
        }
    }

    #[test]
    fn delays_grow_exponentially_up_to_the_cap() {
        let retry = policy(0.0);
        assert_eq!(
            next(&retry, 1),
            Next::Retry {
                attempt: 2,
                delay: Duration::from_secs(1)
            }
        );
        assert_eq!(
            next(&retry, 2),
            Next::Retry {
                attempt: 3,
                delay: Duration::from_secs(2)
            }
        );
        assert_eq!(
            next(&retry, 3),
            Next::Retry {
                attempt: 4,
                delay: Duration::from_secs(4)
            }
        );
        assert_eq!(delay_after(&retry, 10), Duration::from_secs(5));
        assert_eq!(next(&retry, 4), Next::GiveUp);
    }

    #[test]
    fn jitter_spreads_delays_within_its_factor() {
        let retry = policy(0.5);
        let delays: Vec<f64> = (0..200)
            .map(|_| delay_after(&retry, 2).as_secs_f64())
            .collect();
        for d in &delays {
            assert!((1.0..=3.0).contains(d), "{d}");
        }
        // 200 draws from 1..3 s: ignoring the jitter (all 2 s) or shrinking it must fail. The
        // chance that uniform draws all miss a quarter of the range at either end is ~1e-25.
        let lowest = delays.iter().copied().fold(f64::MAX, f64::min);
        let highest = delays.iter().copied().fold(f64::MIN, f64::max);
        assert!(lowest < 1.5 && highest > 2.5, "{lowest}..{highest}");
        assert_eq!(delay_after(&policy(0.0), 2), Duration::from_secs(2));
    }

    #[test]
    fn one_attempt_means_no_retry() {
        let retry = RetryConfig {
            max_attempts: 1,
            ..policy(0.0)
        };
        assert_eq!(next(&retry, 1), Next::GiveUp);
    }
}
