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
    let user = current_user();

    let board =
        FakeBoard::plug(&by_id, BOARD_LINK).context("can't make the simulated board's pty")?;
    let board_task = tokio::spawn(board.run_echo(banner_every, shutdown.clone()));
    let broker = tokio::spawn(server::run(
        config,
        server::Options {
            run_dir: run_dir.clone(),
        },
        Box::new(ByIdSource::new(&by_id)),
        shutdown.clone(),
    ));
    let shim = tokio::spawn(devshim::serve::serve(
        devshim::serve::Options {
            dir: run_dir.join("machines/demo"),
            link_root: guest_dev.clone(),
            user,
            state_dir: root.join("guest/run/devshim"),
            broker_grace: devshim::serve::DEFAULT_BROKER_GRACE,
        },
        shutdown.clone(),
    ));

    let guest_link = guest_dev.join("serial/by-id").join(BOARD_LINK);
    let t0 = Instant::now();
    while guest_link.symlink_metadata().is_err() {
        if t0.elapsed() > Duration::from_secs(10) || broker.is_finished() || shim.is_finished() {
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
    let r1 = broker.await?;
    let r2 = shim.await?;
    let _ = board_task.await?;
    drop(tmp);
    println!("devbroker demo stopped; {} removed.", root.display());
    r1.and(r2)
}

/// The user running the demo, as devshim's owner of the guest pty.
fn current_user() -> devshim::users::User {
    let uid = nix::unistd::getuid().as_raw();
    let gid = nix::unistd::getgid().as_raw();
    devshim::users::lookup(Path::new("/"), &uid.to_string()).unwrap_or(devshim::users::User {
        name: uid.to_string(),
        uid,
        gid,
        home: "/".into(),
    })
}
