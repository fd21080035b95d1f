//! Host-wide leases through the control plane, `devshim lease` and
//! `sai-device`, with the real broker and devshim.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devbroker_tests::control::ControlClient;
use devbroker_tests::*;
use serde_json::json;

const FTDI: &str = "usb-FTDI_FT232R_USB_UART_L3A5E-if00-port0";
const S: Duration = Duration::from_secs(1);

const CONFIG: &str = r#"
[[board]]
name = "esp1"
compatible = ["esp32", "esp-heltec-wb32"]
machines = ["ci1", "ci2"]
host-groups = ["dialout"]

[[board.tty]]
name = "console"
match = { by-id = "usb-FTDI_FT232R_USB_UART_L3A5E-if00-port0" }
"#;

/// `devshim lease` as a job in `machine` would run it.
fn lease_cmd(w: &World, machine: &str, args: &[&str]) -> Command {
    let mut c = Command::new(devshim());
    c.arg("lease")
        .arg("--dir")
        .arg(w.run.join("machines").join(machine))
        .arg("--link-root")
        .arg(w.guest(machine))
        .arg("--state-dir")
        .arg(w.state_dir(machine))
        .args(args)
        .die_with_parent()
        .process_group(0);
    c
}

fn kill_group(pid: u32) {
    let _ = nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[test]
fn waiters_from_two_machines_and_a_host_user_get_the_board_in_order() {
    let w = World::new(CONFIG);
    let _board = w.plug(FTDI);
    let _b = w.broker();
    let _s1 = w.shim("ci1");
    let _s2 = w.shim("ci2");
    let order = w.path("order");
    let job = |name: &str, hold: &str| {
        format!(
            "echo {name} $SAI_DEVICE_TTY0 >> {}; {hold}",
            order.display()
        )
    };
    let read_order = || std::fs::read_to_string(&order).unwrap_or_default();

    // A (ci1) gets it at once and holds it.
    let mut a = lease_cmd(
        &w,
        "ci1",
        &["esp32", "--", "sh", "-c", &job("A", "sleep 60")],
    )
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    wait_for(5 * S, "A's job", || read_order().starts_with("A "));
    assert!(
        read_order().contains(&w.guest_link("ci1", FTDI).display().to_string()),
        "{}",
        read_order()
    );
    // B (ci2) waits, then C (a host user) waits behind B.
    let b_log = w.path("b.log");
    let b = lease_cmd(
        &w,
        "ci2",
        &["--board", "esp1", "--", "sh", "-c", &job("B", "sleep 0.5")],
    )
    .stderr(std::fs::File::create(&b_log).unwrap())
    .spawn()
    .unwrap();
    let mut c = ControlClient::connect(&w.run.join("host/control.sock"));
    wait_for(5 * S, &format!("B in line ({})", b_log.display()), || {
        let st = ControlClient::connect(&w.run.join("broker.sock")).ask(json!({"request": "list"}));
        st["boards"][0]["leased_by"] == "machine ci1" && st["boards"][0]["waiting"] == 1
    });
    let r = c.ask(json!({"request": "lease", "type": "esp32"}));
    assert_eq!(r["reply"], "waiting", "{r}");
    assert_eq!(r["place"], 2, "C is behind B: {r}");

    // SIGKILL of the holder frees the board within 1 s: B gets it.
    let t0 = Instant::now();
    kill_group(a.id());
    let _ = a.wait();
    wait_for(S, "B's job after A was killed", || {
        read_order().contains("B ")
    });
    eprintln!("B got the board {:?} after A's SIGKILL", t0.elapsed());
    // B's job ends; C is granted.
    let out = b.wait_with_output().unwrap();
    let stderr = std::fs::read_to_string(&b_log).unwrap();
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("waiting for board esp1: place 1 in line; held by esp1: machine ci1 since"),
        "{stderr}"
    );
    let g = c.next();
    assert_eq!(g["reply"], "granted", "{g}");
    assert_eq!(g["ttys"][0]["socket"], "host/esp1.console.sock");
    let lines: Vec<String> = read_order()
        .lines()
        .map(|l| l.split(' ').next().unwrap().to_string())
        .collect();
    assert_eq!(lines, ["A", "B"]);
    // While C holds it, no machine has its socket.
    wait_for(S, "the machines' sockets to go", || {
        !w.run.join("machines/ci1/esp1.console.sock").exists()
            && !w.run.join("machines/ci2/esp1.console.sock").exists()
    });
    assert!(w.run.join("host/esp1.console.sock").exists());
}

#[test]
fn sai_device_exports_the_ttys_and_returns_the_status() {
    let w = World::new(CONFIG);
    let board = w.plug(FTDI);
    let _b = w.broker();
    let _s = w.shim("ci1");
    let sai = w.path("bin/sai-device");
    std::fs::create_dir_all(sai.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(devshim(), &sai).unwrap();
    let seen = w.path("seen");
    let script = format!(
        "test -e \"$ESPPORT\" && test \"$ESPPORT\" = \"$SAI_DEVICE_TTY0\" && echo \"$ESPPORT $SAI_DEVICE_BOARD\" > {} && printf hi > \"$ESPPORT\" && exit 7",
        seen.display()
    );
    let out = Command::new(&sai)
        .args(["esp-heltec-wb32", "ESPPORT=0", "sh", "-c", &script])
        .env("DEVBROKER_DIR", w.run.join("machines/ci1"))
        .env("DEVBROKER_LINK_ROOT", w.guest("ci1"))
        .env("DEVBROKER_STATE_DIR", w.state_dir("ci1"))
        .die_with_parent()
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(&seen).unwrap().trim(),
        format!("{} esp1", w.guest_link("ci1", FTDI).display())
    );
    let got = read_exact_timeout(board.master_fd(), 2, 2 * S)
        .unwrap_or_else(|e| panic!("{e}\n{}", w.logs()));
    assert_eq!(got, b"hi", "the path reached the board");
    // Released: the socket is withdrawn from ci1.
    wait_for(2 * S, "the release", || {
        !w.run.join("machines/ci1/esp1.console.sock").exists()
    });

    // No such type: a clear error, exit 2; bad alias: exit 2.
    let out = Command::new(&sai)
        .args(["nrf52", "true"])
        .env("DEVBROKER_DIR", w.run.join("machines/ci1"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("no board of type nrf52 is available to machine ci1"));
    let out = Command::new(&sai)
        .args(["esp32", "ESPPORT=3", "true"])
        .env("DEVBROKER_DIR", w.run.join("machines/ci1"))
        .env("DEVBROKER_LINK_ROOT", w.guest("ci1"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("ESPPORT=3: board esp1 has 1 ttys"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A bounded wait gives up with 75 while someone else holds it.
    let mut holder = ControlClient::connect(&w.run.join("machines/ci2/control.sock"));
    holder.lease_board("esp1");
    let t0 = Instant::now();
    let out = lease_cmd(&w, "ci1", &["--wait", "300ms", "esp32", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(t0.elapsed() < 5 * S);
    // Options after the type are options, not the command.
    let out = lease_cmd(&w, "ci1", &["esp32", "--wait", "300ms", "--", "true"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(75), "{err}");
    assert!(err.contains("waiting for a board of type esp32"), "{err}");
    // sai-device answers --help and --version.
    for (arg, want) in [
        ("--help", "usage: sai-device TYPE"),
        ("--version", "sai-device (devshim) "),
    ] {
        let out = Command::new(&sai).arg(arg).output().unwrap();
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(want),
            "sai-device {arg}: {out:?}"
        );
    }
}

#[test]
fn the_control_plane_survives_bad_requests() {
    let w = World::new(CONFIG);
    let _b = w.broker();
    let mut c = ControlClient::connect(&w.run.join("machines/ci1/control.sock"));
    for (bad, want) in [
        (b"not json\n".to_vec(), "bad request"),
        (b"{\"request\":\"fly\"}\n".to_vec(), "unknown variant `fly`"),
        (
            b"{\"request\":\"lease\",\"board\":\"esp1\",\"type\":\"esp32\"}\n".to_vec(),
            "exactly one of",
        ),
        (
            b"{\"request\":\"release\",\"board\":\"esp1\"}\n".to_vec(),
            "not leased by this connection",
        ),
        (
            b"{\"request\":\"lease\",\"board\":\"nope\"}\n".to_vec(),
            "board nope is not available to machine ci1",
        ),
        (
            [vec![b'x'; 70 * 1024], b"\n".to_vec()].concat(),
            "over the 65536-byte limit",
        ),
    ] {
        c.send_raw(&bad);
        let r = c.next();
        assert_eq!(r["reply"], "error", "{r}");
        assert!(r["message"].as_str().unwrap().contains(want), "{r}");
    }
    // Still usable.
    let r = c.ask(json!({"request": "list"}));
    assert_eq!(r["boards"][0]["name"], "esp1");
    assert_eq!(r["boards"][0]["present"], false);
    // Out of order: nothing but hello first.
    let mut fresh =
        std::os::unix::net::UnixStream::connect(w.run.join("machines/ci1/control.sock")).unwrap();
    use std::io::{BufRead, Write};
    fresh.write_all(b"{\"request\":\"list\"}\n").unwrap();
    let mut line = String::new();
    std::io::BufReader::new(&fresh)
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("send hello first"), "{line}");
    // A newer protocol version is refused by name.
    let r = c.ask(json!({"request": "hello", "version": 9, "client": "x"}));
    assert!(
        r["message"]
            .as_str()
            .unwrap()
            .contains("protocol version 9 is not supported"),
        "{r}"
    );
}

/// Runs a lease whose job writes `one`, waits for `flag`, writes `two`.
fn job_across_a_restart(w: &World, flag: &std::path::Path) -> std::process::Child {
    let script = format!(
        "exec 3<>\"$SAI_DEVICE_TTY0\"; printf one >&3; while [ ! -e {} ]; do sleep 0.05; done; printf two >&3; cat <&3 >/dev/null & sleep 0.5; exit 0",
        flag.display()
    );
    lease_cmd(w, "ci1", &["--board", "esp1", "--", "sh", "-c", &script])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A child's stderr, collected in the background.
struct Stderr {
    text: std::sync::Arc<std::sync::Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl Stderr {
    fn of(child: &mut std::process::Child) -> Stderr {
        use std::io::BufRead;
        let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let t = text.clone();
        let err = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                *t.lock().unwrap() += &(line + "\n");
            }
        });
        Stderr { text, reader }
    }

    /// What it has said so far.
    fn now(&self) -> String {
        self.text.lock().unwrap().clone()
    }

    /// All it said, once every writer has closed it.
    fn all(self) -> String {
        join_within(self.reader, 5 * S);
        let text = self.text.lock().unwrap().clone();
        text
    }
}

#[test]
fn a_lease_held_through_a_broker_restart_is_restored() {
    let w = World::new(CONFIG);
    let board = w.plug(FTDI);
    let mut broker = w.broker();
    let _s = w.shim("ci1");
    let flag = w.path("flag");
    let mut job = job_across_a_restart(&w, &flag);
    let err = Stderr::of(&mut job);
    let got = read_exact_timeout(board.master_fd(), 3, 5 * S)
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", err.now(), w.logs()));
    assert_eq!(got, b"one");

    broker.kill9();
    std::thread::sleep(Duration::from_millis(300));
    let _broker = w.broker();
    wait_for(5 * S, "the lease to be restored", || {
        err.now().contains("lease on esp1 restored")
    });
    std::fs::write(&flag, "").unwrap();
    let got = read_exact_timeout(board.master_fd(), 3, 5 * S)
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", err.now(), w.logs()));
    assert_eq!(got, b"two", "the job's tty works after the restart");
    let st = job.wait().unwrap();
    assert_eq!(st.code(), Some(0), "{}", err.now());
    // Released as usual afterwards.
    wait_for(3 * S, "the release", || {
        !w.run.join("machines/ci1/esp1.console.sock").exists()
    });
}

#[test]
fn a_lease_whose_broker_stays_away_ends_and_says_so() {
    let w = World::new(CONFIG);
    let board = w.plug(FTDI);
    let mut broker = w.broker();
    let _s = w.shim_with("ci1", &["--broker-grace", "1s"]);
    let script = "exec 3<>\"$SAI_DEVICE_TTY0\"; printf one >&3; cat <&3 >/dev/null; echo \"job: cat exited $?\" >&2; exit 3";
    let mut job = lease_cmd(&w, "ci1", &["--board", "esp1", "--", "sh", "-c", script])
        .env("DEVSHIM_BROKER_GRACE", "1s")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = Stderr::of(&mut job);
    let got = read_exact_timeout(board.master_fd(), 3, 5 * S)
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", err.now(), w.logs()));
    assert_eq!(got, b"one");
    let t0 = Instant::now();
    broker.kill9();
    let st = job.wait().unwrap();
    let took = t0.elapsed();
    let err = err.all();
    assert_eq!(st.code(), Some(3), "the job's status comes back: {err}");
    assert!(
        err.contains("lease on esp1 ended: the broker did not come back within 1s"),
        "{err}"
    );
    assert!(
        err.contains("job: cat exited 1"),
        "the job's tty hung up: {err}"
    );
    assert!(took < 5 * S, "{took:?}");
    eprintln!("job ended {took:?} after the broker died (grace 1 s)");
}
