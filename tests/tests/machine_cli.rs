//! `devbroker machine setup|check|remove` on trees made for the test (the
//! booted-container proof is in `containers.rs`). Needs root: setup chowns.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use devbroker_tests::*;

struct Host {
    tmp: tempfile::TempDir,
}

impl Host {
    fn new() -> Option<Host> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: machine setup chowns files and needs root (run the suite as root, as CI does)");
            return None;
        }
        let h = Host {
            tmp: tempfile::tempdir().unwrap(),
        };
        fs::create_dir_all(h.p("machines")).unwrap();
        fs::create_dir_all(h.p("nspawn")).unwrap();
        Some(h)
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.tmp.path().join(rel)
    }

    /// A minimal container tree, as debootstrap leaves one.
    fn tree(&self, name: &str) -> PathBuf {
        let t = self.p(&format!("machines/{name}"));
        for d in [
            "etc/systemd/system",
            "lib/systemd/system",
            "usr/local/bin",
            "home",
        ] {
            fs::create_dir_all(t.join(d)).unwrap();
        }
        for u in ["systemd-networkd.service", "systemd-networkd.socket"] {
            fs::write(t.join("lib/systemd/system").join(u), "[Unit]\n").unwrap();
        }
        fs::write(t.join("etc/passwd"), "root:x:0:0:root:/root:/bin/bash\n").unwrap();
        fs::write(t.join("etc/group"), "root:x:0:\n").unwrap();
        fs::write(t.join("etc/shadow"), "root:*:19000:0:99999:7:::\n").unwrap();
        fs::write(t.join("etc/hostname"), "localhost\n").unwrap();
        t
    }

    fn args(&self, name: &str) -> Vec<String> {
        let mut v: Vec<String> = vec!["machine".into(), "setup".into(), name.into()];
        for (flag, rel) in [
            ("--nspawn-dir", "nspawn"),
            ("--run-dir", "run"),
            ("--state-dir", "state"),
            ("--machines-dir", "machines"),
            ("--config", "none.toml"),
        ] {
            v.push(flag.into());
            v.push(self.p(rel).display().to_string());
        }
        v.push("--devshim".into());
        v.push(devshim().display().to_string());
        v
    }

    fn run(&self, name: &str, extra: &[&str]) -> (bool, String) {
        let mut a = self.args(name);
        if extra.contains(&"--devshim") {
            a.truncate(a.len() - 2);
        }
        a.extend(extra.iter().map(|s| s.to_string()));
        devbroker_cli(&a.iter().map(String::as_str).collect::<Vec<_>>())
    }
}

#[test]
fn setup_is_idempotent_dry_run_writes_nothing_remove_restores() {
    let Some(h) = Host::new() else { return };
    let tree = h.tree("ci-one");
    // The admin's own settings in an existing .nspawn file.
    fs::write(
        h.p("nspawn/ci-one.nspawn"),
        "# admin's\n[Exec]\nPrivateUsers=pick\n\n[Files]\nBind=/srv/ccache\n",
    )
    .unwrap();
    let before = snapshot(h.tmp.path());

    let (ok, out) = h.run("ci-one", &["--dry-run"]);
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "+++ {}/etc/systemd/network/50-host0.network",
            tree.display()
        )),
        "{out}"
    );
    assert!(out.contains("+Address=192.168.100.9/24"), "{out}");
    assert!(
        out.contains("+Bind=") && out.contains("/run/machines/ci-one:/run/devbroker"),
        "{out}"
    );
    assert!(out.contains("(dry run: nothing written)"), "{out}");
    assert_eq!(snapshot(h.tmp.path()), before, "--dry-run wrote something");

    let (ok, out) = h.run("ci-one", &[]);
    assert!(ok, "{out}");
    assert!(out.contains("machine ci-one: set up"), "{out}");
    assert!(
        out.contains("nmcli connection add type ethernet ifname ve-ci-one"),
        "{out}"
    );
    let nspawn = fs::read_to_string(h.p("nspawn/ci-one.nspawn")).unwrap();
    assert_eq!(
        nspawn,
        format!(
            "# admin's\n[Exec]\nPrivateUsers=pick\nBoot=yes\n\n[Files]\nBind=/srv/ccache\nBind={}:/run/devbroker\n\n[Network]\nVirtualEthernet=yes\n",
            h.p("run/machines/ci-one").display()
        )
    );
    assert!(!nspawn.contains("DeviceAllow") && !nspawn.contains("/dev/tty"));
    assert_eq!(
        fs::read_to_string(tree.join("etc/hostname")).unwrap(),
        "ci-one\n"
    );
    assert!(fs::read_to_string(tree.join("etc/passwd"))
        .unwrap()
        .contains("sai:x:883:883::/home/sai:/bin/bash"));
    assert!(fs::read_to_string(tree.join("etc/shadow"))
        .unwrap()
        .contains("\nsai:!:"));
    assert_eq!(fs::metadata(tree.join("home/sai")).unwrap().uid(), 883);
    assert_eq!(
        fs::read_link(tree.join("etc/systemd/system/multi-user.target.wants/devshim.service"))
            .unwrap(),
        Path::new("/etc/systemd/system/devshim.service")
    );
    assert_eq!(
        fs::read_link(
            tree.join("etc/systemd/system/multi-user.target.wants/systemd-networkd.service")
        )
        .unwrap(),
        Path::new("/lib/systemd/system/systemd-networkd.service")
    );
    assert_eq!(
        fs::read(tree.join("usr/local/bin/devshim")).unwrap(),
        fs::read(devshim()).unwrap()
    );
    assert!(
        fs::read_to_string(tree.join("etc/systemd/system/devshim.service"))
            .unwrap()
            .contains("--user sai")
    );
    assert!(h.p("run/machines/ci-one").is_dir());

    let after_setup = snapshot(h.tmp.path());
    let (ok, out) = h.run("ci-one", &[]);
    assert!(
        ok && out.contains("machine ci-one: already set up; nothing changed"),
        "{out}"
    );
    assert_eq!(
        snapshot(h.tmp.path()),
        after_setup,
        "a second setup changed something"
    );
    let (ok, out) = h.run("ci-one", &["--dry-run"]);
    assert!(ok && out.contains("nothing would change"), "{out}");

    let (ok, out) = devbroker_cli(&[
        "machine",
        "remove",
        "ci-one",
        "--state-dir",
        h.p("state").to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    let mut now = snapshot(h.tmp.path());
    now.retain(|k, _| !k.starts_with("state"));
    let mut want = before.clone();
    want.retain(|k, _| !k.starts_with("state"));
    assert_eq!(
        now, want,
        "remove did not restore what was there before setup"
    );
}

#[test]
fn remove_keeps_what_the_admin_changed_since() {
    let Some(h) = Host::new() else { return };
    let tree = h.tree("ci-two");
    assert!(h.run("ci-two", &[]).0);
    // The admin adds a line of their own to passwd and a setting to the .nspawn file.
    let mut passwd = fs::read_to_string(tree.join("etc/passwd")).unwrap();
    passwd.push_str("bob:x:1000:1000::/home/bob:/bin/sh\n");
    fs::write(tree.join("etc/passwd"), &passwd).unwrap();
    let nspawn = h.p("nspawn/ci-two.nspawn");
    let mut text = fs::read_to_string(&nspawn).unwrap();
    text.push_str("\n[Exec]\nEnvironment=A=1\n");
    fs::write(&nspawn, text).unwrap();
    let (ok, out) = devbroker_cli(&[
        "machine",
        "remove",
        "ci-two",
        "--state-dir",
        h.p("state").to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    assert_eq!(
        fs::read_to_string(tree.join("etc/passwd")).unwrap(),
        "root:x:0:0:root:/root:/bin/bash\nbob:x:1000:1000::/home/bob:/bin/sh\n"
    );
    let text = fs::read_to_string(&nspawn).unwrap();
    assert!(
        text.contains("Environment=A=1")
            && !text.contains("Boot=yes")
            && !text.contains("/run/devbroker"),
        "{text}"
    );
}

#[test]
fn machines_get_their_own_subnets_and_shifted_owners() {
    let Some(h) = Host::new() else { return };
    h.tree("ci-a");
    assert!(h.run("ci-a", &[]).0);
    let b = h.tree("ci-b");
    // A tree used with private users: its root is owned by the shift.
    let shift = 0x7E90000u32;
    std::os::unix::fs::chown(&b, Some(shift), Some(shift)).unwrap();
    let (ok, out) = h.run("ci-b", &["--user", "ci:1500"]);
    assert!(ok, "{out}");
    assert!(out.contains(&format!("owned by uid {shift}")), "{out}");
    let net = fs::read_to_string(b.join("etc/systemd/network/50-host0.network")).unwrap();
    assert!(
        net.contains("Address=192.168.101.9/24") && net.contains("Gateway=192.168.101.1"),
        "{net}"
    );
    let dir = fs::metadata(h.p("run/machines/ci-b")).unwrap();
    assert_eq!(
        (dir.uid(), dir.mode() & 0o777),
        (shift, 0o755),
        "the container's root owns its directory"
    );
    assert_eq!(fs::metadata(b.join("home/ci")).unwrap().uid(), shift + 1500);
    assert_eq!(fs::metadata(b.join("etc/hostname")).unwrap().uid(), shift);
}

#[test]
fn bad_names_are_refused_clearly() {
    let Some(h) = Host::new() else { return };
    h.tree("sai-builder-1");
    for (name, want) in [
        ("a_b", "contains '_' (systemd refuses it in machine names)"),
        ("a\nb", "contains a newline"),
        ("..", "has an empty label"),
        ("a/b", "contains '/'"),
        ("sai-builder-2", "would share its host veth ve-sai-builder with sai-builder-1: the first 11 characters of machine names must differ"),
    ] {
        let (ok, out) = h.run(name, &[]);
        assert!(!ok, "{name:?} accepted");
        assert!(out.contains(want), "{name:?}: {out}");
    }
    let (ok, out) = h.run("no-tree", &[]);
    assert!(
        !ok && out
            .contains("is not there: make one (debootstrap, machinectl pull-tar) or pass --tree"),
        "{out}"
    );
    let (ok, out) = h.run("sai-builder-1", &["--devshim", "/bin/sh"]);
    assert!(!ok && out.contains("is not a static executable"), "{out}");
    assert!(
        !h.p("state").exists() && !h.p("run").exists(),
        "a refused setup wrote something"
    );
}

#[test]
fn check_finds_and_fixes_the_old_way() {
    let Some(h) = Host::new() else { return };
    let systemd = h.p("systemd");
    let dropins = systemd.join("systemd-nspawn@ci-old.service.d");
    fs::create_dir_all(&dropins).unwrap();
    fs::write(
        dropins.join("devices.conf"),
        "[Service]\nDeviceAllow=char-ttyUSB rwm\nDeviceAllow=char-ttyACM rwm\nMemoryMax=4G\n",
    )
    .unwrap();
    fs::write(
        h.p("nspawn/ci-old.nspawn"),
        "[Files]\nBind=/dev/ttyUSB0\nBind=/srv/cache\n",
    )
    .unwrap();
    let udev = h.p("udev");
    fs::create_dir_all(&udev).unwrap();
    fs::write(udev.join("99-boards.rules"), "SUBSYSTEM==\"tty\", KERNEL==\"ttyUSB[0-9]*\", MODE=\"0666\"\nSUBSYSTEM==\"net\", NAME=\"lan0\"\n").unwrap();
    let args = |fix: bool| {
        let mut v = vec![
            "machine".to_string(),
            "check".into(),
            "ci-old".into(),
            "--systemd-dir".into(),
            systemd.display().to_string(),
            "--nspawn-dir".into(),
            h.p("nspawn").display().to_string(),
            "--udev-dir".into(),
            udev.display().to_string(),
        ];
        if fix {
            v.push("--fix".into());
        }
        v
    };
    let (ok, out) = devbroker_cli(&args(false).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!ok, "leftovers make check fail");
    assert!(
        out.contains("devices.conf:2: DeviceAllow=char-ttyUSB rwm")
            && out.contains("devices.conf:3:"),
        "{out}"
    );
    assert!(out.contains("ci-old.nspawn:2: Bind=/dev/ttyUSB0"), "{out}");
    assert!(out.contains("99-boards.rules:1:"), "{out}");
    assert!(out.contains("4 leftover lines"), "{out}");
    let (ok, out) = devbroker_cli(&args(true).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "{out}");
    assert_eq!(
        fs::read_to_string(dropins.join("devices.conf")).unwrap(),
        "[Service]\nMemoryMax=4G\n"
    );
    assert_eq!(
        fs::read_to_string(h.p("nspawn/ci-old.nspawn")).unwrap(),
        "[Files]\nBind=/srv/cache\n"
    );
    assert_eq!(
        fs::read_to_string(udev.join("99-boards.rules")).unwrap(),
        "SUBSYSTEM==\"net\", NAME=\"lan0\"\n"
    );
    assert!(
        fs::read_to_string(dropins.join("devices.conf.devbroker-bak"))
            .unwrap()
            .contains("DeviceAllow=char-ttyUSB")
    );
    assert!(udev.join("99-boards.rules.devbroker-bak").exists());
    let (ok, out) = devbroker_cli(&args(false).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok && out.contains("no leftovers"), "{out}");
}
