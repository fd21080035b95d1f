//! The command line, as data: `main.rs` parses it and dispatches, and the
//! packaging build renders man pages and shell completions from it — so this
//! file uses nothing of the crate but itself (the build script includes it).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// Where the broker looks for its config when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/devbroker/devbroker.toml";
/// The default run directory.
pub const DEFAULT_RUN_DIR: &str = "/run/devbroker";

/// `devbroker`.
#[derive(Parser)]
#[command(
    name = "devbroker",
    version,
    about = "Relays the USB serial ports of embedded boards into containers and to host users"
)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// The subcommands.
#[derive(Subcommand)]
pub enum Cmd {
    /// Run the broker.
    Run {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[command(flatten)]
        adapters: SourceArgs,
        #[arg(long, default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// Show each board and tty: present or not, who holds it since when, bytes each way.
    Status {
        #[arg(long, default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Reload the running broker's config (what `systemctl reload` runs):
    /// returns once it is in force, or prints why it was refused.
    Reload {
        #[arg(long, default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// Print what a board's console sent (its capture ring); --follow keeps printing.
    Log {
        board: String,
        #[arg(long, short)]
        follow: bool,
        #[arg(long, default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// List the USB serial adapters plugged in, their identities and the
    /// board each is in the config; --suggest adds an entry for each other one.
    Boards {
        /// Print the listing as comments and a [[board]] entry for each adapter
        /// the config does not name: the output can be appended to the config.
        #[arg(long)]
        suggest: bool,
        /// Print the listing as JSON.
        #[arg(long, conflicts_with = "suggest")]
        json: bool,
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[command(flatten)]
        adapters: SourceArgs,
    },
    /// Check a config file and print what it says.
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Set up, check or remove a systemd-nspawn machine (container).
    Machine {
        #[command(subcommand)]
        cmd: MachineCmd,
    },
    /// Run a simulated board, the broker and devshim in a temporary directory.
    Demo {
        /// Stop after this long (e.g. "30s") instead of waiting for Ctrl-C.
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<Duration>,
        /// How often the simulated board prints its boot banner.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        banner_every: Duration,
    },
}

/// `devbroker machine ...`.
#[derive(Subcommand)]
pub enum MachineCmd {
    /// Write NAME.nspawn and configure the tree: hostname, network, devshim, the job user.
    Setup {
        name: String,
        /// The container's root directory [default: /var/lib/machines/NAME].
        #[arg(long)]
        tree: Option<PathBuf>,
        /// Where NAME.nspawn goes (/run/systemd/nspawn is honoured too).
        #[arg(long, default_value = "/etc/systemd/nspawn")]
        nspawn_dir: PathBuf,
        /// The job user inside, NAME:UID [default: the config's, else sai:883].
        #[arg(long)]
        user: Option<String>,
        /// Print a unified diff of every file it would write; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Also run the host-side NetworkManager and firewalld steps.
        #[arg(long)]
        apply_host_network: bool,
        #[arg(long, default_value = DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
        /// The static devshim to install [default: `devshim` next to devbroker].
        #[arg(long)]
        devshim: Option<PathBuf>,
        /// Where setup records what it changed, for `remove`.
        #[arg(long, default_value = "/var/lib/devbroker")]
        state_dir: PathBuf,
        /// Where machines' trees are, to find a free subnet and clashing names.
        #[arg(long, default_value = "/var/lib/machines")]
        machines_dir: PathBuf,
        /// Read [[machine]] entries from this config, if it exists.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Find leftovers of binding devices by hand (DeviceAllow=, Bind=/dev/tty*, MODE="0666").
    Check {
        name: String,
        /// Remove them, keeping a backup of each file changed.
        #[arg(long)]
        fix: bool,
        #[arg(long, default_value = "/etc/systemd/system")]
        systemd_dir: PathBuf,
        /// Directories with .nspawn files (repeatable).
        #[arg(long, default_values = ["/etc/systemd/nspawn", "/run/systemd/nspawn"])]
        nspawn_dir: Vec<PathBuf>,
        #[arg(long, default_value = "/etc/udev/rules.d")]
        udev_dir: PathBuf,
    },
    /// Undo what setup added, and only that.
    Remove {
        name: String,
        #[arg(long, default_value = "/var/lib/devbroker")]
        state_dir: PathBuf,
    },
}

/// How `run` and `boards` find adapters.
#[derive(clap::Args)]
pub struct SourceArgs {
    /// Where adapters come from [default: udev when udevd runs
    /// (/run/udev/control exists), else by-id; by-id when --by-id-dir is given].
    #[arg(long, value_enum)]
    pub source: Option<SourceKind>,
    /// The directory of by-id links for the by-id source [default: /dev/serial/by-id].
    #[arg(long)]
    pub by_id_dir: Option<PathBuf>,
}

/// Where the broker learns about adapters.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceKind {
    /// udev: enumerate, then a udev monitor; identities from udev properties.
    Udev,
    /// A directory of by-id links watched with inotify (demo, hosts without udevd).
    ById,
}
