//! Prometheus metrics on the socket `[metrics] listen` names: what a farm's
//! monitoring scrapes.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use devbroker_tests::*;

const S: Duration = Duration::from_secs(1);
const FTDI: &str = "usb-FTDI_FT232R_USB_UART_M3TR1C-if00-port0";

fn scrape(sock: &std::path::Path, request: &str) -> String {
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(5 * S)).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// The value of one series.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

#[test]
fn metrics_count_bytes_sessions_refusals_and_lease_waits() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("metrics.sock");
    let w = World::new(&format!(
        "[metrics]\nlisten = \"unix:{}\"\n\n[[board]]\nname = \"esp1\"\nmachines = [\"ci1\", \"ci2\"]\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"{FTDI}\" }}\n",
        sock.display()
    ));
    let board = w.plug(FTDI);
    let _b = w.broker();
    wait_for(5 * S, "the metrics socket", || exists(&sock));
    wait_for(5 * S, "the board", || w.present("esp1"));
    let get = |series: &str| {
        let text = scrape(&sock, "GET /metrics HTTP/1.1\r\nHost: devbroker\r\n\r\n");
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        value(&text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
    };
    let tty = "{board=\"esp1\",tty=\"console\"}";
    assert_eq!(get(&format!("devbroker_tty_present{tty}")), 1.0);
    assert_eq!(get(&format!("devbroker_sessions_total{tty}")), 0.0);

    // ci1 leases; ci2 waits, then gets it.
    let mut c1 =
        devbroker_tests::control::ControlClient::connect(&w.run.join("machines/ci1/control.sock"));
    c1.lease_board("esp1");
    let mut c2 =
        devbroker_tests::control::ControlClient::connect(&w.run.join("machines/ci2/control.sock"));
    let r = c2.ask(serde_json::json!({"request": "lease", "board": "esp1"}));
    assert_eq!(r["reply"], "waiting");
    assert_eq!(get("devbroker_lease_waiting{board=\"esp1\"}"), 1.0);
    std::thread::sleep(Duration::from_millis(100));
    drop(c1);
    assert_eq!(c2.next()["reply"], "granted");
    assert_eq!(get("devbroker_lease_waits_total{board=\"esp1\"}"), 1.0);
    assert!(get("devbroker_lease_wait_seconds_total{board=\"esp1\"}") >= 0.1);

    // A session moves 5 bytes each way; a second client is refused.
    let path = w.run.join("machines/ci2/esp1.console.sock");
    wait_for(5 * S, "ci2's socket", || exists(&path));
    let mut s = UnixStream::connect(&path).unwrap();
    let mut first = [0u8; 1];
    s.read_exact(&mut first).unwrap();
    wait_for(5 * S, "the session", || w.holder("esp1").is_some());
    s.write_all(b"hello").unwrap();
    assert_eq!(
        read_exact_timeout(board.master_fd(), 5, 5 * S).unwrap(),
        b"hello"
    );
    let refused = first_bytes_as(&path, 0, 0, &[0], None);
    assert!(
        String::from_utf8_lossy(&refused).contains("in use"),
        "{refused:?}"
    );
    assert_eq!(get(&format!("devbroker_sessions_total{tty}")), 1.0);
    // The board may read the bytes before the broker counts its write.
    let to_board = format!("devbroker_bytes_to_board_total{tty}");
    wait_for(5 * S, "the bytes to the board counted", || {
        get(&to_board) >= 5.0
    });
    assert_eq!(get(&to_board), 5.0);
    assert_eq!(get(&format!("devbroker_refusals_total{tty}")), 1.0);
    assert_eq!(get(&format!("devbroker_tty_in_session{tty}")), 1.0);
    // Anything but GET /metrics is turned away.
    assert!(scrape(&sock, "GET / HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 404"));
}

#[test]
fn a_reload_to_an_address_in_use_is_refused_and_the_metrics_stay() {
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("metrics.sock");
    let board = format!(
        "[[board]]\nname = \"esp1\"\nmachines = [\"ci1\"]\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"{FTDI}\" }}\n"
    );
    let w = World::new(&format!(
        "[metrics]\nlisten = \"unix:{}\"\n\n{board}",
        sock.display()
    ));
    let _b = w.broker();
    wait_for(5 * S, "the metrics socket", || exists(&sock));
    // Another program has the address the new config names.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    std::fs::write(
        &w.config,
        format!("[metrics]\nlisten = \"{addr}\"\n\n{board}"),
    )
    .unwrap();
    let run = w.run.display().to_string();
    let (ok, out) = devbroker_cli(&["reload", "--run-dir", &run]);
    assert!(!ok, "the reload is refused:\n{out}");
    assert!(
        out.contains(&format!("can't serve metrics on {addr}")) && out.contains("in use"),
        "the refusal names the address and why:\n{out}"
    );
    let text = scrape(&sock, "GET /metrics HTTP/1.1\r\n\r\n");
    assert!(
        text.starts_with("HTTP/1.1 200 OK\r\n") && text.contains("devbroker_tty_present"),
        "the old socket is served again:\n{text}"
    );
    // Once the address is free, the same reload takes.
    drop(taken);
    let (ok, out) = devbroker_cli(&["reload", "--run-dir", &run]);
    assert!(ok, "{out}\n{}", w.logs());
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(5 * S)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.contains("devbroker_tty_present"), "{text}");
    assert!(!exists(&sock), "the unix socket is gone");
}

#[test]
fn a_start_that_cannot_serve_the_metrics_fails_and_says_where() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let w = World::new(&format!(
        "[metrics]\nlisten = \"{addr}\"\n\n[[board]]\nname = \"esp1\"\nmachines = [\"ci1\"]\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"{FTDI}\" }}\n"
    ));
    let mut b = std::process::Command::new(bin("devbroker"))
        .args(["run", "--config"])
        .arg(&w.config)
        .arg("--run-dir")
        .arg(&w.run)
        .arg("--by-id-dir")
        .arg(&w.by_id)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_for(10 * S, "the broker to give up", || {
        status = b.try_wait().unwrap();
        status.is_some()
    });
    let mut err = String::new();
    b.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.unwrap().success(), "{err}");
    assert!(
        err.contains(&format!("can't serve metrics on {addr}")) && err.contains("in use"),
        "the error names the address and why:\n{err}"
    );
    assert!(
        std::os::unix::net::UnixStream::connect(w.run.join("broker.sock")).is_err(),
        "nothing is left answering"
    );
}
