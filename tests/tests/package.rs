//! The Debian package on a fresh host: a booted container stands for the
//! host. `apt install ./devbroker_*.deb`, a config, `systemctl start`:
//! active only once READY (every socket of the config is up), a reload that
//! adds a board while a pyserial session on another one goes on moving
//! bytes, a journal without escape codes, units that `systemd-analyze
//! verify` accepts, man pages `man -l` renders.
//!
//! The package is built before the suite (`cargo deb -p devbroker`, as
//! `.ci/run` does); needs root and systemd-container + debootstrap.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use devbroker_tests::container::{self, BootOptions, Container, TreeCopy};
use devbroker_tests::*;

const S: Duration = Duration::from_secs(1);

/// The package `cargo deb` made, if there is one.
fn package() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debian");
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name().is_some_and(|n| {
                n.to_string_lossy().starts_with("devbroker_")
                    && n.to_string_lossy().ends_with("_amd64.deb")
            })
        })
        .max_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
}

fn sh(c: &Container, script: &str) -> String {
    let out = c
        .exec_with(None, &["/bin/sh", "-c", script], 120 * S)
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "in the container: {script}\n{text}");
    text
}

/// Two fake boards inside: ptys that echo, linked in /dev/serial/by-id as
/// udev would.
const FAKE_BOARDS: &str = r#"
import os, pty, select, sys
os.makedirs('/dev/serial/by-id', exist_ok=True)
masters = []
for name in sys.argv[1:]:
    m, s = pty.openpty()
    link = '/dev/serial/by-id/' + name
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(os.ttyname(s), link)
    masters.append(m)
while True:
    for m in select.select(masters, [], [])[0]:
        try:
            os.write(m, os.read(m, 4096))
        except OSError:
            pass
"#;

/// A pyserial job: echoes checked until /root/job.stop appears (at most
/// `secs` seconds); keeps the count so far in /root/job.count and prints it.
const JOB: &str = r#"
import os, serial, sys, time
s = serial.Serial(sys.argv[1], 115200, timeout=5)
end = time.time() + float(sys.argv[2])
n = 0
while not os.path.exists('/root/job.stop'):
    assert time.time() < end, 'not told to stop within %s s' % sys.argv[2]
    msg = b'ping %d\n' % n
    s.write(msg)
    got = s.read(len(msg))
    assert got == msg, (n, got)
    n += 1
    with open('/root/job.count.tmp', 'w') as f:
        f.write(str(n))
    os.replace('/root/job.count.tmp', '/root/job.count')
    time.sleep(0.01)
print('echoes', n)
"#;

/// How many echoes the job has checked so far.
fn echoes(c: &Container) -> u64 {
    let out = c.exec(&["cat", "/root/job.count"]).unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

fn config(boards: &[&str]) -> String {
    let mut c = String::new();
    for b in boards {
        c += &format!(
            "[[board]]\nname = \"{b}\"\nmachines = [\"local\"]\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"usb-Fake_{b}-if00\" }}\n\n"
        );
    }
    c
}

/// Writes the config inside (the container's /etc is its own).
fn write_config(c: &Container, text: &str) {
    sh(
        c,
        &format!("cat > /etc/devbroker/devbroker.toml <<'EOF'\n{text}EOF"),
    );
}

#[test]
fn the_package_installs_runs_reloads_and_logs_plainly() {
    if let Some(why) = container::skip_reason() {
        skip(&why);
        return;
    }
    let Some(deb) = package() else {
        skip(
            "no target/debian/devbroker_*_amd64.deb: build it first with `cargo deb -p devbroker`",
        );
        return;
    };
    let tree = TreeCopy::new().expect("a container tree");
    std::fs::copy(&deb, tree.path().join("root/devbroker.deb")).unwrap();
    std::fs::write(tree.path().join("root/fake_boards.py"), FAKE_BOARDS).unwrap();
    std::fs::write(tree.path().join("root/job.py"), JOB).unwrap();
    let name = container::unique_name("dbpkg");
    let c = Container::boot(BootOptions::new(name, Some(tree.path())))
        .unwrap_or_else(|e| panic!("boot: {e:#}"));

    // Installed as an admin would.
    let out = sh(
        &c,
        "cd /root && DEBIAN_FRONTEND=noninteractive apt install -y ./devbroker.deb 2>&1",
    );
    eprintln!("{out}");
    sh(
        &c,
        "getent group devbroker && getent group devbroker-admin && test -d /run/devbroker",
    );
    sh(
        &c,
        "test -x /usr/bin/devshim && ! ldd /usr/bin/devshim >/dev/null 2>&1",
    );

    // Two boards plugged; the config names one.
    sh(&c, "systemd-run --unit=fakeboards python3 /root/fake_boards.py usb-Fake_b1-if00 usb-Fake_b2-if00");
    wait_for(10 * S, "the fake boards", || {
        c.exec(&["test", "-e", "/dev/serial/by-id/usb-Fake_b2-if00"])
            .unwrap()
            .status
            .success()
    });
    write_config(&c, &config(&["b1"]));
    sh(&c, "systemctl start devbroker");
    // Active only after READY: the board's socket is up by the time start returns.
    sh(
        &c,
        "systemctl is-active devbroker && test -S /run/devbroker/machines/local/b1.console.sock",
    );
    let status = sh(&c, "systemctl show -p StatusText --value devbroker");
    assert!(status.contains("1 of 1 boards present"), "{status}");

    // A job on b1, through devshim as in a container.
    sh(&c, "systemd-run --unit=shim devshim serve --dir /run/devbroker/machines/local --link-root /guest --user root --state-dir /run/devshim");
    wait_for(10 * S, "b1's guest link", || {
        c.exec(&["test", "-e", "/guest/serial/by-id/usb-Fake_b1-if00"])
            .unwrap()
            .status
            .success()
    });
    sh(
        &c,
        "systemd-run --unit=job python3 /root/job.py /guest/serial/by-id/usb-Fake_b1-if00 120",
    );
    wait_for(20 * S, "the job's session to move bytes", || echoes(&c) > 0);

    // Reload with b2 added: served after `systemctl reload` returns; the job goes on.
    write_config(&c, &config(&["b1", "b2"]));
    sh(
        &c,
        "systemctl reload devbroker && test -S /run/devbroker/machines/local/b2.console.sock",
    );
    let at_reload = echoes(&c);
    wait_for(
        20 * S,
        "the job's session to move bytes after the reload",
        || echoes(&c) > at_reload,
    );
    let status = sh(&c, "systemctl show -p StatusText --value devbroker");
    assert!(status.contains("2 of 2 boards present"), "{status}");
    // A config with a problem: the reload fails, saying why, and the
    // running config stays.
    write_config(&c, &format!("{}rate = \"fast\"\n", config(&["b1", "b2"])));
    let bad = c
        .exec_with(None, &["systemctl", "reload", "devbroker"], 60 * S)
        .unwrap();
    assert!(!bad.status.success(), "a bad config was taken");
    let why = sh(&c, "journalctl -u devbroker --no-pager -o cat | tail -5");
    assert!(why.contains("rate = \"fast\" has the wrong type"), "{why}");
    sh(
        &c,
        "systemctl is-active devbroker && test -S /run/devbroker/machines/local/b2.console.sock",
    );
    sh(&c, "touch /root/job.stop");
    wait_for(20 * S, "the job to finish", || {
        !c.exec(&["systemctl", "is-active", "--quiet", "job"])
            .unwrap()
            .status
            .success()
    });
    let job = sh(&c, "journalctl -u job --no-pager -o cat");
    let total: u64 = job
        .lines()
        .find_map(|l| l.strip_prefix("echoes "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("the job's count: {job}"));
    assert!(
        total > at_reload,
        "the job's session went on through the reload ({total} echoes, {at_reload} at the reload):\n{job}"
    );
    let result = sh(&c, "systemctl show -p Result --value job");
    assert_eq!(result.trim(), "success", "{job}");

    // The journal: no escape codes, the reload said so.
    let journal = sh(&c, "journalctl -u devbroker --no-pager -o cat");
    assert!(
        !journal.contains('\x1b'),
        "escape codes in the journal:\n{journal}"
    );
    assert!(journal.contains("config reloaded"), "{journal}");
    assert!(journal.contains("devbroker ready"), "{journal}");

    // Every unit the package ships is one systemd accepts.
    sh(
        &c,
        "systemd-analyze verify --man=no /usr/lib/systemd/system/devbroker.service",
    );
    // The drop-in: every container is ordered after the broker and wants it.
    // (This stand-in for a host has no systemd-container: a template of
    // the same name stands in for its unit.)
    sh(&c, "test -f /lib/systemd/system/systemd-nspawn@.service || printf '[Unit]\\nDescription=stand-in\\n[Service]\\nExecStart=/bin/true\\n' > /run/systemd/system/systemd-nspawn@.service; systemctl daemon-reload");
    let dropin = sh(&c, "systemctl cat systemd-nspawn@x.service; systemctl show -p After,Wants systemd-nspawn@x.service");
    assert!(
        dropin.contains("After=devbroker.service") && dropin.contains("Wants=devbroker.service"),
        "{dropin}"
    );
    let verify = c
        .exec_with(
            None,
            &[
                "systemd-analyze",
                "verify",
                "--man=no",
                "systemd-nspawn@x.service",
            ],
            60 * S,
        )
        .unwrap();
    let text = String::from_utf8_lossy(&verify.stderr);
    assert!(!text.contains("devbroker"), "the drop-in: {text}");

    // The man pages render.
    let x = tempfile::tempdir().unwrap();
    let st = Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(x.path())
        .status()
        .unwrap();
    assert!(st.success());
    let man = x.path().join("usr/share/man/man1");
    for page in [
        "devbroker.1",
        "devbroker-run.1",
        "devbroker-machine-setup.1",
        "devshim.1",
        "devshim-run.1",
    ] {
        let out = Command::new("man")
            .arg("-l")
            .arg(man.join(page))
            .env("MANPAGER", "cat")
            .env("MANWIDTH", "80")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("NAME"),
            "{page}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
