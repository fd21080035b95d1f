//! `devbroker demo`: one command, no hardware; it works and leaves nothing.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use devbroker_tests::*;

#[test]
fn demo_echoes_and_cleans_up() {
    let mut child = Command::new(bin("devbroker"))
        .args(["demo", "--duration", "4s", "--banner-every", "1s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut guest = None;
    let mut root = None;
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        if let Some(p) = line.trim().strip_prefix("guest side") {
            guest = Some(PathBuf::from(p.trim()));
        }
        if let Some(p) = line
            .trim()
            .strip_prefix("Stop the demo with Ctrl-C; it removes ")
        {
            root = Some(PathBuf::from(p.trim_end_matches('.')));
            break;
        }
        line.clear();
    }
    let guest = guest.expect("the demo prints the guest path");
    let root = root.expect("the demo names its directory");
    assert!(guest.starts_with(&root));
    let tool = Tool::open(&guest).unwrap();
    tool.write_all(b"hello board\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("hello board")
        || !String::from_utf8_lossy(&got).contains("boot #")
    {
        match read_timeout(tool.fd.as_raw_fd(), &mut buf, Duration::from_secs(3)).unwrap() {
            Some(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!(
                "no echo and banner from the demo board: {other:?}, got {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    drop(tool);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    assert!(rest.contains("devbroker demo stopped"), "{rest}");
    assert!(!root.exists(), "the demo left {} behind", root.display());
}
