//! Console capture: a ring of what a board sent, an optional log file with
//! size-based rotation, and live followers.
//!
//! The ring is bounded (default 256 KiB): old bytes fall off the front. The
//! log rotates to `FILE.1` … `FILE.N` when it passes its size. Followers get
//! chunks through a bounded broadcast channel; one that falls behind skips
//! ahead instead of holding memory.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::broadcast;

/// When the broker reads a board's console.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// While a client is attached.
    #[default]
    Session,
    /// Always: the broker keeps the port open and drains it between sessions.
    Always,
}

/// A board's console settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleConfig {
    /// The tty captured (the board's first by default).
    pub tty: String,
    pub mode: Mode,
    pub ring: usize,
    pub log: Option<PathBuf>,
    pub log_max: u64,
    pub log_keep: u32,
}

pub const DEFAULT_RING: usize = 256 * 1024;
pub const DEFAULT_LOG_MAX: u64 = 1024 * 1024;
pub const DEFAULT_LOG_KEEP: u32 = 3;

/// A bounded byte ring.
#[derive(Debug)]
pub struct Ring {
    buf: VecDeque<u8>,
    cap: usize,
}

impl Ring {
    pub fn new(cap: usize) -> Ring {
        Ring {
            buf: VecDeque::with_capacity(cap.min(64 * 1024)),
            cap,
        }
    }

    pub fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.cap {
            &data[data.len() - self.cap..]
        } else {
            data
        };
        let over = (self.buf.len() + data.len()).saturating_sub(self.cap);
        self.buf.drain(..over);
        self.buf.extend(data);
    }

    pub fn contents(&self) -> Vec<u8> {
        self.buf.iter().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// An append-only log that rotates by size.
#[derive(Debug)]
pub struct RotatingLog {
    path: PathBuf,
    file: File,
    size: u64,
    max: u64,
    keep: u32,
}

impl RotatingLog {
    pub fn open(path: PathBuf, max: u64, keep: u32) -> io::Result<RotatingLog> {
        if let Some(d) = path.parent() {
            fs::create_dir_all(d)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        let size = file.metadata()?.len();
        Ok(RotatingLog {
            path,
            file,
            size,
            max,
            keep,
        })
    }

    fn numbered(&self, n: u32) -> PathBuf {
        PathBuf::from(format!("{}.{n}", self.path.display()))
    }

    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if self.size + data.len() as u64 > self.max && self.size > 0 {
            self.rotate()?;
        }
        self.file.write_all(data)?;
        self.size += data.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        if self.keep == 0 {
            self.file.set_len(0)?;
        } else {
            let _ = fs::remove_file(self.numbered(self.keep));
            for n in (1..self.keep).rev() {
                let _ = fs::rename(self.numbered(n), self.numbered(n + 1));
            }
            fs::rename(&self.path, self.numbered(1))?;
            self.file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }
}

/// A chunk of console output and where it starts in the board's stream
/// (bytes recorded since the broker started).
pub type Chunk = (u64, Arc<[u8]>);

/// How long a log that failed to write waits before it is tried again.
const LOG_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Where a capture's log stands.
#[derive(Debug)]
enum Sink {
    Open(RotatingLog),
    /// It failed: tried again from then on.
    Down(Instant),
}

/// The log file of a capture, kept trying after a failure (a full disk):
/// what could not be written is counted and noted in the log once it works
/// again.
#[derive(Debug)]
struct LogFile {
    path: PathBuf,
    max: u64,
    keep: u32,
    sink: Sink,
    /// Bytes lost since the last failure.
    lost: u64,
}

impl LogFile {
    fn new(path: PathBuf, max: u64, keep: u32) -> LogFile {
        let sink = match RotatingLog::open(path.clone(), max, keep) {
            Ok(l) => Sink::Open(l),
            Err(e) => Self::down(&path, &e),
        };
        LogFile {
            path,
            max,
            keep,
            sink,
            lost: 0,
        }
    }

    /// A log that just failed, said once.
    fn down(path: &Path, e: &io::Error) -> Sink {
        tracing::warn!(
            "console log {}: {e}; keeping what comes in the ring and trying again every {}s",
            path.display(),
            LOG_RETRY.as_secs()
        );
        Sink::Down(Instant::now() + LOG_RETRY)
    }

    fn write(&mut self, data: &[u8]) {
        if let Sink::Down(at) = self.sink {
            let now = Instant::now();
            let reopened = if now < at {
                None
            } else {
                RotatingLog::open(self.path.clone(), self.max, self.keep).ok()
            };
            match reopened {
                Some(l) => self.sink = Sink::Open(l),
                None => {
                    // Still failing: not said again, tried again later.
                    if now >= at {
                        self.sink = Sink::Down(now + LOG_RETRY);
                    }
                    self.lost += data.len() as u64;
                    return;
                }
            }
        }
        let Sink::Open(log) = &mut self.sink else {
            return;
        };
        let mut r = Ok(());
        if self.lost > 0 {
            let note = format!(
                "\n[devbroker: {} bytes of console output could not be logged]\n",
                self.lost
            );
            r = log.write(note.as_bytes());
            if r.is_ok() {
                tracing::info!(
                    "console log {} works again ({} bytes were lost)",
                    self.path.display(),
                    self.lost
                );
                self.lost = 0;
            }
        }
        if let Err(e) = r.and_then(|()| log.write(data)) {
            self.sink = Self::down(&self.path, &e);
            self.lost += data.len() as u64;
        }
    }
}

#[derive(Debug)]
struct Recorded {
    ring: Ring,
    log: Option<LogFile>,
    /// Bytes recorded since the broker started: the ring holds the last
    /// `ring.len()` of them.
    total: u64,
}

/// One board's capture, shared by its sessions, its drain and readers.
///
/// Readers other than the admin see only what was printed from a given
/// point of the stream on (their lease's start): [`Capture::snapshot_since`]
/// and the stream position of each [`Chunk`].
#[derive(Debug)]
pub struct Capture {
    pub config: ConsoleConfig,
    inner: Mutex<Recorded>,
    live: broadcast::Sender<Chunk>,
}

impl Capture {
    pub fn new(config: ConsoleConfig) -> Capture {
        let log = config
            .log
            .clone()
            .map(|p| LogFile::new(p, config.log_max, config.log_keep));
        let (live, _) = broadcast::channel(64);
        Capture {
            inner: Mutex::new(Recorded {
                ring: Ring::new(config.ring),
                log,
                total: 0,
            }),
            config,
            live,
        }
    }

    /// Records what the board sent.
    pub fn record(&self, data: &[u8]) {
        let mut g = self.inner.lock().unwrap();
        let at = g.total;
        g.total += data.len() as u64;
        g.ring.push(data);
        if let Some(log) = &mut g.log {
            log.write(data);
        }
        drop(g);
        if self.live.receiver_count() > 0 {
            let _ = self.live.send((at, Arc::from(data)));
        }
    }

    /// How many bytes were recorded so far: where a lease starting now
    /// starts reading.
    pub fn total(&self) -> u64 {
        self.inner.lock().unwrap().total
    }

    /// What the ring holds from stream position `from` on, and a receiver
    /// for what comes next.
    pub fn snapshot_since(&self, from: u64) -> (Vec<u8>, broadcast::Receiver<Chunk>) {
        let g = self.inner.lock().unwrap();
        let held = g.ring.len() as u64;
        let start = g.total - held;
        let skip = from.saturating_sub(start).min(held) as usize;
        let mut out = g.ring.contents();
        out.drain(..skip);
        (out, self.live.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_keeps_the_newest_bytes() {
        let mut r = Ring::new(8);
        r.push(b"hello ");
        r.push(b"world");
        assert_eq!(r.contents(), b"lo world");
        r.push(b"0123456789abc");
        assert_eq!(r.contents(), b"56789abc");
    }

    #[test]
    fn log_rotates_by_size() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("b.log");
        let mut l = RotatingLog::open(p.clone(), 10, 2).unwrap();
        for chunk in [&b"0123456"[..], b"789ab", b"cdefghi", b"jk"] {
            l.write(chunk).unwrap();
        }
        assert_eq!(fs::read(&p).unwrap(), b"cdefghijk");
        assert_eq!(fs::read(format!("{}.1", p.display())).unwrap(), b"789ab");
        assert_eq!(fs::read(format!("{}.2", p.display())).unwrap(), b"0123456");
        l.write(b"0123456789").unwrap();
        assert!(!d.path().join("b.log.3").exists(), "keeps 2");
    }

    fn console(ring: usize, log: Option<PathBuf>) -> ConsoleConfig {
        ConsoleConfig {
            tty: "console".into(),
            mode: Mode::Session,
            ring,
            log,
            log_max: DEFAULT_LOG_MAX,
            log_keep: DEFAULT_LOG_KEEP,
        }
    }

    #[test]
    fn readers_see_from_their_start_on() {
        let c = Capture::new(console(8, None));
        c.record(b"abc");
        let from = c.total();
        assert_eq!(from, 3);
        let (ring, mut rx) = c.snapshot_since(from);
        assert!(ring.is_empty(), "what came before is not theirs");
        c.record(b"defgh");
        let (at, chunk) = rx.try_recv().unwrap();
        assert_eq!((at, &chunk[..]), (3, &b"defgh"[..]));
        assert_eq!(c.snapshot_since(from).0, b"defgh");
        assert_eq!(c.snapshot_since(0).0, b"abcdefgh", "the admin sees all");
        c.record(b"ijk");
        // The ring dropped "abc": what is left from 3 on.
        assert_eq!(c.snapshot_since(from).0, b"defghijk");
        assert_eq!(c.snapshot_since(9).0, b"jk");
        assert!(c.snapshot_since(100).0.is_empty());
    }

    /// A log that could not be written (a full disk, a missing directory)
    /// is tried again, and says how much it missed.
    #[test]
    fn a_failed_log_is_tried_again() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("logs");
        fs::write(&dir, b"not a directory").unwrap();
        let p = dir.join("b.log");
        let c = Capture::new(console(64, Some(p.clone())));
        c.record(b"lost ");
        fs::remove_file(&dir).unwrap();
        // Not before the retry time...
        c.record(b"also lost ");
        assert!(!p.exists());
        c.inner.lock().unwrap().log.as_mut().unwrap().sink = Sink::Down(Instant::now());
        c.record(b"kept");
        let text = fs::read_to_string(&p).unwrap();
        assert_eq!(
            text,
            "\n[devbroker: 15 bytes of console output could not be logged]\nkept"
        );
        c.record(b" more");
        assert!(fs::read_to_string(&p).unwrap().ends_with("kept more"));
    }
}
