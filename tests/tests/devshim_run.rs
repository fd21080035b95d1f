//! `devshim run` as a job wrapper (tier 1): a command's exit status and
//! signals, and everything but devshim's ptys left to the kernel — a tool's
//! own pty pair, regular files, a nested `devshim run` — with the same
//! results as without it.

use std::process::Command;

use devbroker_tests::*;

/// What a job does with ttys that are not devshim's: its own pty pair
/// (termios round trip with parity, which the pty drops; `TIOCMBIS` fails
/// with ENOTTY as on any pty), `isatty` on a file, a drain and a break.
const OTHER_TTYS: &str = r#"
import fcntl, os, pty, struct, termios, sys
def show(what, f):
    try:
        print(what, f())
    except OSError as e:
        print(what, "errno", e.errno)
    except termios.error as e:
        print(what, "errno", e.args[0])
m, s = pty.openpty()
t = termios.tcgetattr(s)
t[2] = (t[2] & ~termios.CSIZE) | termios.CS7 | termios.PARENB | termios.PARODD
show("tcsetattr", lambda: termios.tcsetattr(s, termios.TCSANOW, t))
show("cflag", lambda: hex(termios.tcgetattr(s)[2]))
show("tiocmbis", lambda: fcntl.ioctl(s, termios.TIOCMBIS, struct.pack("I", termios.TIOCM_DTR)))
show("tiocmget", lambda: fcntl.ioctl(s, termios.TIOCMGET, struct.pack("I", 0)))
show("tcdrain", lambda: termios.tcdrain(s))
show("tcsendbreak", lambda: termios.tcsendbreak(s, 0))
show("isatty", lambda: os.isatty(os.open("/proc/self/status", os.O_RDONLY)))
show("bad fd", lambda: termios.tcgetattr(999))
with open(sys.argv[1], "w") as f:
    f.write("written")
status = dict(l.split(":", 1) for l in open("/proc/self/status"))
print("seccomp", status["Seccomp"].strip(), "filters", status["Seccomp_filters"].strip())
"#;

/// `Seccomp_filters` of `/proc/self/status`: the filters this test process
/// is already under (a sandbox's, say), which its children inherit.
fn own_filters() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp_filters:"))
        .expect("Seccomp_filters in /proc/self/status")
        .trim()
        .parse()
        .unwrap()
}

/// The output of [`OTHER_TTYS`] without its last line, and the number of
/// seccomp filters that line names.
fn split_filters(out: &str) -> (String, u32) {
    let (rest, last) = out.trim_end().rsplit_once('\n').unwrap();
    let n = last
        .rsplit_once(" filters ")
        .unwrap_or_else(|| panic!("no filter count in {last:?}"))
        .1
        .parse()
        .unwrap();
    (rest.to_string(), n)
}

#[test]
fn other_ttys_and_files_see_the_kernel_as_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let run = |supervised: bool| {
        let f = dir.path().join(format!("out-{supervised}"));
        let mut c = if supervised {
            devshim_run(&state)
        } else {
            Command::new("/usr/bin/python3")
        };
        if supervised {
            c.arg("/usr/bin/python3");
        }
        let out = c.args(["-c", OTHER_TTYS]).arg(&f).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "written");
        (
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (bare, _) = run(false);
    let (supervised, err) = run(true);
    // The same answers from the kernel, but under one filter more: devshim's
    // (the test itself may already run under some).
    let (bare_answers, bare_filters) = split_filters(&bare);
    let (answers, filters) = split_filters(&supervised);
    assert_eq!(bare_answers, answers, "stderr: {err}");
    assert_eq!(bare_filters, own_filters(), "{bare}");
    assert_eq!(filters, bare_filters + 1, "{supervised}\nstderr: {err}");
    assert!(
        supervised.contains(&format!("seccomp 2 filters {filters}")),
        "{supervised}"
    );
    assert!(supervised.contains("tiocmbis errno 25"), "{supervised}");
    assert!(supervised.contains("bad fd errno 9"), "{supervised}");
    assert!(!err.contains("without line control"), "{err}");
}

#[test]
fn exit_status_signals_and_nesting() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let code = |args: &[&str]| {
        devshim_run(&state)
            .args(args)
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(code(&["sh", "-c", "exit 7"]), Some(7));
    // Killed by a signal: 128 + its number, as a shell reports it.
    assert_eq!(code(&["sh", "-c", "kill -TERM $$"]), Some(143));
    assert_eq!(code(&["no-such-command-here"]), Some(127));
    // A nested run can't get a second listener: it runs the command under
    // the outer supervisor, silently, and its status comes back.
    let inner = devshim_run(&state);
    let out = devshim_run(&state)
        .arg(inner.get_program())
        .args(inner.get_args())
        .args([
            "sh",
            "-c",
            "grep ^Seccomp_filters: /proc/self/status; exit 3",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("Seccomp_filters:\t{}", own_filters() + 1)
    );
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Switched off: no filter of devshim's.
    let out = devshim_run(&state)
        .args(["sh", "-c", "grep ^Seccomp_filters: /proc/self/status"])
        .env("DEVSHIM_SUPERVISE", "off")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("Seccomp_filters:\t{}", own_filters())
    );
}
