//! devshim command line. The work is in the library; this parses flags,
//! sets up logging and signals, and runs it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use devshim::cli::{Cli, Cmd, DEFAULT_DIR, DEFAULT_LINK_ROOT};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// `devshim list`.
fn list(state_dir: &Path, json: bool) -> ExitCode {
    let ports = match devshim::ports::read(state_dir) {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!(
                "devshim: {} does not exist: is devshim serve running (with --state-dir {})?",
                devshim::ports::path(state_dir).display(),
                state_dir.display()
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("devshim: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = if json {
        ports.to_bytes()
    } else {
        ports.table().into_bytes()
    };
    use std::io::Write;
    match std::io::stdout().write_all(&out) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

/// `sai-device TYPE [ENV=IDX ...] COMMAND...`: Sai's command line has no
/// room for flags, so the environment may move the paths.
fn sai_device(args: &[String]) -> ExitCode {
    match args.first().map(String::as_str) {
        Some("-h" | "--help") => {
            println!("{}", devshim::lease::SAI_DEVICE_HELP);
            return ExitCode::SUCCESS;
        }
        Some("-V" | "--version") => {
            println!("sai-device (devshim) {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let args = match devshim::lease::parse_sai_device(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("sai-device: {e}");
            return ExitCode::from(devshim::lease::EXIT_USAGE);
        }
    };
    let dir = std::env::var_os("DEVBROKER_DIR").unwrap_or_else(|| DEFAULT_DIR.into());
    let links = std::env::var_os("DEVBROKER_LINK_ROOT").unwrap_or_else(|| DEFAULT_LINK_ROOT.into());
    let state = std::env::var_os("DEVBROKER_STATE_DIR")
        .unwrap_or_else(|| devshim::ports::DEFAULT_DIR.into());
    ExitCode::from(devshim::lease::run(
        &args,
        Path::new(&dir),
        Path::new(&links),
        Path::new(&state),
    ))
}

/// `devshim lease`.
fn lease(
    mut board: Option<String>,
    mut wait: Option<Duration>,
    mut dir: PathBuf,
    mut link_root: PathBuf,
    mut state_dir: PathBuf,
    mut rest: Vec<String>,
) -> ExitCode {
    let usage = |e: String| {
        eprintln!("devshim: {e}");
        ExitCode::from(devshim::lease::EXIT_USAGE)
    };
    // Without --board, the first word is the type.
    let kind = if board.is_none() && !rest.is_empty() && rest[0] != "--" {
        Some(rest.remove(0))
    } else {
        None
    };
    // Options written after TYPE (or after the aliases) count as well.
    let late = match devshim::lease::take_late_options(&mut rest) {
        Ok(o) => o,
        Err(e) => return usage(e),
    };
    board = late.board.or(board);
    wait = late.wait.or(wait);
    dir = late.dir.unwrap_or(dir);
    link_root = late.link_root.unwrap_or(link_root);
    state_dir = late.state_dir.unwrap_or(state_dir);
    let (aliases, command) = match devshim::lease::split_aliases(&rest) {
        Ok(x) => x,
        Err(e) => return usage(e),
    };
    if board.is_none() && kind.is_none() {
        return usage("name a board (--board NAME) or a type".into());
    }
    let args = devshim::lease::LeaseArgs {
        board,
        kind,
        wait,
        aliases,
        command,
    };
    ExitCode::from(devshim::lease::run(&args, &dir, &link_root, &state_dir))
}

/// `devshim serve`, until SIGINT or SIGTERM.
fn serve(
    dir: PathBuf,
    link_root: PathBuf,
    user: &str,
    state_dir: PathBuf,
    broker_grace: Duration,
) -> ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        let user = devshim::users::lookup(Path::new("/"), user).map_err(anyhow::Error::msg)?;
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
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("devshim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    if argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .is_some_and(|n| n == "sai-device")
    {
        return sai_device(&argv[1..]);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEVSHIM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().cmd {
        Cmd::Ctl {
            board,
            what,
            tty,
            dir,
        } => match devshim::ctl::request(&board, tty, &what) {
            Ok(req) => ExitCode::from(devshim::ctl::run(&dir, &req)),
            Err(e) => {
                eprintln!("devshim: {e}");
                ExitCode::from(2)
            }
        },
        Cmd::List { state_dir, json } => list(&state_dir, json),
        Cmd::Run {
            state_dir,
            mut command,
        } => {
            if command.first().is_some_and(|a| a == "--") {
                command.remove(0);
            }
            if command.is_empty() {
                eprintln!("devshim: no command given: devshim run -- COMMAND [ARGS...]");
                return ExitCode::from(2);
            }
            match devshim::run::command(&command, &[], &state_dir) {
                Ok(code) => ExitCode::from(code),
                Err((code, msg)) => {
                    eprintln!("devshim: {msg}");
                    ExitCode::from(code)
                }
            }
        }
        Cmd::Lease {
            board,
            wait,
            dir,
            link_root,
            state_dir,
            rest,
        } => lease(board, wait, dir, link_root, state_dir, rest),
        Cmd::Serve {
            dir,
            link_root,
            user,
            state_dir,
            broker_grace,
        } => serve(dir, link_root, &user, state_dir, broker_grace),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait(arg: &str) -> Option<Duration> {
        match Cli::try_parse_from(["devshim", "lease", "--wait", arg, "t", "--", "true"]) {
            Ok(Cli {
                cmd: Cmd::Lease { wait, .. },
            }) => wait,
            Ok(_) => unreachable!(),
            Err(_) => None,
        }
    }

    #[test]
    fn durations() {
        assert_eq!(wait("30s"), Some(Duration::from_secs(30)));
        assert_eq!(wait("10m"), Some(Duration::from_secs(600)));
        assert_eq!(wait("1h"), Some(Duration::from_secs(3600)));
        assert_eq!(wait("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(wait("soon"), None);
        let Cmd::Serve { broker_grace, .. } = Cli::parse_from(["devshim", "serve"]).cmd else {
            unreachable!()
        };
        assert_eq!(broker_grace, Duration::from_secs(10));
    }
}
