//! Prometheus metrics: per board and tty, the bytes each way, sessions,
//! refusals, re-enumerations and lease waits, in the text exposition format,
//! on the TCP address or unix socket `[metrics] listen` names (off unless
//! it does) — what a farm's monitoring scrapes across many hosts.
//!
//! The server is as small as the job: `GET /metrics` over HTTP/1.x, one
//! request per connection, bounded in size and time.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::MetricsListen;
use crate::state::Shared;

/// The biggest request head read; a scraper's is a few hundred bytes.
const MAX_REQUEST: usize = 8192;

/// One metric family's header.
fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// A label value, escaped as the format asks.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// One tty's figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TtyFigures {
    pub board: String,
    pub tty: String,
    pub to_board: u64,
    pub from_board: u64,
    pub sessions: u64,
    pub refusals: u64,
    pub reenumerations: u64,
    pub present: bool,
    pub in_session: bool,
}

/// One board's lease figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BoardFigures {
    pub board: String,
    pub leased: bool,
    pub waiting: usize,
    pub waits: u64,
    pub wait_seconds: f64,
}

/// What the metrics are made of, read from the state in one go.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Figures {
    pub ttys: Vec<TtyFigures>,
    pub boards: Vec<BoardFigures>,
}

/// The figures in Prometheus' text format.
pub fn render(f: &Figures) -> String {
    let mut out = String::new();
    type Get = fn(&TtyFigures) -> String;
    let per_tty: [(&str, &str, &str, Get); 7] = [
        (
            "devbroker_bytes_to_board_total",
            "counter",
            "Bytes written to the board.",
            |t| t.to_board.to_string(),
        ),
        (
            "devbroker_bytes_from_board_total",
            "counter",
            "Bytes read from the board.",
            |t| t.from_board.to_string(),
        ),
        (
            "devbroker_sessions_total",
            "counter",
            "Sessions started on the tty.",
            |t| t.sessions.to_string(),
        ),
        (
            "devbroker_refusals_total",
            "counter",
            "Connections to the tty's sockets refused.",
            |t| t.refusals.to_string(),
        ),
        (
            "devbroker_reenumerations_total",
            "counter",
            "Times the adapter came back within the re-enumeration grace.",
            |t| t.reenumerations.to_string(),
        ),
        (
            "devbroker_tty_present",
            "gauge",
            "1 while the tty's adapter is plugged in.",
            |t| u8::from(t.present).to_string(),
        ),
        (
            "devbroker_tty_in_session",
            "gauge",
            "1 while a client holds the tty.",
            |t| u8::from(t.in_session).to_string(),
        ),
    ];
    for (name, kind, help, get) in per_tty {
        family(&mut out, name, kind, help);
        for t in &f.ttys {
            let _ = writeln!(
                out,
                "{name}{{board=\"{}\",tty=\"{}\"}} {}",
                label(&t.board),
                label(&t.tty),
                get(t)
            );
        }
    }
    type BoardGet = fn(&BoardFigures) -> String;
    let per_board: [(&str, &str, &str, BoardGet); 4] = [
        (
            "devbroker_board_leased",
            "gauge",
            "1 while the board's lease is held.",
            |b| u8::from(b.leased).to_string(),
        ),
        (
            "devbroker_lease_waiting",
            "gauge",
            "Lease requests waiting that the board could satisfy.",
            |b| b.waiting.to_string(),
        ),
        (
            "devbroker_lease_waits_total",
            "counter",
            "Leases granted after waiting.",
            |b| b.waits.to_string(),
        ),
        (
            "devbroker_lease_wait_seconds_total",
            "counter",
            "Time the leases granted after waiting waited, in all.",
            |b| b.wait_seconds.to_string(),
        ),
    ];
    for (name, kind, help, get) in per_board {
        family(&mut out, name, kind, help);
        for b in &f.boards {
            let _ = writeln!(out, "{name}{{board=\"{}\"}} {}", label(&b.board), get(b));
        }
    }
    out
}

/// The response to one request head.
fn respond(head: &[u8], shared: &Shared) -> Vec<u8> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, kind, body) = match (method, path.split('?').next().unwrap_or("")) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(&shared.figures()),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "devbroker serves /metrics\n".to_string(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".to_string(),
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if method != "HEAD" {
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// Reads one request head (up to the blank line) and answers it.
async fn serve_one<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    shared: Shared,
) {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let read = async {
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            let n = s.read(&mut buf).await.ok()?;
            if n == 0 || head.len() + n > MAX_REQUEST {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(())
    };
    if tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .ok()
        .flatten()
        .is_none()
    {
        return;
    }
    let _ = s.write_all(&respond(&head, &shared)).await;
    let _ = s.shutdown().await;
}

/// How many scrapes are answered at once; one more is closed unanswered.
const MAX_CONNECTIONS: usize = 16;

/// A bound metrics socket, which [`serve`] answers on.
pub enum Listener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, std::path::PathBuf),
}

/// Binds where `listen` says — now, so that a start or a reload learns at
/// once that it can't. A stale unix socket at the path is replaced; any
/// other file there is left alone and refused.
pub fn bind(listen: &MetricsListen) -> std::io::Result<Listener> {
    match listen {
        MetricsListen::Tcp(addr) => {
            let l = std::net::TcpListener::bind(addr)?;
            l.set_nonblocking(true)?;
            Ok(Listener::Tcp(tokio::net::TcpListener::from_std(l)?))
        }
        MetricsListen::Unix(path) => {
            use std::os::unix::fs::FileTypeExt;
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                std::fs::remove_file(path)?;
            }
            Ok(Listener::Unix(
                tokio::net::UnixListener::bind(path)?,
                path.clone(),
            ))
        }
    }
}

/// Answers scrapes on `listener` until `shutdown`.
pub async fn serve(listener: Listener, shared: Shared, shutdown: CancellationToken) {
    let busy = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    match listener {
        Listener::Tcp(l) => {
            crate::accept::serve(l, "the metrics socket".into(), shutdown, move |s| {
                spawn_one(s, &shared, &busy)
            })
            .await
        }
        Listener::Unix(l, path) => {
            crate::accept::serve(l, "the metrics socket".into(), shutdown, move |s| {
                spawn_one(s, &shared, &busy)
            })
            .await;
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Answers one scrape, if fewer than [`MAX_CONNECTIONS`] are being answered.
fn spawn_one<S>(s: S, shared: &Shared, busy: &Arc<Semaphore>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let Ok(permit) = busy.clone().try_acquire_owned() else {
        return;
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        serve_one(s, shared).await;
        drop(permit);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        let shared = Shared::new(
            crate::config::parse(
                std::path::Path::new("t"),
                "[[board]]\nname = \"a\"\nmachines = [\"m\"]\n[[board.tty]]\nname = \"console\"\nmatch = { by-id = \"x\" }\n",
            )
            .unwrap(),
        );
        let ok = String::from_utf8(respond(
            b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
            &shared,
        ))
        .unwrap();
        let f = shared.figures();
        assert_eq!(f.ttys.len(), 1);
        assert_eq!(
            (f.boards[0].board.as_str(), f.boards[0].leased),
            ("a", false)
        );
        assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
        assert!(
            ok.contains("devbroker_bytes_to_board_total{board=\"a\",tty=\"console\"} 0\n"),
            "{ok}"
        );
        assert!(
            ok.contains("# TYPE devbroker_lease_wait_seconds_total counter\n"),
            "{ok}"
        );
        assert!(
            String::from_utf8(respond(b"GET / HTTP/1.1\r\n\r\n", &shared))
                .unwrap()
                .starts_with("HTTP/1.1 404")
        );
        assert!(
            String::from_utf8(respond(b"POST /metrics HTTP/1.1\r\n\r\n", &shared))
                .unwrap()
                .starts_with("HTTP/1.1 405")
        );
        assert_eq!(label("a\"b\\c"), "a\\\"b\\\\c");
    }
}
