//! devshim's command line: errors name the problem and what to do.

use std::process::Command;

#[test]
fn unknown_user_is_refused_with_a_hint() {
    let out = Command::new(env!("CARGO_BIN_EXE_devshim"))
        .args([
            "serve",
            "--dir",
            "/nonexistent",
            "--user",
            "no-such-user-here",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("user \"no-such-user-here\" is not in /etc/passwd; create it or pass --user"),
        "{err}"
    );
}
