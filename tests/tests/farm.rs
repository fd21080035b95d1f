//! A farm's scale under the kernel's default limits: one `devshim serve`
//! with 256 ttys in its machine directory publishes all 256 guest links
//! while its uid has only `fs.inotify.max_user_instances` (128 by default)
//! inotify instances to spend. Not a timing test: it waits generously and
//! fails fast only when devshim says it gave a tty up.
//!
//! The budget is per uid. As root, the test runs devshim as a container
//! with `-U` does: as a uid of its own (no other process spends its
//! budget), in a mount namespace of its own where the machine directory is
//! bound in and `/etc/passwd` names the job user. Where the sysctl is
//! above the default, a helper of the same uid holds the instances past 128,
//! so devshim has exactly the default budget; no sysctl is changed. Not as
//! root, devshim runs as the test's own uid, whose budget other processes
//! of that user share, and the test skips where the sysctl is above the
//! default (nothing could hold the excess).
//!
//! devshim also gets systemd's default soft descriptor limit (1024), as a
//! `devshim.service` in a container does.

use std::ffi::CString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use devbroker_tests::*;

const TTYS: usize = 256;
const MACHINE: &str = "big";
/// The kernel's default `fs.inotify.max_user_instances`.
const DEFAULT_INSTANCES: u64 = 128;
/// systemd's default soft descriptor limit for a service.
const SOFT_NOFILE: u64 = 1024;

fn by_id_name(i: usize) -> String {
    format!("usb-Farm_Test_F{i:04}-if00-port0")
}

/// 256 boards with one tty each, all dedicated to one machine.
fn config() -> String {
    (0..TTYS)
        .map(|i| {
            format!(
                "[[board]]\nname = \"b{i:04}\"\nmachines = [\"{MACHINE}\"]\n[[board.tty]]\nname = \"console\"\nmatch = {{ by-id = \"{}\" }}\n\n",
                by_id_name(i)
            )
        })
        .collect()
}

fn max_user_instances() -> u64 {
    fs::read_to_string("/proc/sys/fs/inotify/max_user_instances")
        .expect("fs.inotify.max_user_instances")
        .trim()
        .parse()
        .expect("a number")
}

/// A uid no process runs as, so its inotify budget is untouched.
fn unused_uid() -> u32 {
    let used: std::collections::BTreeSet<u32> = fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path().join("status")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    (61_000..62_000)
        .find(|u| {
            !used.contains(u)
                && nix::unistd::User::from_uid((*u).into())
                    .ok()
                    .flatten()
                    .is_none()
        })
        .expect("a free uid in 61000..62000")
}

/// Who devshim runs as, and how it is started.
struct Identity {
    uid: u32,
    /// The job user's name in the passwd devshim reads.
    user: String,
    /// As root: the private passwd that names `user`, bound over
    /// `/etc/passwd` in devshim's mount namespace.
    passwd: Option<PathBuf>,
}

impl Identity {
    /// As root, a fresh uid with a passwd line of its own; otherwise the
    /// test's own uid.
    fn choose(w: &World) -> Identity {
        let me = nix::unistd::getuid().as_raw();
        if me != 0 {
            return Identity {
                uid: me,
                user: me.to_string(),
                passwd: None,
            };
        }
        let uid = unused_uid();
        let user = "devbroker-farm".to_string();
        let passwd = w.path("passwd");
        let mut text = fs::read_to_string("/etc/passwd").unwrap();
        text += &format!("{user}:x:{uid}:{uid}::/nonexistent:/usr/sbin/nologin\n");
        fs::write(&passwd, text).unwrap();
        fs::set_permissions(&passwd, fs::Permissions::from_mode(0o644)).unwrap();
        Identity {
            uid,
            user,
            passwd: Some(passwd),
        }
    }
}

fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_encoded_bytes()).unwrap()
}

/// Makes `cmd` run as `id` in a mount namespace of its own where `dir` is
/// bound at `at` and the private passwd over `/etc/passwd`, as a container
/// sees its machine directory and its own users.
fn as_container(cmd: &mut Command, id: &Identity, dir: &Path, at: &Path) {
    let Some(passwd) = &id.passwd else { return };
    let (dir, at, passwd) = (cstr(dir), cstr(at), cstr(passwd));
    let etc_passwd = CString::new("/etc/passwd").unwrap();
    let root = CString::new("/").unwrap();
    let uid = id.uid;
    // SAFETY: only async-signal-safe system calls between fork and exec,
    // on strings made before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let ok = libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    std::ptr::null(),
                    root.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
                && libc::mount(
                    dir.as_ptr(),
                    at.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) == 0
                && libc::mount(
                    passwd.as_ptr(),
                    etc_passwd.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                ) == 0
                && libc::setgroups(0, std::ptr::null()) == 0
                && libc::setgid(uid) == 0
                && libc::setuid(uid) == 0;
            if ok {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
}

/// Gives `cmd` systemd's default soft descriptor limit.
fn default_soft_nofile(cmd: &mut Command) {
    // SAFETY: getrlimit/setrlimit between fork and exec are
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = SOFT_NOFILE.min(lim.rlim_max);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Where the sysctl is above the kernel's default, a process of `uid`
/// holding the instances past it, so that `uid` has the default budget
/// left; `None` when there is nothing to hold.
fn hold_excess_instances(uid: u32) -> Option<Proc> {
    let excess = max_user_instances().saturating_sub(DEFAULT_INSTANCES);
    if excess == 0 {
        return None;
    }
    let mut cmd = Command::new("sleep");
    cmd.arg("3600");
    // SAFETY: only async-signal-safe system calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(uid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            // Without IN_CLOEXEC: `sleep` keeps them open.
            for _ in 0..excess {
                if libc::inotify_init1(0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    println!("fs.inotify.max_user_instances is above {DEFAULT_INSTANCES}: holding {excess} instances as uid {uid}");
    Some(Proc {
        child: cmd
            .die_with_parent()
            .spawn()
            .expect("the helper holding instances"),
        name: "inotify holder".into(),
    })
}

/// Starts `devshim serve` for the machine as `id`.
fn start_devshim(w: &World, id: &Identity) -> Proc {
    let machine_dir = w.run.join("machines").join(MACHINE);
    let guest = w.guest(MACHINE);
    let state = w.state_dir(MACHINE);
    for d in [&guest, &state] {
        fs::create_dir_all(d).unwrap();
        nix::unistd::chown(d.as_path(), Some(id.uid.into()), Some(id.uid.into())).unwrap();
    }
    // As a container sees it: its machine directory bound at a path of its
    // own (the run directory's `machines` is root's alone).
    let dir = if id.passwd.is_some() {
        let at = w.path("container-run-devbroker");
        fs::create_dir_all(&at).unwrap();
        at
    } else {
        machine_dir.clone()
    };
    let log = fs::File::create(w.path("shim-big.log")).unwrap();
    let mut cmd = Command::new(devshim());
    cmd.args(["serve", "--dir"])
        .arg(&dir)
        .arg("--link-root")
        .arg(&guest)
        .args(["--user", &id.user, "--state-dir"])
        .arg(&state)
        .env("DEVSHIM_LOG", "info")
        .stdout(Stdio::null())
        .stderr(log);
    default_soft_nofile(&mut cmd);
    as_container(&mut cmd, id, &machine_dir, &dir);
    // Last: a change of uid clears the parent-death signal.
    cmd.die_with_parent();
    Proc {
        child: cmd.spawn().expect("devshim"),
        name: "devshim big".into(),
    }
}

fn links_up(w: &World) -> usize {
    (0..TTYS)
        .filter(|&i| exists(&w.guest_link(MACHINE, &by_id_name(i))))
        .count()
}

/// Lines of devshim's log where it gave a tty (or itself) up, without
/// the log's colours.
fn given_up(w: &World) -> Vec<String> {
    fs::read_to_string(w.path("shim-big.log"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("can't watch") || l.contains("Too many open files"))
        .map(plain)
        .collect()
}

/// `line` without ANSI escape sequences.
fn plain(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn one_devshim_publishes_256_ttys_under_the_default_inotify_limit() {
    // Not as root, devshim runs as the test's own uid, and nothing holds
    // the instances past the default: the default limit would not be in force.
    if !nix::unistd::getuid().is_root() && max_user_instances() > DEFAULT_INSTANCES {
        skip(&format!(
            "fs.inotify.max_user_instances is {} here, above the kernel's default {DEFAULT_INSTANCES}: \
             only as root does the test hold the excess (run the suite as root, as CI does)",
            max_user_instances()
        ));
        return;
    }
    let w = World::new(&config());
    let _boards: Vec<FakeBoard> = (0..TTYS).map(|i| w.plug(&by_id_name(i))).collect();
    let _broker = w.broker();
    let machine_dir = w.run.join("machines").join(MACHINE);
    wait_for(Duration::from_secs(60), "the broker's 256 sockets", || {
        fs::read_dir(&machine_dir).is_ok_and(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".sock"))
                .count()
                > TTYS
        })
    });

    let id = Identity::choose(&w);
    let _holder = if id.passwd.is_some() {
        hold_excess_instances(id.uid)
    } else {
        None
    };
    println!(
        "devshim runs as uid {} with fs.inotify.max_user_instances = {}",
        id.uid,
        max_user_instances()
    );
    let mut shim = start_devshim(&w, &id);

    // Generous: the links come in about a second; the test fails early only
    // when devshim has said it gave up.
    let limit = Duration::from_secs(120);
    let t0 = std::time::Instant::now();
    let mut failure = None;
    while links_up(&w) < TTYS && t0.elapsed() < limit {
        let gave_up = given_up(&w);
        let exited = shim.child.try_wait().unwrap();
        if !gave_up.is_empty() || exited.is_some() {
            // What it had published by then stays; give the rest a moment.
            std::thread::sleep(Duration::from_secs(2));
            failure = Some((given_up(&w), exited));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let up = links_up(&w);
    assert!(
        up == TTYS && failure.is_none(),
        "{up} of {TTYS} guest links up under fs.inotify.max_user_instances = {} (uid {}){}\n\
         devshim gave up on {} ttys, e.g.:\n{}",
        max_user_instances(),
        id.uid,
        match &failure {
            Some((_, Some(status))) => format!("; devshim exited: {status}"),
            _ => String::new(),
        },
        failure.as_ref().map_or(0, |f| f.0.len()),
        failure
            .as_ref()
            .map(|f| f.0.iter().take(3).cloned().collect::<Vec<_>>().join("\n"))
            .unwrap_or_default()
    );
}
