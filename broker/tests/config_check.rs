//! `devbroker check`: every kind of config rejection, as the admin sees it.

use std::process::Command;

/// `devbroker check` on `text`: its exit code and output.
fn run_check(text: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("devbroker.toml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_devbroker"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (
        out.status.code(),
        text.replace(&path.display().to_string(), "FILE"),
    )
}

fn check(text: &str) -> (bool, String) {
    let (code, msg) = run_check(text);
    (code == Some(0), msg)
}

/// The output of a rejected config; a rejection exits 2.
fn rejected(text: &str) -> String {
    let (code, msg) = run_check(text);
    assert_ne!(code, Some(0), "accepted:\n{text}");
    assert_eq!(code, Some(2), "{msg}");
    msg
}

const TTY: &str = "\n[[board.tty]]\nname = \"console\"\nmatch = { by-id = \"usb-A\" }\n";

#[test]
fn the_example_config_is_valid() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../devbroker.example.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_devbroker"))
        .args(["check", "--config", path])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("ok, 4 boards, 5 ttys, 2 machines\n"));
}

#[test]
fn unknown_keys() {
    let m = rejected(&format!(
        "[[board]]\nname = \"a\"\nmachine = [\"ci1\"]\n{TTY}"
    ));
    assert!(
        m.starts_with("FILE:3:1: unknown field `machine`, expected one of"),
        "{m}"
    );
    assert!(
        m.contains("help: remove the key or fix its spelling"),
        "{m}"
    );
    let m = rejected("[[board]]\nname = \"a\"\n[[board.tty]]\nname = \"c\"\nmatch = { serial = \"X\", vid = \"1\" }\n");
    assert!(m.starts_with("FILE:5:"), "{m}");
    assert!(m.contains("unknown field `vid`"), "{m}");
    let m = rejected("[global]\nx = 1\n");
    assert!(m.contains("unknown field `global`"), "{m}");
}

#[test]
fn bad_names_say_what_to_write() {
    let m = rejected(&format!("[[board]]\nname = \"ESP_1\"\n{TTY}"));
    assert!(
        m.starts_with("FILE:2:8: board name \"ESP_1\" is not allowed: it starts with 'E'"),
        "{m}"
    );
    assert!(m.contains("e.g. \"esp-1\""), "{m}");
    let m = rejected(&format!(
        "[[board]]\nname = \"a\"\nmachines = [\"ci_1\"]\n{TTY}"
    ));
    assert!(
        m.contains("FILE:3:13: machine name \"ci_1\" is not allowed: it contains '_'"),
        "{m}"
    );
    let m = rejected(
        "[[board]]\nname = \"a\"\n[[board.tty]]\nname = \"\"\nmatch = { by-id = \"x\" }\n",
    );
    assert!(
        m.contains("tty name \"\" is not allowed: it is empty"),
        "{m}"
    );
    let m = rejected(&format!("[[board]]\nname = \"{}\"\n{TTY}", "a".repeat(64)));
    assert!(
        m.contains("it is 64 characters long; the limit is 63"),
        "{m}"
    );
}

#[test]
fn names_that_could_escape_a_directory() {
    let m = rejected(&format!("[[board]]\nname = \"..\"\n{TTY}"));
    assert!(
        m.contains("board name \"..\" is not allowed: it starts with '.'"),
        "{m}"
    );
    let m = rejected(&format!("[[board]]\nname = \"a/b\"\n{TTY}"));
    assert!(
        m.contains("board name \"a/b\" is not allowed: it contains '/'"),
        "{m}"
    );
    let m = rejected(&format!(
        "[[board]]\nname = \"a\"\nmachines = [\"../../etc\"]\n{TTY}"
    ));
    assert!(
        m.contains("machine name \"../../etc\" is not allowed"),
        "{m}"
    );
    let m = rejected("[[board]]\nname = \"a\"\n[[board.tty]]\nname = \"c\"\nmatch = { by-id = \"../../../dev/sda\" }\n");
    assert!(
        m.contains("FILE:5:19: by-id \"../../../dev/sda\" is not a link name: it contains '/'"),
        "{m}"
    );
    assert!(
        m.contains(
            "help: write the name of the link in /dev/serial/by-id alone, e.g. by-id = \"sda\""
        ),
        "{m}"
    );
    let m = rejected("[[board]]\nname = \"a\"\n[[board.tty]]\nname = \"c\"\nmatch = { by-id = \"/dev/serial/by-id/usb-X-if00\" }\n");
    assert!(m.contains("e.g. by-id = \"usb-X-if00\""), "{m}");
    let m = rejected("[[board]]\nname = \"a\"\nmachines = [\"ci1\\nci2\"]\n[[board.tty]]\nname = \"c\"\nmatch = { by-id = \"x\" }\n");
    assert!(m.contains("it contains '\\n'"), "{m}");
}

#[test]
fn duplicate_names() {
    let m = rejected(&format!("[[board]]\nname = \"a\"\n{TTY}\n[[board]]\nname = \"a\"\n[[board.tty]]\nname = \"c\"\nmatch = {{ by-id = \"usb-B\" }}\n"));
    assert!(
        m.contains("board name \"a\" is used twice (first at 2:8)"),
        "{m}"
    );
    let m = rejected("[[board]]\nname = \"a\"\n[[board.tty]]\nname = \"c\"\nmatch = { by-id = \"x\" }\n[[board.tty]]\nname = \"c\"\nmatch = { by-id = \"y\" }\n");
    assert!(
        m.contains("FILE:7:8: board \"a\" has two ttys named \"c\" (first at 4:8)"),
        "{m}"
    );
    let m = rejected("[[board]]\nname = \"a\"\nmachines = [\"m\", \"m\", \"m\"]\n[[board.tty]]\nname = \"c\"\nmatch = { by-id = \"x\" }\n");
    assert!(
        m.contains("FILE:3:18: machine \"m\" is listed twice (first at 3:13)"),
        "{m}"
    );
    assert!(
        m.contains("FILE:3:23: machine \"m\" is listed twice (first at 3:13)"),
        "{m}"
    );
    // "a.b" + "c" and "a" + "b.c" would share a socket file.
    let m = rejected("[[board]]\nname = \"a.b\"\n[[board.tty]]\nname = \"c\"\nmatch = { by-id = \"x\" }\n[[board]]\nname = \"a\"\n[[board.tty]]\nname = \"b.c\"\nmatch = { by-id = \"y\" }\n");
    assert!(
        m.contains(
            "needs the socket \"a.b.c.sock\", which board \"a.b\" tty \"c\" (at 4:8) needs too"
        ),
        "{m}"
    );
}

#[test]
fn two_boards_that_can_match_one_adapter() {
    let m = rejected("[[board]]\nname = \"a\"\n[[board.tty]]\nname = \"c\"\nmatch = { usb = \"0403:6001\" }\n[[board]]\nname = \"b\"\n[[board.tty]]\nname = \"c\"\nmatch = { serial = \"A1B2C3\" }\n");
    assert!(m.contains("FILE:10:9: board \"b\" tty \"c\" and board \"a\" tty \"c\" (match at 5:9) can match the same adapter"), "{m}");
    assert!(m.contains("help: tell them apart"), "{m}");
    let m = rejected("[[board]]\nname = \"a\"\n[[board.tty]]\nname = \"c\"\nmatch = { by-id = \"usb-X\" }\n[[board]]\nname = \"b\"\n[[board.tty]]\nname = \"c\"\nmatch = { by-id = \"usb-X\" }\n");
    assert!(m.contains("can match the same adapter"), "{m}");
    // Apart by serial: accepted.
    let (ok, m) = check("[[board]]\nname = \"a\"\n[[board.tty]]\nname = \"c\"\nmatch = { usb = \"10c4:ea60\", serial = \"1\" }\n[[board]]\nname = \"b\"\n[[board.tty]]\nname = \"c\"\nmatch = { usb = \"10c4:ea60\", serial = \"2\" }\n");
    assert!(ok, "{m}");
}

#[test]
fn bad_values() {
    let m = rejected(
        "[[board]]\nname = \"a\"\n[[board.tty]]\nname = \"c\"\nmatch = { usb = \"403:6001\" }\n",
    );
    assert!(
        m.contains("usb \"403:6001\" is not VENDOR:PRODUCT") && m.contains("usb = \"0403:6001\""),
        "{m}"
    );
    let m = rejected("[[board]]\nname = \"a\"\n[[board.tty]]\nname = \"c\"\nmatch = {}\n");
    assert!(
        m.contains("match is empty: it would match any adapter"),
        "{m}"
    );
    let m = rejected("[[board]]\nname = \"a\"\n[[board.tty]]\nname = \"c\"\nrate = 0\nmatch = { by-id = \"x\" }\n");
    assert!(m.contains("FILE:5:8: rate 0 is out of range"), "{m}");
    let m = rejected("[[board]]\nname = \"a\"\n");
    assert!(m.contains("board \"a\" has no tty"), "{m}");
    let m = rejected("[[board]]\nname = \"a\"\nhost-groups = [\"Wheel Group\"]\n[[board.tty]]\nname = \"c\"\nmatch = { by-id = \"x\" }\n");
    assert!(
        m.contains("host group \"Wheel Group\" is not a unix group name"),
        "{m}"
    );
    let m = rejected("[[board]\nname = \"a\"\n");
    assert!(m.starts_with("FILE:1:"), "{m}");
    let (code, m) = check_missing();
    assert!(
        code == Some(2) && m.contains("can't read the config") && m.contains("pass --config"),
        "{m}"
    );
}

fn check_missing() -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_devbroker"))
        .args(["check", "--config", "/nonexistent/devbroker.toml"])
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_problem_is_reported_at_once() {
    let m = rejected("[[board]]\nname = \"A\"\nmachines = [\"x_y\"]\n[[board.tty]]\nname = \"c\"\nmatch = { usb = \"zz\" }\n");
    assert_eq!(m.matches("FILE:").count(), 3, "{m}");
}

#[test]
fn machine_entries() {
    let (ok, m) = check("[[machine]]\nname = \"ci1\"\n[[machine]]\nname = \"ci2\"\ntree = \"/srv/ci2\"\nuser = \"build:1001\"\n");
    assert!(ok, "{m}");
    assert!(m.contains("0 boards, 0 ttys, 2 machines"), "{m}");
    let m = rejected("[[machine]]\nname = \"ci1\"\n[[machine]]\nname = \"ci1\"\n");
    assert!(
        m.contains("FILE:4:8: machine \"ci1\" is listed twice (first at 2:8)"),
        "{m}"
    );
    let m = rejected("[[machine]]\nname = \"ci_1\"\n");
    assert!(
        m.contains("machine name \"ci_1\" is not allowed: it contains '_'"),
        "{m}"
    );
    let m = rejected("[[machine]]\nname = \"ci1\"\ntree = \"machines/ci1\"\n");
    assert!(
        m.contains("tree \"machines/ci1\" is not an absolute path"),
        "{m}"
    );
    let m = rejected("[[machine]]\nname = \"ci1\"\nuser = \"sai\"\n");
    assert!(m.contains("\"sai\" is not NAME:UID"), "{m}");
    let m = rejected("[[machine]]\nname = \"ci1\"\nuser = \"root:0\"\n");
    assert!(m.contains("uid 0 is not a job user's"), "{m}");
    let m = rejected("[[machine]]\nname = \"ci1\"\nimage = \"x\"\n");
    assert!(m.contains("unknown field `image`"), "{m}");
}

#[test]
fn reenumerate_grace() {
    let m = rejected(&format!(
        "[[board]]\nname = \"a\"\nreenumerate-grace = \"soon\"\n{TTY}"
    ));
    assert!(
        m.starts_with("FILE:3:21: reenumerate-grace \"soon\" is not a duration"),
        "{m}"
    );
    assert!(
        m.contains("help: write e.g. reenumerate-grace = \"3s\""),
        "{m}"
    );
    let m = rejected(&format!(
        "[[board]]\nname = \"a\"\nreenumerate-grace = \"5m\"\n{TTY}"
    ));
    assert!(m.contains("is longer than 60s"), "{m}");
    let (ok, m) = check(&format!(
        "[[board]]\nname = \"a\"\nreenumerate-grace = \"1500ms\"\n{TTY}"
    ));
    assert!(ok, "{m}");
}

/// A value of the wrong type is one problem among the others, with its
/// place and what to write, not the end of the check.
#[test]
fn wrong_types_are_reported_with_every_other_problem() {
    let m = rejected(
        "[[board]]\nname = \"esp1\"\nmachines = [\"ci1\"]\nreenumerate-grace = 3\n[board.console]\nring = \"big\"\n[[board.tty]]\nname = \"console\"\nrate = \"fast\"\nmatch = { by-id = \"usb-A\" }\n\n[[board]]\nname = \"Bad_Name\"\nmachines = [\"ci1\"]\n[[board.tty]]\nname = \"console\"\nmatch = { by-id = \"usb-B\" }\n",
    );
    let lines: Vec<&str> = m.lines().filter(|l| l.starts_with("FILE:")).collect();
    assert_eq!(lines.len(), 4, "{m}");
    assert!(
        lines[0].starts_with("FILE:4:21: reenumerate-grace = 3 has the wrong type"),
        "{m}"
    );
    assert!(
        lines[1].starts_with(
            "FILE:6:8: ring = \"big\" has the wrong type: ring takes a whole number of bytes"
        ),
        "{m}"
    );
    assert!(lines[2].starts_with("FILE:9:8: rate = \"fast\" has the wrong type: rate takes a whole number of bits per second"), "{m}");
    assert!(
        lines[3].starts_with("FILE:13:8: board name \"Bad_Name\" is not allowed"),
        "{m}"
    );
    assert!(m.contains("help: write e.g. rate = 115200"), "{m}");
}

#[test]
fn check_warns_of_likely_mistakes() {
    let (ok, m) = check("");
    assert!(ok, "{m}");
    assert!(
        m.contains("FILE: warning: the config names no boards"),
        "{m}"
    );
    let (ok, m) = check(&format!("[[board]]\nname = \"lonely\"\n{TTY}"));
    assert!(ok, "{m}");
    assert!(
        m.contains("warning: board \"lonely\": no machine and no host group may use it"),
        "{m}"
    );
}

#[test]
fn an_unreadable_config_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let run = |p: &std::path::Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_devbroker"))
            .args(["check", "--config"])
            .arg(p)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let m = run(&dir.path().join("missing.toml"));
    assert!(
        m.contains("can't read the config: there is no such file"),
        "{m}"
    );
    let m = run(dir.path());
    assert!(
        m.contains("can't read the config: it is a directory"),
        "{m}"
    );
    let bin = dir.path().join("bin.toml");
    std::fs::write(&bin, [0xff, 0xfe, 0x00]).unwrap();
    assert!(run(&bin).contains("it is not UTF-8 text"));
}
