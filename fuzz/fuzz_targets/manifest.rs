//! `ttys.json`, the index devshim reads from outside the container:
//! `Manifest::parse` never panics, and a manifest it accepts has version 1,
//! names that pass `check_name` / `check_link_name` (so socket and link names
//! are single path components), and survives `to_bytes` and parsing again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::manifest::Manifest;
use wire::names::{check_link_name, check_name};

fn one_component(name: &str) {
    assert!(
        !name.is_empty()
            && name != "."
            && name != ".."
            && !name.contains('/')
            && !name.contains('\0'),
        "{name:?} is not a single path component"
    );
}

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::parse(data) else {
        return;
    };
    assert_eq!(m.version, 1);
    for e in &m.ttys {
        assert_eq!(check_name(&e.board), Ok(()), "board {:?}", e.board);
        assert_eq!(check_name(&e.tty), Ok(()), "tty {:?}", e.tty);
        if let Some(l) = &e.by_id {
            assert_eq!(check_link_name(l), Ok(()), "by-id {l:?}");
            one_component(l);
        }
        one_component(&e.socket());
        one_component(&e.short_name());
    }
    assert_eq!(
        Manifest::parse(&m.to_bytes()).ok().as_ref(),
        Some(&m),
        "does not survive to_bytes"
    );
});
