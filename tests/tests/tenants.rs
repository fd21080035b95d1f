//! One tenant can't read another's console, stall the broker for the
//! others, or starve them: each machine sees only what its board printed
//! during its own lease, its sequences end with its lease, and its
//! connections, waiters and log lines are limited.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use devbroker_tests::control::ControlClient;
use devbroker_tests::*;
use serde_json::json;

const S: Duration = Duration::from_secs(1);
const FTDI: &str = "usb-FTDI_FT232R_USB_UART_T3N4NT-if00-port0";

/// One board shared by m1 and m2, one dedicated to m2, a type only m1's
/// and m2's boards have.
const CONFIG: &str = r#"
[[board]]
name = "shared"
compatible = ["esp32"]
machines = ["m1", "m2"]
[[board.tty]]
name = "console"
match = { by-id = "usb-FTDI_FT232R_USB_UART_T3N4NT-if00-port0" }

[[board]]
name = "own"
compatible = ["nrf52"]
machines = ["m2"]
host-groups = ["nosuchgroup"]
[[board.tty]]
name = "console"
match = { by-id = "usb-FTDI_FT232R_USB_UART_0THER-if00-port0" }
"#;

fn control(w: &World, machine: &str) -> ControlClient {
    ControlClient::connect(&w.run.join(format!("machines/{machine}/control.sock")))
}

fn release(c: &mut ControlClient, board: &str) {
    let r = c.ask(json!({"request": "release", "board": board}));
    assert_eq!(r["reply"], "released", "{r}");
}

fn log_text(c: &mut ControlClient, board: &str) -> String {
    let r = c.ask(json!({"request": "log", "board": board}));
    assert_eq!(r["reply"], "log", "{r}");
    r["text"].as_str().unwrap().to_string()
}

/// Prints `text` on the board and waits until the broker recorded it.
fn print(w: &World, board: &FakeBoard, text: &str) {
    write_all_fd(board.master_fd(), text.as_bytes()).unwrap();
    let mut admin = ControlClient::connect(&w.run.join("broker.sock"));
    wait_for(5 * S, "the broker to record the output", || {
        log_text(&mut admin, "shared").contains(text)
    });
}

/// A raw session on a machine's tty socket, keeping the port open (and so
/// the console captured in `session` mode).
fn session(w: &World, machine: &str) -> UnixStream {
    let path = w
        .run
        .join(format!("machines/{machine}/shared.console.sock"));
    wait_for(5 * S, "the leased board's socket", || exists(&path));
    let s = UnixStream::connect(&path).unwrap();
    let mut first = [0u8; 1];
    (&s).read_exact(&mut first).unwrap();
    assert_eq!(first[0], 255, "a session, not a refusal");
    wait_for(5 * S, "the session", || w.holder("shared").is_some());
    s
}

#[test]
fn a_machine_reads_only_what_its_board_printed_during_its_own_lease() {
    let w = World::new(CONFIG);
    let board = w.plug(FTDI);
    let _b = w.broker();
    let mut m1 = control(&w, "m1");
    let mut m2 = control(&w, "m2");

    m1.lease_board("shared");
    let s1 = session(&w, "m1");
    print(&w, &board, "m1 flashes\r\n");
    assert!(log_text(&mut m1, "shared").contains("m1 flashes"));
    // A follow taken during m1's lease.
    let mut follower = control(&w, "m1");
    let r = follower.ask(json!({"request": "log", "board": "shared", "follow": true}));
    assert!(r["text"].as_str().unwrap().contains("m1 flashes"), "{r}");
    drop(s1);
    release(&mut m1, "shared");

    m2.lease_board("shared");
    let s2 = session(&w, "m2");
    print(&w, &board, "secret of m2\r\n");
    let text = log_text(&mut m2, "shared");
    assert!(
        text.contains("secret of m2"),
        "m2 reads what the board printed in its lease: {text}"
    );
    assert!(
        !text.contains("m1 flashes"),
        "m2 does not read what the board printed for m1: {text}"
    );
    // m1's follow ends instead of streaming m2's output.
    let r = follower.next();
    assert_eq!(r["reply"], "error", "{r}");
    assert_eq!(r["code"], "not-held", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("lease on shared ended"),
        "{r}"
    );
    // And m1 may not read the board at all while m2 holds it.
    let r = m1.ask(json!({"request": "log", "board": "shared"}));
    assert_eq!(r["reply"], "error", "{r}");
    assert_eq!(r["code"], "not-held", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .starts_with("machine m1 does not hold board shared: lease it first"),
        "{r}"
    );
    drop(s2);
    release(&mut m2, "shared");

    // m1 again: only what comes from now on.
    m1.lease_board("shared");
    let s1 = session(&w, "m1");
    print(&w, &board, "m1 flashes again\r\n");
    let text = log_text(&mut m1, "shared");
    assert!(
        text.contains("m1 flashes again"),
        "m1 reads what the board printed in its new lease: {text}"
    );
    assert!(!text.contains("secret of m2"), "{text}");
    assert!(
        !text.contains("m1 flashes\r"),
        "an earlier lease is not this one: {text}"
    );
    drop(s1);
    // The admin sees everything.
    let mut admin = ControlClient::connect(&w.run.join("broker.sock"));
    let all = log_text(&mut admin, "shared");
    assert!(
        all.contains("m1 flashes\r")
            && all.contains("secret of m2")
            && all.contains("m1 flashes again"),
        "{all}"
    );
}

#[test]
fn a_board_not_yours_reads_as_one_that_does_not_exist() {
    let w = World::new(CONFIG);
    let _b = w.broker();
    let mut m1 = control(&w, "m1");
    for (req, want) in [
        (
            json!({"request": "lease", "board": "own"}),
            "board own is not available to machine m1",
        ),
        (
            json!({"request": "lease", "board": "ghost"}),
            "board ghost is not available to machine m1",
        ),
        (
            json!({"request": "lease", "type": "nrf52"}),
            "no board of type nrf52 is available to machine m1",
        ),
        (
            json!({"request": "lease", "type": "ghost"}),
            "no board of type ghost is available to machine m1",
        ),
        (
            json!({"request": "log", "board": "own"}),
            "board own is not available to machine m1",
        ),
        (
            json!({"request": "log", "board": "ghost"}),
            "board ghost is not available to machine m1",
        ),
        (
            json!({"request": "run", "board": "own", "sequence": "reset"}),
            "board own is not available to machine m1",
        ),
        (
            json!({"request": "run", "board": "ghost", "sequence": "reset"}),
            "board ghost is not available to machine m1",
        ),
    ] {
        let r = m1.ask(req.clone());
        assert_eq!(r["reply"], "error", "{req}: {r}");
        assert_eq!(r["message"], want, "{req}");
        assert_eq!(r["code"], "not-available", "{req}: {r}");
    }
    // `list` names only m1's boards, and no other machine's queue.
    let mut m2 = control(&w, "m2");
    let _board = w.plug(FTDI);
    wait_for(5 * S, "the board", || w.present("shared"));
    m2.lease_board("shared");
    let mut waiter = control(&w, "m2");
    let r = waiter.ask(json!({"request": "lease", "board": "shared"}));
    assert_eq!(r["reply"], "waiting", "{r}");
    let r = m1.ask(json!({"request": "list"}));
    let boards = r["boards"].as_array().unwrap();
    assert_eq!(boards.len(), 1, "{r}");
    assert_eq!(boards[0]["name"], "shared");
    assert_eq!(boards[0]["leased_by"], "another client", "{r}");
    assert_eq!(boards[0]["waiting"], 0, "m2's waiter is not m1's business");
    // The host socket shows a user outside every group nothing.
    if nix::unistd::geteuid().is_root() {
        let text = ask_as(
            &w.run.join("host/control.sock"),
            65534,
            &json!({"request": "status"}),
        );
        assert!(text.contains("\"boards\":[]"), "{text}");
    }
}

/// Sends one request as `uid` (after hello) on `socket`; the reply line.
fn ask_as(socket: &std::path::Path, uid: u32, req: &serde_json::Value) -> String {
    let socket = socket.to_path_buf();
    let req = req.clone();
    std::thread::spawn(move || {
        use std::io::BufRead;
        // A child that drops to `uid` and asks; its stdout is the reply.
        let script = format!(
            "import os,socket,sys\nos.setgroups([{uid}])\nos.setgid({uid})\nos.setuid({uid})\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\ns.sendall(b'{{\"request\":\"hello\",\"version\":1,\"client\":\"t\"}}\\n'+{:?}.encode()+b'\\n')\nf=s.makefile()\nf.readline()\nsys.stdout.write(f.readline())\n",
            socket.display().to_string(),
            req.to_string()
        );
        let out = std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&out.stdout[..])
            .read_line(&mut line)
            .unwrap();
        assert!(!line.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
        line
    })
    .join()
    .unwrap()
}

#[test]
fn a_sequence_ends_with_its_lease_and_its_connection() {
    let w = World::new(CONFIG);
    let board = w.plug(FTDI);
    let _b = w.broker();
    let mut m1 = control(&w, "m1");
    m1.lease_board("shared");
    // A long sequence on a port nobody has open: the broker opens it and
    // status says who holds it.
    m1.send(json!({"request": "run", "board": "shared", "steps": "dtr=1 sleep=40s dtr=0"}));
    wait_for(5 * S, "the sequence to take the tty", || {
        w.holder("shared")
            .is_some_and(|h| h.contains("a sequence of machine m1"))
    });
    // One at a time per machine.
    let mut m1b = control(&w, "m1");
    let r = m1b.ask(json!({"request": "run", "board": "shared", "steps": "dtr=0"}));
    assert_eq!(r["reply"], "error", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("already runs a sequence"),
        "{r}"
    );
    // The job ends: its connection closes, the lease ends, the sequence
    // stops and the port is free for the next holder at once.
    drop(m1);
    let mut m2 = control(&w, "m2");
    m2.lease_board("shared");
    wait_for(5 * S, "the sequence to give the tty up", || {
        w.holder("shared").is_none()
    });
    let _shim = w.shim("m2");
    let link = w.guest_link("m2", FTDI);
    wait_for(5 * S, "m2's link", || exists(&link));
    let tool = Tool::open(&link).unwrap();
    tool.write_all(b"m2 got the port").unwrap();
    let got = read_exact_timeout(board.master_fd(), 15, 5 * S).unwrap();
    assert_eq!(got, b"m2 got the port");
    drop(tool);
    wait_for(5 * S, "the tool's session to end", || {
        w.holder("shared").is_none()
    });

    // A sequence running when the lease is released stops too.
    let mut m2b = control(&w, "m2");
    m2b.send(json!({"request": "run", "board": "shared", "steps": "sleep=40s dtr=0"}));
    wait_for(5 * S, "m2's sequence", || {
        w.holder("shared")
            .is_some_and(|h| h.contains("a sequence of machine m2"))
    });
    release(&mut m2, "shared");
    let r = m2b.next();
    assert_eq!(r["reply"], "error", "{r}");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("the sequence was stopped"),
        "{r}"
    );
}

#[test]
fn the_broker_stops_at_once_with_a_sequence_running() {
    let w = World::new(CONFIG);
    let _board = w.plug(FTDI);
    let mut b = w.broker();
    let mut m1 = control(&w, "m1");
    m1.lease_board("shared");
    m1.send(json!({"request": "run", "board": "shared", "steps": "sleep=50s dtr=0"}));
    wait_for(5 * S, "the sequence", || w.holder("shared").is_some());
    // Proc::stop fails the test past 10 s; the sequence would take 50.
    let status = b.stop();
    assert!(status.success(), "{status}");
}

/// A connection that gives up waiting for a second board keeps the first,
/// and a grant that comes just as the wait runs out is delivered, not lost.
#[test]
fn a_timed_out_wait_keeps_what_is_held() {
    let w = World::new(
        r#"
[[board]]
name = "a"
machines = ["m1", "m2"]
[[board.tty]]
name = "console"
match = { by-id = "usb-A-if00" }

[[board]]
name = "b"
machines = ["m1", "m2"]
[[board.tty]]
name = "console"
match = { by-id = "usb-B-if00" }
"#,
    );
    let _a = w.plug("usb-A-if00");
    let _bb = w.plug("usb-B-if00");
    let _b = w.broker();
    wait_for(5 * S, "the boards", || w.present("a") && w.present("b"));
    let mut m2 = control(&w, "m2");
    m2.lease_board("b");
    let mut m1 = control(&w, "m1");
    m1.lease_board("a");
    let r = m1.ask(json!({"request": "lease", "board": "b", "wait_ms": 200}));
    assert_eq!(r["reply"], "waiting", "{r}");
    let r = m1.next();
    assert_eq!(r["reply"], "error", "{r}");
    assert!(r["message"].as_str().unwrap().contains("in time"), "{r}");
    assert_eq!(r["code"], "timeout", "{r}");
    let r = m1.ask(json!({"request": "list"}));
    let a = r["boards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "a")
        .unwrap()
        .clone();
    assert_eq!(a["leased_by"], "machine m1", "m1 still holds a: {r}");
}

#[test]
fn a_machine_past_its_limits_is_refused_and_others_go_on() {
    let w = World::new(CONFIG);
    let _board = w.plug(FTDI);
    let _b = w.broker();
    let sock = w.run.join("machines/m1/control.sock");
    // Idle connections up to the limit, and past it.
    let mut held = Vec::new();
    let mut refused = None;
    for _ in 0..200 {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(b"{\"request\":\"hello\",\"version\":1,\"client\":\"flood\"}\n")
            .unwrap();
        s.set_read_timeout(Some(5 * S)).unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut line).unwrap();
        if line.contains("too many control connections") {
            refused = Some(line);
            break;
        }
        assert!(line.contains("hello"), "{line}");
        held.push(s);
    }
    let refused = refused.expect("a limit on control connections");
    assert!(
        held.len() >= 8,
        "a job's few connections fit: {}",
        held.len()
    );
    assert!(refused.contains("close some"), "{refused}");
    // m2 is served as before.
    let mut m2 = control(&w, "m2");
    let r = m2.ask(json!({"request": "list"}));
    assert_eq!(r["reply"], "boards", "{r}");
    drop(held);
    wait_for(5 * S, "the flood's connections to close", || {
        let Ok(mut s) = UnixStream::connect(&sock) else {
            return false;
        };
        let _ = s.write_all(b"{\"request\":\"hello\",\"version\":1,\"client\":\"t\"}\n");
        // A probe the broker leaves unanswered must not hang the wait.
        s.set_read_timeout(Some(S)).unwrap();
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut line);
        line.contains("\"hello\"")
    });
    // Waiters are limited too: each waiting request is refused past it.
    let mut m2h = control(&w, "m2");
    m2h.lease_board("shared");
    let mut waiting = Vec::new();
    let mut limit_hit = None;
    for _ in 0..60 {
        let mut c = control(&w, "m1");
        let r = c.ask(json!({"request": "lease", "board": "shared"}));
        if r["reply"] == "error" {
            limit_hit = Some(r);
            break;
        }
        assert_eq!(r["reply"], "waiting", "{r}");
        waiting.push(c);
    }
    let r = limit_hit.expect("a limit on waiting requests");
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("lease requests waiting (the limit)"),
        "{r}"
    );
    let mut m2w = control(&w, "m2");
    let r = m2w.ask(json!({"request": "lease", "board": "shared"}));
    assert_eq!(r["reply"], "waiting", "m2 still gets in line: {r}");
}

/// A megabyte of malformed commands costs the log a few lines, not one
/// per command.
#[test]
fn malformed_commands_do_not_flood_the_log() {
    let w = World::new(CONFIG);
    let _board = w.plug(FTDI);
    let _b = w.broker();
    let mut m1 = control(&w, "m1");
    m1.lease_board("shared");
    let s = session(&w, "m1");
    // IAC SB COM-PORT-OPTION, a command byte with no valid payload, IAC SE.
    let bad: Vec<u8> = [255u8, 250, 44, 1, 255, 240].repeat(200_000);
    let mut w2 = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = w2.write_all(&bad);
    });
    writer.join().unwrap();
    drop(s);
    wait_for(5 * S, "the session to end", || w.holder("shared").is_none());
    let log = std::fs::read_to_string(w.path("broker.log")).unwrap();
    let warnings = log.lines().filter(|l| l.contains("WARN")).count();
    assert!(
        warnings <= 10,
        "{warnings} warnings:\n{}",
        &log[log.len().saturating_sub(2000)..]
    );
    assert!(
        log.contains("more bad commands from the client were not logged"),
        "the rest are summed up"
    );
}

/// `status` shows the lease and who waits since when: all of it to the
/// admin, only its own part to a machine.
#[test]
fn status_shows_leases_and_waiters_as_far_as_the_viewer_may_know() {
    let w = World::new(CONFIG);
    let _board = w.plug(FTDI);
    let _b = w.broker();
    wait_for(5 * S, "the board", || w.present("shared"));
    let mut m1 = control(&w, "m1");
    m1.lease_board("shared");
    let mut m2 = control(&w, "m2");
    let r = m2.ask(json!({"request": "lease", "board": "shared"}));
    assert_eq!(r["reply"], "waiting", "{r}");
    let s = w.status();
    assert_eq!(s["version"], 2, "{s}");
    let b = &s["boards"][0];
    assert_eq!(b["lease"]["who"], "machine m1", "{s}");
    assert_eq!(b["waiting"][0]["who"], "machine m2", "{s}");
    assert!(
        b["waiting"][0]["since"].as_str().unwrap().ends_with('Z'),
        "{s}"
    );
    assert_eq!(b["console"], "session");
    let (ok, text) = devbroker_cli(&["status", "--run-dir", w.run.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(text.contains("leased to machine m1 since"), "{text}");
    assert!(text.contains("waiting #1: machine m2 since"), "{text}");
    // m1 sees its lease, and nobody's place in line but its own.
    let r = m1.ask(json!({"request": "status"}));
    let b = &r["boards"][0];
    assert_eq!(b["lease"]["who"], "machine m1", "{r}");
    assert_eq!(b["waiting"], json!([]), "{r}");
    let r = m2.ask(json!({"request": "status"}));
    let names: Vec<&str> = r["boards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["shared", "own"], "{r}");
    let b = &r["boards"][0];
    assert_eq!(b["lease"]["who"], "another client", "{r}");
}
