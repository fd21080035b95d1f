//! Smoke test of the tier 3 harness (`devbroker_tests::container`): real
//! systemd-nspawn containers. Needs root and systemd-container + debootstrap;
//! skips with a printed reason otherwise. The first run builds the cached
//! bookworm tree (~1 min); afterwards this takes a few seconds.

use devbroker_tests::container::{self, BootOptions, Container, TreeCopy};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Instant;

fn skip() -> bool {
    match container::skip_reason() {
        Some(r) => {
            devbroker_tests::skip(&r);
            true
        }
        None => false,
    }
}

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Runs `argv` inside and returns its stdout, failing with the container's
/// log when it fails.
fn run(ct: &Container, user: Option<&str>, argv: &[&str]) -> String {
    let o = match user {
        Some(u) => ct.exec_as(u, argv),
        None => ct.exec(argv),
    }
    .unwrap_or_else(|e| panic!("{e:#}\n{}", ct.log()));
    assert!(
        o.status.success(),
        "{argv:?} as {user:?} failed ({}): {}\n---- nspawn log ----\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr),
        ct.log()
    );
    stdout(&o)
}

/// A TreeCopy booted with a host directory bound at /run/devbroker.
fn boot_with_bind(private_users: bool) -> (TreeCopy, tempfile::TempDir, Container) {
    let tree = TreeCopy::new().expect("tree copy");
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("hello"), "from the host\n").unwrap();
    let mut opts = BootOptions::new(container::unique_name("smoke"), Some(tree.path()));
    opts.private_users = private_users;
    opts.extra_args = vec![format!("--bind={}:/run/devbroker", host.path().display())];
    let t0 = Instant::now();
    let ct = Container::boot(opts).unwrap_or_else(|e| panic!("{e:#}"));
    println!(
        "booted {} (private_users={private_users}) in {:.2?}",
        ct.name(),
        t0.elapsed()
    );
    (tree, host, ct)
}

fn check_bind_and_nobody(ct: &Container) {
    assert_eq!(
        run(ct, None, &["cat", "/run/devbroker/hello"]),
        "from the host"
    );
    assert_eq!(run(ct, Some("nobody"), &["id", "-u"]), "65534");
    assert_eq!(run(ct, None, &["id", "-u"]), "0");
    assert!(
        ct.unit_active("dbus.service"),
        "dbus inactive\n{}",
        ct.log()
    );
    assert!(!ct.unit_active("no-such.service"));
    // A failing command reports its status and stderr, and is collected
    // (-G) so the system does not turn degraded.
    let o = ct.exec(&["sh", "-c", "echo oops >&2; exit 3"]).unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&o.stderr).trim(), "oops");
    assert_eq!(
        run(ct, None, &["systemctl", "is-system-running"]),
        "running"
    );
}

#[test]
fn bind_exec_and_nobody() {
    if skip() {
        return;
    }
    let (_tree, _host, ct) = boot_with_bind(false);
    assert_eq!(ct.uid_shift(), 0);
    check_bind_and_nobody(&ct);
    let t0 = Instant::now();
    run(&ct, None, &["true"]);
    println!("exec true: {:.1?}", t0.elapsed());
    let t0 = Instant::now();
    let r = ct.exec_with(
        None,
        &["sleep", "30"],
        std::time::Duration::from_millis(300),
    );
    assert!(r.is_err(), "{r:?}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
}

#[test]
fn private_users_shift_is_tree_root_owner() {
    if skip() {
        return;
    }
    let (tree, _host, ct) = boot_with_bind(true);
    let shift = ct.uid_shift();
    assert!(shift > 0, "no uid shift with -U\n{}", ct.log());
    assert_eq!(shift % 65536, 0);
    // nspawn chowned the TreeCopy (overlayfs has no idmapped mounts), so
    // the tree root's owner on the host is the shift: what the product reads.
    let meta = std::fs::metadata(tree.path()).unwrap();
    assert_eq!(
        meta.uid(),
        shift,
        "tree root owner vs uid_map\n{}",
        ct.log()
    );
    assert_eq!(meta.gid(), shift);
    check_bind_and_nobody(&ct);
    // The cached base tree itself is untouched.
    let base = container::base_tree().unwrap();
    assert_eq!(std::fs::metadata(&base).unwrap().uid(), 0);
}

#[test]
fn private_users_refuses_the_cached_tree() {
    if skip() {
        return;
    }
    let base = container::base_tree().unwrap();
    let mut opts = BootOptions::new(container::unique_name("smoke"), Some(&base));
    opts.private_users = true;
    let err = Container::boot(opts).err().expect("must refuse");
    assert!(format!("{err:#}").contains("TreeCopy"), "{err:#}");
}

#[test]
fn two_containers_at_once() {
    if skip() {
        return;
    }
    let base = container::base_tree().unwrap();
    // Booted in parallel from short-lived threads: they must survive the
    // threads (the parent-death signal is tied to the spawning thread).
    let boots: Vec<_> = (0..2)
        .map(|_| {
            let opts = BootOptions::new(container::unique_name("smoke"), Some(&base));
            std::thread::spawn(move || Container::boot(opts).unwrap_or_else(|e| panic!("{e:#}")))
        })
        .collect();
    let t0 = Instant::now();
    let mut cts: Vec<Container> = boots.into_iter().map(|h| h.join().unwrap()).collect();
    println!(
        "booted two containers on the base tree in {:.2?}",
        t0.elapsed()
    );
    std::thread::sleep(std::time::Duration::from_millis(200));
    for ct in &cts {
        assert_eq!(
            run(ct, None, &["systemctl", "is-system-running"]),
            "running"
        );
        assert_eq!(run(ct, None, &["hostname"]), ct.name());
    }
    // Stopping one must not stop the other's units (own cgroups).
    let a = cts.remove(0);
    let (a_leader, a_nspawn, a_name) = (a.leader(), a.nspawn_pid(), a.name().to_string());
    drop(a);
    assert!(!Path::new(&format!("/proc/{a_leader}")).exists());
    assert!(!Path::new(&format!("/proc/{a_nspawn}")).exists());
    let b = &cts[0];
    assert!(b.unit_active("dbus.service"), "{}", b.log());
    assert_eq!(run(b, None, &["systemctl", "is-system-running"]), "running");
    // Its cgroups are gone too.
    for h in ["systemd", "unified"] {
        let left: Vec<String> = std::fs::read_dir(format!("/sys/fs/cgroup/{h}"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(&a_name))
            .collect();
        assert!(left.is_empty(), "cgroups left: {left:?}");
    }
}
