//! Console capture: the ring, the log file, `always` versus `session`.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use devbroker_tests::*;

const S: Duration = Duration::from_secs(1);

fn config(mode: &str, log: &std::path::Path) -> String {
    format!(
        "[[board]]\nname = \"esp1\"\nmachines = [\"ci1\"]\n[board.console]\nmode = \"{mode}\"\nlog = \"{}\"\nlog-max = 4096\nlog-keep = 2\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"usb-Console-if00\" }}\n",
        log.display()
    )
}

fn log_of(w: &World) -> String {
    let (ok, out) = devbroker_cli(&["log", "esp1", "--run-dir", w.run.to_str().unwrap()]);
    assert!(ok, "{out}");
    out
}

#[test]
fn always_mode_keeps_what_nobody_was_attached_for() {
    let tmp = tempfile::tempdir().unwrap();
    let logfile = tmp.path().join("esp1.log");
    let w = World::new(&config("always", &logfile));
    let board = w.plug("usb-Console-if00");
    let _b = w.broker();
    wait_for(5 * S, "the drain", || std::fs::read_to_string(w.path("broker.log")).unwrap_or_default().contains("capturing the console of esp1.console"));
    write_all_fd(board.master_fd(), b"rst:0x1 (POWERON_RESET),boot:0x13\r\nbanner while nobody listens\r\n").unwrap();
    wait_for(2 * S, "the banner in the ring", || log_of(&w).contains("banner while nobody listens"));
    wait_for(2 * S, "the banner in the log file", || std::fs::read_to_string(&logfile).unwrap_or_default().contains("banner while nobody listens"));

    // A session takes the open port over; what the board sends reaches the tool and the ring.
    let _s = w.shim("ci1");
    let link = w.guest_link("ci1", "usb-Console-if00");
    wait_for(5 * S, "the link", || exists(&link));
    let tool = Tool::open(&link).unwrap();
    wait_for(5 * S, "the session", || w.status()["boards"][0]["ttys"][0]["holder"].is_object());
    write_all_fd(board.master_fd(), b"to the tool\r\n").unwrap();
    let got = read_exact_timeout(std::os::fd::AsRawFd::as_raw_fd(&tool.fd), 13, 2 * S).unwrap();
    assert_eq!(got, b"to the tool\r\n");
    assert!(log_of(&w).contains("to the tool"));
    // The tool leaves; the broker drains again.
    drop(tool);
    wait_for(2 * S, "the session to end", || w.status()["boards"][0]["ttys"][0]["holder"].is_null());
    std::thread::sleep(Duration::from_millis(200));
    write_all_fd(board.master_fd(), b"after the session\r\n").unwrap();
    wait_for(2 * S, "output after the session", || log_of(&w).contains("after the session"));

    // --follow prints new output as it comes.
    let mut follow = Command::new(bin("devbroker"))
        .args(["log", "esp1", "--follow", "--run-dir"])
        .arg(&w.run)
        .stdout(Stdio::piped())
        .die_with_parent()
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    write_all_fd(board.master_fd(), b"followed line\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let _ = follow.kill();
    let mut out = String::new();
    follow.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    let _ = follow.wait();
    assert!(out.contains("banner while nobody listens") && out.contains("followed line"), "{out}");

    // The log rotates by size.
    for _ in 0..100 {
        write_all_fd(board.master_fd(), &[b'x'; 100]).unwrap();
    }
    wait_for(3 * S, "a rotated log", || tmp.path().join("esp1.log.1").exists());
    assert!(std::fs::metadata(&logfile).unwrap().len() <= 4096);
    assert!(!tmp.path().join("esp1.log.3").exists());
}

#[test]
fn session_mode_captures_only_while_attached() {
    let tmp = tempfile::tempdir().unwrap();
    let w = World::new(&config("session", &tmp.path().join("esp1.log")));
    let board = w.plug("usb-Console-if00");
    let _b = w.broker();
    let _s = w.shim("ci1");
    let link = w.guest_link("ci1", "usb-Console-if00");
    wait_for(5 * S, "the link", || exists(&link));
    write_all_fd(board.master_fd(), b"banner while nobody listens\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!log_of(&w).contains("banner while nobody listens"));
    let tool = Tool::open(&link).unwrap();
    wait_for(5 * S, "the session", || w.status()["boards"][0]["ttys"][0]["holder"].is_object());
    write_all_fd(board.master_fd(), b"while attached\r\n").unwrap();
    wait_for(2 * S, "output while attached", || log_of(&w).contains("while attached"));
    assert!(!log_of(&w).contains("banner while nobody listens"));
    drop(tool);
    // Machines read their boards' consoles on their control socket; others are refused.
    let mut c = devbroker_tests::control::ControlClient::connect(&w.run.join("machines/ci1/control.sock"));
    let r = c.ask(serde_json::json!({"request": "log", "board": "esp1"}));
    assert!(r["text"].as_str().unwrap().contains("while attached"), "{r}");
}
