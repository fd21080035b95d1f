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
        skip(&format!("{WRAPPER} is missing (apt-get install libnss-wrapper)"));
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
