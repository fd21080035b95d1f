//! The udev source: adapters are the `tty` devices udev knows as USB serial
//! ports, listed at start and then followed through a udev monitor.
//!
//! The monitor is opened before the listing, so nothing plugged in between is
//! missed; a device seen twice (listed, then its `add`) is reported once.
//! Everything is kept in a map keyed by syspath: a `remove` needs nothing
//! from the event but the syspath (in a remove event the USB parent is
//! already gone), and a `change` is compared with what was reported before
//! (the same adapter: nothing; another identity: `Removed` then `Added`).
//!
//! The monitor socket is non-blocking and driven by tokio's [`AsyncFd`]. If
//! the kernel drops events (`ENOBUFS`: the socket's buffer overflowed), the
//! source lists the devices again and reports the difference.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::{AdapterStream, Source, SourceEvent};
use crate::adapter::{Adapter, UdevIdentity};

/// udevd's control socket: it exists while udevd runs, so the udev source is
/// the one to use when it does.
pub const UDEV_CONTROL: &str = "/run/udev/control";

/// True when udevd seems to run here (its control socket exists).
pub fn udev_running() -> bool {
    Path::new(UDEV_CONTROL).exists()
}

/// Watches udev for USB serial adapters (subsystem `tty`).
#[derive(Debug, Default)]
pub struct UdevSource {
    _private: (),
}

impl UdevSource {
    pub fn new() -> UdevSource {
        UdevSource { _private: () }
    }
}

impl Source for UdevSource {
    fn describe(&self) -> String {
        "udev (subsystem tty, USB serial adapters)".to_string()
    }

    fn watch(self: Box<Self>) -> io::Result<AdapterStream> {
        // Listen first, then list: an adapter plugged in between shows up in
        // the listing, as an event, or both, never in neither.
        let socket = udev::MonitorBuilder::new()?
            .match_subsystem("tty")?
            .listen()?;
        let raw = RawMonitorFd(socket.as_raw_fd());
        // SAFETY: the descriptor belongs to `socket`, which lives beside the
        // `AsyncFd` in `Monitor` and is dropped after it.
        let ready = unsafe { AsyncFd::register_with_interest(raw, Interest::READABLE)? };
        let monitor = Monitor { ready, socket };
        let present = scan()?;
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(run(monitor, present, tx));
        Ok(Box::pin(super::ChannelStream(rx)))
    }
}

/// The monitor socket and its readiness. libudev objects may move between
/// threads (the crate's `send` feature) but not be shared, so tokio watches
/// the bare descriptor and only this task touches the socket. Fields drop in
/// order: the descriptor is deregistered before the socket closes.
struct Monitor {
    ready: AsyncFd<RawMonitorFd>,
    socket: udev::MonitorSocket,
}

/// The monitor socket's descriptor, owned by [`Monitor::socket`].
struct RawMonitorFd(RawFd);

impl AsRawFd for RawMonitorFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// One monitor event, copied out of libudev.
struct Change {
    action: String,
    syspath: String,
    /// `DEVPATH_OLD` joined to the sysfs root, for `move`.
    old_syspath: Option<String>,
    /// The adapter the device is now, if it is one (never for `remove`).
    now: Option<Adapter>,
}

async fn run(
    monitor: Monitor,
    mut known: BTreeMap<String, Adapter>,
    tx: mpsc::Sender<io::Result<SourceEvent>>,
) {
    for a in known.values() {
        if tx.send(Ok(SourceEvent::Added(a.clone()))).await.is_err() {
            return;
        }
    }
    if tx.send(Ok(SourceEvent::Settled)).await.is_err() {
        return;
    }
    loop {
        let mut guard = match monitor.ready.readable().await {
            Ok(g) => g,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        let mut changes = Vec::new();
        let mut lost = false;
        loop {
            match monitor.socket.iter().next() {
                Some(ev) => changes.push(change_of(&ev)),
                None => {
                    // libudev sets errno when it returns no device.
                    let err = io::Error::last_os_error();
                    if err.raw_os_error() == Some(libc::ENOBUFS) {
                        warn!("udev events were lost (ENOBUFS); listing the devices again");
                        lost = true;
                        continue;
                    }
                    if !matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(0) | None) {
                        debug!("udev monitor: {err}");
                    }
                    break;
                }
            }
        }
        // Clear readiness only when the socket is really empty: an error
        // above may have left messages behind, and the edge-triggered
        // readiness would not fire again for them.
        if !readable_now(monitor.socket.as_fd()) {
            guard.clear_ready();
        }
        drop(guard);

        let mut out = Vec::new();
        for c in changes {
            if let Some(old) = &c.old_syspath {
                out.extend(apply(&mut known, "remove", old, None));
            }
            out.extend(apply(&mut known, &c.action, &c.syspath, c.now));
        }
        if lost {
            match scan() {
                Ok(now) => {
                    out.extend(super::diff(&known, &now));
                    known = now;
                }
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            }
        }
        for ev in out {
            if tx.send(Ok(ev)).await.is_err() {
                return;
            }
        }
    }
}

/// `poll` with no timeout: is there something to read?
fn readable_now(fd: BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    poll(&mut [PollFd::new(fd, PollFlags::POLLIN)], PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

fn change_of(ev: &udev::Event) -> Change {
    let action = lossy(ev.action()).unwrap_or_default();
    let syspath = ev.syspath().to_string_lossy().into_owned();
    let old_syspath = if action == "move" {
        lossy(ev.property_value("DEVPATH_OLD")).and_then(|old| {
            let devpath = ev.devpath().to_string_lossy();
            syspath
                .strip_suffix(devpath.as_ref())
                .map(|root| format!("{root}{old}"))
        })
    } else {
        None
    };
    let now = if action == "remove" {
        None
    } else {
        adapter_of(ev)
    };
    debug!(%action, %syspath, adapter = now.is_some(), "udev event");
    Change {
        action,
        syspath,
        old_syspath,
        now,
    }
}

fn lossy(s: Option<&OsStr>) -> Option<String> {
    s.map(|s| s.to_string_lossy().into_owned())
}

/// The USB serial adapters udev knows now, by syspath (one enumeration, no
/// monitor): what the source starts from, and what `boards` lists.
pub fn scan() -> io::Result<BTreeMap<String, Adapter>> {
    let mut en = udev::Enumerator::new()?;
    en.match_subsystem("tty")?;
    let mut out = BTreeMap::new();
    for dev in en.scan_devices()? {
        if let Some(a) = adapter_of(&dev) {
            out.insert(a.id.clone(), a);
        }
    }
    Ok(out)
}

/// The adapter a udev device is, if it is a USB serial adapter.
fn adapter_of(dev: &udev::Device) -> Option<Adapter> {
    let props: Vec<(String, String)> = dev
        .properties()
        .map(|p| {
            (
                p.name().to_string_lossy().into_owned(),
                p.value().to_string_lossy().into_owned(),
            )
        })
        .collect();
    let syspath = dev.syspath().to_string_lossy();
    let mut a = adapter_from_properties(&syspath, props.iter().map(|(k, v)| (k, v)))?;
    // Clones sharing a serial number share the by-id link too: use it only
    // while it leads to this device's node.
    let devname = props
        .iter()
        .find(|(k, _)| k == "DEVNAME")
        .map(|(_, v)| devname_path(v))?;
    if a.device != devname && !link_leads_to(&a.device, &devname) {
        debug!(link = %a.device.display(), node = %devname.display(), "the by-id link leads elsewhere; using the node");
        a.device = devname;
    }
    Some(a)
}

/// True when the symlink `link` names `node`'s file (udev makes relative
/// links such as `../../ttyUSB0`).
fn link_leads_to(link: &Path, node: &Path) -> bool {
    match std::fs::read_link(link) {
        Ok(target) => target.file_name().is_some() && target.file_name() == node.file_name(),
        Err(_) => false,
    }
}

fn devname_path(v: &str) -> PathBuf {
    if v.starts_with('/') {
        PathBuf::from(v)
    } else {
        Path::new("/dev").join(v)
    }
}

/// Turns a `tty` device's udev properties into an [`Adapter`], or `None` when
/// it is not a USB serial adapter (neither `ID_BUS=usb` nor a
/// `serial/by-id` link) or has no device node.
///
/// The adapter is keyed by `syspath`. It is opened through its by-id link
/// when it has one and a serial number; without a serial number, identical
/// adapters share one by-id name (udev points the link at only one of them),
/// so the device node (`DEVNAME`) is used and `ID_PATH` tells them apart.
pub fn adapter_from_properties<K, V>(
    syspath: &str,
    props: impl IntoIterator<Item = (K, V)>,
) -> Option<Adapter>
where
    K: AsRef<str>,
    V: AsRef<str>,
{
    let props: Vec<(K, V)> = props.into_iter().collect();
    let pairs = || props.iter().map(|(k, v)| (k.as_ref(), v.as_ref()));
    let mut devname = None;
    let mut devlinks = "";
    let mut usb_bus = false;
    for (k, v) in pairs() {
        match k {
            "DEVNAME" if !v.is_empty() => devname = Some(devname_path(v)),
            "DEVLINKS" => devlinks = v,
            "ID_BUS" => usb_bus = v == "usb",
            _ => {}
        }
    }
    let devname = devname?;
    let by_id_link = devlinks.split_whitespace().map(Path::new).find(|l| {
        l.parent().is_some_and(|p| p.ends_with("serial/by-id"))
            && l.file_name()
                .and_then(OsStr::to_str)
                .is_some_and(|n| wire::names::check_link_name(n).is_ok())
    });
    if !usb_bus && by_id_link.is_none() {
        return None;
    }
    let ident = UdevIdentity::from_properties(pairs());
    let device = match by_id_link {
        Some(link) if ident.serial.is_some() => link.to_path_buf(),
        _ => devname,
    };
    Some(Adapter {
        id: syspath.to_string(),
        device,
        by_id: by_id_link
            .and_then(|l| l.file_name())
            .and_then(OsStr::to_str)
            .map(str::to_owned),
        serial: ident.serial,
        path: ident.path,
        usb: ident.usb,
    })
}

/// Applies one event to the map of known adapters and returns what to
/// report. `now` is the adapter the device is after the event (`None` for a
/// device that is not, or no longer, an adapter; ignored for `remove`).
pub fn apply(
    known: &mut BTreeMap<String, Adapter>,
    action: &str,
    syspath: &str,
    now: Option<Adapter>,
) -> Vec<SourceEvent> {
    let now = if action == "remove" { None } else { now };
    match (known.get(syspath), now) {
        (None, None) => vec![],
        (None, Some(a)) => {
            known.insert(syspath.to_string(), a.clone());
            vec![SourceEvent::Added(a)]
        }
        (Some(old), Some(a)) if *old == a => vec![],
        (Some(_), Some(a)) => {
            known.insert(syspath.to_string(), a.clone());
            vec![
                SourceEvent::Removed(syspath.to_string()),
                SourceEvent::Added(a),
            ]
        }
        (Some(_), None) => {
            known.remove(syspath);
            vec![SourceEvent::Removed(syspath.to_string())]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UsbId;

    const SYS: &str = "/sys/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/ttyUSB0/tty/ttyUSB0";
    const BY_ID: &str = "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0";

    fn ft232() -> Vec<(&'static str, &'static str)> {
        vec![
            ("DEVPATH", "/devices/pci0000:00/0000:00:14.0/usb1/1-2/1-2:1.0/ttyUSB0/tty/ttyUSB0"),
            ("DEVNAME", "/dev/ttyUSB0"),
            ("SUBSYSTEM", "tty"),
            ("ID_BUS", "usb"),
            ("ID_VENDOR_ID", "0403"),
            ("ID_MODEL_ID", "6001"),
            ("ID_SERIAL", "FTDI_FT232R_USB_UART_A1B2C3"),
            ("ID_SERIAL_SHORT", "A1B2C3"),
            ("ID_PATH", "pci-0000:00:14.0-usb-0:2:1.0"),
            (
                "DEVLINKS",
                "/dev/serial/by-path/pci-0000:00:14.0-usb-0:2:1.0-port0 /dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0",
            ),
        ]
    }

    #[test]
    fn usb_serial_adapter() {
        let a = adapter_from_properties(SYS, ft232()).unwrap();
        assert_eq!(
            a,
            Adapter {
                id: SYS.into(),
                device: BY_ID.into(),
                by_id: Some("usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0".into()),
                serial: Some("A1B2C3".into()),
                path: Some("pci-0000:00:14.0-usb-0:2:1.0".into()),
                usb: UsbId::parse("0403:6001"),
            }
        );
    }

    #[test]
    fn without_serial_the_node_is_opened() {
        let props = vec![
            ("DEVNAME", "/dev/ttyUSB1"),
            ("ID_BUS", "usb"),
            ("ID_VENDOR_ID", "1a86"),
            ("ID_MODEL_ID", "7523"),
            ("ID_SERIAL", "1a86_USB_Serial"),
            ("ID_PATH", "pci-0000:00:14.0-usb-0:4:1.0"),
            (
                "DEVLINKS",
                "/dev/serial/by-id/usb-1a86_USB_Serial-if00-port0 /dev/serial/by-path/pci-0000:00:14.0-usb-0:4:1.0-port0",
            ),
        ];
        let a = adapter_from_properties("/sys/x/ttyUSB1", props).unwrap();
        assert_eq!(a.device, PathBuf::from("/dev/ttyUSB1"));
        assert_eq!(a.by_id.as_deref(), Some("usb-1a86_USB_Serial-if00-port0"));
        assert_eq!(a.serial, None);
        assert_eq!(a.path.as_deref(), Some("pci-0000:00:14.0-usb-0:4:1.0"));
        assert_eq!(a.usb, UsbId::parse("1a86:7523"));
    }

    #[test]
    fn only_usb_serial_adapters() {
        // A built-in UART: no ID_BUS=usb, no by-id link.
        let uart = vec![
            ("DEVNAME", "/dev/ttyS0"),
            ("SUBSYSTEM", "tty"),
            ("ID_PATH", "platform-serial8250"),
        ];
        assert_eq!(
            adapter_from_properties("/sys/devices/platform/serial8250/tty/ttyS0", uart),
            None
        );
        // A virtual console: nothing at all.
        assert_eq!(
            adapter_from_properties("/sys/devices/virtual/tty/tty1", [("DEVNAME", "/dev/tty1")]),
            None
        );
        // ID_BUS=usb without a node: nothing to open.
        let no_node: Vec<_> = ft232()
            .into_iter()
            .filter(|(k, _)| *k != "DEVNAME")
            .collect();
        assert_eq!(adapter_from_properties(SYS, no_node), None);
        // A by-id link without ID_BUS (a rule set that does not import usb_id).
        let a = adapter_from_properties(
            "/sys/x",
            [
                ("DEVNAME", "ttyACM0"),
                (
                    "DEVLINKS",
                    "/dev/serial/by-id/usb-Raspberry_Pi_Pico_E66-if00",
                ),
            ],
        )
        .unwrap();
        assert_eq!(a.device, PathBuf::from("/dev/ttyACM0"));
        assert_eq!(a.by_id.as_deref(), Some("usb-Raspberry_Pi_Pico_E66-if00"));
        // ID_BUS=usb without links: the node.
        let a = adapter_from_properties("/sys/x", [("DEVNAME", "/dev/ttyUSB3"), ("ID_BUS", "usb")])
            .unwrap();
        assert_eq!((a.device, a.by_id), (PathBuf::from("/dev/ttyUSB3"), None));
    }

    #[test]
    fn identical_adapters_told_apart() {
        let with = |serial: &'static str, path: &'static str| {
            let mut p = ft232();
            for kv in &mut p {
                match kv.0 {
                    "ID_SERIAL_SHORT" => kv.1 = serial,
                    "ID_PATH" => kv.1 = path,
                    _ => {}
                }
            }
            p
        };
        let a = adapter_from_properties("/sys/a", with("S1", "p1")).unwrap();
        let b = adapter_from_properties("/sys/b", with("S2", "p1")).unwrap();
        let c = adapter_from_properties("/sys/c", with("S1", "p2")).unwrap();
        assert_ne!(a.serial, b.serial);
        assert_ne!(a.path, c.path);
        assert_ne!(a.id, b.id);
    }

    #[test]
    fn events_update_the_map() {
        let mut known = BTreeMap::new();
        let a = adapter_from_properties(SYS, ft232()).unwrap();
        assert_eq!(
            apply(&mut known, "add", SYS, Some(a.clone())),
            vec![SourceEvent::Added(a.clone())]
        );
        // Listed at start and then its add event: reported once.
        assert_eq!(apply(&mut known, "add", SYS, Some(a.clone())), vec![]);
        assert_eq!(apply(&mut known, "change", SYS, Some(a.clone())), vec![]);
        // A change of identity: removed, then added.
        let mut b = a.clone();
        b.path = Some("pci-0000:00:14.0-usb-0:9:1.0".into());
        assert_eq!(
            apply(&mut known, "change", SYS, Some(b.clone())),
            vec![
                SourceEvent::Removed(SYS.into()),
                SourceEvent::Added(b.clone())
            ]
        );
        // A change that makes it no adapter.
        assert_eq!(
            apply(&mut known, "change", SYS, None),
            vec![SourceEvent::Removed(SYS.into())]
        );
        assert!(known.is_empty());
        // Remove needs only the syspath, whatever the event carries.
        apply(&mut known, "add", SYS, Some(a.clone()));
        assert_eq!(
            apply(&mut known, "remove", SYS, Some(a.clone())),
            vec![SourceEvent::Removed(SYS.into())]
        );
        assert_eq!(apply(&mut known, "remove", SYS, None), vec![]);
        // Not adapters: nothing.
        assert_eq!(
            apply(&mut known, "add", "/sys/devices/virtual/tty/tty1", None),
            vec![]
        );
        assert!(known.is_empty());
    }
}
