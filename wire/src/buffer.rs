//! The relay buffers of both ends, and how big they are.
//!
//! A farm holds hundreds of sessions, most of them quiet (a console, a
//! prompt); a few stream (a flash). A session's read buffers cost what its
//! traffic needs: [`SMALL`] while reads come back short, [`CHUNK`] once one
//! comes back full, and small again after a run of short reads.

/// The most a relay reads or writes at once.
pub const CHUNK: usize = 64 * 1024;

/// A buffer's size while its session is quiet.
pub const SMALL: usize = 4 * 1024;

/// A read at least this big suggests a stream: gather what else is ready
/// before writing it on. Smaller reads go out at once, keeping round trips
/// short.
pub const DRAIN_AFTER: usize = 1024;

/// Short reads in a row after which a grown buffer shrinks back.
const SHRINK_AFTER: u32 = 256;

/// A read buffer that grows to [`CHUNK`] while its session streams and
/// shrinks back to [`SMALL`] when it quiets down.
#[derive(Debug, Clone)]
pub struct Elastic {
    buf: Vec<u8>,
    short: u32,
}

impl Default for Elastic {
    fn default() -> Elastic {
        Elastic::new()
    }
}

impl Elastic {
    pub fn new() -> Elastic {
        Elastic {
            buf: vec![0; SMALL],
            short: 0,
        }
    }

    /// The buffer as it is now.
    pub fn slice(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// Its size now.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Never empty; here for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Grows it to [`CHUNK`], keeping its contents (to gather more behind
    /// what a read just brought).
    pub fn grow(&mut self) {
        if self.buf.len() < CHUNK {
            self.buf.resize(CHUNK, 0);
        }
        self.short = 0;
    }

    /// Frees `scratch` — a buffer of the relay that holds what one read
    /// brought, escaped or joined, so at most twice this buffer's size and
    /// up to twice that again as a `Vec` grows — once it is bigger than
    /// that: after this buffer shrank because the session quieted down.
    pub fn fit(&self, scratch: &mut Vec<u8>) {
        if scratch.capacity() > 4 * self.buf.len() {
            *scratch = Vec::new();
        }
    }

    /// Notes that a read brought `n` bytes: a full buffer grows, a run of
    /// short reads shrinks it. Call it only while nothing in the buffer is
    /// still needed.
    pub fn filled(&mut self, n: usize) {
        if n >= DRAIN_AFTER {
            self.short = 0;
            if n == self.buf.len() {
                self.grow();
            }
        } else if self.buf.len() > SMALL {
            self.short += 1;
            if self.short >= SHRINK_AFTER {
                self.buf = vec![0; SMALL];
                self.short = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_when_full_and_shrinks_when_quiet() {
        let mut b = Elastic::new();
        assert_eq!(b.len(), SMALL);
        b.filled(10);
        assert_eq!(b.len(), SMALL, "short reads keep it small");
        b.filled(SMALL);
        assert_eq!(b.len(), CHUNK, "a full read grows it");
        b.filled(CHUNK / 2);
        for _ in 0..SHRINK_AFTER - 1 {
            b.filled(1);
        }
        assert_eq!(b.len(), CHUNK, "not before a run of short reads");
        b.filled(1);
        assert_eq!(b.len(), SMALL);
        b.slice()[..3].copy_from_slice(b"abc");
        b.grow();
        assert_eq!(&b.slice()[..3], b"abc", "growing keeps what it holds");
    }

    #[test]
    fn a_scratch_buffer_is_freed_only_once_the_session_quiets() {
        let mut b = Elastic::new();
        b.filled(SMALL);
        let mut scratch = Vec::with_capacity(3 * CHUNK);
        b.fit(&mut scratch);
        assert_eq!(scratch.capacity(), 3 * CHUNK, "kept while streaming");
        for _ in 0..SHRINK_AFTER {
            b.filled(1);
        }
        b.fit(&mut scratch);
        assert_eq!(scratch.capacity(), 0, "freed once quiet");
    }
}
