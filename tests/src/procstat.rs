//! What the kernel says about a running process, for the benchmarks: CPU
//! time, context switches, memory and descriptors, read from `/proc`.
//!
//! Per-thread figures are summed over `/proc/PID/task/*`: the broker and
//! devshim run tokio, and a wakeup of any thread is a wakeup. A thread that
//! exited during a measurement takes its counts with it; the relays keep
//! their threads for the whole of a run, so that does not happen here.

use std::fs;

/// The threads of `pid`, as `/proc/PID/task/TID` paths.
fn tasks(pid: i32) -> Vec<std::path::PathBuf> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

/// Nanoseconds `pid`'s threads have spent on a CPU (`schedstat`'s first
/// field): exact, where `/proc/PID/stat` counts 10 ms ticks, too coarse
/// for a relay that needs a few milliseconds per MiB.
pub fn cpu_ns(pid: i32) -> u64 {
    tasks(pid)
        .iter()
        .filter_map(|t| fs::read_to_string(t.join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// CPU seconds of several processes together.
pub fn cpu_seconds(pids: &[i32]) -> f64 {
    pids.iter().map(|&p| cpu_ns(p)).sum::<u64>() as f64 / 1e9
}

/// Voluntary plus involuntary context switches of `pid`'s threads: each is
/// a time a thread went to sleep or was put aside, so an idle process that
/// never wakes keeps this number still.
pub fn switches(pid: i32) -> u64 {
    tasks(pid)
        .iter()
        .filter_map(|t| fs::read_to_string(t.join("status")).ok())
        .map(|s| {
            s.lines()
                .filter_map(|l| {
                    l.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                })
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .sum::<u64>()
        })
        .sum()
}

/// Context switches of several processes together.
pub fn switches_of(pids: &[i32]) -> u64 {
    pids.iter().map(|&p| switches(p)).sum()
}

/// Resident memory of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: i32) -> u64 {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Open descriptors of `pid`.
pub fn fd_count(pid: i32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| rd.count())
        .unwrap_or(0)
}

/// The 1-minute load average, to print beside figures taken on a shared
/// machine.
pub fn loadavg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// The `p`-th percentile (0..=100) of `samples`, which it sorts.
pub fn percentile(samples: &mut [f64], p: usize) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(|a, b| a.total_cmp(b));
    samples[(samples.len() * p / 100).min(samples.len() - 1)]
}

/// The median of `values` (the mean of the two middle ones for an even
/// count), which it sorts.
pub fn median(values: &mut [f64]) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}
