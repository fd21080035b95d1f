//! devshim's command line, as data: `main.rs` parses it and dispatches, and
//! the packaging build renders man pages and completions from it — so this
//! file uses nothing of the crate but itself.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Where `devshim serve` keeps its state file (ports.json).
pub const DEFAULT_STATE_DIR: &str = "/run/devshim";

/// The machine directory, as `machine setup` binds it.
pub const DEFAULT_DIR: &str = "/run/devbroker";
/// Where links are made.
pub const DEFAULT_LINK_ROOT: &str = "/dev";

/// `devshim`.
#[derive(Parser)]
#[command(
    name = "devshim",
    version,
    about = "Presents devbroker's board sockets as ptys under their /dev/serial/by-id names"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Run line control on the host next to a board's port: a named sequence
    /// (reset, bootloader, esp32-bootloader, ...) or steps such as
    /// `dtr=0 rts=1 break=250ms baud=115200 sleep=100ms`.
    Ctl {
        board: String,
        /// SEQUENCE, or STEP...
        #[arg(required = true, num_args = 1..)]
        what: Vec<String>,
        /// The tty [default: the board's first].
        #[arg(long)]
        tty: Option<String>,
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Wait for a board, run COMMAND with its ttys exported, give the board back.
    ///
    /// Exports SAI_DEVICE_TTY<n> (the guest path of tty n),
    /// SAI_DEVICE_RFC2217_<n> (rfc2217://127.0.0.1:PORT, its RFC 2217
    /// endpoint), SAI_DEVICE_BOARD, and each ENV=IDX alias (e.g. ESPPORT=0),
    /// which names the tty's path. Exits with COMMAND's status,
    /// or 75 if no board could be had. Invoked as `sai-device TYPE [ENV=IDX
    /// ...] COMMAND...` it takes Sai's command line.
    Lease {
        /// Take this board by name (else the first word is a TYPE: any free
        /// board compatible with it).
        #[arg(long)]
        board: Option<String>,
        /// Give up after this long (e.g. "10m"); by default wait as long as it takes.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        #[arg(long, default_value = DEFAULT_LINK_ROOT)]
        link_root: PathBuf,
        /// Where `devshim serve` keeps the state file of the RFC 2217 ports.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// [TYPE] [ENV=IDX ...] -- COMMAND [ARGS...]
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 1.., value_name = "[TYPE] [ENV=IDX ...] -- COMMAND")]
        rest: Vec<String>,
    },
    /// Run COMMAND so that its DTR/RTS, break, parity and data-size calls on
    /// devshim's ptys reach the real port (a seccomp supervisor; Linux 5.6+).
    ///
    /// For jobs and shells that take no lease: `devshim run -- bash`.
    /// `devshim lease` and `sai-device` run their command the same way.
    /// Exits with COMMAND's status.
    Run {
        /// Where `devshim serve` keeps its state file (ports.json).
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// COMMAND [ARGS...]
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true, num_args = 1.., value_name = "COMMAND")]
        command: Vec<String>,
    },
    /// Publish a pty for every tty socket in DIR, for as long as it runs.
    Serve {
        /// The machine directory the broker fills (bind-mounted from the host).
        #[arg(long, default_value = DEFAULT_DIR)]
        dir: PathBuf,
        /// Where `serial/by-id/` and `devbroker/` links are made.
        #[arg(long, default_value = DEFAULT_LINK_ROOT)]
        link_root: PathBuf,
        /// The user who runs jobs and owns the ptys (name or uid, from /etc/passwd).
        #[arg(long, default_value = "sai")]
        user: String,
        /// Where the state file of the RFC 2217 ports (ports.json) is kept.
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// How long tools keep their ptys while the broker is away (restarted
        /// or upgraded); past it they read EIO.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
        broker_grace: Duration,
    },
    /// List the attached ttys: guest path and RFC 2217 endpoint.
    List {
        #[arg(long, default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Print the state file (JSON) instead of a table.
        #[arg(long)]
        json: bool,
    },
}
