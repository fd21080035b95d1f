//! Named line sequences (`reset`, `bootloader`, or any name) run on the host
//! next to the port, so their timing doesn't cross a container and a socket.
//!
//! A sequence is plain text, steps separated by spaces or commas:
//! `dtr=0 rts=1 sleep=100ms dtr=1 rts=0 sleep=50ms dtr=0`, with
//! `dtr=0|1`, `rts=0|1`, `break=DURATION`, `baud=N` and `sleep=DURATION`.
//! Steps are timed against one start instant, so delays don't accumulate.

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

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
    ("esp32-bootloader", "dtr=0 rts=1 sleep=100ms dtr=1 rts=0 sleep=50ms dtr=0"),
    ("esp32-reset", "rts=1 sleep=100ms rts=0"),
    ("usb-jtag-bootloader", "rts=0 dtr=0 sleep=100ms dtr=1 rts=0 sleep=100ms rts=1 dtr=0 rts=1 sleep=100ms dtr=0 rts=0"),
    ("usb-jtag-reset", "rts=0 dtr=0 rts=1 sleep=100ms rts=0"),
];

/// Parses a duration like `250ms`, `1s`, `500us`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{s:?} is not a duration like 100ms"))?;
    let d = match unit {
        "us" => Duration::from_micros(n),
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        _ => return Err(format!("{s:?} is not a duration like 100ms (units: us, ms, s)")),
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
            "baud" => Step::Baud(v.parse().ok().filter(|b| (50..=20_000_000).contains(b)).ok_or_else(|| format!("step {word:?}: baud takes a rate like 115200"))?),
            _ => return Err(format!("step {word:?}: unknown key {k:?} (dtr, rts, break, baud, sleep)")),
        });
        if steps.len() > 256 {
            return Err("a sequence has at most 256 steps".into());
        }
    }
    if steps.is_empty() {
        return Err("the sequence is empty".into());
    }
    Ok(steps)
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

fn modem(fd: RawFd, bit: libc::c_int, on: bool) -> io::Result<()> {
    let req = if on { libc::TIOCMBIS } else { libc::TIOCMBIC };
    // SAFETY: TIOCMBIS/TIOCMBIC read one int.
    if unsafe { libc::ioctl(fd, req, &bit) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sleeps until `t`: the kernel's sleep up to a little before, then a short
/// spin, so a step lands within tens of microseconds of its time.
fn sleep_until(t: Instant) {
    const SPIN: Duration = Duration::from_micros(200);
    let now = Instant::now();
    if t > now + SPIN {
        std::thread::sleep(t - now - SPIN);
    }
    while Instant::now() < t {
        std::hint::spin_loop();
    }
}

/// Makes the calling thread's timers exact and, where allowed (root),
/// schedules it ahead of ordinary work for the sequence's short life.
/// Returns the policy to restore.
fn realtime_begin() -> Option<(libc::c_int, libc::sched_param)> {
    // SAFETY: prctl and sched_* on the calling thread with valid arguments.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1, 0, 0, 0);
        let old_policy = libc::sched_getscheduler(0);
        let mut old: libc::sched_param = std::mem::zeroed();
        libc::sched_getparam(0, &mut old);
        let p = libc::sched_param { sched_priority: 10 };
        if libc::sched_setscheduler(0, libc::SCHED_FIFO, &p) == 0 {
            Some((old_policy, old))
        } else {
            None
        }
    }
}

fn realtime_end(old: Option<(libc::c_int, libc::sched_param)>) {
    if let Some((policy, param)) = old {
        // SAFETY: restores what realtime_begin read.
        unsafe { libc::sched_setscheduler(0, policy, &param) };
    }
}

/// Runs the steps on an open port; blocking (run it off the async threads).
/// A device without modem lines (a pty) fails DTR/RTS with `ENOTTY`:
/// `tolerate_enotty` keeps going, for fake boards.
pub fn run(fd: RawFd, steps: &[Step], tolerate_enotty: bool) -> io::Result<Vec<Timing>> {
    let old = realtime_begin();
    let r = run_steps(fd, steps, tolerate_enotty);
    realtime_end(old);
    r
}

fn run_steps(fd: RawFd, steps: &[Step], tolerate_enotty: bool) -> io::Result<Vec<Timing>> {
    let ok = |r: io::Result<()>| match r {
        Err(e) if tolerate_enotty && e.raw_os_error() == Some(libc::ENOTTY) => Ok(()),
        other => other,
    };
    let start = Instant::now();
    let mut nominal = Duration::ZERO;
    let mut out = Vec::with_capacity(steps.len());
    for s in steps {
        let due = start + nominal;
        sleep_until(due);
        let late = Instant::now().saturating_duration_since(due);
        match s {
            Step::Dtr(on) => ok(modem(fd, libc::TIOCM_DTR, *on))?,
            Step::Rts(on) => ok(modem(fd, libc::TIOCM_RTS, *on))?,
            Step::Break(d) => {
                // SAFETY: TIOCSBRK/TIOCCBRK take no argument.
                if unsafe { libc::ioctl(fd, libc::TIOCSBRK, 0) } < 0 {
                    ok(Err(io::Error::last_os_error()))?;
                }
                nominal += *d;
                sleep_until(start + nominal);
                // SAFETY: as above.
                unsafe { libc::ioctl(fd, libc::TIOCCBRK, 0) };
            }
            Step::Baud(b) => {
                let mut t = termios::get(fd)?;
                termios::set_baud(&mut t, *b);
                termios::set(fd, &t, When::AfterDrain)?;
            }
            Step::Sleep(d) => nominal += *d,
        }
        if !matches!(s, Step::Sleep(_)) {
            out.push(Timing { step: describe(s), nominal: due - start, late_us: late.as_secs_f64() * 1e6 });
        }
    }
    sleep_until(start + nominal);
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
            vec![Step::Dtr(false), Step::Rts(true), Step::Sleep(Duration::from_millis(100)), Step::Break(Duration::from_millis(250)), Step::Baud(921600)]
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
    }
}
