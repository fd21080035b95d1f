//! A control-plane client for tests: hello, then requests, as JSON lines.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// One control connection. Leases it takes end when it is dropped.
pub struct ControlClient {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl ControlClient {
    /// Connects and says hello.
    pub fn connect(socket: &Path) -> ControlClient {
        let s = UnixStream::connect(socket)
            .unwrap_or_else(|e| panic!("connect {}: {e}", socket.display()));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut c = ControlClient {
            w: s.try_clone().unwrap(),
            r: BufReader::new(s),
        };
        let hello = c.ask(json!({"request": "hello", "version": 1, "client": "test"}));
        assert_eq!(hello["reply"], "hello", "{hello}");
        c
    }

    /// Sends one request line.
    pub fn send(&mut self, req: Value) {
        let mut line = serde_json::to_vec(&req).unwrap();
        line.push(b'\n');
        self.w.write_all(&line).unwrap();
    }

    /// Sends raw bytes (for malformed requests).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.w.write_all(bytes).unwrap();
    }

    /// Reads the next reply line (blocking; not an iterator: a closed
    /// connection fails the test).
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).expect("a reply line");
        assert!(!line.is_empty(), "the broker closed the control connection");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad reply {line:?}: {e}"))
    }

    /// Sends a request and reads one reply.
    pub fn ask(&mut self, req: Value) -> Value {
        self.send(req);
        self.next()
    }

    /// Takes a board by name and waits for the grant.
    pub fn lease_board(&mut self, board: &str) -> Value {
        let mut r = self.ask(json!({"request": "lease", "board": board}));
        while r["reply"] == "waiting" {
            r = self.next();
        }
        assert_eq!(r["reply"], "granted", "{r}");
        r
    }
}
