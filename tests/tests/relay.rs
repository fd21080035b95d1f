//! The whole path with real parts: fake board pty → devbroker → unix socket →
//! devshim → guest pty → tool.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::time::Duration;

use devbroker_tests::control::ControlClient;
use devbroker_tests::*;

const FTDI: &str = "usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0";
const JLINK: &str = "usb-SEGGER_J-Link_000683-if00";

const HOSTB: &str = "usb-Host_Board_H1-if00";

const CONFIG: &str = r#"
[[board]]
name = "esp1"
compatible = ["esp32"]
machines = ["ci1"]

[[board.tty]]
name = "console"
match = { by-id = "usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0" }

[[board]]
name = "nrf"
machines = ["ci2"]

[[board.tty]]
name = "uart"
match = { by-id = "usb-SEGGER_J-Link_000683-if00" }

[[board]]
name = "hil1"
host-groups = ["dialout"]

[[board.tty]]
name = "console"
match = { by-id = "usb-Host_Board_H1-if00" }

[[machine]]
name = "ci3"
"#;

const S: Duration = Duration::from_secs(1);

/// A board plugged in, the broker and devshim for ci1 running, the guest
/// link up.
fn attached(w: &World) -> (FakeBoard, Proc, Proc, std::path::PathBuf) {
    let board = w.plug(FTDI);
    let broker = w.broker();
    let shim = w.shim("ci1");
    let link = w.guest_link("ci1", FTDI);
    wait_for(5 * S, "the guest link", || exists(&link));
    (board, broker, shim, link)
}

/// Exchanges a line each way through an open tool.
fn ping(tool: &Tool, board: &FakeBoard, w: &World) {
    tool.write_all(b"ping\n").unwrap();
    let got = read_exact_timeout(board.master_fd(), 5, 5 * S)
        .unwrap_or_else(|e| panic!("board: {e}\n{}", w.logs()));
    assert_eq!(got, b"ping\n");
    write_all_fd(board.master_fd(), b"pong\n").unwrap();
    let got = read_exact_timeout(tool.fd.as_raw_fd(), 5, 5 * S)
        .unwrap_or_else(|e| panic!("tool: {e}\n{}", w.logs()));
    assert_eq!(got, b"pong\n");
}

#[test]
fn eight_mib_each_way_nothing_lost_or_reordered() {
    let w = World::new(CONFIG);
    let (board, _b, _s, link) = attached(&w);
    let tool = Tool::open(&link).unwrap();
    wait_for(5 * S, "the session", || w.holder("esp1").is_some());

    const N: usize = 8 << 20;
    let to_board = random_bytes(N, 1);
    let to_tool = random_bytes(N, 2);
    let mfd = board.master_fd();
    let tfd = tool.fd.as_raw_fd();
    std::thread::scope(|sc| {
        let a = sc.spawn(|| write_all_fd(tfd, &to_board).unwrap());
        let b = sc.spawn(|| write_all_fd(mfd, &to_tool).unwrap());
        let c = sc.spawn(|| read_exact_timeout(mfd, N, Duration::from_secs(120)));
        let got_tool = read_exact_timeout(tfd, N, Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("tool side: {e}\n{}", w.logs()));
        let got_board = c
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("board side: {e}\n{}", w.logs()));
        a.join().unwrap();
        b.join().unwrap();
        assert!(
            got_board == to_board,
            "bytes to the board differ (first at {:?})",
            got_board.iter().zip(&to_board).position(|(x, y)| x != y)
        );
        assert!(
            got_tool == to_tool,
            "bytes to the tool differ (first at {:?})",
            got_tool.iter().zip(&to_tool).position(|(x, y)| x != y)
        );
    });
    let st = w.status();
    let tty = &st["boards"][0]["ttys"][0];
    assert_eq!(tty["bytes_to_board"].as_u64().unwrap(), N as u64);
    assert_eq!(tty["bytes_from_board"].as_u64().unwrap(), N as u64);
}

#[test]
fn pyserial_baud_changes_reach_the_board() {
    let w = World::new(CONFIG);
    let (board, _b, _s, link) = attached(&w);
    let script = r#"
import serial, sys
s = serial.Serial(sys.argv[1], 115200)
for rate in (921600, 250000):
    s.write(b"at-old-rate")
    s.baudrate = rate
    print(rate, flush=True)
    sys.stdin.readline()
s.close()
"#;
    let mut py = Command::new("/usr/bin/python3")
        .args(["-c", script])
        .arg(&link)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with python3-serial");
    let mut out = BufReader::new(py.stdout.take().unwrap());
    let mut stdin = py.stdin.take().unwrap();
    for rate in [921600u32, 250000] {
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            rate.to_string(),
            "pyserial failed:\n{}",
            w.logs()
        );
        wait_for(2 * S, &format!("the board at {rate}"), || {
            board.baud() == rate
        });
        // The bytes written before the change came first.
        let got = read_exact_timeout(board.master_fd(), 11, 2 * S).unwrap();
        assert_eq!(got, b"at-old-rate");
        writeln!(stdin).unwrap();
    }
    assert!(py.wait().unwrap().success());
}

#[test]
fn unplug_gives_eio_and_removes_links_replug_brings_them_back() {
    let w = World::new(CONFIG);
    let board = w.plug(FTDI);
    let _b = w.broker();
    let _s = w.shim("ci1");
    let link = w.guest_link("ci1", FTDI);
    let short = w.guest("ci1").join("devbroker/esp1.console");
    wait_for(5 * S, "the guest links", || exists(&link) && exists(&short));
    let tool = Tool::open(&link).unwrap();
    ping(&tool, &board, &w);

    tool.eio_after(S, "the tool reads EIO after an unplug", || board.unplug());
    let err = tool.write_all(b"x").expect_err("writes fail too");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let gone = time_until(S, "both guest links to go", || {
        !exists(&link) && !exists(&short)
    });
    eprintln!("links gone {gone:?} after EIO");
    assert!(!w.run.join("machines/ci1/esp1.console.sock").exists());
    // udev removes /dev/serial when the last adapter goes, and makes it again.
    std::fs::remove_dir_all(w.by_id.parent().unwrap()).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));

    let board = w.plug(FTDI);
    wait_for(2 * S, "the guest links to return", || {
        exists(&link) && exists(&short)
    });
    let tool = Tool::open(&link).unwrap();
    ping(&tool, &board, &w);
}

#[test]
fn policy_decides_who_gets_a_socket() {
    let w = World::new(CONFIG);
    let _board = w.plug(FTDI);
    let _b = w.broker();
    let _s1 = w.shim("ci1");
    let _s2 = w.shim("ci2");
    wait_for(5 * S, "the ci1 link", || exists(&w.guest_link("ci1", FTDI)));
    // A [[machine]] with no board yet still has its directory and control socket.
    assert!(w.run.join("machines/ci3/control.sock").exists());
    assert_eq!(
        std::fs::read_to_string(w.run.join("machines/ci3/ttys.json")).unwrap(),
        "{\n  \"version\": 1,\n  \"ttys\": []\n}\n"
    );
    // ci2 may use nrf only: no socket, no index entry, no link for esp1.
    assert!(w.run.join("machines/ci2").is_dir());
    assert!(w.run.join("machines/ci2/control.sock").exists());
    let names: Vec<String> = std::fs::read_dir(w.run.join("machines/ci2"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!names.iter().any(|n| n.starts_with("esp1")), "{names:?}");
    let index = std::fs::read_to_string(w.run.join("machines/ci2/ttys.json")).unwrap();
    assert!(!index.contains("esp1"), "{index}");
    assert!(!exists(&w.guest_link("ci2", FTDI)));
    assert!(!exists(&w.guest("ci2").join("devbroker/esp1.console")));
    // The machines directory is closed to host users.
    assert_eq!(
        ::devshim::pty::mode_of(&w.run.join("machines")).unwrap(),
        0o700
    );

    // Host users: members of dialout, holding the lease.
    let _host_board = w.plug(HOSTB);
    let host_sock = w.run.join("host/hil1.console.sock");
    wait_for(2 * S, "the host socket", || host_sock.exists());
    if !nix::unistd::geteuid().is_root() {
        skip("the host-group half: connecting as another user needs root (run the suite as root, as CI does)");
        return;
    }
    let group = std::fs::read_to_string("/etc/group").unwrap();
    let dialout = ::devshim::users::group_gid(&group, "dialout").expect("a dialout group");
    let refused =
        String::from_utf8(first_bytes_as(&host_sock, 65534, 65534, &[65534], None)).unwrap();
    assert!(
        refused.starts_with("devbroker: permission denied: hil1.console is for members of dialout"),
        "{refused}"
    );
    assert!(refused.contains("uid 65534"), "{refused}");
    let control = w.run.join("host/control.sock");
    let lease_refused = String::from_utf8(first_bytes_as(
        &control,
        65534,
        65534,
        &[65534],
        Some("hil1"),
    ))
    .unwrap();
    assert!(
        lease_refused.contains("board hil1 is not available to host user nobody (uid 65534)"),
        "{lease_refused}"
    );
    let unleased =
        String::from_utf8(first_bytes_as(&host_sock, 65534, 65534, &[dialout], None)).unwrap();
    assert!(
        unleased.contains("hil1 is not leased to you: take it with `devshim lease --board hil1"),
        "{unleased}"
    );
    let accepted = first_bytes_as(&host_sock, 65534, 65534, &[dialout], Some("hil1"));
    assert_eq!(
        accepted.first(),
        Some(&255u8),
        "a member of dialout holding the lease gets RFC 2217 negotiation, got {:?}",
        String::from_utf8_lossy(&accepted)
    );
    // nrf is absent: nobody has its socket.
    assert!(!w.run.join("machines/ci2/nrf.uart.sock").exists());
    let _nrf = w.plug(JLINK);
    wait_for(2 * S, "nrf in ci2", || exists(&w.guest_link("ci2", JLINK)));
    assert!(!exists(&w.guest_link("ci1", JLINK)));
}

#[test]
fn a_shared_board_follows_its_lease_and_a_second_client_is_refused() {
    let config = CONFIG.replace("machines = [\"ci1\"]", "machines = [\"ci1\", \"ci2\"]");
    let w = World::new(&config);
    let board = w.plug(FTDI);
    let _b = w.broker();
    let _s1 = w.shim("ci1");
    let _s2 = w.shim("ci2");
    let l1 = w.guest_link("ci1", FTDI);
    let l2 = w.guest_link("ci2", FTDI);
    // A shared board has no socket anywhere until someone leases it.
    wait_for(2 * S, "the broker to find esp1", || w.present("esp1"));
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(!exists(&l1) && !exists(&l2));
    assert!(!w.run.join("machines/ci1/esp1.console.sock").exists());

    let mut lease1 = ControlClient::connect(&w.run.join("machines/ci1/control.sock"));
    let g = lease1.lease_board("esp1");
    assert_eq!(g["ttys"][0]["by_id"], FTDI);
    assert_eq!(g["ttys"][0]["socket"], "esp1.console.sock");
    wait_for(2 * S, "the link in ci1", || exists(&l1));
    assert!(!exists(&l2), "ci2 does not hold the lease");
    let tool = Tool::open(&l1).unwrap();
    ping(&tool, &board, &w);
    assert_eq!(w.holder("esp1").as_deref(), Some("machine ci1"));

    // One client per tty: another connection to ci1's socket is refused, naming the holder.
    let me = nix::unistd::geteuid().as_raw();
    let text = String::from_utf8(first_bytes_as(
        &w.run.join("machines/ci1/esp1.console.sock"),
        me,
        0,
        &[],
        None,
    ))
    .unwrap();
    assert!(
        text.starts_with("devbroker: esp1.console is in use by machine ci1 (")
            && text.contains("pid "),
        "{text}"
    );
    assert!(text.contains(" since 20"), "{text}");
    ping(&tool, &board, &w);

    // ci2 waits in line, told who holds the board.
    let mut lease2 = ControlClient::connect(&w.run.join("machines/ci2/control.sock"));
    let r = lease2.ask(serde_json::json!({"request": "lease", "type": "esp32"}));
    assert_eq!(r["reply"], "waiting", "{r}");
    assert_eq!(r["place"], 1);
    assert!(
        r["holders"][0]
            .as_str()
            .unwrap()
            .starts_with("esp1: machine ci1 since 20"),
        "{r}"
    );
    // The holder's job ends: its connection closes, its tool is hung up, ci2 gets the board.
    tool.eio_after(S, "the tool loses the board with the lease", || {
        drop(lease1)
    });
    let g = lease2.next();
    assert_eq!(g["reply"], "granted", "{g}");
    wait_for(2 * S, "the link to move to ci2", || {
        exists(&l2) && !exists(&l1)
    });
    let tool2 = Tool::open(&l2).unwrap();
    ping(&tool2, &board, &w);
}

#[test]
fn broker_sigkill_and_restart_the_tool_keeps_its_pty_and_line() {
    let w = World::new(CONFIG);
    let (board, mut broker, _s, link) = attached(&w);
    let pty = std::fs::read_link(&link).unwrap();
    let tool = Tool::open(&link).unwrap();
    let fd = &tool.fd;
    let mut t = wire::termios::get(fd).unwrap();
    wire::termios::set_baud(&mut t, 230400);
    wire::termios::set(fd, &t, wire::termios::When::AfterDrain).unwrap();
    ping(&tool, &board, &w);
    assert_eq!(board.baud(), 230400);

    let reader = tool.blocked_read();
    broker.kill9();
    // The next broker opens the port at the config's rate; the tool's rate
    // must come back with the resumed session.
    std::thread::sleep(Duration::from_millis(300));
    assert!(exists(&link), "the link stays while the broker is away");
    tool.write_all(b"written-while-away\n").unwrap();

    let _broker = w.broker();
    let t0 = std::time::Instant::now();
    let got = read_exact_timeout(board.master_fd(), 19, 5 * S)
        .unwrap_or_else(|e| panic!("bytes written while the broker was away: {e}\n{}", w.logs()));
    eprintln!("resumed {:?} after the broker's restart", t0.elapsed());
    assert_eq!(got, b"written-while-away\n");
    assert_eq!(board.baud(), 230400, "the tool's rate is applied again");
    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        pty,
        "the same guest pty"
    );
    write_all_fd(board.master_fd(), b"back\n").unwrap();
    let n = join_within(reader, 5 * S).expect("the blocked read gets data, not EIO");
    assert!(n > 0);
    ping(&tool, &board, &w);
}

#[test]
fn broker_restarted_with_sigterm_the_tool_goes_on() {
    // An upgrade: systemctl restart sends SIGTERM.
    let w = World::new(CONFIG);
    let (board, mut broker, _s, link) = attached(&w);
    let tool = Tool::open(&link).unwrap();
    ping(&tool, &board, &w);
    let reader = tool.blocked_read();
    assert!(broker.stop().success());
    tool.write_all(b"during\n").unwrap();
    let _broker = w.broker();
    let got = read_exact_timeout(board.master_fd(), 7, 5 * S)
        .unwrap_or_else(|e| panic!("bytes written during the restart: {e}\n{}", w.logs()));
    assert_eq!(got, b"during\n");
    write_all_fd(board.master_fd(), b"x").unwrap();
    let n = join_within(reader, 5 * S).expect("the blocked read gets data, not EIO");
    assert_eq!(n, 1);
    ping(&tool, &board, &w);
}

#[test]
fn broker_away_past_the_grace_hangs_up_then_comes_back() {
    let w = World::new(CONFIG);
    let board = w.plug(FTDI);
    let mut broker = w.broker();
    let _s = w.shim_with("ci1", &["--broker-grace", "1s"]);
    let link = w.guest_link("ci1", FTDI);
    wait_for(5 * S, "the guest link", || exists(&link));
    let tool = Tool::open(&link).unwrap();
    ping(&tool, &board, &w);

    let after = tool.eio_after(4 * S, "EIO once the broker grace runs out", || {
        broker.kill9()
    });
    assert!(
        after >= Duration::from_millis(900),
        "not before the grace: {after:?}"
    );
    eprintln!("EIO {after:?} after the broker died (grace 1 s)");
    wait_for(2 * S, "the link to go", || !exists(&link));

    let _broker = w.broker();
    let back = time_until(3 * S, "the link to return", || exists(&link));
    eprintln!("link back {back:?} after the broker's restart");
    let tool = Tool::open(&link).unwrap();
    ping(&tool, &board, &w);
}

#[test]
fn status_shows_presence_holder_and_bytes() {
    let w = World::new(CONFIG);
    let (board, _b, _s, link) = attached(&w);
    let tool = Tool::open(&link).unwrap();
    ping(&tool, &board, &w);
    let st = w.status();
    let esp = &st["boards"][0];
    assert_eq!(esp["name"], "esp1");
    let tty = &esp["ttys"][0];
    assert_eq!(tty["present"], true);
    assert_eq!(tty["by_id"], FTDI);
    assert_eq!(tty["holder"]["who"], "machine ci1");
    assert!(tty["holder"]["since"].as_str().unwrap().starts_with("20"));
    assert_eq!(tty["bytes_to_board"], 5);
    assert_eq!(tty["bytes_from_board"], 5);
    let nrf = &st["boards"][1]["ttys"][0];
    assert_eq!(nrf["present"], false);
    assert!(nrf["holder"].is_null());
    // The table names the same facts.
    let out = Command::new(bin("devbroker"))
        .args(["status", "--run-dir"])
        .arg(&w.run)
        .output()
        .unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(table.contains("held by machine ci1"), "{table}");
    assert!(
        table.contains("5 bytes to board, 5 bytes from board"),
        "{table}"
    );
    assert!(table.contains("absent"), "{table}");
    // Releasing frees it.
    drop(tool);
    wait_for(2 * S, "the tty to be free", || w.holder("esp1").is_none());
}

#[test]
fn broker_stops_cleanly_on_sigterm() {
    let w = World::new(CONFIG);
    let _board = w.plug(FTDI);
    let mut b = w.broker();
    let mut s = w.shim_with("ci1", &["--broker-grace", "1s"]);
    let link = w.guest_link("ci1", FTDI);
    wait_for(5 * S, "the guest link", || exists(&link));
    assert!(b.stop().success());
    assert!(!w.run.join("machines/ci1/esp1.console.sock").exists());
    assert!(!w.run.join("machines/ci1/control.sock").exists());
    assert!(!w.run.join("broker.sock").exists());
    assert!(
        w.run.join("machines/ci1").is_dir(),
        "machine directories stay for their bind mounts"
    );
    // devshim keeps the tty for its broker grace (1 s here), then takes it down.
    std::thread::sleep(Duration::from_millis(500));
    assert!(exists(&link), "the link stays within the broker grace");
    wait_for(3 * S, "devshim to take the link down", || !exists(&link));
    assert!(s.stop().success());
}

/// SIGHUP reloads the config: a board added is served, one removed goes,
/// a session on a board that did not change goes on moving bytes, and a
/// config with problems is refused with the running one kept.
#[test]
fn sighup_reloads_the_config_and_keeps_unchanged_sessions() {
    let one = format!(
        "[[board]]\nname = \"b1\"\nmachines = [\"ci1\"]\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"{FTDI}\" }}\n"
    );
    let w = World::new(&one);
    let board = w.plug(FTDI);
    let b2 = w.plug("usb-Second_Board-if00");
    let broker = w.broker();
    let _s = w.shim("ci1");
    let link = w.guest_link("ci1", FTDI);
    wait_for(5 * S, "b1's link", || exists(&link));
    let tool = Tool::open(&link).unwrap();
    wait_for(5 * S, "the session", || w.holder("b1").is_some());
    let hup = || {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(broker.pid()),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    let reloads = || {
        std::fs::read_to_string(w.path("broker.log"))
            .unwrap_or_default()
            .matches("config reloaded")
            .count()
    };
    let bytes_flow = |tag: &[u8]| {
        tool.write_all(tag).unwrap();
        assert_eq!(
            read_exact_timeout(board.master_fd(), tag.len(), 5 * S).unwrap(),
            tag
        );
        write_all_fd(board.master_fd(), tag).unwrap();
        assert_eq!(
            read_exact_timeout(tool.fd.as_raw_fd(), tag.len(), 5 * S).unwrap(),
            tag
        );
    };
    bytes_flow(b"before");

    // Add a board: served after the reload; b1's session never noticed.
    let two = format!(
        "{one}\n[[board]]\nname = \"b2\"\nmachines = [\"ci1\"]\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"usb-Second_Board-if00\" }}\n"
    );
    std::fs::write(&w.config, &two).unwrap();
    hup();
    wait_for(5 * S, "the reload", || reloads() == 1);
    wait_for(5 * S, "b2's socket", || {
        exists(&w.run.join("machines/ci1/b2.console.sock"))
    });
    bytes_flow(b"after adding b2");
    assert!(w.holder("b1").is_some(), "b1's session went on");

    // A config with problems: refused, b2 still served.
    std::fs::write(&w.config, "[[board]]\nname = \"b1\"\nrate = \"fast\"\n").unwrap();
    hup();
    wait_for(5 * S, "the refusal", || {
        std::fs::read_to_string(w.path("broker.log"))
            .unwrap_or_default()
            .contains("reload refused")
    });
    assert!(exists(&w.run.join("machines/ci1/b2.console.sock")));
    bytes_flow(b"after a bad config");

    // Remove b2 again: its socket goes, b1's session still moves bytes.
    std::fs::write(&w.config, &one).unwrap();
    hup();
    wait_for(5 * S, "the second reload", || reloads() == 2);
    wait_for(5 * S, "b2's socket to go", || {
        !exists(&w.run.join("machines/ci1/b2.console.sock"))
    });
    bytes_flow(b"after removing b2");
    drop(b2);
}

/// A broker killed before it read what the tool wrote took those bytes with
/// it: the tool must see an error (EIO), not go on as if they reached the
/// board. (A broker that read everything is bridged as always: see
/// `broker_sigkill_and_restart_the_tool_keeps_its_pty_and_line`.)
#[test]
fn bytes_a_killed_broker_never_read_are_not_lost_silently() {
    let w = World::new(CONFIG);
    let (board, mut broker, _s, link) = attached(&w);
    let tool = Tool::open(&link).unwrap();
    ping(&tool, &board, &w);
    // The broker stops reading; the tool writes on.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(broker.pid()),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    tool.write_all(&random_bytes(5200, 13)).unwrap();
    // devshim takes them from the pty into the broker's socket.
    wait_for(5 * S, "devshim to take the tool's bytes", || {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ writes one int.
        unsafe { libc::ioctl(tool.fd.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        queued == 0
    });
    tool.eio_after(
        5 * S,
        "the broker died with the tool's bytes unread",
        || {
            broker.kill9();
        },
    );
    let _broker = w.broker();
    let got = read_timeout(board.master_fd(), &mut [0u8; 8192], S).unwrap();
    assert_eq!(got, None, "nothing of it reached the board");
}
