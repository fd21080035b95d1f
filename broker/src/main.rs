//! devbroker command line: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use devbroker::source::{by_id, udev, Source};
use devbroker::{config, demo, server, shutdown, status};

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
        #[command(flatten)]
        adapters: SourceArgs,
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
    /// Print what a board's console sent (its capture ring); --follow keeps printing.
    Log {
        board: String,
        #[arg(long, short)]
        follow: bool,
        #[arg(long, default_value = server::DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// List the USB serial adapters plugged in, their identities and the
    /// board each is in the config; --suggest adds an entry for each other one.
    Boards {
        /// Print the listing as comments and a [[board]] entry for each adapter
        /// the config does not name: the output can be appended to the config.
        #[arg(long)]
        suggest: bool,
        #[arg(long, default_value = config::DEFAULT_PATH)]
        config: PathBuf,
        #[command(flatten)]
        adapters: SourceArgs,
    },
    /// Check a config file and print what it says.
    Check {
        #[arg(long, default_value = config::DEFAULT_PATH)]
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

#[derive(Subcommand)]
enum MachineCmd {
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
        #[arg(long, default_value = server::DEFAULT_RUN_DIR)]
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
        #[arg(long, default_value = config::DEFAULT_PATH)]
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
struct SourceArgs {
    /// Where adapters come from [default: udev when udevd runs
    /// (/run/udev/control exists), else by-id; by-id when --by-id-dir is given].
    #[arg(long, value_enum)]
    source: Option<SourceKind>,
    /// The directory of by-id links for the by-id source [default: /dev/serial/by-id].
    #[arg(long)]
    by_id_dir: Option<PathBuf>,
}

impl SourceArgs {
    fn kind(&self) -> anyhow::Result<SourceKind> {
        let kind = self
            .source
            .unwrap_or(if self.by_id_dir.is_some() || !udev::udev_running() {
                SourceKind::ById
            } else {
                SourceKind::Udev
            });
        if kind == SourceKind::Udev && self.by_id_dir.is_some() {
            anyhow::bail!("--by-id-dir applies to --source by-id only");
        }
        Ok(kind)
    }

    fn dir(&self) -> PathBuf {
        self.by_id_dir
            .clone()
            .unwrap_or_else(|| by_id::DEFAULT_DIR.into())
    }

    /// The source `run` watches.
    fn source(&self) -> anyhow::Result<Box<dyn Source>> {
        Ok(match self.kind()? {
            SourceKind::Udev => Box::new(udev::UdevSource::new()),
            SourceKind::ById => Box::new(by_id::ByIdSource::new(self.dir())),
        })
    }

    /// The adapters present now, for `boards`.
    fn present(&self) -> anyhow::Result<Vec<devbroker::adapter::Adapter>> {
        Ok(match self.kind()? {
            SourceKind::Udev => devbroker::suggest::present_udev()
                .map_err(|e| anyhow::anyhow!("can't list udev's tty devices: {e}"))?,
            SourceKind::ById => devbroker::suggest::present_by_id(&self.dir()),
        })
    }
}

/// Where the broker learns about adapters.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SourceKind {
    /// udev: enumerate, then a udev monitor; identities from udev properties.
    Udev,
    /// A directory of by-id links watched with inotify (demo, hosts without udevd).
    ById,
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

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
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
                server::run(cfg, server::Options { run_dir }, src, stop).await
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
            let report = devbroker::suggest::report(&present, &cfg);
            print!("{}", report.render(suggest));
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Check { config: path } => {
            let c = config::load(&path)?;
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
        Cmd::Machine { cmd } => machine_cmd(cmd),
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

fn machine_cmd(cmd: MachineCmd) -> anyhow::Result<ExitCode> {
    use devbroker::machine::{self, check, network, setup};
    match cmd {
        MachineCmd::Setup {
            name,
            tree,
            nspawn_dir,
            user,
            dry_run,
            apply_host_network,
            run_dir,
            devshim,
            state_dir,
            machines_dir,
            config: cfg_path,
        } => {
            let cfg = if cfg_path.exists() {
                config::load(&cfg_path)?
            } else {
                config::Config::default()
            };
            let entry = cfg.machines.iter().find(|m| m.name == name);
            let (user, uid) = match (&user, entry) {
                (Some(u), _) => config::parse_job_user(u).map_err(anyhow::Error::msg)?,
                (None, Some(m)) => (m.user.clone(), m.uid),
                (None, None) => {
                    config::parse_job_user(config::DEFAULT_JOB_USER).expect("valid default")
                }
            };
            let tree = tree
                .or_else(|| entry.map(|m| m.tree.clone()))
                .unwrap_or_else(|| machines_dir.join(&name));
            let devshim = match devshim {
                Some(p) => p,
                None => std::env::current_exe()?.with_file_name("devshim"),
            };
            let names: Vec<String> = devbroker::plan::machines(&cfg).into_iter().collect();
            let others = machine::known_machines(
                &machines_dir,
                &[
                    PathBuf::from("/etc/systemd/nspawn"),
                    PathBuf::from("/run/systemd/nspawn"),
                    nspawn_dir.clone(),
                ],
                &names,
            );
            let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
            let opts = setup::SetupOptions {
                name: name.clone(),
                tree: abs(tree),
                nspawn_dir: abs(nspawn_dir),
                run_dir: abs(run_dir),
                user,
                uid,
                devshim,
                state_dir: abs(state_dir),
                machines_dir: abs(machines_dir),
                other_machines: others,
                dry_run,
            };
            let rep = setup::setup(&opts)?;
            if dry_run {
                print!("{}", rep.diff);
                if rep.changed.is_empty() {
                    println!("machine {name}: already set up; nothing would change");
                } else {
                    println!(
                        "machine {name}: {} paths would change (dry run: nothing written)",
                        rep.changed.len()
                    );
                }
            } else if rep.changed.is_empty() {
                println!("machine {name}: already set up; nothing changed");
            } else {
                for c in &rep.changed {
                    println!("  wrote {c}");
                }
                println!("machine {name}: set up ({} paths changed; `devbroker machine remove {name}` undoes it)", rep.changed.len());
            }
            if rep.uid_shift != 0 {
                println!(
                    "  the tree is owned by uid {}: private users (-U) shift ids by that much",
                    rep.uid_shift
                );
            }
            let steps = network::host_steps(&name, rep.subnet);
            println!(
                "\nHost side, for 192.168.{}.0/24 on {}:\n{}",
                rep.subnet,
                machine::name::veth(&name),
                network::render(&steps)
            );
            if apply_host_network && !dry_run {
                match network::apply(&steps) {
                    Ok(done) => print!("{done}"),
                    Err(e) => eprintln!("devbroker: {e}"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        MachineCmd::Check {
            name,
            fix,
            systemd_dir,
            nspawn_dir,
            udev_dir,
        } => {
            machine::name::check(&name).map_err(anyhow::Error::msg)?;
            let found = check::scan(&check::Places {
                machine: name.clone(),
                systemd_dir,
                nspawn_dirs: nspawn_dir,
                udev_dir,
            });
            if found.is_empty() {
                println!("machine {name}: no leftovers of binding devices by hand");
                return Ok(ExitCode::SUCCESS);
            }
            for f in &found {
                println!("{f}");
            }
            if fix {
                let fixed = check::fix(&found)?;
                for b in &fixed.backups {
                    println!("  backup kept: {}", b.display());
                }
                for r in &fixed.refused {
                    eprintln!("devbroker: not fixed: {r}");
                }
                if !fixed.refused.is_empty() {
                    println!(
                        "machine {name}: {} of {} files with leftovers fixed; fix the others by hand",
                        fixed.backups.len(),
                        fixed.backups.len() + fixed.refused.len()
                    );
                    return Ok(ExitCode::from(1));
                }
                println!(
                    "machine {name}: removed {} leftover lines; restart the container to drop them",
                    found.len()
                );
                Ok(ExitCode::SUCCESS)
            } else {
                println!("machine {name}: {} leftover lines; `devbroker machine check {name} --fix` removes them", found.len());
                Ok(ExitCode::from(1))
            }
        }
        MachineCmd::Remove { name, state_dir } => {
            let rep = setup::remove(&name, &state_dir)?;
            for u in &rep.undone {
                println!("  {u}");
            }
            for k in &rep.kept {
                println!("  kept {k}");
            }
            println!("machine {name}: removed what setup added");
            Ok(ExitCode::SUCCESS)
        }
    }
}
