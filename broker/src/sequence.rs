//! Named line sequences (`reset`, `bootloader`, or any name) run on the host
//! next to the port, so their timing doesn't cross a container and a socket.
//!
//! A sequence is plain text, steps separated by spaces or commas:
//! `dtr=0 rts=1 sleep=100ms dtr=1 rts=0 sleep=50ms dtr=0`, with
//! `dtr=0|1`, `rts=0|1`, `break=DURATION`, `baud=N` and `sleep=DURATION`.
//! Steps are timed against one start instant, so delays don't accumulate.
//!
//! A sequence runs on a thread of its own and can be stopped at any time
//! ([`Stop`]): its lease ending, its connection closing or the broker
//! stopping ends it between steps, never minutes later. The thread sleeps
//! as any other until just before a step is due; only for that last moment
//! and the step itself does it take real-time priority (as root) and exact
//! timer slack, so a step lands within tens of microseconds of its time
//! without taking a core from anyone else.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::time::{clock_gettime, clock_nanosleep, ClockId, ClockNanosleepFlags};
use wire::termios::{self, When};

/// One step of a sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Dtr(bool),
    Rts(bool),
    Break(Duration),
    Baud(u32),
    Sleep(Duration),
}

/// Sequences every board has unless its config names its own of that name.
/// `esp32-bootloader` and `esp32-reset` are esptool's classic auto-reset
/// (DTR → IO0, RTS → EN through the usual two transistors);
/// `usb-jtag-bootloader` is its USB-Serial-JTAG reset (ESP32-S3/C3).
pub const BUILTINS: &[(&str, &str)] = &[
    (
        "esp32-bootloader",
        "dtr=0 rts=1 sleep=100ms dtr=1 rts=0 sleep=50ms dtr=0",
    ),
    ("esp32-reset", "rts=1 sleep=100ms rts=0"),
    (
        "usb-jtag-bootloader",
        "rts=0 dtr=0 sleep=100ms dtr=1 rts=0 sleep=100ms rts=1 dtr=0 rts=1 sleep=100ms dtr=0 rts=0",
    ),
    ("usb-jtag-reset", "rts=0 dtr=0 rts=1 sleep=100ms rts=0"),
];

/// Parses a duration like `250ms`, `1s`, `500us`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 100ms"))?;
    let d = match unit {
        "us" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        _ => {
            return Err(format!(
                "{s:?} is not a duration like 100ms (units: us, ms, s)"
            ))
        }
    };
    if d > Duration::from_secs(60) {
        return Err(format!("{s:?} is longer than a minute"));
    }
    Ok(d)
}

/// Parses a sequence's text.
pub fn parse(text: &str) -> Result<Vec<Step>, String> {
    let mut steps = Vec::new();
    for word in text.split([' ', ',', '\t', '\n']).filter(|w| !w.is_empty()) {
        let (k, v) = word.split_once('=').ok_or_else(|| format!("step {word:?} is not KEY=VALUE (dtr=0, rts=1, break=250ms, baud=115200, sleep=100ms)"))?;
        let bit = |v: &str| match v {
            "0" | "off" => Ok(false),
            "1" | "on" => Ok(true),
            _ => Err(format!("step {word:?}: {k} takes 0 or 1")),
        };
        steps.push(match k {
            "dtr" => Step::Dtr(bit(v)?),
            "rts" => Step::Rts(bit(v)?),
            "break" => Step::Break(parse_duration(v)?),
            "sleep" => Step::Sleep(parse_duration(v)?),
            "baud" => Step::Baud(
                v.parse()
                    .ok()
                    .filter(|b| (50..=20_000_000).contains(b))
                    .ok_or_else(|| format!("step {word:?}: baud takes a rate like 115200"))?,
            ),
            _ => {
                return Err(format!(
                    "step {word:?}: unknown key {k:?} (dtr, rts, break, baud, sleep)"
                ))
            }
        });
        if steps.len() > 256 {
            return Err("a sequence has at most 256 steps".into());
        }
    }
    if steps.is_empty() {
        return Err("the sequence is empty".into());
    }
    let total: Duration = steps
        .iter()
        .map(|s| match s {
            Step::Sleep(d) | Step::Break(d) => *d,
            _ => Duration::ZERO,
        })
        .sum();
    if total > crate::limits::SEQUENCE_TIME {
        return Err(format!(
            "the sequence lasts {} in all; the limit is {}",
            humantime::format_duration(total),
            humantime::format_duration(crate::limits::SEQUENCE_TIME)
        ));
    }
    Ok(steps)
}

/// Stops a running sequence from another thread.
#[derive(Debug, Default)]
pub struct Stop {
    stopped: Mutex<bool>,
    wake: Condvar,
}

impl Stop {
    /// Makes the sequence stop before its next step.
    pub fn stop(&self) {
        *self.stopped.lock().unwrap() = true;
        self.wake.notify_all();
    }

    /// Sleeps until `t`, or until stopped: false then.
    fn sleep_until(&self, t: Instant) -> bool {
        let mut stopped = self.stopped.lock().unwrap();
        loop {
            if *stopped {
                return false;
            }
            let now = Instant::now();
            if now >= t {
                return true;
            }
            stopped = self.wake.wait_timeout(stopped, t - now).unwrap().0;
        }
    }
}

/// The error a stopped sequence ends with.
fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "the sequence was stopped")
}

/// When each step ran, relative to its nominal time.
#[derive(Debug, Clone, PartialEq)]
pub struct Timing {
    pub step: String,
    /// Nominal start, from the sequence's start.
    pub nominal: Duration,
    /// How late it started (µs).
    pub late_us: f64,
}

/// How long before a step the thread stops sleeping as any thread does and
/// waits for the exact time with real-time priority.
const EDGE_LEAD: Duration = Duration::from_micros(300);

/// Real-time priority for the moment around one step's edge: taken just
/// before the last, exact sleep and given back after the step.
struct Edge {
    old: Option<(libc::c_int, libc::sched_param)>,
}

impl Edge {
    fn begin() -> Edge {
        // SAFETY: sched_* on the calling thread with valid arguments.
        unsafe {
            let old_policy = libc::sched_getscheduler(0);
            let mut old: libc::sched_param = std::mem::zeroed();
            libc::sched_getparam(0, &mut old);
            let p = libc::sched_param { sched_priority: 10 };
            let ok = old_policy != libc::SCHED_FIFO
                && libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) == 0;
            Edge {
                old: ok.then_some((old_policy, old)),
            }
        }
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        if let Some((policy, param)) = self.old {
            // SAFETY: restores what Edge::begin read.
            unsafe { libc::sched_setscheduler(0, policy, &param) };
        }
    }
}

/// Waits until the step due at `start + at`: an ordinary, stoppable sleep
/// up to [`EDGE_LEAD`] before, then an exact absolute sleep on the monotonic
/// clock with real-time priority, which the returned [`Edge`] holds until
/// the step is done.
fn until_edge(stop: &Stop, start: Instant, start_ts: TimeSpec, at: Duration) -> io::Result<Edge> {
    let due = start + at;
    if !stop.sleep_until(due.checked_sub(EDGE_LEAD).unwrap_or(start).max(start)) {
        return Err(stopped());
    }
    let edge = Edge::begin();
    let ts = start_ts + TimeSpec::from_duration(at);
    // An absolute sleep on the monotonic clock; EINTR just wakes early and
    // is retried.
    while clock_nanosleep(
        ClockId::CLOCK_MONOTONIC,
        ClockNanosleepFlags::TIMER_ABSTIME,
        &ts,
    ) == Err(nix::errno::Errno::EINTR)
    {}
    Ok(edge)
}

/// Runs the steps on an open port; blocking (run it on a thread of its
/// own). A device without modem lines (a pty) fails DTR/RTS with `ENOTTY`:
/// `tolerate_enotty` keeps going, for fake boards. Stopped through `stop`,
/// it returns an `Interrupted` error before the next step.
pub fn run(
    port: BorrowedFd<'_>,
    steps: &[Step],
    tolerate_enotty: bool,
    stop: &Stop,
) -> io::Result<Vec<Timing>> {
    // Exact timer slack for this thread; harmless to others.
    let _ = nix::sys::prctl::set_timerslack(1);
    let fd = port;
    let ok = |r: io::Result<()>| match r {
        Err(e) if tolerate_enotty && e.raw_os_error() == Some(libc::ENOTTY) => Ok(()),
        other => other,
    };
    let start_ts = clock_gettime(ClockId::CLOCK_MONOTONIC).map_err(io::Error::from)?;
    let start = Instant::now();
    let mut nominal = Duration::ZERO;
    let mut out = Vec::with_capacity(steps.len());
    for s in steps {
        if let Step::Sleep(d) = s {
            nominal += *d;
            continue;
        }
        let edge = until_edge(stop, start, start_ts, nominal)?;
        let due = start + nominal;
        let late = Instant::now().saturating_duration_since(due);
        match s {
            Step::Dtr(on) => ok(termios::set_modem_lines(fd, libc::TIOCM_DTR, *on))?,
            Step::Rts(on) => ok(termios::set_modem_lines(fd, libc::TIOCM_RTS, *on))?,
            Step::Break(d) => {
                ok(termios::set_break(fd, true))?;
                drop(edge);
                nominal += *d;
                // Stopped or not, a break started is ended.
                let end = until_edge(stop, start, start_ts, nominal);
                let _ = termios::set_break(fd, false);
                end?;
            }
            Step::Baud(b) => {
                drop(edge);
                let mut t = termios::get(fd)?;
                termios::set_baud(&mut t, *b);
                termios::set(fd, &t, When::AfterDrain)?;
            }
            Step::Sleep(_) => unreachable!("handled above"),
        }
        out.push(Timing {
            step: describe(s),
            nominal: due - start,
            late_us: late.as_secs_f64() * 1e6,
        });
    }
    if !stop.sleep_until(start + nominal) {
        return Err(stopped());
    }
    Ok(out)
}

fn describe(s: &Step) -> String {
    match s {
        Step::Dtr(b) => format!("dtr={}", *b as u8),
        Step::Rts(b) => format!("rts={}", *b as u8),
        Step::Break(d) => format!("break={}ms", d.as_millis()),
        Step::Baud(b) => format!("baud={b}"),
        Step::Sleep(d) => format!("sleep={}ms", d.as_millis()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_steps() {
        assert_eq!(
            parse("dtr=0 rts=1, sleep=100ms break=250ms baud=921600").unwrap(),
            vec![
                Step::Dtr(false),
                Step::Rts(true),
                Step::Sleep(Duration::from_millis(100)),
                Step::Break(Duration::from_millis(250)),
                Step::Baud(921600)
            ]
        );
        assert!(parse("dtr=2").unwrap_err().contains("takes 0 or 1"));
        assert!(parse("jump=1").unwrap_err().contains("unknown key"));
        assert!(parse("sleep=5").unwrap_err().contains("units"));
        assert!(parse("sleep=2h").is_err());
        assert!(parse("").unwrap_err().contains("empty"));
        assert!(parse("reset").unwrap_err().contains("KEY=VALUE"));
        for (name, text) in BUILTINS {
            assert!(parse(text).is_ok(), "{name}");
        }
        let e = parse("sleep=30s sleep=30s sleep=1ms").unwrap_err();
        assert!(e.contains("lasts 1m 1ms in all; the limit is 1m"), "{e}");
    }

    /// A stopped sequence ends at once, not when its sleeps run out, and a
    /// break it started is ended.
    #[test]
    fn stopping_ends_a_sequence_between_steps() {
        let (master, slave) = nix::pty::openpty(None, None)
            .map(|p| (p.master, p.slave))
            .unwrap();
        let stop = std::sync::Arc::new(Stop::default());
        let s2 = stop.clone();
        let t = std::thread::spawn(move || {
            let steps = parse("baud=9600 sleep=30s baud=19200").unwrap();
            use std::os::fd::AsFd;
            run(slave.as_fd(), &steps, true, &s2)
        });
        std::thread::sleep(Duration::from_millis(50));
        let t0 = Instant::now();
        stop.stop();
        let e = t.join().unwrap().unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Interrupted);
        assert!(t0.elapsed() < Duration::from_secs(10), "stopped mid-sleep");
        drop(master);
    }
}
