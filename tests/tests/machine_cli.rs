//! `devbroker machine setup|check|remove` on trees made for the test (the
//! booted-container proof is in `containers.rs`). Needs root: setup chowns.
//!
//! The container's root owns its tree, so the later tests plant what it
//! could — links to host files and directories, FIFOs, a `..` home — and
//! check that setup, remove and check --fix refuse (or stay inside the
//! tree) and leave the host's files as they were.

use std::fs;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use devbroker_tests::*;

struct Host {
    tmp: tempfile::TempDir,
}

impl Host {
    fn new() -> Option<Host> {
        if !nix::unistd::geteuid().is_root() {
            skip("machine setup chowns files and needs root (run the suite as root, as CI does)");
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
        cli_within(&a.iter().map(String::as_str).collect::<Vec<_>>())
    }

    fn remove(&self, name: &str) -> (bool, String) {
        cli_within(&[
            "machine",
            "remove",
            name,
            "--state-dir",
            self.p("state").to_str().unwrap(),
        ])
    }

    /// A host file outside every tree, for a planted link to aim at.
    fn host_file(&self, rel: &str, text: &str) -> PathBuf {
        let p = self.p(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(&p, text).unwrap();
        p
    }

    /// A host directory outside every tree, owned by root with mode 0700.
    fn host_dir(&self, rel: &str) -> PathBuf {
        let p = self.p(rel);
        fs::create_dir_all(&p).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o700)).unwrap();
        p
    }
}

fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o644)).unwrap();
}

fn meta(p: &Path) -> (u32, u32, u32) {
    let m = fs::symlink_metadata(p).unwrap();
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

/// An earlier devbroker bound the machine directory writable; setup makes
/// it read-only (even a container root that is the host's root can't write
/// there then), and remove puts the file back as it found it.
#[test]
fn a_writable_bind_from_an_earlier_setup_becomes_read_only() {
    let Some(h) = Host::new() else { return };
    h.tree("ci-old");
    let bind = format!("{}:/run/devbroker", h.p("run/machines/ci-old").display());
    let old = format!("[Exec]\nBoot=yes\n\n[Files]\nBind=/srv/ccache\nBind={bind}\n");
    fs::write(h.p("nspawn/ci-old.nspawn"), &old).unwrap();
    let (ok, out) = h.run("ci-old", &[]);
    assert!(ok, "{out}");
    let now = fs::read_to_string(h.p("nspawn/ci-old.nspawn")).unwrap();
    assert!(now.contains(&format!("BindReadOnly={bind}")), "{now}");
    assert!(!now.contains(&format!("\nBind={bind}")), "{now}");
    assert!(
        now.contains("Bind=/srv/ccache"),
        "the admin's own bind stays: {now}"
    );
    let (ok, out) = h.run("ci-old", &[]);
    assert!(ok && out.contains("already set up"), "{out}");
    let (ok, out) = devbroker_cli(&[
        "machine",
        "remove",
        "ci-old",
        "--state-dir",
        h.p("state").to_str().unwrap(),
    ]);
    assert!(ok, "{out}");
    assert_eq!(
        fs::read_to_string(h.p("nspawn/ci-old.nspawn")).unwrap(),
        old
    );
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
        out.contains("+BindReadOnly=") && out.contains("/run/machines/ci-one:/run/devbroker"),
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
            "# admin's\n[Exec]\nPrivateUsers=pick\nBoot=yes\n\n[Files]\nBind=/srv/ccache\nBindReadOnly={}:/run/devbroker\n\n[Network]\nVirtualEthernet=yes\n",
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
    // The host's, not the container's root's: readable and searchable
    // from inside (sockets are 0666), never writable by the container.
    assert_eq!(
        meta(&h.p("run/machines/ci-b")),
        (0, 0, 0o755),
        "the machine's run directory is the host's"
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

#[test]
fn a_link_at_the_temporary_file_is_refused_and_the_host_file_kept() {
    let Some(h) = Host::new() else { return };
    let tree = h.tree("ci-tmp");
    let victim = h.host_file("host/passwd", "host's own passwd\n");
    symlink(&victim, tree.join("etc/.passwd.devbroker-tmp")).unwrap();
    let host_before = snapshot(&victim);
    let tree_before = snapshot(&tree);

    let (ok, out) = h.run("ci-tmp", &[]);
    assert!(!ok, "setup wrote through the link: {out}");
    assert!(
        out.contains(&format!(
            "{}/etc/.passwd.devbroker-tmp is a symbolic link (to {}); setup never writes through links in a container's tree: remove it",
            tree.display(),
            victim.display()
        )),
        "{out}"
    );
    assert_eq!(snapshot(&victim), host_before, "the host file changed");
    assert_eq!(
        snapshot(&tree),
        tree_before,
        "a refused setup changed the tree"
    );
}

#[test]
fn fifos_in_the_tree_are_refused_not_opened() {
    let Some(h) = Host::new() else { return };
    // Where setup reads: the tree's passwd.
    let a = h.tree("ci-fifo-a");
    fs::remove_file(a.join("etc/passwd")).unwrap();
    mkfifo(&a.join("etc/passwd"));
    let (ok, out) = h.run("ci-fifo-a", &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "{}/etc/passwd is a FIFO, not a regular file; setup only reads and writes regular files there: remove it",
            a.display()
        )),
        "{out}"
    );
    // Where setup writes: its temporary file.
    let b = h.tree("ci-fifo-b");
    mkfifo(&b.join("etc/.group.devbroker-tmp"));
    let before = snapshot(&b);
    let (ok, out) = h.run("ci-fifo-b", &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "{}/etc/.group.devbroker-tmp is a FIFO where setup writes its temporary file: remove it",
            b.display()
        )),
        "{out}"
    );
    assert_eq!(snapshot(&b), before);
}

#[test]
fn a_home_linked_to_a_host_directory_is_refused() {
    let Some(h) = Host::new() else { return };
    let tree = h.tree("ci-home");
    let host = h.host_dir("host/srv");
    fs::write(host.join("data"), "host data\n").unwrap();
    symlink(&host, tree.join("home/sai")).unwrap();
    let before = snapshot(&host);

    let (ok, out) = h.run("ci-home", &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "{}/home/sai is a symbolic link (to {}); setup never writes through links in a container's tree: remove it",
            tree.display(),
            host.display()
        )),
        "{out}"
    );
    assert_eq!(
        snapshot(&host),
        before,
        "the host directory was chowned or chmodded"
    );
    assert_eq!(meta(&host), (0, 0, 0o700));
}

#[test]
fn a_home_with_dotdot_in_the_trees_passwd_is_refused() {
    let Some(h) = Host::new() else { return };
    let tree = h.tree("ci-dots");
    // From machines/ci-dots, `../..` is the host's directory above both.
    let host = h.host_dir("host-home");
    fs::write(
        tree.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/bash\nsai:x:883:883::/../../host-home:/bin/bash\n",
    )
    .unwrap();
    let before = snapshot(&host);
    let (ok, out) = h.run("ci-dots", &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "the home directory of sai in {}/etc/passwd is \"/../../host-home\"; setup makes a home only at a plain absolute path",
            tree.display()
        )),
        "{out}"
    );
    assert_eq!(snapshot(&host), before);
    assert_eq!(meta(&host), (0, 0, 0o700));
}

#[test]
fn linked_directories_resolve_inside_the_tree() {
    let Some(h) = Host::new() else { return };
    // A link to a host directory the tree has no counterpart of: refused,
    // before anything is written.
    let tree = h.tree("ci-net");
    let host_net = h.host_dir("host/network");
    fs::create_dir_all(tree.join("etc/systemd")).unwrap();
    symlink(&host_net, tree.join("etc/systemd/network")).unwrap();
    let before = snapshot(&tree);
    let (ok, out) = h.run("ci-net", &[]);
    assert!(!ok, "{out}");
    assert!(
        out.contains(&format!(
            "{}/etc/systemd/network is a symbolic link to {}, which is no directory inside the tree; setup never makes directories through links",
            tree.display(),
            host_net.display()
        )),
        "{out}"
    );
    assert!(
        fs::read_dir(&host_net).unwrap().next().is_none(),
        "setup wrote into the host's directory"
    );
    assert_eq!(snapshot(&tree), before);

    // A link to a directory the tree has: it leads there, as it does for
    // the running container, and setup goes on — inside the tree.
    let tree = h.tree("ci-bin");
    let host_bin = h.host_dir("host/bin");
    let inside = tree.join(host_bin.strip_prefix("/").unwrap());
    fs::create_dir_all(&inside).unwrap();
    fs::remove_dir(tree.join("usr/local/bin")).unwrap();
    symlink(&host_bin, tree.join("usr/local/bin")).unwrap();
    let host_before = snapshot(&host_bin);
    let (ok, out) = h.run("ci-bin", &[]);
    assert!(ok, "{out}");
    assert_eq!(
        snapshot(&host_bin),
        host_before,
        "devshim landed on the host"
    );
    assert_eq!(
        fs::read(inside.join("devshim")).unwrap(),
        fs::read(devshim()).unwrap()
    );
    let (ok, out) = h.remove("ci-bin");
    assert!(ok, "{out}");
    assert!(!inside.join("devshim").exists(), "{out}");
    assert_eq!(snapshot(&host_bin), host_before);
}

#[test]
fn edited_files_keep_owner_and_mode_and_remove_restores_them() {
    let Some(h) = Host::new() else { return };
    let tree = h.tree("ci-own");
    const SHADOW_GID: u32 = 42;
    for (f, text) in [
        ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
        ("etc/gshadow", "root:*::\n"),
    ] {
        let p = tree.join(f);
        fs::write(&p, text).unwrap();
        std::os::unix::fs::chown(&p, Some(0), Some(SHADOW_GID)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
    }
    fs::set_permissions(tree.join("etc/group"), fs::Permissions::from_mode(0o604)).unwrap();
    // A home that is there already, the tree's root's.
    fs::create_dir(tree.join("home/sai")).unwrap();
    fs::set_permissions(tree.join("home/sai"), fs::Permissions::from_mode(0o755)).unwrap();
    // The admin's .nspawn file, readable by a group of theirs only.
    let nspawn = h.p("nspawn/ci-own.nspawn");
    fs::write(&nspawn, "[Exec]\nPrivateUsers=pick\n").unwrap();
    std::os::unix::fs::chown(&nspawn, Some(0), Some(SHADOW_GID)).unwrap();
    fs::set_permissions(&nspawn, fs::Permissions::from_mode(0o640)).unwrap();
    let before = snapshot(h.tmp.path());

    let (ok, out) = h.run("ci-own", &[]);
    assert!(ok, "{out}");
    for f in ["etc/shadow", "etc/gshadow"] {
        assert_eq!(meta(&tree.join(f)), (0, SHADOW_GID, 0o640), "{f}");
    }
    assert!(fs::read_to_string(tree.join("etc/shadow"))
        .unwrap()
        .contains("\nsai:!:"));
    assert!(fs::read_to_string(tree.join("etc/gshadow"))
        .unwrap()
        .contains("\nsai:!::"));
    assert_eq!(meta(&tree.join("etc/group")), (0, 0, 0o604));
    assert_eq!(meta(&nspawn), (0, SHADOW_GID, 0o640));
    assert_eq!(meta(&tree.join("home/sai")), (883, 883, 0o750));
    let (ok, out) = h.run("ci-own", &[]);
    assert!(ok && out.contains("nothing changed"), "{out}");

    let (ok, out) = h.remove("ci-own");
    assert!(ok, "{out}");
    let mut now = snapshot(h.tmp.path());
    now.retain(|k, _| !k.starts_with("state"));
    let mut want = before;
    want.retain(|k, _| !k.starts_with("state"));
    assert_eq!(
        now, want,
        "remove did not restore contents, owners and modes"
    );
}

#[test]
fn subnets_are_picked_without_following_links_or_opening_fifos() {
    let Some(h) = Host::new() else { return };
    let net = "etc/systemd/network/50-host0.network";
    // Another container points its network file at a host file...
    let host = h.host_file(
        "host/secret.network",
        "[Network]\nAddress=192.168.100.9/24\n",
    );
    let o1 = h.tree("ci-o1");
    fs::create_dir_all(o1.join("etc/systemd/network")).unwrap();
    symlink(&host, o1.join(net)).unwrap();
    // ... and another makes its a FIFO.
    let o2 = h.tree("ci-o2");
    fs::create_dir_all(o2.join("etc/systemd/network")).unwrap();
    mkfifo(&o2.join(net));
    let host_before = snapshot(&host);

    let me = h.tree("ci-me");
    let (ok, out) = h.run("ci-me", &[]);
    assert!(ok, "{out}");
    // The host file was not read as a machine's: 100 is free.
    let text = fs::read_to_string(me.join(net)).unwrap();
    assert!(text.contains("Address=192.168.100.9/24"), "{text}");
    assert_eq!(snapshot(&host), host_before);
}

#[test]
fn remove_never_follows_links_planted_after_setup() {
    let Some(h) = Host::new() else { return };
    let tree = h.tree("ci-rm");
    let (ok, out) = h.run("ci-rm", &[]);
    assert!(ok, "{out}");
    // The container swaps setup's files for links to host files whose
    // content would pass remove's checks: the hostname setup wrote (remove
    // would copy the old one over it) and a gshadow with setup's line in it
    // (remove would take the line out).
    let hostname = h.host_file("host/hostname", "ci-rm\n");
    let gshadow = h.host_file("host/gshadow", "sai:!::\nroot:*::\n");
    for (f, target) in [("etc/hostname", &hostname), ("etc/gshadow", &gshadow)] {
        fs::remove_file(tree.join(f)).unwrap();
        symlink(target, tree.join(f)).unwrap();
    }
    let before = (snapshot(&hostname), snapshot(&gshadow));

    let (ok, out) = h.remove("ci-rm");
    assert!(ok, "{out}");
    assert_eq!(
        (snapshot(&hostname), snapshot(&gshadow)),
        before,
        "remove wrote through a link: {out}"
    );
    for f in ["etc/hostname", "etc/gshadow"] {
        assert!(
            out.contains(&format!(
                "kept {}/{f}: it is a symbolic link (to {}); setup never writes through links in a container's tree",
                tree.display(),
                h.p(&format!("host/{}", Path::new(f).file_name().unwrap().to_str().unwrap())).display()
            )),
            "{f}: {out}"
        );
        assert!(fs::symlink_metadata(tree.join(f)).unwrap().is_symlink());
    }
    // The rest is taken back.
    assert!(!fs::read_to_string(tree.join("etc/passwd"))
        .unwrap()
        .contains("sai:"));
    assert!(!tree.join("usr/local/bin/devshim").exists());
}

#[test]
fn check_fix_keeps_owner_and_mode_and_never_follows_links() {
    let Some(h) = Host::new() else { return };
    let systemd = h.p("systemd");
    let dropins = systemd.join("systemd-nspawn@ci-fix.service.d");
    fs::create_dir_all(&dropins).unwrap();
    let conf = dropins.join("devices.conf");
    fs::write(
        &conf,
        "[Service]\nDeviceAllow=char-ttyUSB rwm\nMemoryMax=4G\n",
    )
    .unwrap();
    std::os::unix::fs::chown(&conf, Some(0), Some(42)).unwrap();
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o640)).unwrap();
    // The .nspawn file is a link to the admin's copy elsewhere.
    let admin = h.host_file("admin/ci-fix.nspawn", "[Files]\nBind=/dev/ttyUSB0\n");
    symlink(&admin, h.p("nspawn/ci-fix.nspawn")).unwrap();
    let admin_before = snapshot(&admin);
    let udev = h.p("udev");
    fs::create_dir_all(&udev).unwrap();
    let (ok, out) = cli_within(&[
        "machine",
        "check",
        "ci-fix",
        "--systemd-dir",
        systemd.to_str().unwrap(),
        "--nspawn-dir",
        h.p("nspawn").to_str().unwrap(),
        "--udev-dir",
        udev.to_str().unwrap(),
        "--fix",
    ]);
    assert!(!ok, "a file left unfixed makes --fix fail: {out}");
    assert_eq!(
        fs::read_to_string(&conf).unwrap(),
        "[Service]\nMemoryMax=4G\n"
    );
    assert_eq!(meta(&conf), (0, 42, 0o640), "{out}");
    assert_eq!(
        meta(&dropins.join("devices.conf.devbroker-bak")),
        (0, 42, 0o640)
    );
    assert!(
        out.contains(&format!(
            "not fixed: {} is a symbolic link (to {}); devbroker never writes through links: edit {} by hand",
            h.p("nspawn/ci-fix.nspawn").display(),
            admin.display(),
            admin.display()
        )),
        "{out}"
    );
    assert!(fs::symlink_metadata(h.p("nspawn/ci-fix.nspawn"))
        .unwrap()
        .is_symlink());
    assert_eq!(snapshot(&admin), admin_before);
}
