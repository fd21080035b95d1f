//! Console capture: the ring, the log file, `always` versus `session`.

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devbroker_tests::*;

const S: Duration = Duration::from_secs(1);

fn config(mode: &str, log: &std::path::Path) -> String {
    format!(
        "[[board]]\nname = \"esp1\"\nmachines = [\"ci1\"]\n[board.console]\nmode = \"{mode}\"\nlog = \"{}\"\nlog-max = 4096\nlog-keep = 2\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"usb-Console-if00\" }}\n",
        log.display()
    )
}

/// Reads `fd` into `out` until `out` holds `want` (within 5 s).
fn read_until(fd: i32, out: &mut String, want: &str) {
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    while !out.contains(want) {
        let left = (5 * S).checked_sub(t0.elapsed());
        let left = left.unwrap_or_else(|| panic!("no {want:?} within 5 s: {out:?}"));
        match read_timeout(fd, &mut buf, left).unwrap() {
            Some(0) => panic!("ended before {want:?}: {out:?}"),
            Some(n) => out.push_str(&String::from_utf8_lossy(&buf[..n])),
            None => {}
        }
    }
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
    wait_for(5 * S, "the drain", || {
        std::fs::read_to_string(w.path("broker.log"))
            .unwrap_or_default()
            .contains("capturing the console of esp1.console")
    });
    write_all_fd(
        board.master_fd(),
        b"rst:0x1 (POWERON_RESET),boot:0x13\r\nbanner while nobody listens\r\n",
    )
    .unwrap();
    wait_for(2 * S, "the banner in the ring", || {
        log_of(&w).contains("banner while nobody listens")
    });
    wait_for(2 * S, "the banner in the log file", || {
        std::fs::read_to_string(&logfile)
            .unwrap_or_default()
            .contains("banner while nobody listens")
    });

    // A session takes the open port over; what the board sends reaches the tool and the ring.
    let _s = w.shim("ci1");
    let link = w.guest_link("ci1", "usb-Console-if00");
    wait_for(5 * S, "the link", || exists(&link));
    let tool = Tool::open(&link).unwrap();
    wait_for(5 * S, "the session", || w.holder("esp1").is_some());
    write_all_fd(board.master_fd(), b"to the tool\r\n").unwrap();
    let got = read_exact_timeout(tool.fd.as_raw_fd(), 13, 2 * S).unwrap();
    assert_eq!(got, b"to the tool\r\n");
    assert!(log_of(&w).contains("to the tool"));
    // The tool leaves; the broker drains again.
    drop(tool);
    wait_for(2 * S, "the session to end", || w.holder("esp1").is_none());
    std::thread::sleep(Duration::from_millis(200));
    write_all_fd(board.master_fd(), b"after the session\r\n").unwrap();
    wait_for(2 * S, "output after the session", || {
        log_of(&w).contains("after the session")
    });

    // --follow prints new output as it comes.
    let mut follow = Command::new(bin("devbroker"))
        .args(["log", "esp1", "--follow", "--run-dir"])
        .arg(&w.run)
        .stdout(Stdio::piped())
        .die_with_parent()
        .spawn()
        .unwrap();
    let followed = follow.stdout.take().unwrap();
    let mut out = String::new();
    // It prints the ring, then follows from there.
    read_until(
        followed.as_raw_fd(),
        &mut out,
        "banner while nobody listens",
    );
    write_all_fd(board.master_fd(), b"followed line\r\n").unwrap();
    read_until(followed.as_raw_fd(), &mut out, "followed line");
    let _ = follow.kill();
    let _ = follow.wait();

    // The log rotates by size (checked once the last line is in: a rotation
    // renames the log before it makes a new one).
    for _ in 0..100 {
        write_all_fd(board.master_fd(), &[b'x'; 100]).unwrap();
    }
    write_all_fd(board.master_fd(), b"last line\r\n").unwrap();
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap_or_default();
    wait_for(3 * S, "the last line in the log", || {
        (read(&tmp.path().join("esp1.log.1")) + &read(&logfile)).ends_with("last line\r\n")
    });
    assert!(tmp.path().join("esp1.log.1").exists(), "no rotated log");
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
    wait_for(5 * S, "the session", || w.holder("esp1").is_some());
    write_all_fd(board.master_fd(), b"while attached\r\n").unwrap();
    wait_for(2 * S, "output while attached", || {
        log_of(&w).contains("while attached")
    });
    assert!(!log_of(&w).contains("banner while nobody listens"));
    drop(tool);
    // Machines read their boards' consoles on their control socket; others are refused.
    let mut c =
        devbroker_tests::control::ControlClient::connect(&w.run.join("machines/ci1/control.sock"));
    let r = c.ask(serde_json::json!({"request": "log", "board": "esp1"}));
    assert!(
        r["text"].as_str().unwrap().contains("while attached"),
        "{r}"
    );
}
