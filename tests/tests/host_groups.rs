//! Host users pass by the groups the kernel recorded on their socket, with
//! group names looked up through NSS: a group that only a directory service
//! (LDAP, SSSD) knows works as a local one does. `libnss_wrapper` stands in
//! for the directory here: it answers NSS lookups from its own files, which
//! `/etc/group` does not have.

use std::path::Path;

use devbroker_tests::*;

const WRAPPER: &str = "/usr/lib/x86_64-linux-gnu/libnss_wrapper.so";
const CONFIG: &str = r#"
[[board]]
name = "hil1"
host-groups = ["farmhands"]
[[board.tty]]
name = "console"
match = { by-id = "usb-FTDI_FT232R_USB_UART_NSS0-if00-port0" }
"#;

#[test]
fn a_group_only_nss_knows_lets_its_members_in() {
    if !nix::unistd::geteuid().is_root() {
        skip("connecting as another user needs root (run the suite as root, as CI does)");
        return;
    }
    if !Path::new(WRAPPER).exists() {
        skip(&format!(
            "{WRAPPER} is missing (apt-get install libnss-wrapper)"
        ));
        return;
    }
    assert!(
        !std::fs::read_to_string("/etc/group")
            .unwrap()
            .contains("farmhands:"),
        "the group must not be local for this test to mean anything"
    );
    let w = World::new(CONFIG);
    let passwd = w.path("nss-passwd");
    let group = w.path("nss-group");
    std::fs::write(
        &passwd,
        "root:x:0:0:root:/root:/bin/sh\nfarmer:x:4242:4242:Farmer:/nonexistent:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(&group, "root:x:0:\nfarmhands:x:4343:farmer\n").unwrap();
    let _board = w.plug("usb-FTDI_FT232R_USB_UART_NSS0-if00-port0");
    let _b = w.broker_env(
        &["--by-id-dir", w.by_id.to_str().unwrap()],
        &[
            ("LD_PRELOAD", WRAPPER),
            ("NSS_WRAPPER_PASSWD", passwd.to_str().unwrap()),
            ("NSS_WRAPPER_GROUP", group.to_str().unwrap()),
        ],
    );
    wait_for(std::time::Duration::from_secs(5), "the board", || {
        w.present("hil1")
    });
    let control = w.run.join("host/control.sock");
    let sock = w.run.join("host/hil1.console.sock");
    // A member (supplementary group 4343) takes the lease and the tty.
    let granted =
        String::from_utf8(first_bytes_as(&control, 4242, 4242, &[4343], Some("hil1"))).unwrap();
    assert!(granted.contains("\"granted\""), "{granted}");
    let first = first_bytes_as(&sock, 4242, 4242, &[4343], Some("hil1"));
    assert_eq!(
        first.first(),
        Some(&255u8),
        "{:?}",
        String::from_utf8_lossy(&first)
    );
    // The same user without the group is refused, named as NSS names it.
    let refused = String::from_utf8(first_bytes_as(&sock, 4242, 4242, &[4242], None)).unwrap();
    assert!(
        refused.contains(
            "hil1.console is for members of farmhands; host user farmer (uid 4242) is in none"
        ),
        "{refused}"
    );
}

/// The admin socket is root's and, where the host has the group, the
/// `devbroker-admin` group's: mode 0660, that group, and a member passes by
/// the groups the kernel recorded; anyone else is refused.
#[test]
fn the_admin_group_may_use_the_admin_socket() {
    if !nix::unistd::geteuid().is_root() {
        skip("connecting as another user needs root (run the suite as root, as CI does)");
        return;
    }
    if !Path::new(WRAPPER).exists() {
        skip(&format!(
            "{WRAPPER} is missing (apt-get install libnss-wrapper)"
        ));
        return;
    }
    let w = World::new(CONFIG);
    let passwd = w.path("nss-passwd");
    let group = w.path("nss-group");
    std::fs::write(
        &passwd,
        "root:x:0:0:root:/root:/bin/sh\nops:x:4242:4242::/nonexistent:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(&group, "root:x:0:\ndevbroker-admin:x:4400:ops\n").unwrap();
    let _b = w.broker_env(
        &["--by-id-dir", w.by_id.to_str().unwrap()],
        &[
            ("LD_PRELOAD", WRAPPER),
            ("NSS_WRAPPER_PASSWD", passwd.to_str().unwrap()),
            ("NSS_WRAPPER_GROUP", group.to_str().unwrap()),
        ],
    );
    let sock = w.run.join("broker.sock");
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(&sock).unwrap();
    assert_eq!((m.mode() & 0o777, m.gid()), (0o660, 4400));
    let ask = |groups: &[u32]| {
        let script = format!(
            "import os,socket,sys\nos.setgroups({groups:?})\nos.setgid(4242)\nos.setuid(4242)\ns=socket.socket(socket.AF_UNIX)\ns.connect({:?})\ns.sendall(b'{{\"request\":\"hello\",\"version\":1,\"client\":\"t\"}}\\n{{\"request\":\"status\"}}\\n')\nf=s.makefile()\nprint(f.readline().strip())\nprint(f.readline().strip())\n",
            sock.display().to_string()
        );
        let out = std::process::Command::new("python3")
            .args(["-c", &script])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let member = ask(&[4400]);
    assert!(member.contains("\"reply\":\"status\""), "{member}");
    let outsider = ask(&[4242]);
    assert!(
        outsider.contains("Permission denied") || outsider.contains("permission denied"),
        "{outsider}"
    );
}
