//! Re-enumeration grace: a native-USB board resets, its adapter goes and
//! comes back as the same identity. Within the board's grace the tool's pty
//! stays open and keeps its line settings; past it, the tool reads `EIO`.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use devbroker_tests::*;

const JTAG: &str = "usb-Espressif_USB_JTAG_serial_debug_unit_F4:12:FA:00:11:22-if00";

const CONFIG: &str = r#"
[[board]]
name = "s3"
machines = ["ci1"]
reenumerate-grace = "2s"

[[board.tty]]
name = "console"
match = { by-id = "usb-Espressif_USB_JTAG_serial_debug_unit_F4:12:FA:00:11:22-if00" }
"#;

const S: Duration = Duration::from_secs(1);

fn expect(fd: i32, want: &[u8], w: &World, what: &str) {
    let got = read_exact_timeout(fd, want.len(), 5 * S)
        .unwrap_or_else(|e| panic!("{what}: {e}\n{}", w.logs()));
    assert_eq!(got, want, "{what}");
}

#[test]
fn within_the_grace_the_session_resumes_with_its_line_settings() {
    let w = World::new(CONFIG);
    let board = w.plug(JTAG);
    let _b = w.broker();
    let _s = w.shim("ci1");
    let link = w.guest_link("ci1", JTAG);
    wait_for(5 * S, "the guest link", || exists(&link));
    let pty = std::fs::read_link(&link).unwrap();
    let tool = Tool::open(&link).unwrap();
    tool.set_baud(460800);
    wait_for(5 * S, "the board at 460800", || board.baud() == 460800);
    tool.write_all(b"before\n").unwrap();
    expect(board.master_fd(), b"before\n", &w, "bytes before the reset");

    // The board resets: its adapter goes, and comes back on a new node.
    let reader = tool.blocked_read();
    board.unplug();
    wait_for(2 * S, "the broker to see the adapter go", || {
        !w.present("s3")
    });
    // Written while the adapter is away: must reach the board once it's back.
    tool.write_all(b"while-away\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(exists(&link), "the link stays while the adapter is away");
    let board = w.plug(JTAG);
    let back = Instant::now();
    expect(
        board.master_fd(),
        b"while-away\n",
        &w,
        "bytes written while away",
    );
    eprintln!("resumed {:?} after the replug", back.elapsed());
    assert_eq!(
        board.baud(),
        460800,
        "the tool's rate is applied to the new port"
    );
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        pty,
        "the same guest pty"
    );
    write_all_fd(board.master_fd(), b"after\n").unwrap();
    let n = join_within(reader, 5 * S).expect("the tool's blocked read gets data, not EIO");
    assert!(n > 0);
    expect(
        tool.fd.as_raw_fd(),
        &b"after\n"[n..],
        &w,
        "the rest of the line",
    );
    tool.write_all(b"ok\n").unwrap();
    expect(board.master_fd(), b"ok\n", &w, "bytes after the resume");
    assert!(
        w.logs().contains("session resumed"),
        "the broker says the session resumed:\n{}",
        w.logs()
    );

    // A second reset, to show it was not a one-off.
    board.unplug();
    wait_for(2 * S, "the broker to see the adapter go again", || {
        !w.present("s3")
    });
    let board = w.plug(JTAG);
    tool.write_all(b"again\n").unwrap();
    expect(
        board.master_fd(),
        b"again\n",
        &w,
        "bytes after a second reset",
    );
    assert_eq!(board.baud(), 460800);
    write_all_fd(board.master_fd(), b"back\n").unwrap();
    expect(
        tool.fd.as_raw_fd(),
        b"back\n",
        &w,
        "bytes to the tool after a second reset",
    );
}

#[test]
fn past_the_grace_it_is_an_unplug() {
    let w = World::new(CONFIG);
    let board = w.plug(JTAG);
    let _b = w.broker();
    let _s = w.shim("ci1");
    let link = w.guest_link("ci1", JTAG);
    wait_for(5 * S, "the guest link", || exists(&link));
    let tool = Tool::open(&link).unwrap();
    tool.write_all(b"hi\n").unwrap();
    expect(board.master_fd(), b"hi\n", &w, "bytes before");

    let after = tool.eio_after(6 * S, "EIO once the grace runs out", || board.unplug());
    assert!(
        after >= Duration::from_millis(1900),
        "not before the grace: {after:?}"
    );
    eprintln!("EIO {after:?} after the unplug (grace 2 s)");
    wait_for(2 * S, "the link to go", || !exists(&link));
    assert!(!w.run.join("machines/ci1/s3.console.sock").exists());

    // Plugged again later: a fresh tty, as after any unplug.
    let board = w.plug(JTAG);
    wait_for(3 * S, "the link to return", || exists(&link));
    let tool = Tool::open(&link).unwrap();
    tool.write_all(b"new\n").unwrap();
    expect(board.master_fd(), b"new\n", &w, "bytes on the new session");
}

#[test]
fn a_tool_opening_while_the_adapter_is_away_is_told_why() {
    let w = World::new(CONFIG);
    let board = w.plug(JTAG);
    let _b = w.broker();
    let sock = w.run.join("machines/ci1/s3.console.sock");
    wait_for(5 * S, "the socket", || sock.exists());
    board.unplug();
    wait_for(2 * S, "the broker to see the adapter go", || {
        !w.present("s3")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(sock.exists(), "the socket stays within the grace");
    let me = nix::unistd::getuid().as_raw();
    let refusal = first_bytes_as(&sock, me, nix::unistd::getgid().as_raw(), &[], None);
    assert!(
        String::from_utf8_lossy(&refusal).contains("re-enumerating"),
        "{}",
        String::from_utf8_lossy(&refusal)
    );
}

#[test]
fn a_reload_while_the_adapter_is_away_keeps_the_session() {
    // A grace long enough that the reload surely falls inside it.
    let w = World::new(&CONFIG.replace("\"2s\"", "\"20s\""));
    let board = w.plug(JTAG);
    let b = w.broker();
    let _s = w.shim("ci1");
    let link = w.guest_link("ci1", JTAG);
    wait_for(5 * S, "the guest link", || exists(&link));
    let tool = Tool::open(&link).unwrap();
    tool.write_all(b"before\n").unwrap();
    expect(board.master_fd(), b"before\n", &w, "bytes before the reset");

    board.unplug();
    wait_for(2 * S, "the broker to see the adapter go", || {
        !w.present("s3")
    });
    // Another board joins the config; s3 itself does not change.
    let more = format!(
        "{}\n[[board]]\nname = \"other\"\nmachines = [\"ci1\"]\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"usb-other-if00\" }}\n",
        &CONFIG.replace("\"2s\"", "\"20s\"")
    );
    std::fs::write(&w.config, more).unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.pid()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    wait_for(5 * S, "the reload", || w.logs().contains("config reloaded"));
    tool.write_all(b"while-away\n")
        .unwrap_or_else(|e| panic!("{e}\n{}", w.logs()));
    let board = w.plug(JTAG);
    expect(
        board.master_fd(),
        b"while-away\n",
        &w,
        "bytes written while away, across the reload",
    );
    write_all_fd(board.master_fd(), b"after\n").unwrap();
    expect(
        tool.fd.as_raw_fd(),
        b"after\n",
        &w,
        "bytes to the tool after the reload and replug",
    );
}
