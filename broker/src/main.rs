//! devbroker command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use devbroker::{config, demo, server, shutdown, source::by_id, status};

#[derive(Parser)]
#[command(
    name = "devbroker",
    version,
    about = "Relays the USB serial ports of embedded boards into containers and to host users"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the broker.
    Run {
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        /// Watch this directory of by-id links for adapters.
        #[arg(long, default_value = by_id::DEFAULT_DIR)]
        by_id_dir: PathBuf,
        #[arg(long, default_value = server::DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// Show each board and tty: present or not, who holds it since when, bytes each way.
    Status {
        #[arg(long, default_value = server::DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check a config file and print what it says.
    Check {
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
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

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DEVBROKER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("devbroker: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Run {
            config: path,
            by_id_dir,
            run_dir,
        } => {
            let cfg = match config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return Ok(ExitCode::from(2));
                }
            };
            runtime()?.block_on(async {
                let stop = shutdown::on_signals()?;
                server::run(
                    cfg,
                    server::Options {
                        run_dir,
                        etc: PathBuf::from("/etc"),
                    },
                    Box::new(by_id::ByIdSource::new(by_id_dir)),
                    stop,
                )
                .await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Status { run_dir, json } => {
            let s = status::fetch(&run_dir.join(server::ADMIN_SOCKET))?;
            status::print(&s, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { config: path } => match config::load(&path) {
            Ok(c) => {
                let ttys: usize = c.boards.iter().map(|b| b.ttys.len()).sum();
                println!(
                    "{}: ok, {} boards, {} ttys",
                    path.display(),
                    c.boards.len(),
                    ttys
                );
                Ok(ExitCode::SUCCESS)
            }
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::from(2))
            }
        },
        Cmd::Demo {
            duration,
            banner_every,
        } => {
            runtime()?.block_on(async {
                let stop = shutdown::on_signals()?;
                demo::run(stop, duration, banner_every).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
