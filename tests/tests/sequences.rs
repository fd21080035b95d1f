//! Named sequences run on the host through the control plane.

use std::time::Duration;

use devbroker_tests::control::ControlClient;
use devbroker_tests::*;
use serde_json::json;

const FTDI: &str = "usb-FTDI_FT232R_USB_UART_5EQ-if00-port0";

const CONFIG: &str = r#"
[[board]]
name = "esp1"
compatible = ["esp32"]
machines = ["ci1"]

[board.sequences]
reset = "rts=1 sleep=20ms rts=0"
slow = "dtr=1 sleep=30ms dtr=0 sleep=30ms baud=460800"

[[board.tty]]
name = "console"
match = { by-id = "usb-FTDI_FT232R_USB_UART_5EQ-if00-port0" }

[[board]]
name = "other"
machines = ["ci2"]
[[board.tty]]
name = "console"
match = { by-id = "usb-Other-if00" }
"#;

#[test]
fn sequences_run_on_the_host_with_their_timing() {
    let w = World::new(CONFIG);
    let board = w.plug(FTDI);
    let _b = w.broker();
    let mut c = ControlClient::connect(&w.run.join("machines/ci1/control.sock"));
    // The board's own sequence, on a port nobody has open: the broker opens it.
    let r = c.ask(json!({"request": "run", "board": "esp1", "sequence": "slow"}));
    assert_eq!(r["reply"], "ran", "{r}");
    let steps: Vec<&str> = r["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["dtr=1", "dtr=0", "baud=460800"]);
    assert_eq!(r["steps"][1]["nominal_us"], 30_000);
    assert_eq!(r["steps"][2]["nominal_us"], 60_000);
    for s in r["steps"].as_array().unwrap() {
        assert!(s["late_us"].as_f64().unwrap() < 20_000.0, "{s}");
    }
    assert_eq!(board.baud(), 460800, "baud= reached the port");
    // Explicit steps and a built-in.
    let r = c.ask(
        json!({"request": "run", "board": "esp1", "steps": "dtr=0 rts=1 break=10ms baud=115200"}),
    );
    assert_eq!(r["reply"], "ran", "{r}");
    assert_eq!(board.baud(), 115200);
    let r = c.ask(json!({"request": "run", "board": "esp1", "sequence": "esp32-bootloader"}));
    assert_eq!(r["reply"], "ran", "{r}");

    // While a session holds the port, the sequence runs on that port.
    let _s = w.shim("ci1");
    let link = w.guest_link("ci1", FTDI);
    wait_for(Duration::from_secs(5), "the link", || exists(&link));
    let tool = Tool::open(&link).unwrap();
    wait_for(Duration::from_secs(5), "the session", || {
        w.status()["boards"][0]["ttys"][0]["holder"].is_object()
    });
    let r = c.ask(json!({"request": "run", "board": "esp1", "steps": "baud=230400"}));
    assert_eq!(r["reply"], "ran", "{r}");
    assert_eq!(board.baud(), 230400);
    drop(tool);

    // devshim ctl, as a job runs it.
    let dir = w.run.join("machines/ci1");
    let out = std::process::Command::new(devshim())
        .args(["ctl", "--dir", dir.to_str().unwrap(), "esp1", "reset"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rts=1") && text.contains("20.000 ms  rts=0"),
        "{text}"
    );
    let out = std::process::Command::new(devshim())
        .args([
            "ctl",
            "--dir",
            dir.to_str().unwrap(),
            "esp1",
            "baud=57600",
            "dtr=1",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(board.baud(), 57600);
    let out = std::process::Command::new(devshim())
        .args(["ctl", "--dir", dir.to_str().unwrap(), "other", "reset"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("board other is not available to machine ci1"));

    // Refusals name the problem.
    for (req, want) in [
        (
            json!({"request": "run", "board": "esp1", "sequence": "nope"}),
            "has no sequence \"nope\"; it has reset, slow, esp32-bootloader",
        ),
        (
            json!({"request": "run", "board": "esp1", "steps": "dtr=5"}),
            "dtr takes 0 or 1",
        ),
        (
            json!({"request": "run", "board": "other", "sequence": "reset"}),
            "board other is not available to machine ci1",
        ),
        (
            json!({"request": "run", "board": "nowhere", "sequence": "reset"}),
            "board nowhere is not available to machine ci1",
        ),
        (
            json!({"request": "run", "board": "esp1", "steps": "sleep=30s sleep=31s"}),
            "lasts 1m 1s in all; the limit is 1m",
        ),
        (json!({"request": "run", "board": "esp1"}), "exactly one of"),
    ] {
        let r = c.ask(req);
        assert_eq!(r["reply"], "error", "{r}");
        assert!(r["message"].as_str().unwrap().contains(want), "{r}");
    }
}

#[test]
fn a_bad_sequence_in_the_config_is_refused() {
    let (ok, out) = {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "[[board]]\nname = \"a\"\n[board.sequences]\nreset = \"rts=1 sleep=10\"\n[[board.tty]]\nname = \"c\"\nmatch = { by-id = \"x\" }\n").unwrap();
        devbroker_cli(&["check", "--config", p.to_str().unwrap()])
    };
    assert!(!ok);
    assert!(
        out.contains(":4:9: sequence \"reset\": \"10\" is not a duration like 100ms"),
        "{out}"
    );
}
