//! sequence-bench: how far each step of a line sequence lands from its
//! nominal time when the broker runs it on the host (goal: p99 within 1 ms).
//!
//! Run `cargo build --release --workspace` first; this uses the release
//! broker next to it and a fake board (a pty: DTR/RTS calls return ENOTTY
//! at once, so the figures are the broker's scheduling, not a USB round trip).

use std::process::Command;
use std::time::Duration;

use devbroker_tests::control::ControlClient;
use devbroker_tests::procstat::percentile;
use devbroker_tests::{wait_for, DieWithParent, FakeBoard};
use serde_json::json;

fn main() {
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let dir = tempfile::Builder::new()
        .prefix("sequence-bench-")
        .tempdir()
        .unwrap();
    let by_id = dir.path().join("by-id");
    let _board = FakeBoard::plug(&by_id, "usb-Bench_Seq-if00").unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "[[board]]\nname = \"b\"\nmachines = [\"m\"]\n[[board.tty]]\nname = \"console\"\nmatch = { by-id = \"usb-Bench_Seq-if00\" }\n").unwrap();
    let run = dir.path().join("run");
    let exe = std::env::current_exe().unwrap().with_file_name("devbroker");
    let mut broker = Command::new(&exe)
        .args(["run", "--config"])
        .arg(&cfg)
        .arg("--by-id-dir")
        .arg(&by_id)
        .arg("--run-dir")
        .arg(&run)
        .env("DEVBROKER_LOG", "warn")
        .die_with_parent()
        .spawn()
        .expect("target/release/devbroker: run `cargo build --release --workspace` first");
    let control = run.join("machines/m/control.sock");
    wait_for(Duration::from_secs(10), "the broker", || {
        std::os::unix::net::UnixStream::connect(&control).is_ok()
    });
    let mut c = ControlClient::connect(&control);
    let mut late: Vec<f64> = Vec::new();
    for _ in 0..runs {
        let r = c.ask(json!({"request": "run", "board": "b", "sequence": "esp32-bootloader"}));
        assert_eq!(r["reply"], "ran", "{r}");
        late.extend(
            r["steps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["late_us"].as_f64().unwrap()),
        );
    }
    let _ = broker.kill();
    let _ = broker.wait();
    let (p50, p99, max) = (
        percentile(&mut late, 50),
        percentile(&mut late, 99),
        percentile(&mut late, 100),
    );
    println!(
        "sequence-bench: esp32-bootloader x {runs} ({} timed steps)",
        late.len()
    );
    println!(
        "  step lateness: p50 {:.0} us, p99 {:.0} us, max {:.0} us",
        p50, p99, max
    );
    println!(
        "  goal p99 within 1 ms: {}",
        if p99 <= 1000.0 { "ok" } else { "MISSED" }
    );
}
