//! Exponential backoff between reconnects: doubles from `min` to `max`, reset once a
//! session got as far as streaming. Each wait is jittered to between half and all of its
//! step, so that fifty branches cut off by one outage do not all reach main in the same
//! second when it returns.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    /// xorshift64 state for the jitter (never 0).
    seed: u64,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        // A per-process random seed from the standard library's hasher keys.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(0x5eed);
        Backoff::with_seed(min, max, h.finish())
    }

    pub fn with_seed(min: Duration, max: Duration, seed: u64) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
            seed: seed.max(1),
        }
    }

    /// The next wait: this step jittered, then the step doubles (up to `max`).
    pub fn next_wait(&mut self) -> Duration {
        let step = self.next;
        self.next = (self.next * 2).min(self.max);
        self.jittered(step)
    }

    /// The longest wait, jittered (a link stopped on an error that needs a person).
    pub fn max(&mut self) -> Duration {
        self.jittered(self.max)
    }

    pub fn reset(&mut self) {
        self.next = self.min;
    }

    /// Between half and all of `step`.
    fn jittered(&mut self, step: Duration) -> Duration {
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let fraction = (self.seed >> 11) as f64 / (1u64 << 53) as f64;
        step / 2 + step.mul_f64(fraction / 2.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_and_resets_each_wait_between_half_and_all_of_its_step() {
        let mut b = Backoff::with_seed(Duration::from_millis(100), Duration::from_millis(350), 42);
        let steps = [100, 200, 350, 350];
        for step in steps {
            let w = b.next_wait().as_millis();
            assert!(w >= step / 2 && w <= step, "{w} for a step of {step}");
        }
        b.reset();
        let w = b.next_wait().as_millis();
        assert!((50..=100).contains(&w), "{w}");
    }

    #[test]
    fn two_sidecars_do_not_wait_the_same() {
        let waits = |seed| {
            let mut b = Backoff::with_seed(Duration::from_secs(10), Duration::from_secs(10), seed);
            (0..8).map(|_| b.next_wait()).collect::<Vec<_>>()
        };
        assert_ne!(waits(1), waits(2));
    }
}
