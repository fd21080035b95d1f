//! A container's root, hostile: in a booted `-U` container it plants links
//! and FIFOs everywhere `machine setup` and the broker write, then the admin
//! runs setup again, `check --fix` and `remove`, and jobs lease a shared
//! board back and forth. A sentinel set of host files, hashed before and
//! after, must be unchanged, and nothing may hang. Needs root,
//! systemd-container and debootstrap (.ci/run installs them).

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use devbroker_tests::container::{self, BootOptions, Container, TreeCopy};
use devbroker_tests::control::ControlClient;
use devbroker_tests::*;

const FTDI: &str = "usb-FTDI_FT232R_USB_UART_H0ST1L-if00-port0";

/// Host files a hostile container would love to change: their content,
/// owner and mode.
struct Sentinels {
    dir: tempfile::TempDir,
}

impl Sentinels {
    fn new() -> Sentinels {
        let dir = tempfile::Builder::new()
            .prefix("devbroker-sentinel-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let s = Sentinels { dir };
        std::fs::write(s.file(), "root:x:0:0:host secret\n").unwrap();
        std::fs::set_permissions(
            s.file(),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        std::fs::create_dir(s.subdir()).unwrap();
        std::fs::set_permissions(
            s.subdir(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        std::fs::write(s.subdir().join("keep"), "host data\n").unwrap();
        s
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("passwd")
    }

    fn subdir(&self) -> PathBuf {
        self.dir.path().join("dir")
    }

    /// Every path under the sentinel directory with its type, content hash,
    /// owner and mode.
    fn snapshot(&self) -> BTreeMap<String, String> {
        snapshot(self.dir.path())
    }
}

fn sh(c: &Container, script: &str) -> (bool, String) {
    let out = c
        .exec_with(None, &["/bin/sh", "-c", script], Duration::from_secs(60))
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn setup_args<'a>(name: &'a str, tree: &'a str, w: &'a World, state: &'a str) -> Vec<&'a str> {
    vec![
        "machine",
        "setup",
        name,
        "--tree",
        tree,
        "--nspawn-dir",
        "/run/systemd/nspawn",
        "--run-dir",
        w.run.to_str().unwrap(),
        "--state-dir",
        state,
        "--config",
        w.config.to_str().unwrap(),
    ]
}

#[test]
fn a_hostile_container_root_changes_nothing_of_the_host() {
    if let Some(why) = container::skip_reason() {
        skip(&why);
        return;
    }
    let name = format!("dbh{}", std::process::id() % 100000);
    let w = World::new(&format!(
        "[[board]]\nname = \"shared\"\nmachines = [\"{name}\", \"other\"]\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"{FTDI}\" }}\n\n[[machine]]\nname = \"{name}\"\n\n[[machine]]\nname = \"other\"\n"
    ));
    let sentinels = Sentinels::new();
    let tree = TreeCopy::new().expect("a container tree");
    let link = PathBuf::from("/var/lib/machines").join(&name);
    std::fs::create_dir_all("/var/lib/machines").unwrap();
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(tree.path(), &link).unwrap();
    let _leftovers = Leftovers(vec![
        link.clone(),
        PathBuf::from(format!("/run/systemd/nspawn/{name}.nspawn")),
    ]);
    let state = w.path("state");
    let tree_s = tree.path().to_str().unwrap().to_string();
    let state_s = state.to_str().unwrap().to_string();
    let mut args = setup_args(&name, &tree_s, &w, &state_s);
    let shim = devshim().to_str().unwrap().to_string();
    args.extend(["--devshim", &shim]);
    let (ok, out) = cli_within(&args);
    assert!(ok, "setup: {out}");
    let _broker = w.broker();
    let board = w.plug(FTDI);
    let c = Container::boot(BootOptions {
        name: name.clone(),
        directory: None,
        private_users: true,
        extra_args: vec![],
    })
    .unwrap_or_else(|e| panic!("boot: {e:#}"));
    assert!(c.uid_shift() > 0, "a -U container");
    let before = sentinels.snapshot();
    let target = sentinels.file().display().to_string();
    let target_dir = sentinels.subdir().display().to_string();

    // The machine directory is the host's: the container's root can't plant
    // anything there. (Its index first proves the directory is bound in.)
    let index = w.run.join(format!("machines/{name}/ttys.json"));
    wait_for(Duration::from_secs(10), "the machine's index", || {
        index.exists()
    });
    let (ok, out) = sh(
        &c,
        &format!(
            "test -e /run/devbroker/ttys.json || exit 9; \
             ln -s {target} /run/devbroker/.ttys.json.tmp || echo refused-link; \
             mkfifo /run/devbroker/.ttys.json.tmp || echo refused-fifo; \
             ln -s {target} /run/devbroker/shared.console.sock || echo refused-sock; \
             touch /run/devbroker/x || echo refused-file"
        ),
    );
    assert!(ok, "{out}");
    for r in [
        "refused-link",
        "refused-fifo",
        "refused-sock",
        "refused-file",
    ] {
        assert!(out.contains(r), "{r}: {out}");
    }

    // The tree: one planted attack at a time where setup reads or writes.
    // Before each, the tree is put back as setup left it, less the job
    // user's lines, so setup wants to write every account file again.
    let reset = "set -e
        rm -f /etc/.*.devbroker-tmp
        if [ -L /home/sai ]; then rm /home/sai; fi; mkdir -p /home/sai
        if [ -L /etc/systemd/network ]; then rm /etc/systemd/network; fi; mkdir -p /etc/systemd/network
        if [ -L /usr/local/bin ]; then rm /usr/local/bin; mv /usr/local/bin.real /usr/local/bin; fi
        sed -i '/^sai:/d' /etc/passwd /etc/group /etc/shadow /etc/gshadow
        rm -f /etc/hostname /etc/systemd/network/50-host0.network";
    let attacks = [
        (
            format!("echo 'sai:x:883:883::/../../../../../..{target_dir}:/bin/sh' >> /etc/passwd"),
            "home directory of sai",
        ),
        (format!("rm -rf /home/sai; ln -s {target_dir} /home/sai"), "/home/sai"),
        (
            format!("ln -s {target} /etc/.passwd.devbroker-tmp"),
            ".passwd.devbroker-tmp",
        ),
        ("mkfifo /etc/.shadow.devbroker-tmp".to_string(), ".shadow.devbroker-tmp"),
        (
            format!("ln -s {target} /etc/.hostname.devbroker-tmp"),
            ".hostname.devbroker-tmp",
        ),
        (
            format!("rm -rf /etc/systemd/network; ln -s {target_dir} /etc/systemd/network"),
            "systemd/network",
        ),
        (
            format!("cp -a /usr/local/bin /usr/local/bin.real; rm -rf /usr/local/bin; ln -s {target_dir} /usr/local/bin"),
            "usr/local/bin",
        ),
    ];
    let setup = |expect_ok: bool, why: &str| {
        let mut again = setup_args(&name, &tree_s, &w, &state_s);
        again.extend(["--devshim", &shim]);
        let (ok, out) = cli_within(&again);
        assert_eq!(ok, expect_ok, "{why}: {out}");
        out
    };
    for (plant, named) in &attacks {
        let (ok, out) = sh(&c, &format!("{reset}\n{plant}\necho planted"));
        assert!(ok && out.contains("planted"), "{plant}: {out}");
        // The admin runs setup again (an upgrade, say): refused, naming
        // what is in the way, and nothing of the host touched.
        let out = setup(false, plant);
        assert!(
            out.contains(named),
            "the refusal for `{plant}` names {named}: {out}"
        );
        assert_eq!(
            before,
            sentinels.snapshot(),
            "a host file changed after `{plant}`"
        );
    }
    let (ok, out) = sh(&c, &format!("{reset}\necho reset"));
    assert!(ok, "{out}");
    setup(true, "a clean tree is set up again");

    // Links and FIFOs planted after setup: check --fix and remove go
    // around them, and hang on none.
    let (ok, out) = sh(
        &c,
        &format!(
            "set -e
             ln -sf {target} /etc/hostname
             rm -f /etc/.passwd.devbroker-tmp; mkfifo /etc/.passwd.devbroker-tmp
             rm -f /usr/local/bin/devshim.devbroker-bak; ln -s {target} /usr/local/bin/devshim.devbroker-bak
             echo planted"
        ),
    );
    assert!(ok && out.contains("planted"), "{out}");
    // check reads the host's files only (drop-ins, .nspawn files, udev
    // rules; empty directories stand in for the host's drop-ins and rules):
    // setup's own .nspawn file has nothing to fix.
    let empty = w.path("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, out) = cli_within(&[
        "machine",
        "check",
        &name,
        "--fix",
        "--nspawn-dir",
        "/run/systemd/nspawn",
        "--systemd-dir",
        empty.to_str().unwrap(),
        "--udev-dir",
        empty.to_str().unwrap(),
    ]);
    assert!(ok, "check --fix: {out}");
    assert!(
        out.contains(&format!(
            "machine {name}: no leftovers of binding devices by hand"
        )),
        "check --fix: {out}"
    );
    let nspawn = PathBuf::from(format!("/run/systemd/nspawn/{name}.nspawn"));
    assert!(nspawn.exists(), "setup's {}", nspawn.display());
    // remove takes back what setup added and leaves the planted links and
    // FIFO, naming them.
    let record = state.join(format!("machines/{name}.json"));
    assert!(record.exists(), "setup's record {}", record.display());
    let (ok, out) = cli_within(&["machine", "remove", &name, "--state-dir", &state_s]);
    assert!(ok, "remove: {out}");
    let etc = tree.path().join("etc");
    for want in [
        format!("removed {}", nspawn.display()),
        format!(
            "kept {}: it is a symbolic link (to {target}); setup never writes through links",
            etc.join("hostname").display()
        ),
        format!(
            "kept {}: {} is a FIFO where setup writes its temporary file",
            etc.join("passwd").display(),
            etc.join(".passwd.devbroker-tmp").display()
        ),
        format!("machine {name}: removed what setup added"),
    ] {
        assert!(out.contains(&want), "remove says {want:?}: {out}");
    }
    assert!(!exists(&nspawn), "remove left {}: {out}", nspawn.display());
    assert!(!record.exists(), "remove left its record: {out}");
    assert_eq!(
        before,
        sentinels.snapshot(),
        "a host file changed in check --fix or remove"
    );

    // Leases move the shared board between machines while the container's
    // root keeps trying to swap links into its directory.
    let script = format!(
        "test -e /run/devbroker/ttys.json || exit 9; for i in $(seq 200); do ln -s {target} /run/devbroker/.x 2>/dev/null; mv -f /run/devbroker/.x /run/devbroker/shared.console.sock 2>/dev/null; done; echo done"
    );
    let mut c1 = ControlClient::connect(&w.run.join(format!("machines/{name}/control.sock")));
    let mut c2 = ControlClient::connect(&w.run.join("machines/other/control.sock"));
    std::thread::scope(|sc| {
        let h = sc.spawn(|| sh(&c, &script));
        for _ in 0..20 {
            c1.lease_board("shared");
            let r = c1.ask(serde_json::json!({"request": "release", "board": "shared"}));
            assert_eq!(r["reply"], "released", "{r}");
            c2.lease_board("shared");
            let r = c2.ask(serde_json::json!({"request": "release", "board": "shared"}));
            assert_eq!(r["reply"], "released", "{r}");
        }
        let (ok, out) = h.join().unwrap();
        assert!(ok && out.contains("done"), "{out}");
    });
    // The broker still answers everyone.
    let r = c2.ask(serde_json::json!({"request": "list"}));
    assert_eq!(r["reply"], "boards", "{r}");
    drop(board);

    let after = sentinels.snapshot();
    assert_eq!(before, after, "a host file changed");
    let m = std::fs::metadata(w.run.join(format!("machines/{name}"))).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o755));
}

/// The host files naming the machine, removed however the test ends (after
/// the container, which is dropped first).
struct Leftovers(Vec<PathBuf>);

impl Drop for Leftovers {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}
