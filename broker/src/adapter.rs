//! A USB serial adapter as a discovery source sees it, and how config
//! matches pick one.

use std::path::PathBuf;

use crate::config::{Match, UsbId};

/// One serial adapter that is present now. `/dev/ttyUSBn` numbers are never
/// part of its identity: they change on every replug.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adapter {
    /// Key of this presence: the syspath (udev) or the link path (by-id).
    pub id: String,
    /// The path the broker opens.
    pub device: PathBuf,
    /// Link name in `/dev/serial/by-id`.
    pub by_id: Option<String>,
    /// `ID_SERIAL_SHORT`.
    pub serial: Option<String>,
    /// `ID_PATH`.
    pub path: Option<String>,
    pub usb: Option<UsbId>,
}

impl Match {
    /// True when every key this match gives equals the adapter's.
    pub fn matches(&self, a: &Adapter) -> bool {
        fn eq<T: PartialEq>(want: &Option<T>, have: &Option<T>) -> bool {
            match want {
                None => true,
                Some(w) => have.as_ref() == Some(w),
            }
        }
        eq(&self.by_id, &a.by_id)
            && eq(&self.serial, &a.serial)
            && eq(&self.path, &a.path)
            && eq(&self.usb, &a.usb)
    }
}

/// Identity fields read from a udev database record (`/run/udev/data/cMAJ:MIN`)
/// or a uevent property list: lines `E:KEY=VALUE` or `KEY=VALUE`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct UdevIdentity {
    pub serial: Option<String>,
    pub path: Option<String>,
    pub usb: Option<UsbId>,
}

impl UdevIdentity {
    /// Parses the properties we identify adapters by.
    pub fn parse(text: &str) -> UdevIdentity {
        UdevIdentity::from_properties(
            text.lines()
                .filter_map(|l| l.strip_prefix("E:").unwrap_or(l).split_once('=')),
        )
    }

    /// Picks the properties we identify adapters by from `(KEY, VALUE)` pairs.
    pub fn from_properties<'a>(
        props: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> UdevIdentity {
        let mut id = UdevIdentity::default();
        let (mut vendor, mut model) = (None, None);
        for (k, v) in props {
            match k {
                "ID_SERIAL_SHORT" if !v.is_empty() => id.serial = Some(v.to_string()),
                "ID_PATH" if !v.is_empty() => id.path = Some(v.to_string()),
                "ID_VENDOR_ID" => vendor = u16::from_str_radix(v, 16).ok(),
                "ID_MODEL_ID" => model = u16::from_str_radix(v, 16).ok(),
                _ => {}
            }
        }
        if let (Some(vendor), Some(product)) = (vendor, model) {
            id.usb = Some(UsbId { vendor, product });
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udev_record() {
        let rec = "S:serial/by-id/usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0\nE:ID_VENDOR_ID=0403\nE:ID_MODEL_ID=6001\nE:ID_SERIAL_SHORT=A1B2C3\nE:ID_PATH=pci-0000:00:14.0-usb-0:2:1.0\n";
        let id = UdevIdentity::parse(rec);
        assert_eq!(id.serial.as_deref(), Some("A1B2C3"));
        assert_eq!(id.path.as_deref(), Some("pci-0000:00:14.0-usb-0:2:1.0"));
        assert_eq!(id.usb, UsbId::parse("0403:6001"));
    }

    #[test]
    fn all_keys_must_match() {
        let a = Adapter {
            id: "x".into(),
            device: "/dev/x".into(),
            by_id: Some("usb-a".into()),
            serial: Some("S1".into()),
            path: None,
            usb: UsbId::parse("0403:6001"),
        };
        assert!(Match {
            serial: Some("S1".into()),
            ..Default::default()
        }
        .matches(&a));
        assert!(!Match {
            serial: Some("S1".into()),
            path: Some("p".into()),
            ..Default::default()
        }
        .matches(&a));
        assert!(Match {
            usb: UsbId::parse("0403:6001"),
            by_id: Some("usb-a".into()),
            ..Default::default()
        }
        .matches(&a));
        assert!(!Match {
            usb: UsbId::parse("0403:6002"),
            ..Default::default()
        }
        .matches(&a));
    }
}
