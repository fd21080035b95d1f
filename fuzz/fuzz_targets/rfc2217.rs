//! The Telnet decoder and the RFC 2217 commands inside it.
//!
//! Input: one control byte `k`, then `k % 16` chunk lengths (each byte + 1),
//! then the Telnet stream. The stream is decoded whole, one byte at a time,
//! in chunks of the given lengths (cycled), and, when short, cut once at every
//! position. Checked:
//! - `feed` never panics, consumes 1..=len bytes of a non-empty input, and
//!   never returns an empty Data event;
//! - every way of cutting the stream gives the same events once adjacent
//!   Data events are merged, and `decode_all` gives them too;
//! - every `Subnegotiation(44, payload)` goes through `Command::decode`, and a
//!   decoded `(dir, cmd)` encodes (`to_bytes(dir)`) to one subnegotiation
//!   whose payload is the same and decodes to the same `(dir, cmd)`;
//! - the events, encoded again, decode to the same events (Malformed aside).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::rfc2217::Command;
use wire::telnet::{self, Decoder, OwnedEvent, IAC, MAX_SUBNEG, OPT_COM_PORT};

fn merge(events: impl IntoIterator<Item = OwnedEvent>) -> Vec<OwnedEvent> {
    let mut out: Vec<OwnedEvent> = Vec::new();
    for ev in events {
        match (out.last_mut(), ev) {
            (Some(OwnedEvent::Data(a)), OwnedEvent::Data(b)) => a.extend_from_slice(&b),
            (_, ev) => out.push(ev),
        }
    }
    out
}

/// Feeds `chunk` to `dec` until it is used up, checking each call.
fn feed_chunk(dec: &mut Decoder, mut chunk: &[u8], out: &mut Vec<OwnedEvent>) {
    while !chunk.is_empty() {
        let (used, ev) = dec.feed(chunk);
        assert!(
            used >= 1 && used <= chunk.len(),
            "feed consumed {used} of {} bytes ({chunk:02x?}) and returned {ev:?}",
            chunk.len()
        );
        if let Some(ev) = ev {
            if let telnet::Event::Data(d) = &ev {
                assert!(!d.is_empty(), "empty Data event");
            }
            out.push(OwnedEvent::from(ev));
        }
        chunk = &chunk[used..];
    }
    // An empty input is a no-op.
    let (used, ev) = dec.feed(&[]);
    assert_eq!((used, ev), (0, None), "feed of an empty input");
}

/// Decodes `stream` cut into chunks of the lengths in `lens`, cycled.
fn decode_in_chunks(stream: &[u8], lens: &[usize]) -> Vec<OwnedEvent> {
    let mut dec = Decoder::new();
    let mut out = Vec::new();
    let mut rest = stream;
    for &n in lens.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        feed_chunk(&mut dec, chunk, &mut out);
        rest = tail;
    }
    merge(out)
}

fn check_command(payload: &[u8]) {
    let Ok((dir, cmd)) = Command::decode(payload) else {
        return;
    };
    if payload.len() > MAX_SUBNEG {
        return; // only reachable by calling decode directly; too long to send
    }
    let bytes = cmd.to_bytes(dir);
    let evs = Decoder::new().decode_all(&bytes);
    match &evs[..] {
        [OwnedEvent::Subnegotiation(OPT_COM_PORT, p)] => {
            assert_eq!(p, payload, "{cmd:?} ({dir:?}) encodes another payload");
            assert_eq!(
                Command::decode(p),
                Ok((dir, cmd.clone())),
                "{cmd:?} ({dir:?}) does not decode back"
            );
        }
        other => panic!("{cmd:?} ({dir:?}) encodes to {bytes:02x?}, which decodes to {other:?}"),
    }
}

/// The wire form of an event, for the re-encoding check.
fn encode(ev: &OwnedEvent, out: &mut Vec<u8>) {
    match ev {
        OwnedEvent::Data(d) => telnet::escape_into(d, out),
        OwnedEvent::Negotiate(v, o) => telnet::negotiate(*v, *o, out),
        OwnedEvent::Subnegotiation(o, p) => telnet::subnegotiation(*o, p, out),
        OwnedEvent::Command(c) => out.extend_from_slice(&[IAC, *c]),
        OwnedEvent::Malformed(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let k = usize::from(k % 16).min(rest.len());
    let (lens, stream) = rest.split_at(k);
    let lens: Vec<usize> = lens.iter().map(|&b| usize::from(b) + 1).collect();

    let whole = decode_in_chunks(stream, &[usize::MAX]);
    assert_eq!(
        Decoder::new().decode_all(stream),
        whole,
        "decode_all differs from feed"
    );
    assert_eq!(
        decode_in_chunks(stream, &[1]),
        whole,
        "byte by byte differs"
    );
    if !lens.is_empty() {
        assert_eq!(
            decode_in_chunks(stream, &lens),
            whole,
            "chunks of {lens:?} differ"
        );
    }
    if stream.len() <= 64 {
        for cut in 1..stream.len() {
            let mut dec = Decoder::new();
            let mut out = Vec::new();
            feed_chunk(&mut dec, &stream[..cut], &mut out);
            feed_chunk(&mut dec, &stream[cut..], &mut out);
            assert_eq!(merge(out), whole, "cut at {cut} differs");
        }
    }

    for ev in &whole {
        if let OwnedEvent::Subnegotiation(OPT_COM_PORT, payload) = ev {
            assert!(payload.len() <= MAX_SUBNEG);
            check_command(payload);
        }
    }
    // The decoder of commands on its own, with any payload.
    check_command(stream);

    let mut again = Vec::new();
    for ev in &whole {
        encode(ev, &mut again);
    }
    let without_malformed = || {
        merge(
            whole
                .iter()
                .filter(|e| !matches!(e, OwnedEvent::Malformed(_)))
                .cloned(),
        )
    };
    assert_eq!(
        Decoder::new().decode_all(&again),
        without_malformed(),
        "events encoded again as {again:02x?} decode differently"
    );
});
