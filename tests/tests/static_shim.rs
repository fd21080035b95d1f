//! devshim ships into old distributions: it must be static.

use std::process::Command;

#[test]
fn devshim_is_a_static_executable() {
    let shim = devbroker_tests::devshim();
    let out = Command::new("ldd").arg(&shim).output().expect("ldd");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("not a dynamic executable"),
        "ldd {}: {text}",
        shim.display()
    );
    let out = Command::new(&shim).arg("--version").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("devshim "));
}
