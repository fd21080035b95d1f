//! `devbroker boards --suggest` through the library: adapters listed from a
//! by-id directory of fake boards (with udev records made for them) and from
//! udev under umockdev; the suggested entries parse next to the config, pick
//! their adapter only, and a broker run with them serves the board.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use devbroker::config::{self, UsbId};
use devbroker::suggest::{self, Survey};
use devbroker_tests::umockdev::{self, testdata};
use devbroker_tests::*;

const FTDI: &str = "usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0";
const FTDI2: &str = "usb-FTDI_FT232R_USB_UART_FT100001-if00-port0";
const JLINK: &str = "usb-SEGGER_J-Link_000683-if00";
const CH340_A: &str = "usb-1a86_USB_Serial_A-if00-port0";
const CH340_B: &str = "usb-1a86_USB_Serial_B-if00-port0";

const CONFIG: &str = r#"
[[board]]
name = "esp1"
machines = ["ci1"]

[[board.tty]]
name = "console"
match = { by-id = "usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0" }

[[board]]
name = "gone"
machines = ["ci1"]

[[board.tty]]
name = "console"
match = { by-id = "usb-Absent_Board_X1-if00" }
"#;

/// Writes udev's record for a fake board's pty, as udevd keeps one for a
/// real adapter in `/run/udev/data/cMAJ:MIN`.
fn udev_record(dir: &Path, board: &FakeBoard, props: &[(&str, &str)]) {
    std::fs::create_dir_all(dir).unwrap();
    let rdev = std::fs::metadata(&board.slave_path).unwrap().rdev();
    let mut text = String::new();
    for (k, v) in props {
        text += &format!("E:{k}={v}\n");
    }
    std::fs::write(
        dir.join(format!("c{}:{}", libc::major(rdev), libc::minor(rdev))),
        text,
    )
    .unwrap();
}

fn parse(text: &str) -> config::Config {
    config::parse(Path::new("devbroker.toml"), text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Appends the suggestions (and, separately, the whole `--suggest` output)
/// to `text`; both must parse, and with them every adapter has a board.
fn appended(text: &str, rep: &Survey) -> String {
    let whole = format!("{text}{}", rep.render(true));
    parse(&whole);
    let all = suggest::append_to(text, rep);
    parse(&all);
    all
}

#[test]
fn by_id_fake_boards_get_entries_that_parse() {
    let w = World::new(CONFIG);
    let udev = w.path("udev-data");
    let ftdi = w.plug(FTDI);
    let ftdi2 = w.plug(FTDI2);
    let _jlink = w.plug(JLINK);
    let ch_a = w.plug(CH340_A);
    let ch_b = w.plug(CH340_B);
    let ftdi_id = [("ID_VENDOR_ID", "0403"), ("ID_MODEL_ID", "6001")];
    let ch340_id = [("ID_VENDOR_ID", "1a86"), ("ID_MODEL_ID", "7523")];
    for (b, id, serial, port) in [
        (&ftdi, ftdi_id, Some("A1B2C3"), 2),
        (&ftdi2, ftdi_id, Some("FT100001"), 3),
        (&ch_a, ch340_id, None, 4),
        (&ch_b, ch340_id, None, 5),
    ] {
        let path = format!("pci-0000:00:14.0-usb-0:{port}:1.0");
        let mut props = id.to_vec();
        props.push(("ID_PATH", &path));
        if let Some(s) = serial {
            props.push(("ID_SERIAL_SHORT", s));
        }
        udev_record(&udev, b, &props);
    }
    // The J-Link has no udev record: the by-id name is all there is.

    let adapters = suggest::present_by_id_with(&w.by_id, &udev);
    assert_eq!(adapters.len(), 5, "{adapters:#?}");
    let cfg = parse(CONFIG);
    let rep = suggest::survey(&adapters, &cfg);
    let text = rep.render(true);
    println!("{text}");

    let of = |by_id: &str| {
        rep.adapters
            .iter()
            .find(|r| r.adapter.by_id.as_deref() == Some(by_id))
            .unwrap_or_else(|| panic!("{by_id} not listed"))
    };
    // The configured one: matched, identities listed, no suggestion.
    let r = of(FTDI);
    assert_eq!(r.serves[0].to_string(), "esp1.console");
    assert_eq!(r.adapter.serial.as_deref(), Some("A1B2C3"));
    assert!(r.suggestion.is_none());
    assert!(
        text.contains("#   config  board esp1 tty console\n"),
        "{text}"
    );
    assert!(text.contains("#   serial  A1B2C3\n"), "{text}");
    // usb + serial.
    let m = &of(FTDI2).suggestion.as_ref().unwrap().matcher;
    assert_eq!(
        (
            m.usb,
            m.serial.as_deref(),
            m.path.as_deref(),
            m.by_id.as_deref()
        ),
        (UsbId::parse("0403:6001"), Some("FT100001"), None, None)
    );
    // No serial: usb + path would do, but the config names boards by by-id
    // alone, and the config check can't tell a by-id match from a usb +
    // path one: these get their (distinct) by-id names.
    for name in [CH340_A, CH340_B] {
        let m = &of(name).suggestion.as_ref().unwrap().matcher;
        assert_eq!(m.by_id.as_deref(), Some(name), "{m:?}");
        assert_eq!((m.usb, m.path.as_deref()), (None, None));
    }
    // With the boards named by usb + serial, they get usb + path.
    let by_serial = CONFIG
        .replace(
            r#"by-id = "usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0""#,
            r#"usb = "0403:6001", serial = "A1B2C3""#,
        )
        .replace(
            r#"by-id = "usb-Absent_Board_X1-if00""#,
            r#"usb = "0403:6001", serial = "X1""#,
        );
    let rep2 = suggest::survey(&adapters, &parse(&by_serial));
    for (name, port) in [(CH340_A, 4), (CH340_B, 5)] {
        let r = rep2
            .adapters
            .iter()
            .find(|r| r.adapter.by_id.as_deref() == Some(name))
            .unwrap();
        let m = &r.suggestion.as_ref().unwrap().matcher;
        assert_eq!(m.usb, UsbId::parse("1a86:7523"));
        assert_eq!(
            m.path.as_deref(),
            Some(format!("pci-0000:00:14.0-usb-0:{port}:1.0").as_str())
        );
        assert_eq!((m.serial.as_deref(), m.by_id.as_deref()), (None, None));
    }
    appended(&by_serial, &rep2);
    // Neither: the by-id name.
    let sg = of(JLINK).suggestion.as_ref().unwrap();
    assert_eq!(sg.matcher.by_id.as_deref(), Some(JLINK));
    assert_eq!(sg.board, "segger-j-link-000683");
    assert!(
        text.contains("match = { by-id = \"usb-SEGGER_J-Link_000683-if00\" }"),
        "{text}"
    );
    assert_eq!(
        rep.missing
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>(),
        ["gone.console"]
    );

    // Appended, the config parses (nothing overlaps), and every adapter
    // then has exactly one tty: nothing left to suggest.
    let all = appended(CONFIG, &rep);
    let again = suggest::survey(&adapters, &parse(&all));
    for r in &again.adapters {
        assert_eq!(r.serves.len(), 1, "{r:?}");
        assert!(r.suggestion.is_none() && r.note.is_none(), "{r:?}");
    }
    assert!(again.render(true).contains("nothing to suggest"));
    // Each suggested match picks its adapter and no other one present.
    for r in &rep.adapters {
        if let Some(sg) = &r.suggestion {
            let hits: Vec<_> = adapters.iter().filter(|a| sg.matcher.matches(a)).collect();
            assert_eq!(hits.len(), 1, "{:?} matches {hits:?}", sg.matcher);
            assert_eq!(hits[0].id, r.adapter.id);
        }
    }
    // The same through `devbroker boards --json`, for scripts.
    std::fs::write(w.path("boards.toml"), CONFIG).unwrap();
    let out = std::process::Command::new(bin("devbroker"))
        .args(["boards", "--json", "--source", "by-id", "--by-id-dir"])
        .arg(&w.by_id)
        .arg("--config")
        .arg(w.path("boards.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(j["version"], 1);
    let listed = j["adapters"].as_array().unwrap();
    assert_eq!(listed.len(), 5, "{j}");
    let esp = listed.iter().find(|a| a["by_id"] == FTDI).unwrap();
    assert_eq!(esp["serves"], serde_json::json!(["esp1.console"]), "{j}");
    assert!(listed.iter().any(|a| a["suggestion"].is_string()), "{j}");
}

#[test]
fn a_suggested_board_is_served() {
    // The fake board has no udev record, so the suggestion is its by-id
    // name, which `devbroker run --by-id-dir` matches as well.
    let w = World::new(CONFIG);
    let _ftdi = w.plug(FTDI);
    let jlink = w.plug(JLINK);
    let adapters = suggest::present_by_id(&w.by_id);
    let rep = suggest::survey(&adapters, &parse(CONFIG));
    let sg = rep
        .adapters
        .iter()
        .find_map(|r| r.suggestion.clone())
        .expect("a suggestion for the J-Link");
    let all =
        appended(CONFIG, &rep).replace("# machines = [\"sai-builder-1\"]", "machines = [\"ci1\"]");
    parse(&all);
    std::fs::write(&w.config, &all).unwrap();

    let _b = w.broker();
    let _s = w.shim("ci1");
    let link = w.guest_link("ci1", JLINK);
    let short = w
        .guest("ci1")
        .join(format!("devbroker/{}.{}", sg.board, sg.tty));
    wait_for(
        Duration::from_secs(5),
        "the suggested board's links",
        || exists(&link) && exists(&short),
    );
    let tool = Tool::open(&link).unwrap();
    tool.write_all(b"hello\n").unwrap();
    let got = read_exact_timeout(jlink.master_fd(), 6, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e}\n{}", w.logs()));
    assert_eq!(got, b"hello\n");
}

// ---- udev, under umockdev (tier 2) ----

fn udev_report(cfg: &str) -> Survey {
    let adapters = suggest::present_udev().expect("enumerate udev");
    suggest::survey(&adapters, &parse(cfg))
}

#[test]
fn udev_pair_told_apart_by_serial() {
    let tb = umockdev::testbed!();
    tb.add_from_string(&testdata("ftdi-ft232r-pair.umockdev"))
        .unwrap();
    let rep = udev_report("");
    assert_eq!(rep.adapters.len(), 2, "{rep:#?}");
    let mut serials = Vec::new();
    for r in &rep.adapters {
        let m = &r.suggestion.as_ref().unwrap().matcher;
        assert_eq!(m.usb, UsbId::parse("0403:6001"));
        assert_eq!((m.path.as_deref(), m.by_id.as_deref()), (None, None));
        serials.push(m.serial.clone().unwrap());
        // The by-id link leads to this adapter: it is the device.
        assert!(r.adapter.device.starts_with("/dev/serial/by-id"), "{r:?}");
    }
    serials.sort();
    assert_eq!(serials, ["FT100001", "FT100002"]);
    appended("", &rep);
}

#[test]
fn udev_pair_without_serial_told_apart_by_path() {
    let tb = umockdev::testbed!();
    tb.add_from_string(&testdata("ch340-pair-noserial.umockdev"))
        .unwrap();
    let rep = udev_report("");
    assert_eq!(rep.adapters.len(), 2, "{rep:#?}");
    for r in &rep.adapters {
        let m = &r.suggestion.as_ref().unwrap().matcher;
        assert_eq!(m.usb, UsbId::parse("1a86:7523"));
        assert_eq!(m.path, r.adapter.path);
        assert_eq!(m.by_id, None, "the by-id name is shared: {m:?}");
    }
    let names: Vec<_> = rep
        .adapters
        .iter()
        .map(|r| r.suggestion.as_ref().unwrap().board.clone())
        .collect();
    assert_eq!(names, ["1a86-usb-serial", "1a86-usb-serial-2"]);
    appended("", &rep);
}

#[test]
fn udev_clones_sharing_a_serial_need_the_path() {
    let tb = umockdev::testbed!();
    let clones = testdata("ftdi-ft232r-pair.umockdev")
        .replace("FT100001", "A50285BI")
        .replace("FT100002", "A50285BI");
    tb.add_from_string(&clones).unwrap();
    // One of them is configured by serial + path; the other gets an entry
    // that does not overlap it.
    let cfg = r#"
[[board]]
name = "clone-a"
host-groups = ["hil"]
[[board.tty]]
name = "console"
match = { serial = "A50285BI", path = "pci-0000:00:14.0-usb-0:3:1.0" }
"#;
    let rep = udev_report(cfg);
    assert_eq!(rep.adapters.len(), 2, "{rep:#?}");
    let configured: Vec<_> = rep
        .adapters
        .iter()
        .filter(|r| !r.serves.is_empty())
        .collect();
    assert_eq!(configured.len(), 1);
    assert!(configured[0].adapter.id.contains("/1-3/"));
    let other = rep.adapters.iter().find(|r| r.serves.is_empty()).unwrap();
    let m = &other.suggestion.as_ref().unwrap().matcher;
    assert_eq!(m.serial.as_deref(), Some("A50285BI"));
    assert_eq!(m.path.as_deref(), Some("pci-0000:00:14.0-usb-0:4:1.0"));
    // The shared link leads to one clone only; the other opens its node.
    let devices: Vec<_> = rep
        .adapters
        .iter()
        .map(|r| r.adapter.device.clone())
        .collect();
    assert_ne!(devices[0], devices[1]);
    appended(cfg, &rep);
}
