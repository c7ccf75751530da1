//! Request budgets: so many requests a minute (a token bucket: the first N of a burst pass,
//! then one more every 60/N seconds) and so many in all, counted per run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The limits one table of a policy file sets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub requests_per_minute: Option<u32>,
    pub max_requests: Option<u64>,
    pub max_body_bytes: Option<u64>,
}

impl Limits {
    pub fn counts_requests(&self) -> bool {
        self.requests_per_minute.is_some() || self.max_requests.is_some()
    }
}

/// One budget's counters, named after where it was set (for the 429's message).
#[derive(Debug)]
pub struct Budget {
    pub name: String,
    per_minute: Option<(u32, Mutex<Bucket>)>,
    total: Option<(u64, AtomicU64)>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Which limit a request went over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    PerMinute(u32),
    Total(u64),
}

impl Budget {
    pub fn new(name: String, limits: &Limits) -> Budget {
        Budget {
            name,
            per_minute: limits.requests_per_minute.map(|n| {
                (
                    n,
                    Mutex::new(Bucket {
                        tokens: f64::from(n),
                        at: Instant::now(),
                    }),
                )
            }),
            total: limits.max_requests.map(|n| (n, AtomicU64::new(0))),
        }
    }

    /// Count one request, or say which limit it is over (an over-budget request is not
    /// counted against the total).
    pub fn charge(&self, now: Instant) -> Result<(), Over> {
        if let Some((limit, used)) = &self.total {
            if used.load(Ordering::Relaxed) >= *limit {
                return Err(Over::Total(*limit));
            }
        }
        if let Some((per_minute, bucket)) = &self.per_minute {
            let mut b = bucket.lock().unwrap_or_else(|p| p.into_inner());
            let refill =
                now.saturating_duration_since(b.at).as_secs_f64() * f64::from(*per_minute) / 60.0;
            b.tokens = (b.tokens + refill).min(f64::from(*per_minute));
            b.at = now;
            if b.tokens < 1.0 {
                return Err(Over::PerMinute(*per_minute));
            }
            b.tokens -= 1.0;
        }
        if let Some((limit, used)) = &self.total {
            // Two requests racing for the last one: the loser is over.
            if used.fetch_add(1, Ordering::Relaxed) >= *limit {
                return Err(Over::Total(*limit));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_minute_budget_lets_a_burst_through_then_refills() {
        let b = Budget::new(
            "t".into(),
            &Limits {
                requests_per_minute: Some(3),
                ..Limits::default()
            },
        );
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(b.charge(t0), Ok(()));
        }
        assert_eq!(b.charge(t0), Err(Over::PerMinute(3)));
        assert_eq!(
            b.charge(t0 + Duration::from_secs(10)),
            Err(Over::PerMinute(3))
        );
        assert_eq!(b.charge(t0 + Duration::from_secs(21)), Ok(()));
    }

    #[test]
    fn a_total_is_a_total() {
        let b = Budget::new(
            "t".into(),
            &Limits {
                max_requests: Some(2),
                ..Limits::default()
            },
        );
        let now = Instant::now();
        assert_eq!(b.charge(now), Ok(()));
        assert_eq!(b.charge(now), Ok(()));
        assert_eq!(b.charge(now), Err(Over::Total(2)));
        assert_eq!(
            b.charge(now + Duration::from_secs(3600)),
            Err(Over::Total(2))
        );
    }
}
