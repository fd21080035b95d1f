//! RFC 2217 COM-PORT-OPTION messages, carried in Telnet subnegotiations of
//! option 44.
//!
//! Client-to-server commands have codes 0–12; the server answers each with
//! the same command plus 100, carrying the value now in force. Value 0 of
//! SET-BAUDRATE, -DATASIZE, -PARITY, -STOPSIZE and a few SET-CONTROL values is
//! a query.

use crate::telnet::{self, OPT_COM_PORT};

pub const SIGNATURE: u8 = 0;
pub const SET_BAUDRATE: u8 = 1;
pub const SET_DATASIZE: u8 = 2;
pub const SET_PARITY: u8 = 3;
pub const SET_STOPSIZE: u8 = 4;
pub const SET_CONTROL: u8 = 5;
pub const NOTIFY_LINESTATE: u8 = 6;
pub const NOTIFY_MODEMSTATE: u8 = 7;
pub const FLOWCONTROL_SUSPEND: u8 = 8;
pub const FLOWCONTROL_RESUME: u8 = 9;
pub const SET_LINESTATE_MASK: u8 = 10;
pub const SET_MODEMSTATE_MASK: u8 = 11;
pub const PURGE_DATA: u8 = 12;
/// Added to a command code in the server's messages.
pub const SERVER_OFFSET: u8 = 100;

/// Parity values of SET-PARITY.
pub mod parity {
    pub const REQUEST: u8 = 0;
    pub const NONE: u8 = 1;
    pub const ODD: u8 = 2;
    pub const EVEN: u8 = 3;
    pub const MARK: u8 = 4;
    pub const SPACE: u8 = 5;
}

/// Stop bit values of SET-STOPSIZE.
pub mod stopsize {
    pub const REQUEST: u8 = 0;
    pub const ONE: u8 = 1;
    pub const TWO: u8 = 2;
    pub const ONE_AND_HALF: u8 = 3;
}

/// Values of SET-CONTROL.
pub mod control {
    pub const FLOW_REQUEST: u8 = 0;
    pub const FLOW_NONE: u8 = 1;
    pub const FLOW_XONXOFF: u8 = 2;
    pub const FLOW_HARDWARE: u8 = 3;
    pub const BREAK_REQUEST: u8 = 4;
    pub const BREAK_ON: u8 = 5;
    pub const BREAK_OFF: u8 = 6;
    pub const DTR_REQUEST: u8 = 7;
    pub const DTR_ON: u8 = 8;
    pub const DTR_OFF: u8 = 9;
    pub const RTS_REQUEST: u8 = 10;
    pub const RTS_ON: u8 = 11;
    pub const RTS_OFF: u8 = 12;
    pub const INBOUND_FLOW_REQUEST: u8 = 13;
    pub const INBOUND_FLOW_NONE: u8 = 14;
    pub const INBOUND_FLOW_XONXOFF: u8 = 15;
    pub const INBOUND_FLOW_HARDWARE: u8 = 16;
    pub const FLOW_DCD: u8 = 17;
    pub const INBOUND_FLOW_DTR: u8 = 18;
    pub const FLOW_DSR: u8 = 19;
}

/// Values of PURGE-DATA.
pub mod purge {
    /// Purge the access server's receive buffer (data from the board).
    pub const RECEIVE: u8 = 1;
    /// Purge the access server's transmit buffer (data to the board).
    pub const TRANSMIT: u8 = 2;
    pub const BOTH: u8 = 3;
}

/// Bits of NOTIFY-MODEMSTATE.
pub mod modemstate {
    pub const CD: u8 = 0x80;
    pub const RI: u8 = 0x40;
    pub const DSR: u8 = 0x20;
    pub const CTS: u8 = 0x10;
    pub const DELTA_CD: u8 = 0x08;
    pub const TRAILING_RI: u8 = 0x04;
    pub const DELTA_DSR: u8 = 0x02;
    pub const DELTA_CTS: u8 = 0x01;
}

/// Bits of NOTIFY-LINESTATE.
pub mod linestate {
    pub const TIMEOUT: u8 = 0x80;
    pub const TSRE: u8 = 0x40;
    pub const THRE: u8 = 0x20;
    pub const BREAK: u8 = 0x10;
    pub const FRAMING: u8 = 0x08;
    pub const PARITY: u8 = 0x04;
    pub const OVERRUN: u8 = 0x02;
    pub const DATA_READY: u8 = 0x01;
}

/// One COM-PORT-OPTION command, the same shape in both directions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Free text naming the peer; empty asks the other side for its own.
    Signature(Vec<u8>),
    SetBaudRate(u32),
    SetDataSize(u8),
    SetParity(u8),
    SetStopSize(u8),
    SetControl(u8),
    NotifyLineState(u8),
    NotifyModemState(u8),
    FlowControlSuspend,
    FlowControlResume,
    SetLineStateMask(u8),
    SetModemStateMask(u8),
    PurgeData(u8),
}

/// The tool holding a guest pty, as devshim names it to the broker in a
/// client SIGNATURE (`tool pid=1234 comm=esptool.py`): `status` then names
/// the tool rather than devshim. Untrusted text from a machine: parsing
/// keeps only a positive pid and a short, printable name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolSignature {
    /// Its pid in the client's pid namespace.
    pub pid: i32,
    /// Its command name (`/proc/PID/comm`).
    pub comm: String,
}

impl ToolSignature {
    /// Longest name kept.
    pub const MAX_COMM: usize = 32;

    pub fn to_bytes(&self) -> Vec<u8> {
        format!("tool pid={} comm={}", self.pid, self.comm).into_bytes()
    }

    /// Reads one; `None` for any other signature.
    pub fn parse(b: &[u8]) -> Option<ToolSignature> {
        let text = std::str::from_utf8(b).ok()?;
        let rest = text.strip_prefix("tool pid=")?;
        let (pid, comm) = rest.split_once(" comm=")?;
        let pid: i32 = pid.parse().ok().filter(|p| *p > 0)?;
        let comm: String = comm
            .chars()
            .take(Self::MAX_COMM)
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        Some(ToolSignature { pid, comm })
    }
}

/// Who sent a message: the code space differs by 100.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

/// Why a COM-PORT-OPTION payload could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad RFC 2217 message: {}", self.0)
    }
}

impl std::error::Error for DecodeError {}

impl Command {
    /// The client-side code of this command.
    pub fn code(&self) -> u8 {
        match self {
            Command::Signature(_) => SIGNATURE,
            Command::SetBaudRate(_) => SET_BAUDRATE,
            Command::SetDataSize(_) => SET_DATASIZE,
            Command::SetParity(_) => SET_PARITY,
            Command::SetStopSize(_) => SET_STOPSIZE,
            Command::SetControl(_) => SET_CONTROL,
            Command::NotifyLineState(_) => NOTIFY_LINESTATE,
            Command::NotifyModemState(_) => NOTIFY_MODEMSTATE,
            Command::FlowControlSuspend => FLOWCONTROL_SUSPEND,
            Command::FlowControlResume => FLOWCONTROL_RESUME,
            Command::SetLineStateMask(_) => SET_LINESTATE_MASK,
            Command::SetModemStateMask(_) => SET_MODEMSTATE_MASK,
            Command::PurgeData(_) => PURGE_DATA,
        }
    }

    /// Parses the payload of an option-44 subnegotiation.
    pub fn decode(payload: &[u8]) -> Result<(Direction, Command), DecodeError> {
        let (&code, value) = payload
            .split_first()
            .ok_or_else(|| DecodeError("empty subnegotiation".into()))?;
        let (dir, code) = if code >= SERVER_OFFSET {
            (Direction::ServerToClient, code - SERVER_OFFSET)
        } else {
            (Direction::ClientToServer, code)
        };
        let byte = |name: &str| -> Result<u8, DecodeError> {
            match value {
                [v] => Ok(*v),
                _ => Err(DecodeError(format!(
                    "{name} takes 1 byte, got {}",
                    value.len()
                ))),
            }
        };
        let none = |name: &str| -> Result<(), DecodeError> {
            if value.is_empty() {
                Ok(())
            } else {
                Err(DecodeError(format!(
                    "{name} takes no value, got {} bytes",
                    value.len()
                )))
            }
        };
        let cmd = match code {
            SIGNATURE => Command::Signature(value.to_vec()),
            SET_BAUDRATE => match value {
                [a, b, c, d] => Command::SetBaudRate(u32::from_be_bytes([*a, *b, *c, *d])),
                _ => {
                    return Err(DecodeError(format!(
                        "SET-BAUDRATE takes 4 bytes, got {}",
                        value.len()
                    )))
                }
            },
            SET_DATASIZE => Command::SetDataSize(byte("SET-DATASIZE")?),
            SET_PARITY => Command::SetParity(byte("SET-PARITY")?),
            SET_STOPSIZE => Command::SetStopSize(byte("SET-STOPSIZE")?),
            SET_CONTROL => Command::SetControl(byte("SET-CONTROL")?),
            NOTIFY_LINESTATE => Command::NotifyLineState(byte("NOTIFY-LINESTATE")?),
            NOTIFY_MODEMSTATE => Command::NotifyModemState(byte("NOTIFY-MODEMSTATE")?),
            FLOWCONTROL_SUSPEND => {
                none("FLOWCONTROL-SUSPEND")?;
                Command::FlowControlSuspend
            }
            FLOWCONTROL_RESUME => {
                none("FLOWCONTROL-RESUME")?;
                Command::FlowControlResume
            }
            SET_LINESTATE_MASK => Command::SetLineStateMask(byte("SET-LINESTATE-MASK")?),
            SET_MODEMSTATE_MASK => Command::SetModemStateMask(byte("SET-MODEMSTATE-MASK")?),
            PURGE_DATA => Command::PurgeData(byte("PURGE-DATA")?),
            other => {
                return Err(DecodeError(format!(
                    "unknown command code {}",
                    other as u16
                        + if dir == Direction::ServerToClient {
                            100
                        } else {
                            0
                        }
                )))
            }
        };
        Ok((dir, cmd))
    }

    /// Appends the whole subnegotiation (`IAC SB 44 ... IAC SE`) to `out`.
    pub fn encode(&self, dir: Direction, out: &mut Vec<u8>) {
        let code = match dir {
            Direction::ClientToServer => self.code(),
            Direction::ServerToClient => self.code() + SERVER_OFFSET,
        };
        let mut payload = Vec::with_capacity(8);
        payload.push(code);
        match self {
            Command::Signature(s) => payload.extend_from_slice(s),
            Command::SetBaudRate(b) => payload.extend_from_slice(&b.to_be_bytes()),
            Command::SetDataSize(v)
            | Command::SetParity(v)
            | Command::SetStopSize(v)
            | Command::SetControl(v)
            | Command::NotifyLineState(v)
            | Command::NotifyModemState(v)
            | Command::SetLineStateMask(v)
            | Command::SetModemStateMask(v)
            | Command::PurgeData(v) => payload.push(*v),
            Command::FlowControlSuspend | Command::FlowControlResume => {}
        }
        telnet::subnegotiation(OPT_COM_PORT, &payload, out);
    }

    /// The encoded bytes, for tests and cold paths.
    pub fn to_bytes(&self, dir: Direction) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(dir, &mut v);
        v
    }
}

/// The serial line settings a tool asked for, in RFC 2217's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineSettings {
    pub baud: u32,
    /// 5 to 8.
    pub data_size: u8,
    /// One of [`parity`].
    pub parity: u8,
    /// One of [`stopsize`].
    pub stop_size: u8,
    /// [`control::FLOW_NONE`], [`control::FLOW_XONXOFF`] or [`control::FLOW_HARDWARE`].
    pub flow: u8,
}

impl LineSettings {
    /// The commands that set these settings, for a session's start.
    pub fn commands(&self) -> [Command; 5] {
        [
            Command::SetBaudRate(self.baud),
            Command::SetDataSize(self.data_size),
            Command::SetParity(self.parity),
            Command::SetStopSize(self.stop_size),
            Command::SetControl(self.flow),
        ]
    }

    /// The commands needed to go from `self` to `new`, in wire order.
    pub fn changes_to(&self, new: &LineSettings) -> Vec<Command> {
        let mut v = Vec::new();
        if self.baud != new.baud {
            v.push(Command::SetBaudRate(new.baud));
        }
        if self.data_size != new.data_size {
            v.push(Command::SetDataSize(new.data_size));
        }
        if self.parity != new.parity {
            v.push(Command::SetParity(new.parity));
        }
        if self.stop_size != new.stop_size {
            v.push(Command::SetStopSize(new.stop_size));
        }
        if self.flow != new.flow {
            v.push(Command::SetControl(new.flow));
        }
        v
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn tool_signatures() {
        let t = ToolSignature {
            pid: 42,
            comm: "esp tool.py".into(),
        };
        assert_eq!(ToolSignature::parse(&t.to_bytes()), Some(t));
        assert_eq!(ToolSignature::parse(b"tool pid=0 comm=x"), None);
        assert_eq!(ToolSignature::parse(b"tool pid=-3 comm=x"), None);
        assert_eq!(ToolSignature::parse(b"devshim 0.1"), None);
        let odd = ToolSignature::parse(b"tool pid=7 comm=a\x1b[2Jb").unwrap();
        assert_eq!(odd.comm, "a?[2Jb");
        let long = ToolSignature::parse(format!("tool pid=7 comm={}", "x".repeat(500)).as_bytes());
        assert_eq!(long.unwrap().comm.len(), ToolSignature::MAX_COMM);
    }
    use super::*;
    use crate::telnet::{Decoder, OwnedEvent, IAC, SB, SE};

    fn roundtrip(cmd: Command, dir: Direction, wire: &[u8]) {
        let bytes = cmd.to_bytes(dir);
        assert_eq!(bytes, wire, "encoding of {cmd:?}");
        let evs = Decoder::new().decode_all(&bytes);
        match &evs[..] {
            [OwnedEvent::Subnegotiation(44, p)] => {
                assert_eq!(Command::decode(p).unwrap(), (dir, cmd))
            }
            other => panic!("{other:?}"),
        }
    }

    // Byte sequences written out from RFC 2217, section "Com Port Configuration
    // Commands" (client codes) and their server replies (code + 100).
    #[test]
    fn rfc_byte_sequences() {
        use Direction::*;
        // IAC SB COM-PORT-OPTION SET-BAUDRATE <value(4)> IAC SE; 115200 = 0x0001C200
        roundtrip(
            Command::SetBaudRate(115200),
            ClientToServer,
            &[IAC, SB, 44, 1, 0, 1, 0xC2, 0, IAC, SE],
        );
        roundtrip(
            Command::SetBaudRate(115200),
            ServerToClient,
            &[IAC, SB, 44, 101, 0, 1, 0xC2, 0, IAC, SE],
        );
        // A value with 0xFF in it is escaped: 65535 = 0x0000FFFF.
        roundtrip(
            Command::SetBaudRate(65535),
            ClientToServer,
            &[IAC, SB, 44, 1, 0, 0, IAC, IAC, IAC, IAC, IAC, SE],
        );
        roundtrip(
            Command::SetDataSize(8),
            ClientToServer,
            &[IAC, SB, 44, 2, 8, IAC, SE],
        );
        roundtrip(
            Command::SetDataSize(7),
            ServerToClient,
            &[IAC, SB, 44, 102, 7, IAC, SE],
        );
        roundtrip(
            Command::SetParity(parity::EVEN),
            ClientToServer,
            &[IAC, SB, 44, 3, 3, IAC, SE],
        );
        roundtrip(
            Command::SetParity(parity::NONE),
            ServerToClient,
            &[IAC, SB, 44, 103, 1, IAC, SE],
        );
        roundtrip(
            Command::SetStopSize(stopsize::TWO),
            ClientToServer,
            &[IAC, SB, 44, 4, 2, IAC, SE],
        );
        roundtrip(
            Command::SetStopSize(stopsize::ONE),
            ServerToClient,
            &[IAC, SB, 44, 104, 1, IAC, SE],
        );
        roundtrip(
            Command::SetControl(control::DTR_ON),
            ClientToServer,
            &[IAC, SB, 44, 5, 8, IAC, SE],
        );
        roundtrip(
            Command::SetControl(control::RTS_OFF),
            ServerToClient,
            &[IAC, SB, 44, 105, 12, IAC, SE],
        );
        roundtrip(
            Command::SetControl(control::BREAK_ON),
            ClientToServer,
            &[IAC, SB, 44, 5, 5, IAC, SE],
        );
        roundtrip(
            Command::NotifyLineState(linestate::THRE | linestate::TSRE),
            ServerToClient,
            &[IAC, SB, 44, 106, 0x60, IAC, SE],
        );
        roundtrip(
            Command::NotifyModemState(modemstate::CTS | modemstate::DSR),
            ServerToClient,
            &[IAC, SB, 44, 107, 0x30, IAC, SE],
        );
        roundtrip(
            Command::FlowControlSuspend,
            ClientToServer,
            &[IAC, SB, 44, 8, IAC, SE],
        );
        roundtrip(
            Command::FlowControlResume,
            ServerToClient,
            &[IAC, SB, 44, 109, IAC, SE],
        );
        roundtrip(
            Command::SetLineStateMask(0),
            ClientToServer,
            &[IAC, SB, 44, 10, 0, IAC, SE],
        );
        roundtrip(
            Command::SetModemStateMask(0xFF),
            ServerToClient,
            &[IAC, SB, 44, 111, IAC, IAC, IAC, SE],
        );
        roundtrip(
            Command::PurgeData(purge::BOTH),
            ClientToServer,
            &[IAC, SB, 44, 12, 3, IAC, SE],
        );
        roundtrip(
            Command::PurgeData(purge::RECEIVE),
            ServerToClient,
            &[IAC, SB, 44, 112, 1, IAC, SE],
        );
        roundtrip(
            Command::Signature(b"devbroker".to_vec()),
            ServerToClient,
            &[
                IAC, SB, 44, 100, b'd', b'e', b'v', b'b', b'r', b'o', b'k', b'e', b'r', IAC, SE,
            ],
        );
        roundtrip(
            Command::Signature(vec![]),
            ClientToServer,
            &[IAC, SB, 44, 0, IAC, SE],
        );
    }

    #[test]
    fn bad_payloads_are_errors() {
        assert!(Command::decode(&[]).is_err());
        assert_eq!(
            Command::decode(&[1, 0, 1]).unwrap_err().0,
            "SET-BAUDRATE takes 4 bytes, got 2"
        );
        assert!(Command::decode(&[2]).is_err());
        assert!(Command::decode(&[8, 1]).is_err());
        assert_eq!(
            Command::decode(&[13, 0]).unwrap_err().0,
            "unknown command code 13"
        );
        assert_eq!(
            Command::decode(&[113]).unwrap_err().0,
            "unknown command code 113"
        );
    }

    #[test]
    fn settings_diff() {
        let a = LineSettings {
            baud: 115200,
            data_size: 8,
            parity: parity::NONE,
            stop_size: stopsize::ONE,
            flow: control::FLOW_NONE,
        };
        let b = LineSettings { baud: 460800, ..a };
        assert_eq!(a.changes_to(&b), vec![Command::SetBaudRate(460800)]);
        assert!(a.changes_to(&a).is_empty());
    }
}
