//! DTR and RTS as the emulated FT232 received them, read from QEMU's
//! `usb_serial_*` trace: the only place they show, since QEMU passes modem
//! control to its host tty (a pty) where it is lost.
//!
//! The FTDI driver sets the lines with the vendor request SET_MODEM_CTRL
//! (0x4001); its value carries a mask of the lines it changes in the high
//! byte (DTR 0x01, RTS 0x02) and their new levels in the low byte: 0x303 is
//! "DTR and RTS on", 0x100 "DTR off".

/// One SET_MODEM_CTRL request: the lines it sets, to what.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModemCtrl {
    pub dtr: Option<bool>,
    pub rts: Option<bool>,
}

const SET_MODEM_CTRL: &str = "got control 0x4001, value 0x";

/// The SET_MODEM_CTRL requests in `trace`, in order.
pub fn modem_ctrl(trace: &str) -> Vec<ModemCtrl> {
    trace
        .lines()
        .filter_map(|l| {
            let hex = &l[l.find(SET_MODEM_CTRL)? + SET_MODEM_CTRL.len()..];
            let hex: String = hex.chars().take_while(char::is_ascii_hexdigit).collect();
            let v = u32::from_str_radix(&hex, 16).ok()?;
            let line = |mask: u32| (v & (mask << 8) != 0).then_some(v & mask != 0);
            Some(ModemCtrl {
                dtr: line(0x01),
                rts: line(0x02),
            })
        })
        .collect()
}

/// DTR and RTS after `requests`, starting from `start`: what the device's
/// lines are now.
pub fn levels(start: ModemCtrl, requests: &[ModemCtrl]) -> ModemCtrl {
    requests.iter().fold(start, |now, r| ModemCtrl {
        dtr: r.dtr.or(now.dtr),
        rts: r.rts.or(now.rts),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_set_modem_ctrl_requests() {
        let trace = "usb_serial_handle_control dev 0:1 got control 0x8006, value 0x100\n\
                     usb_serial_handle_control dev 0:1 got control 0x4001, value 0x303\n\
                     1234@1.5:usb_serial_handle_control dev 0:1 got control 0x4001, value 0x100\n\
                     usb_serial_handle_control dev 0:1 got control 0x4001, value 0x200\n";
        let r = modem_ctrl(trace);
        assert_eq!(
            r,
            vec![
                ModemCtrl {
                    dtr: Some(true),
                    rts: Some(true)
                },
                ModemCtrl {
                    dtr: Some(false),
                    rts: None
                },
                ModemCtrl {
                    dtr: None,
                    rts: Some(false)
                },
            ]
        );
        assert_eq!(
            levels(ModemCtrl::default(), &r[..2]),
            ModemCtrl {
                dtr: Some(false),
                rts: Some(true)
            }
        );
        assert_eq!(
            levels(ModemCtrl::default(), &r),
            ModemCtrl {
                dtr: Some(false),
                rts: Some(false)
            }
        );
    }
}
