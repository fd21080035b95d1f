//! The test's shell in the guest: scripts go in over a serial port (ttyS1,
//! a unix socket on the host), their output and exit status come back.
//!
//! Each script is sent base64-encoded on one line, so any quoting or
//! heredoc survives the trip, and is followed by a marker command that
//! prints `@@ID STATUS` on a line of its own. The marker's ID is written as
//! `$((ID))` in the command, so an echo of the command itself can never be
//! mistaken for the marker.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// What a script printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub status: i32,
    /// stdout and stderr, interleaved as the guest wrote them.
    pub text: String,
}

/// A connected shell channel.
pub struct Shell {
    stream: UnixStream,
    buf: Vec<u8>,
    next_id: u64,
}

impl Shell {
    /// Connects to QEMU's socket for the guest's ttyS1 (retrying while QEMU starts).
    pub fn connect(path: &Path, limit: Duration) -> Result<Shell> {
        Ok(Shell {
            stream: connect(path, limit, "the guest shell's socket")?,
            buf: Vec::new(),
            next_id: 1,
        })
    }

    /// Waits until the guest's shell answers. Input sent before init opens
    /// ttyS1 is lost, so it pings every half second; `alive` says whether the
    /// guest can still come up (QEMU has not exited).
    pub fn wait_ready(
        &mut self,
        limit: Duration,
        mut alive: impl FnMut() -> bool,
    ) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            let id = self.id();
            self.send(&format!("printf '\\n@@%d %d\\n' $(({id})) 0\n"))?;
            let deadline = Instant::now() + Duration::from_millis(500);
            if self.read_marker(id, deadline)?.is_some() {
                break;
            }
            if !alive() {
                bail!("the guest stopped before its shell answered");
            }
            if t0.elapsed() > limit {
                bail!("the guest's shell did not answer within {limit:?}");
            }
        }
        let ready = t0.elapsed();
        // Replies to earlier pings may still come: a script's marker comes
        // after all of them, so one empty script leaves the channel clean.
        self.run(":", Duration::from_secs(10))?;
        Ok(ready)
    }

    /// Runs `script` in a subshell of the guest's PID 1 and returns its
    /// output and status. Background jobs must redirect their output, or it
    /// lands in a later script's output.
    pub fn run(&mut self, script: &str, limit: Duration) -> Result<Output> {
        let id = self.id();
        let line = format!(
            "( eval \"$(echo {} | base64 -d)\" ) </dev/null; printf '\\n@@%d %d\\n' $(({id})) $?\n",
            base64(script.as_bytes())
        );
        self.send(&line)?;
        match self.read_marker(id, Instant::now() + limit)? {
            Some(out) => Ok(out),
            None => bail!(
                "the guest script did not finish within {limit:?}; its output so far:\n{}\nscript:\n{script}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn send(&mut self, line: &str) -> Result<()> {
        self.stream
            .write_all(line.as_bytes())
            .context("writing to the guest shell")
    }

    /// Reads until the marker of `id`; returns what came before it, or
    /// `None` at the deadline (keeping what was read).
    fn read_marker(&mut self, id: u64, deadline: Instant) -> Result<Option<Output>> {
        let tag = format!("\n@@{id} ");
        loop {
            if let Some(at) = find(&self.buf, tag.as_bytes()) {
                let rest = &self.buf[at + tag.len()..];
                if let Some(nl) = rest.iter().position(|&b| b == b'\n') {
                    let status = String::from_utf8_lossy(&rest[..nl])
                        .trim()
                        .parse()
                        .unwrap_or(-1);
                    let text = String::from_utf8_lossy(&self.buf[..at]).into_owned();
                    self.buf.drain(..at + tag.len() + nl + 1);
                    return Ok(Some(Output { status, text }));
                }
            }
            if !read_more(
                &mut self.stream,
                &mut self.buf,
                deadline,
                "the guest shell's channel",
            )? {
                return Ok(None);
            }
        }
    }
}

/// Connects to QEMU's unix socket `path` (`what` names it), retrying while
/// QEMU starts, for up to `limit`.
pub(crate) fn connect(path: &Path, limit: Duration, what: &str) -> Result<UnixStream> {
    let t0 = Instant::now();
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(_) if t0.elapsed() < limit => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => {
                return Err(e).with_context(|| format!("connecting to {what} {}", path.display()))
            }
        }
    }
}

/// Reads what `stream` has into `buf`, waiting until `deadline` at most.
/// `Ok(false)` when the deadline passed; an error when the stream closed
/// (`what` names it: QEMU exited).
pub(crate) fn read_more(
    stream: &mut UnixStream,
    buf: &mut Vec<u8>,
    deadline: Instant,
    what: &str,
) -> Result<bool> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(false);
    }
    stream.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
    let mut chunk = [0u8; 4096];
    match stream.read(&mut chunk) {
        Ok(0) => bail!("{what} closed (QEMU exited?)"),
        Ok(n) => buf.extend_from_slice(&chunk[..n]),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
            ) => {}
        Err(e) => return Err(e).with_context(|| format!("reading from {what}")),
    }
    Ok(true)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Standard base64 with padding, as busybox `base64 -d` reads it.
pub fn base64(data: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foob"), "Zm9vYg==");
    }

    /// A fake guest: a shell on the other end of a socket pair, evaluating
    /// lines as the guest's init does.
    #[test]
    fn scripts_return_output_and_status() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut guest = std::process::Command::new("sh")
            .args(["-c", "while IFS= read -r line; do eval \"$line\"; done"])
            .stdin(std::os::fd::OwnedFd::from(b.try_clone().unwrap()))
            .stdout(std::os::fd::OwnedFd::from(b.try_clone().unwrap()))
            .stderr(std::os::fd::OwnedFd::from(b))
            .spawn()
            .unwrap();
        let mut sh = Shell {
            stream: a,
            buf: Vec::new(),
            next_id: 1,
        };
        sh.wait_ready(Duration::from_secs(5), || true).unwrap();
        let out = sh
            .run(
                "echo 'quoted \"$x\"'\ncat <<EOF\nheredoc\nEOF\nexit 3",
                Duration::from_secs(5),
            )
            .unwrap();
        assert_eq!(
            out,
            Output {
                status: 3,
                text: "quoted \"$x\"\nheredoc\n".into()
            }
        );
        assert_eq!(sh.run("true", Duration::from_secs(5)).unwrap().status, 0);
        drop(sh);
        let _ = guest.kill();
        let _ = guest.wait();
    }
}
