//! `devbroker demo`: the whole path on one machine, no hardware, no root.
//!
//! A simulated board (a pty that echoes and prints a boot banner), the
//! broker watching a by-id directory, and devshim publishing the guest side
//! — all in a temporary directory that is removed on exit.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use crate::fakeboard::FakeBoard;
use crate::server;
use crate::source::by_id::ByIdSource;

/// The by-id name the demo board gets.
pub const BOARD_LINK: &str = "usb-devbroker_Demo_Board_DEMO0001-if00-port0";

const CONFIG: &str = r#"
[[board]]
name = "demo"
compatible = ["demo-board"]
machines = ["demo"]

[[board.tty]]
name = "console"
rate = 115200
match = { by-id = "usb-devbroker_Demo_Board_DEMO0001-if00-port0" }
"#;

/// Runs the demo until `shutdown` (Ctrl-C) or `duration`.
pub async fn run(
    shutdown: CancellationToken,
    duration: Option<Duration>,
    banner_every: Duration,
) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("devbroker-demo-")
        .tempdir()
        .context("can't make a temporary directory")?;
    let root = tmp.path().to_path_buf();
    let by_id = root.join("host/dev/serial/by-id");
    let run_dir = root.join("run");
    let guest_dev = root.join("guest/dev");
    let config =
        crate::config::parse(Path::new("<demo>"), CONFIG).expect("the demo config is valid");
    let devshim = devshim_binary()?;

    let board =
        FakeBoard::plug(&by_id, BOARD_LINK).context("can't make the simulated board's pty")?;
    let board_task = tokio::spawn(board.run_echo(banner_every, shutdown.clone()));
    let broker = tokio::spawn(server::run(
        config,
        server::Options {
            run_dir: run_dir.clone(),
            config: None,
        },
        Box::new(ByIdSource::new(&by_id)),
        shutdown.clone(),
    ));
    // The guest side as a container runs it: the devshim binary.
    let mut shim = tokio::process::Command::new(&devshim)
        .arg("serve")
        .arg("--dir")
        .arg(run_dir.join("machines/demo"))
        .arg("--link-root")
        .arg(&guest_dev)
        .arg("--user")
        .arg(nix::unistd::getuid().as_raw().to_string())
        .arg("--state-dir")
        .arg(root.join("guest/run/devshim"))
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("can't start {}", devshim.display()))?;

    let guest_link = guest_dev.join("serial/by-id").join(BOARD_LINK);
    let t0 = Instant::now();
    while guest_link.symlink_metadata().is_err() {
        let shim_ended = shim.try_wait()?.is_some();
        if t0.elapsed() > Duration::from_secs(10) || broker.is_finished() || shim_ended {
            shutdown.cancel();
            let _ = broker.await?;
            anyhow::bail!("the guest link did not appear; see the log above");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!();
    println!("devbroker demo is running: a simulated board, the broker and devshim.");
    println!();
    println!("  host side   {}", by_id.join(BOARD_LINK).display());
    println!("  guest side  {}", guest_link.display());
    println!();
    println!("Open the board as a job would (exit picocom with Ctrl-A Ctrl-X):");
    println!();
    println!("  picocom -b 115200 {}", guest_link.display());
    println!();
    println!(
        "See who holds it:  devbroker status --run-dir {}",
        run_dir.display()
    );
    println!("Stop the demo with Ctrl-C; it removes {}.", root.display());
    println!();

    match duration {
        Some(d) => {
            tokio::select! { _ = shutdown.cancelled() => {}, _ = tokio::time::sleep(d) => shutdown.cancel() }
        }
        None => shutdown.cancelled().await,
    }
    if let Some(pid) = shim.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    let stopped = tokio::time::timeout(Duration::from_secs(5), shim.wait()).await;
    let r1 = broker.await?;
    let _ = board_task.await?;
    drop(tmp);
    println!("devbroker demo stopped; {} removed.", root.display());
    match stopped {
        Ok(Ok(s)) if s.success() => r1,
        Ok(Ok(s)) => r1.and(Err(anyhow::anyhow!("devshim ended with {s}"))),
        Ok(Err(e)) => r1.and(Err(e.into())),
        Err(_) => r1.and(Err(anyhow::anyhow!("devshim did not stop within 5 s"))),
    }
}

/// The devshim the demo runs: `DEVBROKER_DEVSHIM`, else the one next to
/// this devbroker (a cargo build puts both in `target/<profile>/`, the
/// package in `/usr/lib/devbroker`).
fn devshim_binary() -> anyhow::Result<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("DEVBROKER_DEVSHIM") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().context("can't find this program's path")?;
    let candidates = [
        exe.with_file_name("devshim"),
        std::path::PathBuf::from("/usr/lib/devbroker/devshim"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "devshim is not next to devbroker ({}): build it too (`cargo build --release -p devshim`), or set DEVBROKER_DEVSHIM",
                candidates[0].display()
            )
        })
}
