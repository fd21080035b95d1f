//! What one client may take of the broker, so one tenant can't starve the
//! others: every machine (and every host user) gets the same allowance, and
//! whoever goes past it gets a clear refusal instead of a broker that stops
//! answering everyone.

use std::time::Duration;

/// Control connections one machine or host user may have open at once. A
/// job needs one per lease it holds or waits for, and devshim one more.
pub const CONTROL_CONNECTIONS: usize = 64;

/// Lease requests one machine or host user may have waiting at once.
pub const WAITING_LEASES: usize = 32;

/// Sequences one machine or host user may run at once.
pub const SEQUENCES: usize = 1;

/// The longest a sequence may last, all its steps together.
pub const SEQUENCE_TIME: Duration = Duration::from_secs(60);

/// Warnings one connection may cause in the broker's log (malformed
/// commands, say) before the rest are only counted, and summed up when it
/// ends.
pub const WARNINGS_PER_CONNECTION: u32 = 5;
