//! devshim: the guest side of devbroker.
//!
//! For every tty socket the broker puts in a machine directory, devshim makes
//! a pty and publishes it under the host's `/dev/serial/by-id` name, so tools
//! open the path they always did. Data, baud changes, flushes and open/close
//! travel to the real port over RFC 2217.

pub mod lease;
pub mod links;
pub mod pty;
pub mod serve;
pub mod tty;
pub mod users;
