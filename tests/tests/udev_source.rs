//! The udev source against real libudev and an emulated `/sys` + `/dev`
//! (umockdev, tier 2), and the udev rules file.
//!
//! Each umockdev test re-executes itself under the preload library with its
//! own testbed (see `devbroker_tests::umockdev`) and runs the broker's
//! `UdevSource` in-process there, or the broker itself (which inherits the
//! preload and the testbed) for hotplug with sessions open.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devbroker::adapter::Adapter;
use devbroker::config::{self, UsbId};
use devbroker::plan::{self, TtyKey};
use devbroker::source::udev::UdevSource;
use devbroker::source::{AdapterStream, Source, SourceEvent};
use devbroker_tests::umockdev::{self, testdata, FT232R_BY_ID};
use devbroker_tests::{
    exists, join_within, read_exact_timeout, wait_for, write_all_fd, Tool, World,
};
use futures_util::StreamExt;

const FT232_TTY: &str = "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/ttyUSB0/tty/ttyUSB0";
const FT232_TTY1: &str =
    "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/ttyUSB1/tty/ttyUSB1";
const FT232_USB: &str = "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2";

/// A built-in UART and a virtual console: ttys that are no USB serial adapters.
const NOT_ADAPTERS: &str = "\
P: /devices/platform/serial8250/tty/ttyS0
N: ttyS0
E: DEVNAME=/dev/ttyS0
E: MAJOR=4
E: MINOR=64
E: SUBSYSTEM=tty
E: ID_PATH=platform-serial8250
A: dev=4:64

P: /devices/virtual/tty/tty1
N: tty1
E: DEVNAME=/dev/tty1
E: MAJOR=4
E: MINOR=1
E: SUBSYSTEM=tty
A: dev=4:1
";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn start() -> AdapterStream {
    let src: Box<dyn Source> = Box::new(UdevSource::new());
    src.watch().expect("start the udev source")
}

/// The next event within `limit`, or `None`.
async fn next_within(stream: &mut AdapterStream, limit: Duration) -> Option<SourceEvent> {
    match tokio::time::timeout(limit, stream.next()).await {
        Ok(Some(ev)) => Some(ev.expect("the source failed")),
        Ok(None) => panic!("the source stopped"),
        Err(_) => None,
    }
}

/// Every event until none came for `quiet`.
async fn events_until_quiet(stream: &mut AdapterStream, quiet: Duration) -> Vec<SourceEvent> {
    let mut out = Vec::new();
    while let Some(ev) = next_within(stream, quiet).await {
        out.push(ev);
    }
    out
}

/// The adapters of a source's first events: its `Added`s, then `Settled`.
fn added(evs: Vec<SourceEvent>) -> BTreeMap<String, Adapter> {
    assert_eq!(
        evs.last(),
        Some(&SourceEvent::Settled),
        "the first events end with Settled: {evs:?}"
    );
    evs.into_iter()
        .filter(|ev| *ev != SourceEvent::Settled)
        .map(|ev| match ev {
            SourceEvent::Added(a) => (a.id.clone(), a),
            other => panic!("expected only Added events, got {other:?}"),
        })
        .collect()
}

/// The FT232R of the test data, its tty numbered `ttyUSB<n>` (umockdev
/// can't make a removed node again, so a replug takes the next number).
fn ft232_description(n: u32) -> String {
    testdata("ftdi-ft232r.umockdev")
        .replace("ttyUSB0", &format!("ttyUSB{n}"))
        .replace("E: MINOR=0\n", &format!("E: MINOR={n}\n"))
        .replace("188:0", &format!("188:{n}"))
}

fn ft232() -> Adapter {
    Adapter {
        id: FT232_TTY.into(),
        device: PathBuf::from("/dev/serial/by-id").join(FT232R_BY_ID),
        by_id: Some(FT232R_BY_ID.into()),
        serial: Some("A1B2C3".into()),
        path: Some("pci-0000:00:14.0-usb-0:2:1.0".into()),
        usb: UsbId::parse("0403:6001"),
    }
}

#[test]
fn ft232_found_at_start_with_its_identities() {
    let tb = umockdev::testbed!();
    tb.add_from_string(NOT_ADAPTERS).unwrap();
    tb.add_from_string(&testdata("ftdi-ft232r.umockdev"))
        .unwrap();
    runtime().block_on(async {
        let t0 = Instant::now();
        let mut stream = start();
        let ev = next_within(&mut stream, Duration::from_secs(5))
            .await
            .expect("no event for the FT232R present at start");
        println!("umockdev: found at start after {:?}", t0.elapsed());
        assert_eq!(ev, SourceEvent::Added(ft232()));
        // ttyS0 and tty1 are not adapters, and the FT232R is reported once;
        // then the source says it reported all it found at the start.
        let more = events_until_quiet(&mut stream, Duration::from_millis(200)).await;
        assert_eq!(more, [SourceEvent::Settled], "unexpected events: {more:?}");
    });
    // The by-id link udev made is in the emulated /dev, and the device
    // behind it is the testbed's pty.
    assert!(tb
        .root_dir()
        .join("dev/serial/by-id")
        .join(FT232R_BY_ID)
        .exists());
    assert!(tb.dev_fd("/dev/ttyUSB0").is_some());
}

#[test]
fn hotplug_add_and_remove() {
    let tb = umockdev::testbed!();
    tb.add_from_string(NOT_ADAPTERS).unwrap();
    runtime().block_on(async {
        let mut stream = start();
        let none = events_until_quiet(&mut stream, Duration::from_millis(100)).await;
        assert_eq!(
            none,
            [SourceEvent::Settled],
            "no adapter is plugged in, yet: {none:?}"
        );

        for (round, tty) in [(0, FT232_TTY), (1, FT232_TTY1)] {
            let want = Adapter {
                id: tty.into(),
                ..ft232()
            };
            // Plug: add_from_string emits the add uevents.
            let t0 = Instant::now();
            tb.add_from_string(&ft232_description(round)).unwrap();
            let added_in = t0.elapsed();
            let ev = next_within(&mut stream, Duration::from_secs(5))
                .await
                .expect("no event for the plugged FT232R");
            println!(
                "umockdev: plug {round}: add_from_string {added_in:?}, Added after {:?}",
                t0.elapsed()
            );
            assert_eq!(ev, SourceEvent::Added(want));

            // A change that keeps the identity: nothing to report.
            tb.uevent(tty, "change");
            let none = events_until_quiet(&mut stream, Duration::from_millis(100)).await;
            assert!(none.is_empty(), "a change without a new identity: {none:?}");

            // Unplug: remove uevents first (remove_device emits none), then
            // the devices go.
            let t0 = Instant::now();
            tb.unplug(tty, FT232_USB);
            let unplugged_in = t0.elapsed();
            let ev = next_within(&mut stream, Duration::from_secs(5))
                .await
                .expect("no event for the unplugged FT232R");
            println!(
                "umockdev: unplug {round}: uevents + removal {unplugged_in:?}, Removed after {:?}",
                t0.elapsed()
            );
            assert_eq!(ev, SourceEvent::Removed(tty.into()));
            let more = events_until_quiet(&mut stream, Duration::from_millis(100)).await;
            assert!(more.is_empty(), "unexpected events: {more:?}");
            assert!(!Path::new(tty).exists(), "the tty is still in the testbed");
            assert!(!Path::new("/dev/serial/by-id").join(FT232R_BY_ID).exists());
        }
    });
}

/// The broker's config for the FT232R, by USB id and serial number.
const FT232_CONFIG: &str = r#"
[[board]]
name = "esp1"
machines = ["ci1"]

[[board.tty]]
name = "console"
match = { usb = "0403:6001", serial = "A1B2C3" }
"#;

/// A raw client of a broker socket: speaks the RFC 2217 opening and reads
/// the relayed bytes.
struct SocketClient(std::os::unix::net::UnixStream);

impl SocketClient {
    fn connect(sock: &Path) -> SocketClient {
        use std::io::Write;
        let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(&wire::telnet::Negotiator::client().opening())
            .unwrap();
        SocketClient(s)
    }

    /// Reads until `want` has come by (among the broker's negotiation).
    fn read_until(&mut self, want: &[u8]) {
        use std::io::Read;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while !got.windows(want.len()).any(|w| w == want) {
            let n = self.0.read(&mut buf).unwrap_or_else(|e| {
                panic!("reading {want:?} from the broker socket: {e}; got {got:?}")
            });
            assert!(n > 0, "the broker closed before {want:?}; got {got:?}");
            got.extend_from_slice(&buf[..n]);
        }
    }

    /// Starts a read in a thread that returns at end of stream (`Ok(0)`),
    /// on an error, or after 5 s (an error).
    fn read_to_end(&self) -> std::thread::JoinHandle<std::io::Result<usize>> {
        use std::io::Read;
        let mut s = self.0.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf) {
                    Ok(0) => return Ok(0),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        })
    }
}

#[test]
fn broker_follows_hotplug_and_hangs_up_sessions_on_unplug() {
    let tb = umockdev::testbed!();
    tb.add_from_string(NOT_ADAPTERS).unwrap();
    // One handler for the adapter in both rounds (a replug takes the next
    // node); it is attached before the devices exist.
    let by_id = format!("/dev/serial/by-id/{FT232R_BY_ID}");
    let line = tb.emulate_serial("/dev/ttyUSB0", &["/dev/ttyUSB1", &by_id]);
    let w = World::new(FT232_CONFIG);
    let _broker = w.broker_udev();
    let _shim = w.shim("ci1");
    let sock = w.run.join("machines/ci1/esp1.console.sock");
    let link = w.guest_link("ci1", FT232R_BY_ID);
    let limit = Duration::from_secs(5);
    std::thread::sleep(Duration::from_millis(100));
    assert!(!exists(&sock), "a socket before the adapter is plugged in");

    // Round 0: a tool in the guest holds the pty; round 1: a raw client of
    // the broker's socket.
    for (round, tty) in [(0u32, FT232_TTY), (1, FT232_TTY1)] {
        let node = format!("/dev/ttyUSB{round}");
        let t0 = Instant::now();
        tb.add_from_string(&ft232_description(round)).unwrap();
        wait_for(limit, "the broker's socket for the plugged FT232R", || {
            exists(&sock)
        });
        println!(
            "umockdev broker: plug {round}: socket after {:?}",
            t0.elapsed()
        );
        let board = tb.dev_fd(&node).expect("the adapter's pty");
        let board = std::os::fd::AsRawFd::as_raw_fd(&board);
        let ended = if round == 0 {
            wait_for(limit, "the guest link", || exists(&link));
            let tool = Tool::open(&link).unwrap();
            tool.write_all(b"to board\n").unwrap();
            // A pty's master reads EIO until the broker has the port open.
            wait_for(limit, "the broker to open the adapter", || {
                line.opens().len() == 1
            });
            let got = read_exact_timeout(board, 9, limit)
                .unwrap_or_else(|e| panic!("{e}: {line:?}\n{}", w.logs()));
            assert_eq!(got, b"to board\n");
            write_all_fd(board, b"to tool\n").unwrap();
            let mut buf = [0u8; 8];
            let n = tool.read_timeout(&mut buf, limit).unwrap();
            assert_eq!(n.map(|n| &buf[..n]), Some(&b"to tool\n"[..]));
            let reader = tool.blocked_read();
            let t0 = Instant::now();
            tb.unplug(tty, FT232_USB);
            let err =
                join_within(reader, limit).expect_err("the tool must read EIO after the unplug");
            assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
            t0.elapsed()
        } else {
            let mut client = SocketClient::connect(&sock);
            wait_for(limit, "the broker to open the adapter", || {
                line.opens().len() == 2
            });
            // The broker's opening comes once the port is set up (and what
            // the board sent before is purged, as on a real port).
            client.read_until(&[wire::telnet::IAC]);
            write_all_fd(board, b"to client\n").unwrap();
            client.read_until(b"to client\n");
            let reader = client.read_to_end();
            let t0 = Instant::now();
            tb.unplug(tty, FT232_USB);
            let r = join_within(reader, limit);
            assert!(
                matches!(&r, Ok(0))
                    || r.as_ref()
                        .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
                "the socket client must see the end of the session: {r:?}"
            );
            t0.elapsed()
        };
        wait_for(limit, "the broker's socket to go", || !exists(&sock));
        wait_for(limit, "the guest link to go", || !exists(&link));
        println!("umockdev broker: unplug {round}: session ended after {ended:?}");
        // Opened once a round, by the by-id link.
        assert_eq!(
            line.opens(),
            vec![by_id.clone(); round as usize + 1],
            "{line:?}"
        );
        assert!(line.failures().is_empty(), "{line:?}");
    }
}

/// Starts the source and returns the adapters it reports at start.
fn adapters_at_start() -> BTreeMap<String, Adapter> {
    runtime().block_on(async {
        let mut stream = start();
        added(events_until_quiet(&mut stream, Duration::from_millis(300)).await)
    })
}

fn assigned(cfg: &str, adapters: &BTreeMap<String, Adapter>) -> BTreeMap<String, Adapter> {
    let config = config::parse(Path::new("devbroker.toml"), cfg).unwrap_or_else(|e| panic!("{e}"));
    let (present, warnings) = plan::assign(&config, adapters);
    assert!(warnings.is_empty(), "{warnings:?}");
    present
        .into_iter()
        .map(|(TtyKey { board, tty }, a)| (format!("{board}.{tty}"), a))
        .collect()
}

#[test]
fn identical_adapters_told_apart_by_serial() {
    let tb = umockdev::testbed!();
    tb.add_from_string(&testdata("ftdi-ft232r-pair.umockdev"))
        .unwrap();
    let adapters = adapters_at_start();
    assert_eq!(adapters.len(), 2, "{adapters:#?}");
    // Identical but for the serial number (and the port they are in).
    let ids: Vec<_> = adapters
        .values()
        .map(|a| (a.usb, a.by_id.clone()))
        .collect();
    assert_eq!(ids[0].0, ids[1].0);
    assert_ne!(ids[0].1, ids[1].1);

    // The config names them by serial only: which port each is in does not matter.
    let cfg = r#"
[[board]]
name = "esp1"
host-groups = ["hil"]
[[board.tty]]
name = "console"
match = { usb = "0403:6001", serial = "FT100001" }

[[board]]
name = "esp2"
host-groups = ["hil"]
[[board.tty]]
name = "console"
match = { usb = "0403:6001", serial = "FT100002" }
"#;
    let got = assigned(cfg, &adapters);
    let esp1 = &got["esp1.console"];
    let esp2 = &got["esp2.console"];
    assert_eq!(
        esp1.id,
        "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-4/1-4:1.0/ttyUSB1/tty/ttyUSB1"
    );
    assert_eq!(
        esp1.device,
        Path::new("/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_FT100001-if00-port0")
    );
    assert_eq!(esp1.path.as_deref(), Some("pci-0000:00:14.0-usb-0:4:1.0"));
    assert_eq!(
        esp2.id,
        "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/ttyUSB0/tty/ttyUSB0"
    );
    assert_eq!(
        esp2.device,
        Path::new("/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_FT100002-if00-port0")
    );
    assert_eq!(esp2.path.as_deref(), Some("pci-0000:00:14.0-usb-0:3:1.0"));
}

#[test]
fn clones_sharing_a_serial_open_their_own_node() {
    let tb = umockdev::testbed!();
    // Cheap FT232R clones often share one serial number, and so one by-id
    // name: the link leads to only one of them.
    let clones = testdata("ftdi-ft232r-pair.umockdev")
        .replace("FT100001", "A50285BI")
        .replace("FT100002", "A50285BI");
    tb.add_from_string(&clones).unwrap();
    let link = Path::new("/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0");
    let owner = std::fs::read_link(link).expect("the shared by-id link");
    let adapters = adapters_at_start();
    assert_eq!(adapters.len(), 2, "{adapters:#?}");
    for a in adapters.values() {
        let node = PathBuf::from("/dev").join(Path::new(&a.id).file_name().unwrap());
        if owner.file_name() == node.file_name() {
            assert_eq!(a.device, link, "{a:#?}");
        } else {
            assert_eq!(a.device, node, "the link leads to the other clone: {a:#?}");
        }
    }
    let cfg = r#"
[[board]]
name = "clone-a"
host-groups = ["hil"]
[[board.tty]]
name = "console"
match = { serial = "A50285BI", path = "pci-0000:00:14.0-usb-0:3:1.0" }

[[board]]
name = "clone-b"
host-groups = ["hil"]
[[board.tty]]
name = "console"
match = { serial = "A50285BI", path = "pci-0000:00:14.0-usb-0:4:1.0" }
"#;
    let got = assigned(cfg, &adapters);
    assert!(got["clone-a.console"].id.contains("/1-3/"));
    assert!(got["clone-b.console"].id.contains("/1-4/"));
    assert_ne!(got["clone-a.console"].device, got["clone-b.console"].device);
}

#[test]
fn adapters_without_serial_told_apart_by_path() {
    let tb = umockdev::testbed!();
    tb.add_from_string(&testdata("ch340-pair-noserial.umockdev"))
        .unwrap();
    let adapters = adapters_at_start();
    assert_eq!(adapters.len(), 2, "{adapters:#?}");
    for a in adapters.values() {
        assert_eq!(a.serial, None);
        assert_eq!(a.usb, UsbId::parse("1a86:7523"));
        // Both carry the same by-id name: it can't tell them apart.
        assert_eq!(a.by_id.as_deref(), Some("usb-1a86_USB_Serial-if00-port0"));
    }

    let cfg = r#"
[[board]]
name = "nrf-a"
host-groups = ["hil"]
[[board.tty]]
name = "uart"
match = { usb = "1a86:7523", path = "pci-0000:00:14.0-usb-0:3:1.0" }

[[board]]
name = "nrf-b"
host-groups = ["hil"]
[[board.tty]]
name = "uart"
match = { usb = "1a86:7523", path = "pci-0000:00:14.0-usb-0:4:1.0" }
"#;
    let got = assigned(cfg, &adapters);
    let a = &got["nrf-a.uart"];
    let b = &got["nrf-b.uart"];
    assert_eq!(
        a.id,
        "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-3/1-3:1.0/ttyUSB0/tty/ttyUSB0"
    );
    assert_eq!(
        b.id,
        "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-4/1-4:1.0/ttyUSB1/tty/ttyUSB1"
    );
    // Each opens its own node, not the by-id link they share.
    assert_eq!(a.device, Path::new("/dev/ttyUSB0"));
    assert_eq!(b.device, Path::new("/dev/ttyUSB1"));

    // Matching by the shared by-id name alone is refused by the config check.
    let clash = cfg
        .replace(
            r#"path = "pci-0000:00:14.0-usb-0:3:1.0""#,
            r#"by-id = "usb-1a86_USB_Serial-if00-port0""#,
        )
        .replace(
            r#"path = "pci-0000:00:14.0-usb-0:4:1.0""#,
            r#"by-id = "usb-1a86_USB_Serial-if00-port0""#,
        );
    let err = config::parse(Path::new("devbroker.toml"), &clash)
        .unwrap_err()
        .to_string();
    assert!(err.contains("can match the same adapter"), "{err}");
}

// ---- the udev rules file ----

fn rules_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../udev-rules/60-devbroker.rules")
}

/// One `KEY{ATTR}OP"VALUE"` of a rule.
#[derive(Debug, Clone, PartialEq)]
struct Pair {
    key: String,
    op: String,
    value: String,
}

/// Splits a rules file into rules (continuation lines joined, comments
/// dropped), each a list of pairs.
fn parse_rules(text: &str) -> Result<Vec<Vec<Pair>>, String> {
    let mut logical = Vec::new();
    let mut cur = String::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if cur.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(head) = t.strip_suffix('\\') {
            cur.push_str(head);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        logical.push((n + 1, std::mem::take(&mut cur)));
    }
    if !cur.is_empty() {
        return Err("the file ends with a continuation line".into());
    }
    let mut rules = Vec::new();
    for (n, line) in logical {
        let mut pairs = Vec::new();
        let mut rest = line.as_str();
        loop {
            rest = rest.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
            if rest.is_empty() {
                break;
            }
            let key_end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || "{}_.-:".contains(c)))
                .ok_or(format!("line {n}: no operator after {rest:?}"))?;
            let (mut key, after) = rest.split_at(key_end);
            // `:=` — the ':' was taken into the key.
            let mut op_prefix = "";
            if let Some(k) = key.strip_suffix(':') {
                key = k;
                op_prefix = ":";
            }
            let op = ["==", "!=", "+=", "-=", "="]
                .into_iter()
                .find(|op| after.starts_with(op))
                .ok_or(format!("line {n}: bad operator after {key:?}"))?;
            let after = &after[op.len()..];
            let after = after
                .strip_prefix('"')
                .ok_or(format!("line {n}: the value of {key} is not quoted"))?;
            let end = after
                .find('"')
                .ok_or(format!("line {n}: unterminated value of {key}"))?;
            pairs.push(Pair {
                key: key.to_string(),
                op: format!("{op_prefix}{op}"),
                value: after[..end].to_string(),
            });
            rest = &after[end + 1..];
            if !(rest.is_empty() || rest.starts_with(',') || rest.starts_with(char::is_whitespace))
            {
                return Err(format!("line {n}: no ',' after {key}"));
            }
        }
        rules.push(pairs);
    }
    Ok(rules)
}

#[test]
fn rules_file_sets_0660_and_the_group_never_0666() {
    let text = std::fs::read_to_string(rules_file()).unwrap();
    let rules = parse_rules(&text).unwrap_or_else(|e| panic!("60-devbroker.rules: {e}"));
    let assigns = |key: &str| -> Vec<(usize, Pair)> {
        rules
            .iter()
            .enumerate()
            .flat_map(|(i, r)| r.iter().map(move |p| (i, p.clone())))
            .filter(|(_, p)| p.key == key && !matches!(p.op.as_str(), "==" | "!="))
            .collect()
    };
    // Every MODE it sets keeps others out (no 0666, nor any world bit).
    let modes = assigns("MODE");
    assert!(!modes.is_empty(), "the rules set no MODE");
    for (_, m) in &modes {
        let v = u32::from_str_radix(&m.value, 8)
            .unwrap_or_else(|_| panic!("MODE {:?} is not octal", m.value));
        assert_eq!(
            v & 0o007,
            0,
            "MODE=\"{}\" gives access to everyone",
            m.value
        );
        assert_ne!(m.value, "0666");
    }
    for l in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        assert!(!l.contains("0666"), "a rule mentions 0666: {l}");
    }
    // The rule that sets 0660 also sets the group and the tag, for USB ttys.
    let (i, _) = modes
        .iter()
        .find(|(_, m)| m.value == "0660")
        .expect("MODE=\"0660\"");
    let rule = &rules[*i];
    let has = |key: &str, op: &str, value: &str| {
        rule.iter()
            .any(|p| p.key == key && p.op == op && p.value == value)
    };
    assert!(has("GROUP", "=", "devbroker"), "{rule:?}");
    assert!(has("TAG", "+=", "devbroker"), "{rule:?}");
    assert!(has("ENV{DEVBROKER}", "=", "1"), "{rule:?}");
    // And it applies only to USB serial ttys: the file skips everything else.
    let all: Vec<&Pair> = rules.iter().flatten().collect();
    let skips = |key: &str, value: &str| {
        all.iter()
            .any(|p| p.key == key && p.op == "!=" && p.value == value)
            || rule
                .iter()
                .any(|p| p.key == key && p.op == "==" && p.value == value)
    };
    assert!(skips("SUBSYSTEM", "tty"));
    assert!(skips("ENV{ID_BUS}", "usb"));
    assert!(skips("KERNEL", "ttyUSB[0-9]*|ttyACM[0-9]*"));

    // Real udevd applies the file in hw-tests (tier 4): the adapter's node
    // is group devbroker, mode 0660 there.
}

#[test]
fn rules_parser_catches_mistakes() {
    let r = parse_rules(
        "SUBSYSTEM==\"tty\", MODE:=\"0660\"\n# MODE=\"0666\"\nKERNEL==\"a\", \\\n  GROUP=\"g\"\n",
    )
    .unwrap();
    assert_eq!(r.len(), 2);
    assert_eq!(
        r[0][1],
        Pair {
            key: "MODE".into(),
            op: ":=".into(),
            value: "0660".into()
        }
    );
    assert_eq!(r[1][1].key, "GROUP");
    assert!(parse_rules("MODE=0666\n").is_err());
    assert!(parse_rules("MODE=\"0666\" GROUP\n").is_err());
    assert!(parse_rules("KERNEL==\"a\"GROUP=\"b\"\n").is_err());
}
