//! Warnings a peer can cause, kept from flooding the broker's log.
//!
//! A client that sends a megabyte of malformed commands, or a flood of
//! connections past the descriptor limit, must not turn each into a line of
//! the log: the first few are logged, the rest are counted and summed up
//! (when the connection ends, or once per window).

use std::time::{Duration, Instant};

/// ", and N more like it" for a warning that held others back.
pub fn held_back(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(" (and {n} more like it not logged)")
    }
}

/// A budget of warnings.
#[derive(Debug)]
pub struct Throttle {
    budget: u32,
    left: u32,
    /// With a window, the budget comes back each window.
    window: Option<(Duration, Instant)>,
    suppressed: u64,
}

impl Throttle {
    /// `budget` warnings for the whole life of a connection.
    pub fn per_connection(budget: u32) -> Throttle {
        Throttle {
            budget,
            left: budget,
            window: None,
            suppressed: 0,
        }
    }

    /// `budget` warnings per `window`.
    pub fn per_window(budget: u32, window: Duration) -> Throttle {
        Throttle {
            budget,
            left: budget,
            window: Some((window, Instant::now())),
            suppressed: 0,
        }
    }

    /// Whether this warning may be logged. When a window begins anew, the
    /// count of those held back in the last one comes with it.
    pub fn allow(&mut self) -> Option<u64> {
        if let Some((len, start)) = &mut self.window {
            if start.elapsed() >= *len {
                *start = Instant::now();
                self.left = self.budget;
            }
        }
        if self.left > 0 {
            self.left -= 1;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// How many were held back and not yet reported.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_gets_its_budget_then_a_count() {
        let mut t = Throttle::per_connection(2);
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), Some(0));
        for _ in 0..100_000 {
            assert_eq!(t.allow(), None);
        }
        assert_eq!(t.suppressed(), 100_000);
    }

    #[test]
    fn a_window_refills_and_reports_what_it_held_back() {
        let mut t = Throttle::per_window(1, Duration::ZERO);
        assert_eq!(t.allow(), Some(0));
        let mut t = Throttle::per_window(1, Duration::from_secs(3600));
        assert_eq!(t.allow(), Some(0));
        assert_eq!(t.allow(), None);
        assert_eq!(t.allow(), None);
        t.window = Some((
            Duration::from_secs(3600),
            Instant::now() - Duration::from_secs(3601),
        ));
        assert_eq!(t.allow(), Some(2));
    }
}
