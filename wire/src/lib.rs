//! Wire formats shared by the devbroker host broker and the devshim guest shim.
//!
//! Everything here is plain data and pure functions, so both ends agree on the
//! bytes and the rules, and every rule is unit-tested without any I/O:
//!
//! - [`telnet`]: the Telnet layer (IAC escaping, option negotiation, subnegotiation).
//! - [`rfc2217`]: the COM-PORT-OPTION commands carried inside Telnet (RFC 2217).
//! - [`names`]: the names of boards, ttys and machines, which become file names.
//! - [`control`]: versioned JSON-line messages of the control sockets.
//! - [`manifest`]: the index of a machine directory that tells devshim each tty's by-id name.
//! - [`termios`]: Linux `termios2` read and written as RFC 2217 line settings.
//! - [`accounts`]: users and groups from `passwd` and `group` text.
//! - [`buffer`]: the relays' buffer sizes, and buffers that cost what the traffic needs.

pub mod accounts;
pub mod buffer;
pub mod control;
pub mod manifest;
pub mod names;
pub mod rfc2217;
pub mod telnet;
pub mod termios;
