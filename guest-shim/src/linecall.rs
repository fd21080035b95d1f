//! A tool's line-control call on a devshim pty — an ioctl request and its
//! argument — and what it means for the real port. Pure: the supervisor
//! ([`crate::supervise`]) does the I/O, the tty actor ([`crate::tty`]) turns
//! a [`LineRequest`] into RFC 2217 commands with [`modem_change`].
//!
//! A pty answers `ENOTTY` to `TIOCM*`, ignores breaks and forces 8 data bits
//! without parity (it clears `CSIZE` and `PARENB`, keeps `PARODD`, `CMSPAR`,
//! `CSTOPB` and `CRTSCTS`). These are the calls that need the supervisor.

use serde::{Deserialize, Serialize};
use wire::termios::Layout;

/// The requests the seccomp filter sends to the supervisor.
pub const REQUESTS: &[u32] = &[
    libc::TIOCMGET as u32,
    libc::TIOCMSET as u32,
    libc::TIOCMBIS as u32,
    libc::TIOCMBIC as u32,
    libc::TIOCSBRK as u32,
    libc::TIOCCBRK as u32,
    libc::TCSBRK as u32,
    libc::TCSBRKP as u32,
    libc::TCSETS as u32,
    libc::TCSETSW as u32,
    libc::TCSETSF as u32,
    libc::TCSETS2 as u32,
    libc::TCSETSW2 as u32,
    libc::TCSETSF2 as u32,
    libc::TCGETS as u32,
    libc::TCGETS2 as u32,
];

/// The kernel's `struct termios` (what `TCGETS`/`TCSETS` carry; not glibc's).
pub const TERMIOS_LEN: usize = Layout::Termios.size();
/// `struct termios2`.
pub const TERMIOS2_LEN: usize = Layout::Termios2.size();
/// The longest break a tool's call asks for: `TCSBRKP` counts tenths of a
/// second, and is cut at a minute here. serve refuses longer ones.
pub const MAX_BREAK_MS: u32 = 60_000;
/// Offset of `c_cflag` in both.
pub const CFLAG_OFFSET: usize = 8;

/// The framing bits a pty drops or a UART needs told: data size and parity.
/// (`CSTOPB` and `CRTSCTS` survive on the pty and reach the port through the
/// packet-mode settings path.)
pub const FRAMING: libc::tcflag_t = libc::CSIZE | libc::PARENB | libc::PARODD | libc::CMSPAR;

/// What a notified ioctl asks, once the descriptor is known to be a devshim pty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// `TIOCMGET`: write the modem bits (an int) to `out`.
    GetModem { out: u64 },
    /// `TIOCMSET`/`TIOCMBIS`/`TIOCMBIC`: read an int at `from`.
    SetModem { op: ModemOp, from: u64 },
    /// `TIOCSBRK` (true) / `TIOCCBRK` (false).
    Break(bool),
    /// `TCSBRK(0)`, `TCSBRKP`: a break of this many ms.
    TimedBreak(u32),
    /// `TCSBRK(non-zero)`: `tcdrain`.
    Drain,
    /// `TCSETS*`: the struct of `len` bytes at `from`, applied with `req`.
    SetTermios { req: u32, from: u64, len: usize },
    /// `TCGETS*`: fill the struct of `len` bytes at `out`.
    GetTermios { req: u32, out: u64, len: usize },
}

/// How `TIOCMSET`/`TIOCMBIS`/`TIOCMBIC` combine their argument with the bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModemOp {
    Set,
    Bis,
    Bic,
}

/// Reads a notified ioctl: `None` for a request this module does not handle.
pub fn classify(req: u32, arg: u64) -> Option<Call> {
    let r = req as libc::c_ulong;
    Some(match r {
        libc::TIOCMGET => Call::GetModem { out: arg },
        libc::TIOCMSET => Call::SetModem {
            op: ModemOp::Set,
            from: arg,
        },
        libc::TIOCMBIS => Call::SetModem {
            op: ModemOp::Bis,
            from: arg,
        },
        libc::TIOCMBIC => Call::SetModem {
            op: ModemOp::Bic,
            from: arg,
        },
        libc::TIOCSBRK => Call::Break(true),
        libc::TIOCCBRK => Call::Break(false),
        // As the kernel: TCSBRK(0) is a 0.25 s break, anything else tcdrain;
        // TCSBRKP(n) is n tenths of a second, 0 meaning 0.25 s.
        libc::TCSBRK if arg as u32 == 0 => Call::TimedBreak(250),
        libc::TCSBRK => Call::Drain,
        libc::TCSBRKP => Call::TimedBreak(match arg as u32 {
            0 => 250,
            n => n.min(MAX_BREAK_MS / 100) * 100,
        }),
        libc::TCSETS | libc::TCSETSW | libc::TCSETSF => Call::SetTermios {
            req,
            from: arg,
            len: TERMIOS_LEN,
        },
        libc::TCSETS2 | libc::TCSETSW2 | libc::TCSETSF2 => Call::SetTermios {
            req,
            from: arg,
            len: TERMIOS2_LEN,
        },
        libc::TCGETS => Call::GetTermios {
            req,
            out: arg,
            len: TERMIOS_LEN,
        },
        libc::TCGETS2 => Call::GetTermios {
            req,
            out: arg,
            len: TERMIOS2_LEN,
        },
        _ => return None,
    })
}

/// What the supervisor asks `devshim serve` for one pty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "call", rename_all = "kebab-case")]
pub enum LineRequest {
    /// The modem bits now: DTR and RTS as last set, CTS, DSR, RI and CD as
    /// the port reports them.
    GetModem,
    /// Sets DTR/RTS (`TIOCM_DTR`/`TIOCM_RTS` of `bits`) as `op` says.
    Modem {
        op: ModemOp,
        bits: i32,
    },
    Break {
        on: bool,
    },
    TimedBreak {
        ms: u32,
    },
    /// Everything written so far has reached the port.
    Drain,
    /// The tool's `TCSETS*` (`req`) with its struct: serve applies it to
    /// the pty and keeps the data size and parity the pty drops.
    SetTermios {
        req: u32,
        termios: Vec<u8>,
    },
    /// The tool's `TCGETS*` (`req`): the pty's settings with those put back.
    GetTermios {
        req: u32,
    },
}

/// Which process's descriptor a request is about, when the supervisor
/// could not get a duplicate of it to send (`pidfd_getfd` denied, as by
/// systemd-nspawn's seccomp filter): serve then checks for itself that
/// process `pid` has the pty open as `fd`, and that the asker is it (same
/// uid) or root.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    pub pid: u32,
    pub fd: i32,
}

/// One packet on the line socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packet {
    pub request: LineRequest,
    /// Set when no descriptor came with the packet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Target>,
}

/// `devshim serve`'s answer, once the port has what was asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct LineReply {
    /// 0, or the errno the tool's call fails with.
    pub errno: i32,
    /// The modem bits after the request (`TIOCM_*`).
    pub modem: i32,
    /// For `GetTermios`: the struct to give the tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub termios: Option<Vec<u8>>,
    /// Why it failed, for the supervisor's warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub why: Option<String>,
}

/// The length of the struct a `TCGETS*`/`TCSETS*` request carries.
pub fn termios_len(req: u32) -> Option<usize> {
    match req as libc::c_ulong {
        libc::TCGETS | libc::TCSETS | libc::TCSETSW | libc::TCSETSF => Some(TERMIOS_LEN),
        libc::TCGETS2 | libc::TCSETS2 | libc::TCSETSW2 | libc::TCSETSF2 => Some(TERMIOS2_LEN),
        _ => None,
    }
}

/// How serve applies a tool's `TCSETS*` on its own side of the pty, after
/// moving out everything the tool wrote (so the output is drained): a plain
/// set of the same struct, and whether to discard the tool's input first
/// (`TCSETSF*`).
pub fn set_after_drain(req: u32) -> Option<(Layout, bool)> {
    Some(match req as libc::c_ulong {
        libc::TCSETS | libc::TCSETSW => (Layout::Termios, false),
        libc::TCSETSF => (Layout::Termios, true),
        libc::TCSETS2 | libc::TCSETSW2 => (Layout::Termios2, false),
        libc::TCSETSF2 => (Layout::Termios2, true),
        _ => return None,
    })
}

/// The DTR/RTS a modem request leaves, from the present ones: `(dtr, rts)`,
/// and which of the two it names (those are sent to the port, changed or
/// not, as a UART driver writes its modem control register).
pub fn modem_change(op: ModemOp, bits: i32, dtr: bool, rts: bool) -> ((bool, bool), (bool, bool)) {
    let d = bits & libc::TIOCM_DTR != 0;
    let r = bits & libc::TIOCM_RTS != 0;
    match op {
        ModemOp::Set => ((d, r), (true, true)),
        ModemOp::Bis => ((dtr || d, rts || r), (d, r)),
        ModemOp::Bic => ((dtr && !d, rts && !r), (d, r)),
    }
}

/// Whether RTS is written before DTR when a request changes both: a UART
/// writes them in one register write, RFC 2217 in two commands, so the line
/// passes through one of the two mixed states for a moment. It is kept out
/// of DTR off + RTS on — the state that holds an ESP32 (EN low through the
/// common auto-reset circuit) or a board wired like it in reset — unless
/// that is where the line goes.
pub fn rts_first(from: (bool, bool), to: (bool, bool)) -> bool {
    let dtr_first_passes = (to.0, from.1);
    dtr_first_passes == (false, true) && to != (false, true)
}

/// The `TIOCM_*` bits from DTR/RTS and RFC 2217 modem state (CTS, DSR, RI, CD).
pub fn modem_bits(dtr: bool, rts: bool, modemstate: u8) -> i32 {
    use wire::rfc2217::modemstate as ms;
    let mut b = 0;
    for (on, bit) in [
        (dtr, libc::TIOCM_DTR),
        (rts, libc::TIOCM_RTS),
        (modemstate & ms::CTS != 0, libc::TIOCM_CTS),
        (modemstate & ms::DSR != 0, libc::TIOCM_DSR),
        (modemstate & ms::RI != 0, libc::TIOCM_RI),
        (modemstate & ms::CD != 0, libc::TIOCM_CD),
    ] {
        if on {
            b |= bit;
        }
    }
    b
}

/// A `c_cflag` as the pty would report it, with the tool's framing put back.
pub fn patch_cflag(cflag: u32, framing: Option<u32>) -> u32 {
    match framing {
        Some(f) => (cflag & !FRAMING) | (f & FRAMING),
        None => cflag,
    }
}

/// Reads `c_cflag` out of a termios struct's bytes.
pub fn cflag_of(termios: &[u8]) -> Option<u32> {
    termios
        .get(CFLAG_OFFSET..CFLAG_OFFSET + 4)
        .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
}

/// Puts `cflag` into a termios struct's bytes.
pub fn set_cflag(termios: &mut [u8], cflag: u32) {
    termios[CFLAG_OFFSET..CFLAG_OFFSET + 4].copy_from_slice(&cflag.to_ne_bytes());
}

/// Line settings as the tool asked them: the pty's (rate, stop bits, flow)
/// with the tool's data size and parity, which the pty dropped.
pub fn with_framing(
    mut s: wire::rfc2217::LineSettings,
    framing: Option<u32>,
) -> wire::rfc2217::LineSettings {
    if let Some(f) = framing {
        let t = wire::termios::to_settings(&libc::termios2 {
            c_iflag: 0,
            c_oflag: 0,
            c_cflag: f,
            c_lflag: 0,
            c_line: 0,
            c_cc: [0; 19],
            c_ispeed: 0,
            c_ospeed: 0,
        });
        s.data_size = t.data_size;
        s.parity = t.parity;
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use wire::rfc2217::{modemstate, parity};

    #[test]
    fn requests_as_the_kernel_reads_them() {
        assert_eq!(
            classify(libc::TCSBRK as u32, 0),
            Some(Call::TimedBreak(250))
        );
        assert_eq!(classify(libc::TCSBRK as u32, 1), Some(Call::Drain));
        assert_eq!(
            classify(libc::TCSBRKP as u32, 0),
            Some(Call::TimedBreak(250))
        );
        assert_eq!(
            classify(libc::TCSBRKP as u32, 3),
            Some(Call::TimedBreak(300))
        );
        assert_eq!(
            classify(libc::TCSBRKP as u32, u32::MAX.into()),
            Some(Call::TimedBreak(MAX_BREAK_MS))
        );
        assert_eq!(
            classify(libc::TIOCMBIS as u32, 0x1000),
            Some(Call::SetModem {
                op: ModemOp::Bis,
                from: 0x1000
            })
        );
        assert_eq!(
            classify(libc::TCSETSW as u32, 8),
            Some(Call::SetTermios {
                req: libc::TCSETSW as u32,
                from: 8,
                len: 36
            })
        );
        assert_eq!(
            classify(libc::TCGETS2 as u32, 8),
            Some(Call::GetTermios {
                req: libc::TCGETS2 as u32,
                out: 8,
                len: 44
            })
        );
        assert_eq!(classify(libc::TIOCINQ as u32, 0), None);
        // Every request the filter sends here is understood.
        for r in REQUESTS {
            assert!(classify(*r, 0).is_some(), "{r:#x}");
        }
    }

    #[test]
    fn modem_requests_combine_as_a_uart_does() {
        let (dtr, rts) = (libc::TIOCM_DTR, libc::TIOCM_RTS);
        // TIOCMSET sets both, named or not.
        assert_eq!(
            modem_change(ModemOp::Set, dtr, false, true),
            ((true, false), (true, true))
        );
        // TIOCMBIS/BIC touch only what they name.
        assert_eq!(
            modem_change(ModemOp::Bis, rts, false, false),
            ((false, true), (false, true))
        );
        assert_eq!(
            modem_change(ModemOp::Bic, dtr, true, true),
            ((false, true), (true, false))
        );
        assert_eq!(
            modem_change(ModemOp::Bic, 0, true, true),
            ((true, true), (false, false))
        );
        // Input bits in the argument are ignored.
        assert_eq!(
            modem_change(ModemOp::Set, libc::TIOCM_CTS, true, true),
            ((false, false), (true, true))
        );
    }

    #[test]
    fn termios_requests_and_their_structs() {
        assert_eq!(termios_len(libc::TCGETS as u32), Some(36));
        assert_eq!(termios_len(libc::TCSETSF2 as u32), Some(44));
        assert_eq!(termios_len(libc::TIOCMGET as u32), None);
        assert_eq!(
            set_after_drain(libc::TCSETSW as u32),
            Some((Layout::Termios, false))
        );
        assert_eq!(
            set_after_drain(libc::TCSETSF2 as u32),
            Some((Layout::Termios2, true))
        );
        assert_eq!(set_after_drain(libc::TCGETS as u32), None);
    }

    #[test]
    fn packets_on_the_wire() {
        let p = Packet {
            request: LineRequest::Modem {
                op: ModemOp::Bis,
                bits: libc::TIOCM_DTR,
            },
            target: None,
        };
        let text = serde_json::to_string(&p).unwrap();
        assert_eq!(text, r#"{"request":{"call":"modem","op":"Bis","bits":2}}"#);
        assert_eq!(serde_json::from_str::<Packet>(&text).unwrap(), p);
    }

    #[test]
    fn replies_read_by_supervisors_of_the_release_before() {
        // That release's reply had a `framing` no supervisor read; it
        // takes a reply without it as `None`, and a reply with it is read
        // now as before.
        #[derive(Deserialize)]
        struct Before {
            errno: i32,
            modem: i32,
            framing: Option<u32>,
        }
        let r = LineReply {
            errno: 0,
            modem: libc::TIOCM_DTR,
            ..LineReply::default()
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"errno":0,"modem":2}"#);
        let b: Before = serde_json::from_str(&text).unwrap();
        assert_eq!((b.errno, b.modem, b.framing), (0, libc::TIOCM_DTR, None));
        let old = r#"{"errno":5,"modem":0,"framing":48,"why":"the tty is gone"}"#;
        let now: LineReply = serde_json::from_str(old).unwrap();
        assert_eq!(
            (now.errno, now.why.as_deref()),
            (5, Some("the tty is gone"))
        );
    }

    #[test]
    fn a_two_line_change_avoids_holding_the_chip_in_reset() {
        // (DTR, RTS): both on to both off goes through DTR on, RTS off.
        assert!(rts_first((true, true), (false, false)));
        // Both off to both on goes through DTR on, RTS off too.
        assert!(!rts_first((false, false), (true, true)));
        // esptool's release from reset with IO0 low: either way is safe.
        assert!(!rts_first((false, true), (true, false)));
        // Into reset on purpose.
        assert!(!rts_first((true, false), (false, true)));
    }

    #[test]
    fn modem_bits_from_lines_and_modem_state() {
        assert_eq!(modem_bits(true, false, 0), libc::TIOCM_DTR);
        assert_eq!(
            modem_bits(
                false,
                true,
                modemstate::CTS | modemstate::CD | modemstate::DELTA_CTS
            ),
            libc::TIOCM_RTS | libc::TIOCM_CTS | libc::TIOCM_CD
        );
        assert_eq!(
            modem_bits(false, false, modemstate::DSR | modemstate::RI),
            libc::TIOCM_DSR | libc::TIOCM_RI
        );
    }

    #[test]
    fn framing_is_put_back_into_what_the_pty_reports() {
        let pty = libc::CS8 | libc::CREAD | libc::HUPCL | libc::CSTOPB;
        let tool = libc::CS7 | libc::PARENB | libc::CREAD;
        assert_eq!(
            patch_cflag(pty, Some(tool & FRAMING)),
            libc::CS7 | libc::PARENB | libc::CREAD | libc::HUPCL | libc::CSTOPB
        );
        assert_eq!(patch_cflag(pty, None), pty);
        let mut b = [0u8; TERMIOS_LEN];
        set_cflag(&mut b, tool);
        assert_eq!(cflag_of(&b), Some(tool));
        assert_eq!(cflag_of(&b[..10]), None);
        let s = wire::rfc2217::LineSettings {
            baud: 9600,
            data_size: 8,
            parity: parity::NONE,
            stop_size: 2,
            flow: 1,
        };
        let m = with_framing(
            s,
            Some(libc::CS7 | libc::PARENB | libc::PARODD | libc::CMSPAR),
        );
        assert_eq!(
            (m.data_size, m.parity, m.baud, m.stop_size),
            (7, parity::MARK, 9600, 2)
        );
        assert_eq!(with_framing(s, None), s);
    }
}
