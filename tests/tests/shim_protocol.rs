//! devshim against a scripted RFC 2217 server standing in for the broker:
//! what a tool does on its pty must arrive as the right commands.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devbroker_tests::*;
use wire::rfc2217::{control, purge, Command as Cmd, Direction};
use wire::telnet::{Decoder, Negotiator, OwnedEvent, OPT_COM_PORT};

struct Peer {
    sock: UnixStream,
    dec: Decoder,
    seen: Vec<OwnedEvent>,
}

impl Peer {
    /// Accepts devshim's session and opens negotiation as a server does.
    fn accept(l: &UnixListener) -> Peer {
        let (sock, _) = l.accept().unwrap();
        (&sock).write_all(&Negotiator::server().opening()).unwrap();
        Peer {
            sock,
            dec: Decoder::new(),
            seen: Vec::new(),
        }
    }

    /// Reads until `want` has been seen (data is merged), or panics.
    fn expect(&mut self, what: &str, mut want: impl FnMut(&[OwnedEvent]) -> bool) {
        let t0 = Instant::now();
        let mut buf = [0u8; 4096];
        while !want(&self.seen) {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "timed out waiting for {what}; seen {:?}",
                self.seen
            );
            self.sock
                .set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            match self.sock.read(&mut buf) {
                Ok(0) => panic!(
                    "devshim closed while waiting for {what}; seen {:?}",
                    self.seen
                ),
                Ok(n) => {
                    for ev in self.dec.decode_all(&buf[..n]) {
                        match (self.seen.last_mut(), ev) {
                            (Some(OwnedEvent::Data(a)), OwnedEvent::Data(b)) => {
                                a.extend_from_slice(&b)
                            }
                            (_, ev) => self.seen.push(ev),
                        }
                    }
                }
                Err(_) => {}
            }
        }
    }

    fn has(seen: &[OwnedEvent], cmd: &Cmd) -> bool {
        seen.iter().any(|e| matches!(e, OwnedEvent::Subnegotiation(OPT_COM_PORT, p) if Cmd::decode(p).ok() == Some((Direction::ClientToServer, cmd.clone()))))
    }

    fn expect_cmd(&mut self, cmd: Cmd) {
        let c = cmd.clone();
        self.expect(&format!("{cmd:?}"), move |s| Self::has(s, &c));
    }
}

/// A `devshim serve` with one tty, against a scripted broker.
struct Shim {
    _tmp: tempfile::TempDir,
    _control: UnixStream,
    tty_listener: UnixListener,
    shim: std::process::Child,
    link: std::path::PathBuf,
    state: std::path::PathBuf,
}

impl Shim {
    fn start() -> Shim {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("machine");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("ttys.json"),
            r#"{"version":1,"ttys":[{"board":"b","tty":"t","by_id":"usb-Test_X-if00","rate":115200}]}"#,
        )
        .unwrap();
        let tty_listener = UnixListener::bind(dir.join("b.t.sock")).unwrap();
        let control = UnixListener::bind(dir.join("control.sock")).unwrap();
        let ctl = std::thread::spawn(move || {
            let (s, _) = control.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            assert!(line.contains("\"hello\""), "{line}");
            (&s).write_all(b"{\"reply\":\"hello\",\"version\":1,\"server\":\"test\"}\n")
                .unwrap();
            s // keep the control connection open: the broker is "alive"
        });
        let guest = tmp.path().join("guest");
        let state = tmp.path().join("state");
        let shim = Command::new(devshim())
            .args(["serve", "--dir"])
            .arg(&dir)
            .arg("--link-root")
            .arg(&guest)
            .arg("--state-dir")
            .arg(&state)
            .args(["--user", &nix::unistd::getuid().to_string()])
            .die_with_parent()
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let link = guest.join("serial/by-id/usb-Test_X-if00");
        wait_for(Duration::from_secs(5), "the links", || {
            exists(&link) && exists(&guest.join("devbroker/b.t"))
        });
        Shim {
            _control: ctl.join().unwrap(),
            _tmp: tmp,
            tty_listener,
            shim,
            link,
            state,
        }
    }

    /// serve's line socket.
    fn line_socket(&self) -> std::path::PathBuf {
        devshim::linesock::path(&self.state, self.shim.id())
    }
}

impl Drop for Shim {
    fn drop(&mut self) {
        let _ = self.shim.kill();
        let _ = self.shim.wait();
    }
}

#[test]
fn tool_actions_become_rfc2217_commands() {
    let s = Shim::start();
    let (tty_listener, link) = (&s.tty_listener, &s.link);

    // A tool opens the pty: devshim connects, sends the line settings and raises DTR/RTS.
    let tool = Tool::open(link).unwrap();
    let mut p = Peer::accept(tty_listener);
    p.expect("WILL COM-PORT-OPTION", |s| {
        s.contains(&OwnedEvent::Negotiate(
            wire::telnet::Verb::Will,
            OPT_COM_PORT,
        ))
    });
    p.expect_cmd(Cmd::SetBaudRate(115200));
    p.expect_cmd(Cmd::SetDataSize(8));
    p.expect_cmd(Cmd::SetControl(control::DTR_ON));
    p.expect_cmd(Cmd::SetControl(control::RTS_ON));

    // Flushes become PURGE-DATA.
    // SAFETY: tcflush on the tool's open pty.
    assert_eq!(
        unsafe { libc::tcflush(tool.fd.as_raw_fd(), libc::TCIOFLUSH) },
        0
    );
    p.expect_cmd(Cmd::PurgeData(purge::RECEIVE));
    p.expect_cmd(Cmd::PurgeData(purge::TRANSMIT));

    // Bytes written before a baud change arrive before the change.
    tool.write_all(b"before").unwrap();
    let mut t = wire::termios::get(&tool.fd).unwrap();
    wire::termios::set_baud(&mut t, 460_800);
    wire::termios::set(&tool.fd, &t, wire::termios::When::Now).unwrap();
    p.expect_cmd(Cmd::SetBaudRate(460_800));
    let pos_data = p
        .seen
        .iter()
        .position(|e| matches!(e, OwnedEvent::Data(d) if d.ends_with(b"before")))
        .expect("data");
    let pos_baud = p.seen.iter().position(|e| matches!(e, OwnedEvent::Subnegotiation(44, pl) if pl[0] == 1 && pl[1..] == 460_800u32.to_be_bytes())).unwrap();
    assert!(
        pos_data < pos_baud,
        "data written before the change must come first: {:?}",
        p.seen
    );

    // 0xFF from the tool is escaped; from the server it is unescaped.
    tool.write_all(&[0xFF, b'z']).unwrap();
    p.expect("escaped 0xFF", |s| {
        s.iter()
            .any(|e| matches!(e, OwnedEvent::Data(d) if d.ends_with(&[0xFF, b'z'])))
    });
    // A malformed command from the server is skipped; data after it flows.
    (&p.sock)
        .write_all(&[255, 250, 44, 101, 0, 255, 240])
        .unwrap();
    (&p.sock).write_all(&[b'o', 255, 255, b'k']).unwrap();
    let got = read_exact_timeout(tool.fd.as_raw_fd(), 3, Duration::from_secs(3)).unwrap();
    assert_eq!(got, [b'o', 0xFF, b'k']);

    // The tool closes: DTR and RTS drop (HUPCL is set), devshim leaves.
    drop(tool);
    p.expect_cmd(Cmd::SetControl(control::DTR_OFF));
    p.expect_cmd(Cmd::SetControl(control::RTS_OFF));
    let mut b = [0u8; 16];
    p.sock
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    assert_eq!(
        p.sock.read(&mut b).unwrap(),
        0,
        "devshim ends the session when the tool closes"
    );
    drop(p);

    // The pty stays: a new tool gets a new session.
    let tool = Tool::open(link).unwrap();
    let mut p = Peer::accept(tty_listener);
    p.expect_cmd(Cmd::SetBaudRate(460_800));
    drop(tool);
}

/// The line socket takes requests from anyone (mode 0666): serve, root,
/// runs only the termios reads a `GetTermios` stands for, and breaks no
/// longer than a tool's call can ask.
#[test]
fn the_line_socket_refuses_requests_no_tool_call_makes() {
    use devshim::linecall::{LineRequest, TERMIOS2_LEN, TERMIOS_LEN};
    let s = Shim::start();
    let tool = Tool::open(&s.link).unwrap();
    let mut p = Peer::accept(&s.tty_listener);
    p.expect_cmd(Cmd::SetControl(control::RTS_ON));
    let before = wire::termios::get(&tool.fd).unwrap();
    let mut client = devshim::linesock::Client::new(s.line_socket());
    let mut ask = |req: LineRequest| {
        client
            .call(Ok(std::os::fd::AsFd::as_fd(&tool.fd)), &req)
            .unwrap()
    };

    // Not a termios read: a set (which would have cleared the tool's
    // settings), TIOCSTI (input pushed into the tool's tty as root), any
    // number.
    for req in [
        libc::TCSETS as u32,
        libc::TCSETSF2 as u32,
        libc::TIOCSTI as u32,
        libc::TIOCMGET as u32,
        0xdead_beef,
    ] {
        let r = ask(LineRequest::GetTermios { req });
        assert_eq!(r.errno, libc::EINVAL, "GetTermios {req:#x}: {r:?}");
        assert_eq!(r.termios, None, "GetTermios {req:#x}");
    }
    let after = wire::termios::get(&tool.fd).unwrap();
    assert_eq!(
        (after.c_cflag, after.c_ospeed, after.c_lflag),
        (before.c_cflag, before.c_ospeed, before.c_lflag),
        "the tool's settings were changed"
    );
    assert!(
        read_exact_timeout(tool.fd.as_raw_fd(), 1, Duration::from_millis(300)).is_err(),
        "something was pushed into the tool's input"
    );

    // The reads a tool's TCGETS/TCGETS2 make still work.
    for (req, len) in [(libc::TCGETS, TERMIOS_LEN), (libc::TCGETS2, TERMIOS2_LEN)] {
        let r = ask(LineRequest::GetTermios { req: req as u32 });
        assert_eq!(r.errno, 0, "{r:?}");
        let t = r.termios.expect("the pty's settings");
        assert_eq!(t.len(), len);
        assert_eq!(
            devshim::linecall::cflag_of(&t),
            Some(before.c_cflag),
            "{req:#x}"
        );
    }

    // A break longer than a tool's TCSBRKP can ask (60 s) is refused
    // without touching the line.
    let r = ask(LineRequest::TimedBreak { ms: 3_600_000 });
    assert_eq!(r.errno, libc::EINVAL, "{r:?}");
    let until = Instant::now() + Duration::from_millis(300);
    p.expect("a moment", |_| Instant::now() >= until);
    assert!(
        !Peer::has(&p.seen, &Cmd::SetControl(control::BREAK_ON)),
        "{:?}",
        p.seen
    );
}
