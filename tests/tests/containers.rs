//! Booted systemd-nspawn containers set up by `devbroker machine setup`:
//! jobs inside use fake boards plugged on the host. Needs root,
//! systemd-container and debootstrap (.ci/run installs them).

use std::time::{Duration, Instant};

use devbroker_tests::container::{self, Container, Machine};
use devbroker_tests::*;

const FTDI: &str = "usb-FTDI_FT232R_USB_UART_C0NTA1-if00-port0";

/// True, after saying why, when these tests can't run here.
fn unavailable() -> bool {
    let why = container::skip_reason();
    if let Some(why) = &why {
        skip(why);
    }
    why.is_some()
}

/// A machine name no other test (or run) uses.
fn unique(prefix: &str) -> String {
    format!("{prefix}{}", std::process::id() % 100000)
}

/// A deterministic byte stream both sides can generate (an LCG).
fn pattern(n: usize, seed: u32) -> Vec<u8> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1103515245).wrapping_add(12345) & 0x7fff_ffff;
            (x >> 16) as u8
        })
        .collect()
}

const PY_PATTERN: &str = "
def pattern(n, seed):
    x = seed
    out = bytearray(n)
    for i in range(n):
        x = (x * 1103515245 + 12345) & 0x7fffffff
        out[i] = (x >> 16) & 0xff
    return bytes(out)
";

fn config(machines: &[&str], allowed: &str) -> String {
    let mut c = format!(
        "[[board]]\nname = \"esp1\"\nmachines = [\"{allowed}\"]\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"{FTDI}\" }}\n"
    );
    for m in machines {
        c += &format!("\n[[machine]]\nname = \"{m}\"\n");
    }
    c
}

/// Whether a session holds the board now.
fn held(w: &World) -> bool {
    w.status()["boards"][0]["ttys"][0]["holder"].is_object()
}

/// Waits until `path` exists inside the container (or not), polling `test`.
fn wait_inside(c: &Container, path: &str, present: bool, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let out = c.exec(&["test", "-e", path]).unwrap();
        if out.status.success() == present {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "{path} {} inside after {limit:?}",
            if present { "not there" } else { "still there" }
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The job user's pyserial session: 1 MiB each way checked, then a baud change.
fn pyserial_job(c: &Container, board: &FakeBoard, w: &World) {
    const N: usize = 1 << 20;
    let script = format!(
        "{PY_PATTERN}
import serial, sys, threading
s = serial.Serial(sys.argv[1], 115200, timeout=20)
got = bytearray()
def reader():
    while len(got) < {N}:
        chunk = s.read({N} - len(got))
        if not chunk: break
        got.extend(chunk)
t = threading.Thread(target=reader); t.start()
s.write(pattern({N}, 1)); s.flush()
t.join()
assert bytes(got) == pattern({N}, 2), 'bytes from the board differ'
s.baudrate = 460800
print('ok', flush=True)
import time; time.sleep(1)
s.close()
"
    );
    let link = format!("/dev/serial/by-id/{FTDI}");
    let mfd = board.master_fd();
    std::thread::scope(|sc| {
        let board_side = sc.spawn(move || read_exact_timeout(mfd, N, Duration::from_secs(60)));
        let writer = sc.spawn(move || {
            // The broker opens the port when the job opens its pty, dropping
            // what the board sent before (as a real port): wait for it.
            wait_for(Duration::from_secs(20), "the job's session", || held(w));
            write_all_fd(mfd, &pattern(N, 2)).unwrap();
            // status names the job's tool by its host pid, found from its
            // pid in the container's namespace.
            let holder = || w.status()["boards"][0]["ttys"][0]["holder"].clone();
            wait_for(Duration::from_secs(20), "status to name the tool", || {
                holder()["tool"] == "python3"
            });
            let pid = holder()["pid"].as_i64().expect("the tool's host pid");
            let proc_status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
            let nspid = proc_status
                .lines()
                .find(|l| l.starts_with("NSpid:"))
                .unwrap();
            assert!(
                proc_status.contains("Name:\tpython3") && nspid.split_whitespace().count() >= 3,
                "pid {pid} is not the container's python3: {proc_status}"
            );
        });
        let out = c
            .exec_as("sai", &["python3", "-c", &script, &link])
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("ok"),
            "job failed: {stdout}\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            c.log()
        );
        writer.join().unwrap();
        let got = board_side
            .join()
            .unwrap()
            .expect("the board got the job's bytes");
        assert!(got == pattern(N, 1), "bytes to the board differ");
    });
}

fn job_on_a_booted_container(private_users: bool) {
    if unavailable() {
        return;
    }
    let name = unique(if private_users { "dbu" } else { "dbp" });
    let w = World::new(&config(&[&name], &name));
    let m = Machine::setup(&w, &name);
    let _broker = w.broker();
    let c = m.boot(private_users, &[]);
    assert!(
        c.unit_active("devshim.service"),
        "devshim.service is not running:\n{}",
        c.log()
    );
    if private_users {
        assert!(c.uid_shift() > 0);
    }
    // Not even the container's root writes in the broker's directory: with
    // -U it isn't the owner, without it the bind is read-only. (The index
    // first proves the directory is bound in.)
    let index = w.run.join(format!("machines/{name}/ttys.json"));
    wait_for(Duration::from_secs(10), "the machine's index", || {
        index.exists()
    });
    let wrote = c
        .exec(&[
            "sh",
            "-c",
            "test -e /run/devbroker/ttys.json || exit 9; touch /run/devbroker/planted",
        ])
        .unwrap();
    let err = String::from_utf8_lossy(&wrote.stderr);
    assert_eq!(
        wrote.status.code(),
        Some(1),
        "the container's root wrote in /run/devbroker, or it is not bound: {err}"
    );
    assert!(
        err.contains("Read-only file system") || err.contains("Permission denied"),
        "{err}"
    );
    assert!(!exists(&w.run.join(format!("machines/{name}/planted"))));

    // Plugged while the container runs: appears inside within 1 s.
    let board = w.plug(FTDI);
    let link = format!("/dev/serial/by-id/{FTDI}");
    let took = wait_inside(&c, &link, true, Duration::from_secs(1));
    eprintln!("link inside after {took:?}");
    let owner = c.exec(&["stat", "-L", "-c", "%U", &link]).unwrap();
    assert_eq!(String::from_utf8_lossy(&owner.stdout).trim(), "sai");

    pyserial_job(&c, &board, &w);
    wait_for(
        Duration::from_secs(2),
        "the baud change at the board",
        || board.baud() == 460800,
    );

    // Unplug while a job reads: it gets EIO and the link goes.
    let script = "import os, sys, tty\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_NOCTTY)\n# pyserial left VMIN=0 (termios outlive a close, as on a real port): block.\ntty.setraw(fd)\nprint('open', flush=True)\ntry:\n    os.read(fd, 10)\n    print('eof')\nexcept OSError as e:\n    print('errno', e.errno)\n";
    let job = {
        let c2 = &c;
        let link = link.clone();
        std::thread::scope(|sc| {
            let h = sc.spawn(move || {
                c2.exec_as("sai", &["python3", "-c", script, &link])
                    .unwrap()
            });
            wait_for(Duration::from_secs(20), "the reader's session", || held(&w));
            std::thread::sleep(Duration::from_millis(200));
            board.unplug();
            h.join().unwrap()
        })
    };
    let out = String::from_utf8_lossy(&job.stdout);
    assert!(out.contains("errno 5"), "the job did not read EIO: {out}");
    wait_inside(&c, &link, false, Duration::from_secs(1));
}

#[test]
fn a_job_uses_a_board_in_a_booted_container() {
    job_on_a_booted_container(false);
}

#[test]
fn the_same_with_private_users() {
    job_on_a_booted_container(true);
}

#[test]
fn a_machine_not_allowed_gets_no_socket_and_no_link() {
    if unavailable() {
        return;
    }
    let a = unique("dba");
    let b = unique("dbb");
    let w = World::new(&config(&[&a, &b], &a));
    let ma = Machine::setup(&w, &a);
    let mb = Machine::setup(&w, &b);
    let _broker = w.broker();
    let _board = w.plug(FTDI);
    let ca = ma.boot(false, &[]);
    let cb = mb.boot(false, &[]);
    let link = format!("/dev/serial/by-id/{FTDI}");
    wait_inside(&ca, &link, true, Duration::from_secs(2));
    std::thread::sleep(Duration::from_millis(300));
    let ls = cb.exec(&["ls", "-A", "/run/devbroker"]).unwrap();
    let names = String::from_utf8_lossy(&ls.stdout);
    assert!(
        names.contains("control.sock") && !names.contains("esp1"),
        "{names}"
    );
    assert!(!cb.exec(&["test", "-e", &link]).unwrap().status.success());
    assert!(!cb
        .exec(&["test", "-e", "/dev/devbroker/esp1.console"])
        .unwrap()
        .status
        .success());
}
