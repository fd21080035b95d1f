//! devshim: the guest side of devbroker.
//!
//! For every tty socket the broker puts in a machine directory, devshim makes
//! a pty and publishes it under the host's `/dev/serial/by-id` name, so tools
//! open the path they always did. Data, baud changes, flushes and open/close
//! travel to the real port over RFC 2217. Each tty is also served as RFC
//! 2217 on `127.0.0.1` for clients that need DTR, RTS, break, parity or data
//! size, which a pty can't carry.

pub mod bpf;
pub mod cli;
pub mod ctl;
pub mod endpoint;
pub mod lease;
pub mod linecall;
pub mod linesock;
pub mod ports;
pub mod procfs;
pub mod pty;
pub mod publish;
pub mod run;
pub mod serve;
pub mod supervise;
pub mod tool;
pub mod tty;
pub mod users;
pub mod watch;
