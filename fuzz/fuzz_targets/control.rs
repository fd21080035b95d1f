//! Control-socket lines: `parse_request` on any bytes never panics, and a
//! request it accepts, written again with `request_line`, parses back equal
//! (without its newline, as the broker hands lines over, and with it). The
//! same for replies, which devshim and `devbroker status` parse.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::control::{parse_request, reply_line, request_line, Reply};

fn one_line(line: &[u8]) -> &[u8] {
    assert_eq!(line.last(), Some(&b'\n'), "line without a newline");
    let text = &line[..line.len() - 1];
    assert!(
        !text.contains(&b'\n'),
        "newline inside {:?}",
        String::from_utf8_lossy(line)
    );
    text
}

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_request(data) {
        let line = request_line(&req);
        let text = one_line(&line);
        assert_eq!(
            parse_request(text).ok().as_ref(),
            Some(&req),
            "{:?} written as {:?}",
            String::from_utf8_lossy(data),
            String::from_utf8_lossy(text)
        );
        assert_eq!(parse_request(&line).ok().as_ref(), Some(&req));
    }
    if let Ok(reply) = serde_json::from_slice::<Reply>(data) {
        let line = reply_line(&reply);
        let text = one_line(&line);
        assert_eq!(
            serde_json::from_slice::<Reply>(text).ok().as_ref(),
            Some(&reply),
            "{:?} written as {:?}",
            String::from_utf8_lossy(data),
            String::from_utf8_lossy(text)
        );
    }
});
