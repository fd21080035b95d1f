//! The Telnet layer under RFC 2217: data escaping and a streaming decoder.
//!
//! The decoder is a pull parser: [`Decoder::feed`] returns the next event and
//! how many input bytes it consumed. Data events borrow the caller's buffer, so
//! a chunk without `0xFF` passes through without a copy — this sits on the
//! relay's hot path.

/// Interpret As Command.
pub const IAC: u8 = 255;
pub const DONT: u8 = 254;
pub const DO: u8 = 253;
pub const WONT: u8 = 252;
pub const WILL: u8 = 251;
/// Subnegotiation begin.
pub const SB: u8 = 250;
/// Subnegotiation end.
pub const SE: u8 = 240;
pub const NOP: u8 = 241;

/// Telnet option: binary transmission (RFC 856).
pub const OPT_BINARY: u8 = 0;
/// Telnet option: echo (RFC 857).
pub const OPT_ECHO: u8 = 1;
/// Telnet option: suppress go-ahead (RFC 858).
pub const OPT_SGA: u8 = 3;
/// Telnet option: COM-PORT-OPTION (RFC 2217).
pub const OPT_COM_PORT: u8 = 44;

/// Longest subnegotiation payload accepted. RFC 2217's longest is a
/// SIGNATURE text; anything longer is a broken or hostile peer.
pub const MAX_SUBNEG: usize = 512;

/// A negotiation verb: WILL, WONT, DO or DONT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verb {
    Will,
    Wont,
    Do,
    Dont,
}

impl Verb {
    fn from_byte(b: u8) -> Option<Verb> {
        match b {
            WILL => Some(Verb::Will),
            WONT => Some(Verb::Wont),
            DO => Some(Verb::Do),
            DONT => Some(Verb::Dont),
            _ => None,
        }
    }

    /// The byte of this verb on the wire.
    pub fn byte(self) -> u8 {
        match self {
            Verb::Will => WILL,
            Verb::Wont => WONT,
            Verb::Do => DO,
            Verb::Dont => DONT,
        }
    }
}

/// One thing found in a Telnet stream.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// Payload bytes, already unescaped.
    Data(&'a [u8]),
    /// `IAC <verb> <option>`.
    Negotiate(Verb, u8),
    /// `IAC SB <option> <payload> IAC SE`, payload unescaped.
    Subnegotiation(u8, Vec<u8>),
    /// Any other two-byte command (`IAC NOP`, `IAC BRK`, ...).
    Command(u8),
    /// A subnegotiation longer than [`MAX_SUBNEG`] or cut by a stray command;
    /// its bytes were dropped. The stream stays usable.
    Malformed(&'static str),
}

impl Event<'_> {
    /// The event, kept past the buffer it was decoded from: every event but
    /// data, which borrows the input (`None`).
    pub fn detached(self) -> Option<Event<'static>> {
        match self {
            Event::Data(_) => None,
            Event::Negotiate(v, o) => Some(Event::Negotiate(v, o)),
            Event::Subnegotiation(o, p) => Some(Event::Subnegotiation(o, p)),
            Event::Command(b) => Some(Event::Command(b)),
            Event::Malformed(why) => Some(Event::Malformed(why)),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Data,
    Iac,
    Verb(Verb),
    SbOption,
    Sb,
    SbIac,
}

/// Streaming Telnet decoder. Keeps state across chunks, so a command split
/// over two reads decodes the same as one in a single read.
#[derive(Debug)]
pub struct Decoder {
    state: State,
    sb_option: u8,
    sb: Vec<u8>,
    sb_overflow: bool,
}

impl Default for Decoder {
    fn default() -> Self {
        Self::new()
    }
}

static FF: [u8; 1] = [IAC];

/// Data events joined for one write: borrowed from the input while there
/// is one piece (no escaped `IAC`), copied into a reused buffer once there
/// are several.
pub struct DataRun<'a, 'b> {
    first: Option<&'a [u8]>,
    spill: &'b mut Vec<u8>,
}

impl<'a, 'b> DataRun<'a, 'b> {
    /// An empty run that copies into `spill` (cleared) when it must.
    pub fn new(spill: &'b mut Vec<u8>) -> DataRun<'a, 'b> {
        spill.clear();
        DataRun { first: None, spill }
    }

    fn push(&mut self, d: &'a [u8]) {
        if self.first.is_none() && self.spill.is_empty() {
            self.first = Some(d);
        } else {
            if let Some(f) = self.first.take() {
                self.spill.extend_from_slice(f);
            }
            self.spill.extend_from_slice(d);
        }
    }

    /// The data gathered.
    pub fn bytes(&self) -> &[u8] {
        self.first.unwrap_or(self.spill)
    }

    pub fn is_empty(&self) -> bool {
        self.bytes().is_empty()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        Decoder {
            state: State::Data,
            sb_option: 0,
            sb: Vec::new(),
            sb_overflow: false,
        }
    }

    /// Decodes from the start of `input` up to the first event that is not
    /// data, gathering the data before it (however many escaped `IAC`s cut
    /// it into pieces) into `run`: one write carries it all. Returns the
    /// bytes consumed and that event, if any.
    pub fn feed_run<'a>(
        &mut self,
        input: &'a [u8],
        run: &mut DataRun<'a, '_>,
    ) -> (usize, Option<Event<'a>>) {
        let mut used = 0;
        while used < input.len() {
            let (n, ev) = self.feed(&input[used..]);
            used += n;
            match ev {
                Some(Event::Data(d)) => run.push(d),
                None => {}
                other => return (used, other),
            }
        }
        (used, None)
    }

    /// Decodes from the start of `input`. Returns the bytes consumed and the
    /// event completed, if any. Call again with the rest until it is empty.
    pub fn feed<'a>(&mut self, input: &'a [u8]) -> (usize, Option<Event<'a>>) {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Data => {
                    let end = memchr::memchr(IAC, &input[i..]).map_or(input.len(), |p| i + p);
                    if end > i {
                        return (end, Some(Event::Data(&input[i..end])));
                    }
                    self.state = State::Iac;
                    i += 1;
                }
                State::Iac => {
                    i += 1;
                    self.state = State::Data;
                    match b {
                        IAC => return (i, Some(Event::Data(&FF))),
                        SB => self.state = State::SbOption,
                        _ => match Verb::from_byte(b) {
                            Some(v) => self.state = State::Verb(v),
                            None => return (i, Some(Event::Command(b))),
                        },
                    }
                }
                State::Verb(v) => {
                    self.state = State::Data;
                    return (i + 1, Some(Event::Negotiate(v, b)));
                }
                State::SbOption => {
                    self.sb_option = b;
                    self.sb.clear();
                    self.sb_overflow = false;
                    self.state = State::Sb;
                    i += 1;
                }
                State::Sb => {
                    let end = memchr::memchr(IAC, &input[i..]).map_or(input.len(), |p| i + p);
                    self.push_sb(&input[i..end]);
                    i = end;
                    if i < input.len() {
                        self.state = State::SbIac;
                        i += 1;
                    }
                }
                State::SbIac => {
                    i += 1;
                    match b {
                        IAC => {
                            self.push_sb(&[IAC]);
                            self.state = State::Sb;
                        }
                        SE => {
                            self.state = State::Data;
                            if self.sb_overflow {
                                return (i, Some(Event::Malformed("subnegotiation too long")));
                            }
                            let payload = std::mem::take(&mut self.sb);
                            return (i, Some(Event::Subnegotiation(self.sb_option, payload)));
                        }
                        _ => {
                            // RFC 854 leaves this undefined; treat it as the end of a
                            // broken subnegotiation and resume at the command. The
                            // command byte is consumed with the Malformed event, so a
                            // call always makes progress even when the byte starts
                            // the input: a verb or SB goes on as after IAC; any other
                            // command (IAC NOP, ...) would be a second event from
                            // one byte, and is dropped with the subnegotiation.
                            self.sb.clear();
                            self.state = match b {
                                SB => State::SbOption,
                                _ => Verb::from_byte(b).map_or(State::Data, State::Verb),
                            };
                            return (
                                i,
                                Some(Event::Malformed("subnegotiation not ended by IAC SE")),
                            );
                        }
                    }
                }
            }
        }
        (i, None)
    }

    fn push_sb(&mut self, bytes: &[u8]) {
        if self.sb.len() + bytes.len() > MAX_SUBNEG {
            self.sb_overflow = true;
        } else {
            self.sb.extend_from_slice(bytes);
        }
    }

    /// Decodes a whole buffer into owned events; for tests and cold paths.
    pub fn decode_all(&mut self, mut input: &[u8]) -> Vec<OwnedEvent> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let (used, ev) = self.feed(input);
            if let Some(ev) = ev {
                out.push(OwnedEvent::from(ev));
            }
            input = &input[used..];
        }
        // Merge adjacent data so callers see logical runs.
        let mut merged: Vec<OwnedEvent> = Vec::with_capacity(out.len());
        for ev in out {
            match (merged.last_mut(), ev) {
                (Some(OwnedEvent::Data(a)), OwnedEvent::Data(b)) => a.extend_from_slice(&b),
                (_, ev) => merged.push(ev),
            }
        }
        merged
    }
}

/// An [`Event`] that owns its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedEvent {
    Data(Vec<u8>),
    Negotiate(Verb, u8),
    Subnegotiation(u8, Vec<u8>),
    Command(u8),
    Malformed(&'static str),
}

impl From<Event<'_>> for OwnedEvent {
    fn from(ev: Event<'_>) -> Self {
        match ev {
            Event::Data(d) => OwnedEvent::Data(d.to_vec()),
            Event::Negotiate(v, o) => OwnedEvent::Negotiate(v, o),
            Event::Subnegotiation(o, p) => OwnedEvent::Subnegotiation(o, p),
            Event::Command(c) => OwnedEvent::Command(c),
            Event::Malformed(m) => OwnedEvent::Malformed(m),
        }
    }
}

/// Appends `data` to `out` with every `0xFF` doubled.
pub fn escape_into(data: &[u8], out: &mut Vec<u8>) {
    let mut rest = data;
    while let Some(p) = memchr::memchr(IAC, rest) {
        out.extend_from_slice(&rest[..=p]);
        out.push(IAC);
        rest = &rest[p + 1..];
    }
    out.extend_from_slice(rest);
}

/// True when `data` can go on the wire as it is.
pub fn needs_escape(data: &[u8]) -> bool {
    memchr::memchr(IAC, data).is_some()
}

/// Appends `IAC <verb> <option>`.
pub fn negotiate(verb: Verb, option: u8, out: &mut Vec<u8>) {
    out.extend_from_slice(&[IAC, verb.byte(), option]);
}

/// Appends `IAC SB <option> <payload, escaped> IAC SE`.
pub fn subnegotiation(option: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&[IAC, SB, option]);
    escape_into(payload, out);
    out.extend_from_slice(&[IAC, SE]);
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_run_joins_the_data_an_escaped_iac_cuts() {
        let mut dec = Decoder::new();
        let mut spill = Vec::new();
        let input = [b'a', IAC, IAC, b'b', IAC, IAC, IAC, NOP, b'c'];
        let mut run = DataRun::new(&mut spill);
        let (used, ev) = dec.feed_run(&input, &mut run);
        assert_eq!(run.bytes(), [b'a', 0xFF, b'b', 0xFF]);
        assert_eq!((used, ev), (8, Some(Event::Command(NOP))));
        let mut run = DataRun::new(&mut spill);
        let (used, ev) = dec.feed_run(&input[8..], &mut run);
        assert_eq!((run.bytes(), used, ev), (&b"c"[..], 1, None));
        // One piece is not copied.
        let plain = b"plain bytes";
        let mut run = DataRun::new(&mut spill);
        dec.feed_run(plain, &mut run);
        assert!(std::ptr::eq(run.bytes(), &plain[..]));
    }

    use super::*;

    fn all(input: &[u8]) -> Vec<OwnedEvent> {
        Decoder::new().decode_all(input)
    }

    #[test]
    fn plain_data_passes_whole() {
        let mut d = Decoder::new();
        let (n, ev) = d.feed(b"hello");
        assert_eq!(n, 5);
        assert_eq!(ev, Some(Event::Data(b"hello")));
    }

    #[test]
    fn doubled_iac_is_one_data_byte() {
        assert_eq!(
            all(&[1, IAC, IAC, 2]),
            vec![OwnedEvent::Data(vec![1, IAC, 2])]
        );
    }

    #[test]
    fn escape_doubles_iac() {
        let mut out = Vec::new();
        escape_into(&[IAC, 0, IAC, IAC], &mut out);
        assert_eq!(out, vec![IAC, IAC, 0, IAC, IAC, IAC, IAC]);
        assert_eq!(all(&out), vec![OwnedEvent::Data(vec![IAC, 0, IAC, IAC])]);
    }

    #[test]
    fn negotiation_between_data() {
        assert_eq!(
            all(&[b'a', IAC, WILL, OPT_COM_PORT, b'b']),
            vec![
                OwnedEvent::Data(b"a".to_vec()),
                OwnedEvent::Negotiate(Verb::Will, OPT_COM_PORT),
                OwnedEvent::Data(b"b".to_vec())
            ]
        );
    }

    #[test]
    fn subnegotiation_with_escaped_payload() {
        // RFC 2217 SET-BAUDRATE 0x0000FFFF: the 0xFF bytes are doubled on the wire.
        let wire = [IAC, SB, 44, 1, 0, 0, IAC, IAC, IAC, IAC, IAC, SE];
        assert_eq!(
            all(&wire),
            vec![OwnedEvent::Subnegotiation(44, vec![1, 0, 0, 0xFF, 0xFF])]
        );
    }

    #[test]
    fn split_anywhere_decodes_the_same() {
        let wire = [
            b'x', IAC, SB, 44, 1, 0, 1, IAC, IAC, 0, IAC, SE, IAC, IAC, b'y', IAC, DO, 0,
        ];
        let whole = all(&wire);
        for cut in 0..wire.len() {
            let mut d = Decoder::new();
            let mut got = d.decode_all(&wire[..cut]);
            got.extend(d.decode_all(&wire[cut..]));
            let mut merged: Vec<OwnedEvent> = Vec::new();
            for ev in got {
                match (merged.last_mut(), ev) {
                    (Some(OwnedEvent::Data(a)), OwnedEvent::Data(b)) => a.extend_from_slice(&b),
                    (_, ev) => merged.push(ev),
                }
            }
            assert_eq!(merged, whole, "cut at {cut}");
        }
    }

    #[test]
    fn overlong_subnegotiation_is_reported_and_stream_recovers() {
        let mut wire = vec![IAC, SB, 44, 0];
        wire.extend(std::iter::repeat_n(b'a', MAX_SUBNEG + 10));
        wire.extend_from_slice(&[IAC, SE, b'z']);
        assert_eq!(
            all(&wire),
            vec![
                OwnedEvent::Malformed("subnegotiation too long"),
                OwnedEvent::Data(b"z".to_vec())
            ]
        );
    }

    #[test]
    fn stray_command_inside_subnegotiation() {
        assert_eq!(
            all(&[IAC, SB, 44, 1, IAC, WILL, 0, b'q']),
            vec![
                OwnedEvent::Malformed("subnegotiation not ended by IAC SE"),
                OwnedEvent::Negotiate(Verb::Will, 0),
                OwnedEvent::Data(b"q".to_vec())
            ]
        );
    }

    #[test]
    fn stray_command_split_from_its_iac_still_makes_progress() {
        // Found by fuzz/ (target rfc2217): with the stray byte first in the
        // input, feed returned (0, Malformed).
        let wire = [IAC, SB, 44, 1, IAC, WILL, 0, IAC, SB, 44, 5, IAC, NOP, b'q'];
        let whole = all(&wire);
        assert_eq!(
            whole,
            vec![
                OwnedEvent::Malformed("subnegotiation not ended by IAC SE"),
                OwnedEvent::Negotiate(Verb::Will, 0),
                OwnedEvent::Malformed("subnegotiation not ended by IAC SE"),
                OwnedEvent::Data(b"q".to_vec())
            ]
        );
        let mut d = Decoder::new();
        let mut got = Vec::new();
        for b in wire.chunks(1) {
            let (used, ev) = d.feed(b);
            assert_eq!(used, 1, "{ev:?}");
            got.extend(ev.map(OwnedEvent::from));
        }
        assert_eq!(got, whole);
        // A stray SB starts a new subnegotiation.
        assert_eq!(
            all(&[IAC, SB, 44, 1, IAC, SB, 44, 8, IAC, SE]),
            vec![
                OwnedEvent::Malformed("subnegotiation not ended by IAC SE"),
                OwnedEvent::Subnegotiation(44, vec![8])
            ]
        );
    }

    #[test]
    fn other_commands() {
        assert_eq!(all(&[IAC, NOP]), vec![OwnedEvent::Command(NOP)]);
    }
}

/// Answers option negotiation for one end of an RFC 2217 link.
///
/// Each end agrees to BINARY and SGA both ways and to COM-PORT-OPTION in its
/// role, and refuses anything else. An answer is sent at most once per
/// option state, so two negotiators can't loop.
#[derive(Debug)]
pub struct Negotiator {
    /// True for the access server (answers `WILL COM-PORT-OPTION` with `DO`).
    server: bool,
    sent: Vec<(Verb, u8)>,
}

impl Negotiator {
    pub fn server() -> Negotiator {
        Negotiator {
            server: true,
            sent: Vec::new(),
        }
    }

    pub fn client() -> Negotiator {
        Negotiator {
            server: false,
            sent: Vec::new(),
        }
    }

    /// What this end sends first on a new connection.
    pub fn opening(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let first: &[(Verb, u8)] = if self.server {
            &[
                (Verb::Will, OPT_BINARY),
                (Verb::Do, OPT_BINARY),
                (Verb::Will, OPT_SGA),
                (Verb::Do, OPT_SGA),
                (Verb::Do, OPT_COM_PORT),
            ]
        } else {
            &[
                (Verb::Will, OPT_BINARY),
                (Verb::Do, OPT_BINARY),
                (Verb::Will, OPT_SGA),
                (Verb::Do, OPT_SGA),
                (Verb::Will, OPT_COM_PORT),
            ]
        };
        for &(v, o) in first {
            self.sent.push((v, o));
            negotiate(v, o, &mut out);
        }
        out
    }

    /// The reply to a peer's `IAC <verb> <option>`, if one is due.
    pub fn answer(&mut self, verb: Verb, option: u8) -> Option<(Verb, u8)> {
        let agree = match (verb, option) {
            (_, OPT_BINARY) | (_, OPT_SGA) => true,
            (Verb::Will, OPT_COM_PORT) | (Verb::Wont, OPT_COM_PORT) => self.server,
            (Verb::Do, OPT_COM_PORT) | (Verb::Dont, OPT_COM_PORT) => !self.server,
            _ => false,
        };
        let reply = match verb {
            Verb::Will => {
                if agree {
                    Verb::Do
                } else {
                    Verb::Dont
                }
            }
            Verb::Do => {
                if agree {
                    Verb::Will
                } else {
                    Verb::Wont
                }
            }
            Verb::Wont => Verb::Dont,
            Verb::Dont => Verb::Wont,
        };
        // Forget the opposite answer so a later change of mind is answered.
        let opposite = match reply {
            Verb::Will => Verb::Wont,
            Verb::Wont => Verb::Will,
            Verb::Do => Verb::Dont,
            Verb::Dont => Verb::Do,
        };
        if self.sent.contains(&(reply, option)) {
            return None;
        }
        self.sent.retain(|&s| s != (opposite, option));
        self.sent.push((reply, option));
        Some((reply, option))
    }
}

#[cfg(test)]
mod negotiator_tests {
    use super::*;

    #[test]
    fn server_and_client_settle_without_loops() {
        let mut s = Negotiator::server();
        let mut c = Negotiator::client();
        let mut to_c = s.opening();
        let mut to_s = c.opening();
        for _ in 0..10 {
            let mut next_c = Vec::new();
            for ev in Decoder::new().decode_all(&to_c) {
                if let OwnedEvent::Negotiate(v, o) = ev {
                    if let Some((rv, ro)) = c.answer(v, o) {
                        negotiate(rv, ro, &mut next_c);
                    }
                }
            }
            let mut next_s = Vec::new();
            for ev in Decoder::new().decode_all(&to_s) {
                if let OwnedEvent::Negotiate(v, o) = ev {
                    if let Some((rv, ro)) = s.answer(v, o) {
                        negotiate(rv, ro, &mut next_s);
                    }
                }
            }
            to_c = next_s;
            to_s = next_c;
        }
        assert!(
            to_c.is_empty() && to_s.is_empty(),
            "negotiation did not settle"
        );
    }

    #[test]
    fn refuses_unknown_options() {
        let mut s = Negotiator::server();
        assert_eq!(s.answer(Verb::Do, OPT_ECHO), Some((Verb::Wont, OPT_ECHO)));
        assert_eq!(s.answer(Verb::Do, OPT_ECHO), None);
        assert_eq!(
            s.answer(Verb::Will, OPT_COM_PORT),
            Some((Verb::Do, OPT_COM_PORT))
        );
        assert_eq!(s.answer(Verb::Will, 99), Some((Verb::Dont, 99)));
    }
}
