//! The broker's config: `config::parse` on any UTF-8 never panics; every
//! error points inside the text (line 1..=lines + 1, column 1..=that line's
//! characters + 1) and renders; an accepted config keeps the rules `validate`
//! promises (valid, unique names and socket files, non-empty matches that no
//! two ttys share, rates in range, valid machines).
#![no_main]

use std::collections::BTreeSet;
use std::path::Path;

use devbroker::config::{could_match_same, parse, Match};
use libfuzzer_sys::fuzz_target;
use wire::names::{check_link_name, check_name, socket_name};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(Path::new("fuzz.toml"), text) {
        Err(errs) => {
            assert!(!errs.0.is_empty(), "Err without errors");
            // Lines as line_col counts them: split at '\n' only ('\r' is a
            // character of its line).
            let lines: Vec<&str> = text.split('\n').collect();
            for e in &errs.0 {
                assert!(
                    e.line >= 1 && e.line <= lines.len(),
                    "line {} of a text of {} lines: {e}",
                    e.line,
                    lines.len()
                );
                let width = lines.get(e.line - 1).map_or(0, |l| l.chars().count());
                assert!(
                    e.col >= 1 && e.col <= width + 1,
                    "column {} of line {} ({width} characters): {e}",
                    e.col,
                    e.line
                );
                assert!(!e.message.is_empty());
                assert_eq!(e.file, Path::new("fuzz.toml"));
            }
            let _ = errs.to_string();
        }
        Ok(config) => {
            let mut boards = BTreeSet::new();
            let mut sockets = BTreeSet::new();
            let mut all: Vec<(&str, &str, &Match)> = Vec::new();
            for b in &config.boards {
                assert_eq!(check_name(&b.name), Ok(()), "board {:?}", b.name);
                assert!(boards.insert(&b.name), "board {:?} twice", b.name);
                assert!(!b.ttys.is_empty(), "board {:?} without ttys", b.name);
                let mut machines = BTreeSet::new();
                for m in &b.machines {
                    assert_eq!(check_name(m), Ok(()), "machine {m:?}");
                    assert!(machines.insert(m), "machine {m:?} twice on {:?}", b.name);
                }
                let mut ttys = BTreeSet::new();
                for t in &b.ttys {
                    assert_eq!(check_name(&t.name), Ok(()), "tty {:?}", t.name);
                    assert!(
                        ttys.insert(&t.name),
                        "tty {:?} twice on {:?}",
                        t.name,
                        b.name
                    );
                    let sock = socket_name(&b.name, &t.name);
                    assert!(sockets.insert(sock.clone()), "socket {sock:?} twice");
                    assert!((50..=20_000_000).contains(&t.rate), "rate {}", t.rate);
                    assert_ne!(t.matcher, Match::default(), "empty match accepted");
                    if let Some(l) = &t.matcher.by_id {
                        assert_eq!(check_link_name(l), Ok(()), "by-id {l:?}");
                    }
                    all.push((&b.name, &t.name, &t.matcher));
                }
            }
            for (i, a) in all.iter().enumerate() {
                for b in &all[..i] {
                    assert!(
                        !could_match_same(a.2, b.2),
                        "{}.{} and {}.{} can match the same adapter",
                        a.0,
                        a.1,
                        b.0,
                        b.1
                    );
                }
            }
            let mut machines = BTreeSet::new();
            for m in &config.machines {
                assert_eq!(check_name(&m.name), Ok(()), "machine {:?}", m.name);
                assert_eq!(devbroker::machine::name::check(&m.name), Ok(()));
                assert!(machines.insert(&m.name), "machine {:?} twice", m.name);
                assert!(m.tree.is_absolute(), "tree {:?}", m.tree);
                assert!(m.uid >= 1 && m.uid < 65534, "uid {}", m.uid);
            }
        }
    }
});
