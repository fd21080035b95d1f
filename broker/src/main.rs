//! devbroker command line: a thin layer over the library.

use std::process::ExitCode;

use clap::Parser;
use devbroker::cli::{Cli, Cmd};
use devbroker::{config, demo, server, shutdown, status};

fn main() -> ExitCode {
    devbroker::logging::init("DEVBROKER_LOG");
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        // A config's problems, each with its place and help, as `check` prints them.
        Err(e) => match e.downcast_ref::<config::ConfigErrors>() {
            Some(problems) => {
                eprintln!("{problems}");
                ExitCode::from(2)
            }
            None => {
                eprintln!("devbroker: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// One thread for the relays; port controls that wait for a drain, NSS
/// lookups and `/proc` scans run on a blocking pool whose idle threads go
/// within half a second, so a burst of sessions leaves no stacks behind.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(64)
        .thread_keep_alive(std::time::Duration::from_millis(500))
        .build()?)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.cmd {
        Cmd::Run {
            config: path,
            adapters,
            run_dir,
        } => {
            let src = adapters.source()?;
            let cfg = config::load(&path)?;
            server::raise_fd_limit();
            runtime()?.block_on(async {
                let stop = shutdown::on_signals()?;
                server::run(
                    cfg,
                    server::Options {
                        run_dir,
                        config: Some(path),
                    },
                    src,
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
        Cmd::Boards {
            suggest,
            json,
            config: path,
            adapters,
        } => {
            let cfg = if path.exists() {
                config::load(&path)?
            } else {
                eprintln!(
                    "devbroker: {} does not exist yet; listing against an empty config",
                    path.display()
                );
                config::Config::default()
            };
            let present = adapters.present()?;
            let report = devbroker::suggest::survey(&present, &cfg);
            if json {
                println!("{}", serde_json::to_string_pretty(&report.to_json())?);
            } else {
                print!("{}", report.render(suggest));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { config: path } => {
            let c = config::load(&path)?;
            for w in config::warnings(&c) {
                eprintln!("{}: warning: {w}", path.display());
            }
            let ttys: usize = c.boards.iter().map(|b| b.ttys.len()).sum();
            println!(
                "{}: ok, {} boards, {} ttys, {} machines",
                path.display(),
                c.boards.len(),
                ttys,
                c.machines.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Reload { run_dir } => {
            match status::ask(
                &run_dir.join(server::ADMIN_SOCKET),
                &wire::control::Request::Reload {},
            )? {
                wire::control::Reply::Reloaded {
                    added,
                    removed,
                    changed,
                } => {
                    println!(
                        "reloaded: {} boards added, {} removed, {} changed",
                        added.len(),
                        removed.len(),
                        changed.len()
                    );
                    Ok(ExitCode::SUCCESS)
                }
                other => anyhow::bail!("unexpected reply: {other:?}"),
            }
        }
        Cmd::Machine { cmd } => devbroker::machine::command::run(cmd).map(ExitCode::from),
        Cmd::Log {
            board,
            follow,
            run_dir,
        } => {
            status::log(&run_dir.join(server::ADMIN_SOCKET), &board, follow)?;
            Ok(ExitCode::SUCCESS)
        }
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
