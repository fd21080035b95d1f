//! devbroker: the host side. It finds USB serial adapters, matches them to
//! the boards in its config, and relays each allowed tty as RFC 2217 over a
//! unix socket in the directory of each machine that may use it.
//!
//! Plain data and pure functions sit at the core ([`config`], [`plan`],
//! [`adapter`]); I/O sits at the edges ([`source`], [`server`], [`session`],
//! [`port`], [`control`]).

pub mod accept;
pub mod adapter;
pub mod capture;
pub mod cli;
pub mod config;
pub mod control;
pub mod demo;
pub mod drain;
pub mod fakeboard;
pub mod lease;
pub mod limits;
pub mod line;
pub mod logging;
pub mod machine;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod peer;
pub mod plan;
pub mod port;
pub mod reconcile;
pub mod refusal;
pub mod rundir;
pub mod sequence;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod source;
pub mod state;
pub mod status;
pub mod suggest;
pub mod throttle;
