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
    },
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEVSHIM_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Serve {
                dir,
                link_root,
                user,
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
