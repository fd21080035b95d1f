//! devshim command line. The work is in the library; this parses flags,
//! sets up logging and signals, and runs it.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "devshim",
    version,
    about = "Presents devbroker's board sockets as ptys under their /dev/serial/by-id names"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
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
        #[arg(long, default_value = "/run/devbroker")]
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
        #[arg(long, value_parser = parse_duration)]
        wait: Option<std::time::Duration>,
        #[arg(long, default_value = "/run/devbroker")]
        dir: PathBuf,
        #[arg(long, default_value = "/dev")]
        link_root: PathBuf,
        /// Where `devshim serve` keeps the state file of the RFC 2217 ports.
        #[arg(long, default_value = devshim::ports::DEFAULT_DIR)]
        state_dir: PathBuf,
        /// [TYPE] [ENV=IDX ...] -- COMMAND [ARGS...]
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 1.., value_name = "[TYPE] [ENV=IDX ...] -- COMMAND")]
        rest: Vec<String>,
    },
    /// Publish a pty for every tty socket in DIR, for as long as it runs.
    Serve {
        /// The machine directory the broker fills (bind-mounted from the host).
        #[arg(long, default_value = "/run/devbroker")]
        dir: PathBuf,
        /// Where `serial/by-id/` and `devbroker/` links are made.
        #[arg(long, default_value = "/dev")]
        link_root: PathBuf,
        /// The user who runs jobs and owns the ptys (name or uid, from /etc/passwd).
        #[arg(long, default_value = "sai")]
        user: String,
        /// Where the state file of the RFC 2217 ports (ports.json) is kept.
        #[arg(long, default_value = devshim::ports::DEFAULT_DIR)]
        state_dir: PathBuf,
        /// How long tools keep their ptys while the broker is away (restarted
        /// or upgraded); past it they read EIO.
        #[arg(long, value_parser = parse_duration, default_value = "10s")]
        broker_grace: std::time::Duration,
    },
    /// List the attached ttys: guest path and RFC 2217 endpoint.
    List {
        #[arg(long, default_value = devshim::ports::DEFAULT_DIR)]
        state_dir: PathBuf,
        /// Print the state file (JSON) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// `devshim list`.
fn list(state_dir: &std::path::Path, json: bool) -> std::process::ExitCode {
    let ports = match devshim::ports::read(state_dir) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "devshim: {} does not exist: is devshim serve running (with --state-dir {})?",
                devshim::ports::path(state_dir).display(),
                state_dir.display()
            );
            return std::process::ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("devshim: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let out = if json {
        String::from_utf8(ports.to_bytes()).expect("JSON is UTF-8")
    } else {
        ports.table()
    };
    use std::io::Write;
    match std::io::stdout().write_all(out.as_bytes()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(_) => std::process::ExitCode::FAILURE,
    }
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 10m or 1h"))?;
    Ok(std::time::Duration::from_secs(match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "ms" => return Ok(std::time::Duration::from_millis(n)),
        _ => return Err(format!("{s:?} is not a duration like 30s, 10m or 1h")),
    }))
}

fn main() -> std::process::ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| n == "sai-device")
    {
        return match devshim::lease::parse_sai_device(&argv[1..]) {
            Ok(args) => {
                // Sai's command line has no room for flags: the environment may move the paths.
                let dir =
                    std::env::var_os("DEVBROKER_DIR").unwrap_or_else(|| "/run/devbroker".into());
                let links =
                    std::env::var_os("DEVBROKER_LINK_ROOT").unwrap_or_else(|| "/dev".into());
                let state = std::env::var_os("DEVBROKER_STATE_DIR")
                    .unwrap_or_else(|| devshim::ports::DEFAULT_DIR.into());
                std::process::ExitCode::from(devshim::lease::run(
                    &args,
                    std::path::Path::new(&dir),
                    std::path::Path::new(&links),
                    std::path::Path::new(&state),
                ))
            }
            Err(e) => {
                eprintln!("sai-device: {e}");
                std::process::ExitCode::from(devshim::lease::EXIT_USAGE)
            }
        };
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEVSHIM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Cmd::Ctl {
        board,
        what,
        tty,
        dir,
    } = &cli.cmd
    {
        return match devshim::ctl::request(board, tty.clone(), what) {
            Ok(req) => std::process::ExitCode::from(devshim::ctl::run(dir, &req)),
            Err(e) => {
                eprintln!("devshim: {e}");
                std::process::ExitCode::from(2)
            }
        };
    }
    if let Cmd::List { state_dir, json } = &cli.cmd {
        return list(state_dir, *json);
    }
    if let Cmd::Lease {
        board,
        wait,
        dir,
        link_root,
        state_dir,
        rest,
    } = &cli.cmd
    {
        // Without --board, the first word is the type.
        let mut rest = rest.clone();
        let kind = if board.is_none() && !rest.is_empty() && rest[0] != "--" {
            Some(rest.remove(0))
        } else {
            None
        };
        let (aliases, command) = match devshim::lease::split_aliases(&rest) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("devshim: {e}");
                return std::process::ExitCode::from(devshim::lease::EXIT_USAGE);
            }
        };
        if board.is_none() && kind.is_none() {
            eprintln!("devshim: name a board (--board NAME) or a type");
            return std::process::ExitCode::from(devshim::lease::EXIT_USAGE);
        }
        let args = devshim::lease::LeaseArgs {
            board: board.clone(),
            kind,
            wait: *wait,
            aliases,
            command,
        };
        return std::process::ExitCode::from(devshim::lease::run(&args, dir, link_root, state_dir));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Lease { .. } | Cmd::List { .. } | Cmd::Ctl { .. } => unreachable!("handled above"),
            Cmd::Serve {
                dir,
                link_root,
                user,
                state_dir,
                broker_grace,
            } => {
                let user = devshim::users::lookup(std::path::Path::new("/"), &user)
                    .map_err(anyhow::Error::msg)?;
                let shutdown = CancellationToken::new();
                let mut int = signal(SignalKind::interrupt())?;
                let mut term = signal(SignalKind::terminate())?;
                let s = shutdown.clone();
                tokio::spawn(async move {
                    tokio::select! { _ = int.recv() => {}, _ = term.recv() => {} }
                    s.cancel();
                });
                devshim::serve::serve(
                    devshim::serve::Options {
                        dir,
                        link_root,
                        user,
                        state_dir,
                        broker_grace,
                    },
                    shutdown,
                )
                .await
            }
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devshim: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
