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
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

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
        Ring { buf: VecDeque::with_capacity(cap.min(64 * 1024)), cap }
    }

    pub fn push(&mut self, data: &[u8]) {
        let data = if data.len() > self.cap { &data[data.len() - self.cap..] } else { data };
        let over = (self.buf.len() + data.len()).saturating_sub(self.cap);
        self.buf.drain(..over);
        self.buf.extend(data);
    }

    pub fn contents(&self) -> Vec<u8> {
        self.buf.iter().copied().collect()
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
        Ok(RotatingLog { path, file, size, max, keep })
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
            self.file = OpenOptions::new().create(true).append(true).open(&self.path)?;
        }
        self.size = 0;
        Ok(())
    }
}

/// One board's capture, shared by its sessions, its drain and readers.
#[derive(Debug)]
pub struct Capture {
    pub config: ConsoleConfig,
    inner: Mutex<(Ring, Option<RotatingLog>)>,
    live: broadcast::Sender<Arc<[u8]>>,
}

impl Capture {
    pub fn new(config: ConsoleConfig) -> Capture {
        let log = config.log.clone().and_then(|p| match RotatingLog::open(p.clone(), config.log_max, config.log_keep) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!("can't open console log {}: {e}", p.display());
                None
            }
        });
        let (live, _) = broadcast::channel(64);
        Capture { inner: Mutex::new((Ring::new(config.ring), log)), config, live }
    }

    /// Records what the board sent.
    pub fn record(&self, data: &[u8]) {
        let mut g = self.inner.lock().unwrap();
        g.0.push(data);
        if let Some(log) = &mut g.1 {
            if let Err(e) = log.write(data) {
                tracing::warn!("console log: {e}");
                g.1 = None;
            }
        }
        drop(g);
        if self.live.receiver_count() > 0 {
            let _ = self.live.send(Arc::from(data));
        }
    }

    /// The ring's contents, and a receiver for what comes next.
    pub fn snapshot(&self) -> (Vec<u8>, broadcast::Receiver<Arc<[u8]>>) {
        let g = self.inner.lock().unwrap();
        (g.0.contents(), self.live.subscribe())
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
}
