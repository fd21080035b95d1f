//! Control-socket messages: one JSON object per line, versioned by the first
//! exchange (`hello`).
//!
//! Lines are capped at [`MAX_LINE`] bytes so a peer can't make the broker
//! buffer without bound. Every request gets exactly one reply, and a bad
//! request gets an [`Reply::Error`] while the connection stays usable.

use serde::{Deserialize, Serialize};

/// Protocol version spoken by this build.
pub const VERSION: u32 = 1;
/// Longest request or reply line, newline included.
pub const MAX_LINE: usize = 64 * 1024;

/// A client's request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Request {
    /// Must come first: names the protocol version the client speaks.
    Hello { version: u32, client: String },
    /// The boards this socket may see, their ttys, holders and counters.
    Status {},
    /// The boards this client may use, with their types and leases.
    List {},
    /// Takes a board by name or any free board of a type; waits in line
    /// (replies `waiting` while it does) up to `wait_ms` (forever if absent).
    Lease {
        #[serde(default)]
        board: Option<String>,
        #[serde(default, rename = "type")]
        kind: Option<String>,
        #[serde(default)]
        wait_ms: Option<u64>,
    },
    /// Reloads the broker's config (the admin's socket only), as SIGHUP
    /// does; the reply comes once the new config is in force, or says why
    /// it was refused.
    Reload {},
    /// Gives a leased board back (closing the connection does too).
    Release { board: String },
    /// What a board's console printed (the ring); with `follow`, then each
    /// new chunk as it comes, until the connection closes.
    Log {
        board: String,
        #[serde(default)]
        follow: bool,
    },
    /// Runs a named sequence (`sequence`) or explicit steps (`steps`, e.g.
    /// "dtr=0 rts=1 sleep=100ms rts=0") on a board's tty, on the host.
    Run {
        board: String,
        #[serde(default)]
        tty: Option<String>,
        #[serde(default)]
        sequence: Option<String>,
        #[serde(default)]
        steps: Option<String>,
    },
}

/// The broker's reply to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Hello {
        version: u32,
        server: String,
    },
    Status(Status),
    Boards {
        boards: Vec<BoardInfo>,
    },
    /// A lease request is queued: its place (1 = next) and who holds the
    /// boards it waits for.
    Waiting {
        place: usize,
        holders: Vec<String>,
    },
    Granted(Granted),
    Released {
        board: String,
    },
    /// A reload took effect: the boards it added, removed and changed.
    Reloaded {
        added: Vec<String>,
        removed: Vec<String>,
        changed: Vec<String>,
    },
    /// Console output (lossy UTF-8).
    Log {
        board: String,
        text: String,
    },
    /// A sequence ran: each step and how late it started.
    Ran {
        board: String,
        steps: Vec<StepTiming>,
    },
    /// The request was refused: `message` for people, `code` for programs
    /// (never match on the message).
    Error {
        message: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<ErrorCode>,
    },
}

/// Why a request was refused, for programs: a client decides what to do by
/// this, never by the English of the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The line is not a request this broker knows (bad JSON, unknown
    /// request or field, too long), or it came before `hello`.
    BadRequest,
    /// The client speaks a protocol version this broker does not.
    Version,
    /// No board the client may use fits the request. Said the same of a
    /// board that is somebody else's and of one that does not exist.
    NotAvailable,
    /// The client does not hold the board it acts on (lease it first), or
    /// releases one it does not hold.
    NotHeld,
    /// The request conflicts with what the connection already does (waits
    /// for a board, holds it, runs a sequence).
    Conflict,
    /// The client is at one of its limits (connections, waiting requests,
    /// sequences).
    Limit,
    /// A bounded lease wait (`wait_ms`) ran out: nothing was granted.
    Timeout,
    /// The board or tty is not plugged in, or is re-enumerating.
    Absent,
    /// A sequence or a port operation failed, or was stopped.
    Failed,
}

impl Reply {
    /// An error reply.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply::Error {
            message: message.into(),
            code: Some(code),
        }
    }
}

/// One step of a sequence as it ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepTiming {
    pub step: String,
    /// When it was due, from the sequence's start.
    pub nominal_us: u64,
    /// How late it started.
    pub late_us: f64,
}

/// A board in a `list` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoardInfo {
    pub name: String,
    pub compatible: Vec<String>,
    pub present: bool,
    /// Who holds its lease, if anyone.
    pub leased_by: Option<String>,
    /// How many lease requests wait for it.
    pub waiting: usize,
    /// Attached to one machine all the time (no lease needed).
    pub dedicated: bool,
    pub ttys: Vec<String>,
}

/// A granted lease: the board and where its ttys appear.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Granted {
    pub board: String,
    pub ttys: Vec<GrantedTty>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantedTty {
    pub tty: String,
    /// The adapter's by-id name (the guest link's name), when known.
    pub by_id: Option<String>,
    /// The socket file, relative to the directory the client uses.
    pub socket: String,
}

/// Why a request line is refused ([`ErrorCode::BadRequest`]); its text is
/// what the client is told.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("request of {0} bytes is over the {MAX_LINE}-byte limit")]
    TooLong(usize),
    #[error("bad request: {0}")]
    Json(#[from] serde_json::Error),
}

/// Parses one request line, its newline already taken off. With its
/// newline, a line may be [`MAX_LINE`] bytes.
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    if line.len() >= MAX_LINE {
        return Err(RequestError::TooLong(line.len()));
    }
    Ok(serde_json::from_slice(line)?)
}

/// Renders a reply as one line, newline included.
pub fn reply_line(reply: &Reply) -> Vec<u8> {
    let mut v = serde_json::to_vec(reply).expect("replies always serialize");
    v.push(b'\n');
    v
}

/// Renders a request as one line, newline included.
pub fn request_line(req: &Request) -> Vec<u8> {
    let mut v = serde_json::to_vec(req).expect("requests always serialize");
    v.push(b'\n');
    v
}

/// What `devbroker status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Status {
    /// The shape of this reply ([`STATUS_VERSION`]); 0 from brokers that
    /// sent none.
    #[serde(default)]
    pub version: u32,
    pub boards: Vec<BoardStatus>,
}

/// The version of the `status` reply: 2 added `version`, each board's
/// `console`, `lease` and `waiting`.
pub const STATUS_VERSION: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BoardStatus {
    pub name: String,
    pub compatible: Vec<String>,
    pub machines: Vec<String>,
    pub host_groups: Vec<String>,
    pub ttys: Vec<TtyStatus>,
    /// How the console is captured: `session` or `always`.
    #[serde(default)]
    pub console: String,
    /// The board's lease, if someone holds it.
    #[serde(default)]
    pub lease: Option<Since>,
    /// Who waits for the board, first in line first.
    #[serde(default)]
    pub waiting: Vec<Since>,
}

/// Who holds or waits, and since when (RFC 3339).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Since {
    pub who: String,
    pub since: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TtyStatus {
    pub name: String,
    /// Whether a matching adapter is plugged in now.
    pub present: bool,
    /// The adapter's `/dev/serial/by-id` name, when present and known.
    pub by_id: Option<String>,
    /// The device node the broker opens, when present.
    pub device: Option<String>,
    pub holder: Option<Holder>,
    /// Bytes written to the board since the broker started.
    pub bytes_to_board: u64,
    /// Bytes read from the board since the broker started.
    pub bytes_from_board: u64,
    /// DTR and RTS on the port, while a session has it open and the device
    /// has modem lines.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtr: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rts: Option<bool>,
}

/// Who has a tty open through the broker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// `machine NAME` or `host user NAME`.
    pub who: String,
    /// Host pid of the tool that has the port open (as devshim names it),
    /// else of the client process.
    pub pid: Option<i32>,
    /// The tool's command name, when devshim named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// RFC 3339 time the session started.
    pub since: String,
}

/// ` (esptool.py, pid 1234)`, ` (pid 1234)` or nothing: how a holder's
/// tool is named after who holds the port.
pub fn tool_and_pid(tool: Option<&str>, pid: Option<i32>) -> String {
    match (tool, pid) {
        (Some(t), Some(p)) => format!(" ({t}, pid {p})"),
        (Some(t), None) => format!(" ({t})"),
        (None, Some(p)) => format!(" (pid {p})"),
        (None, None) => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines() {
        assert_eq!(
            parse_request(br#"{"request":"hello","version":1,"client":"devshim"}"#).unwrap(),
            Request::Hello {
                version: 1,
                client: "devshim".into()
            }
        );
        assert_eq!(
            parse_request(br#"{"request":"status"}"#).unwrap(),
            Request::Status {}
        );
        assert!(parse_request(br#"{"request":"nope"}"#)
            .unwrap_err()
            .to_string()
            .contains("unknown variant"));
        assert!(parse_request(br#"{"request":"status","x":1}"#).is_err());
        assert!(parse_request(b"not json").is_err());
        assert!(parse_request(&vec![b' '; MAX_LINE])
            .unwrap_err()
            .to_string()
            .contains("limit"));
        let line = request_line(&Request::Status {});
        assert_eq!(
            parse_request(&line[..line.len() - 1]).unwrap(),
            Request::Status {}
        );
    }

    #[test]
    fn reply_roundtrip() {
        let r = Reply::error(ErrorCode::Timeout, "x");
        let line = reply_line(&r);
        assert_eq!(
            String::from_utf8_lossy(&line),
            "{\"reply\":\"error\",\"message\":\"x\",\"code\":\"timeout\"}\n"
        );
        assert_eq!(serde_json::from_slice::<Reply>(&line).unwrap(), r);
        // From a broker that sends no code.
        let old: Reply = serde_json::from_str("{\"reply\":\"error\",\"message\":\"x\"}").unwrap();
        assert_eq!(
            old,
            Reply::Error {
                message: "x".into(),
                code: None
            }
        );
    }
}
