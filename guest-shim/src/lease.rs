//! `devshim lease` (and `sai-device`): wait for a board, run a command with
//! its ttys, give the board back.
//!
//! The lease lives as long as this process's connection to the broker's
//! control socket, so a job that crashes or is killed releases its board
//! too. While it waits it says where it stands; once granted it waits for
//! `devshim serve` to publish the board's links, exports their paths and
//! RFC 2217 endpoints, runs the command with signals forwarded, and returns
//! its exit status.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wire::control::{request_line, GrantedTty, Reply, Request, VERSION};
use wire::manifest::CONTROL_SOCKET;

use crate::ports;

/// Exit status when no board could be had (as sysexits' EX_TEMPFAIL).
pub const EXIT_NO_BOARD: u8 = 75;
/// Exit status for bad usage or a refused request.
pub const EXIT_USAGE: u8 = 2;

/// A parsed lease command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseArgs {
    /// A board name (`--board`), else a type.
    pub board: Option<String>,
    pub kind: Option<String>,
    pub wait: Option<Duration>,
    /// `ENV=IDX`: export ENV as the path of tty IDX.
    pub aliases: Vec<(String, usize)>,
    pub command: Vec<String>,
}

fn alias(arg: &str) -> Option<(String, usize)> {
    let (k, v) = arg.split_once('=')?;
    let ok = k
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    Some((k.to_string(), v.parse().ok().filter(|_| ok)?))
}

/// Parses Sai's `sai-device TYPE [ENV=IDX ...] CMD...`.
pub fn parse_sai_device(args: &[String]) -> Result<LeaseArgs, String> {
    let usage = "usage: sai-device TYPE [ENV=IDX ...] COMMAND [ARGS...]";
    let (kind, rest) = args.split_first().ok_or(usage)?;
    let mut aliases = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        match alias(&rest[i]) {
            Some(a) => aliases.push(a),
            None => break,
        }
        i += 1;
    }
    if i == rest.len() {
        return Err(format!("no command given; {usage}"));
    }
    Ok(LeaseArgs {
        board: None,
        kind: Some(kind.clone()),
        wait: None,
        aliases,
        command: rest[i..].to_vec(),
    })
}

/// Splits `[ENV=IDX ...] [--] CMD...` (what follows `devshim lease`'s flags).
pub fn split_aliases(rest: &[String]) -> Result<(Vec<(String, usize)>, Vec<String>), String> {
    let mut aliases = Vec::new();
    let mut i = 0;
    while i < rest.len() {
        if rest[i] == "--" {
            i += 1;
            break;
        }
        match alias(&rest[i]) {
            Some(a) => aliases.push(a),
            None => break,
        }
        i += 1;
    }
    if i >= rest.len() {
        return Err("no command given: devshim lease [--board NAME | TYPE] [ENV=IDX ...] -- COMMAND [ARGS...]".into());
    }
    Ok((aliases, rest[i..].to_vec()))
}

/// The guest path of a granted tty.
pub fn guest_path(link_root: &Path, board: &str, t: &GrantedTty) -> PathBuf {
    match &t.by_id {
        Some(b) => link_root.join("serial/by-id").join(b),
        None => link_root
            .join("devbroker")
            .join(format!("{board}.{}", t.tty)),
    }
}

/// The environment a command gets: `SAI_DEVICE_TTY<n>`,
/// `SAI_DEVICE_RFC2217_<n>` (for the ttys with a known endpoint port) and
/// the aliases.
pub fn environment(
    board: &str,
    paths: &[PathBuf],
    endpoints: &[Option<u16>],
    aliases: &[(String, usize)],
) -> Result<Vec<(String, String)>, String> {
    let mut env = vec![("SAI_DEVICE_BOARD".to_string(), board.to_string())];
    for (i, p) in paths.iter().enumerate() {
        env.push((format!("SAI_DEVICE_TTY{i}"), p.display().to_string()));
        if let Some(Some(port)) = endpoints.get(i) {
            env.push((format!("SAI_DEVICE_RFC2217_{i}"), ports::url(*port)));
        }
    }
    for (k, idx) in aliases {
        let p = paths.get(*idx).ok_or_else(|| {
            format!(
                "{k}={idx}: board {board} has {} ttys (0..{})",
                paths.len(),
                paths.len().saturating_sub(1)
            )
        })?;
        env.push((k.clone(), p.display().to_string()));
    }
    Ok(env)
}

/// The RFC 2217 port of each of `links`, from the state file in
/// `state_dir`. `devshim serve` writes a tty's entry before it publishes its
/// links, so once the links exist the entries normally do too; they are
/// waited for until `deadline`. A tty without one is reported and gets no
/// `SAI_DEVICE_RFC2217_<n>`: the job may well not need it.
pub fn endpoints(state_dir: &Path, links: &[PathBuf], deadline: Instant) -> Vec<Option<u16>> {
    let file = ports::path(state_dir);
    loop {
        let (found, why) = match ports::read(state_dir) {
            Ok(p) => {
                let found: Vec<Option<u16>> =
                    links.iter().map(|l| p.by_link(l).map(|e| e.port)).collect();
                (found, format!("{} has no entry for it", file.display()))
            }
            // No state file at all: that devshim serve keeps none here.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                (vec![None; links.len()], format!("{}: {e}", file.display()))
            }
            Err(e) => (vec![None; links.len()], e.to_string()),
        };
        let gave_up =
            found.iter().any(Option::is_none) && (Instant::now() >= deadline || !file.exists());
        if found.iter().all(Option::is_some) || gave_up {
            for (l, f) in links.iter().zip(&found) {
                if f.is_none() {
                    eprintln!(
                        "devshim: no RFC 2217 endpoint for {} ({why}; is devshim serve running with --state-dir {}?)",
                        l.display(),
                        state_dir.display()
                    );
                }
            }
            return found;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Runs a lease to completion; returns the exit status to leave with.
pub fn run(args: &LeaseArgs, dir: &Path, link_root: &Path, state_dir: &Path) -> u8 {
    match run_inner(args, dir, link_root, state_dir) {
        Ok(code) => code,
        Err((code, msg)) => {
            eprintln!("devshim: {msg}");
            code
        }
    }
}

fn run_inner(
    args: &LeaseArgs,
    dir: &Path,
    link_root: &Path,
    state_dir: &Path,
) -> Result<u8, (u8, String)> {
    let control = dir.join(CONTROL_SOCKET);
    let sock = UnixStream::connect(&control).map_err(|e| {
        (EXIT_NO_BOARD, format!("can't reach the broker at {}: {e} (is /run/devbroker bound and devbroker running?)", control.display()))
    })?;
    let mut w = sock
        .try_clone()
        .map_err(|e| (EXIT_NO_BOARD, e.to_string()))?;
    let mut r = BufReader::new(sock);
    let mut read = || -> Result<Reply, (u8, String)> {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => Err((EXIT_NO_BOARD, "the broker closed the connection".into())),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| (EXIT_NO_BOARD, format!("unreadable reply {line:?}: {e}"))),
        }
    };
    let send = |w: &mut UnixStream, req: &Request| {
        w.write_all(&request_line(req))
            .map_err(|e| (EXIT_NO_BOARD, e.to_string()))
    };
    send(
        &mut w,
        &Request::Hello {
            version: VERSION,
            client: format!("devshim-lease {}", env!("CARGO_PKG_VERSION")),
        },
    )?;
    if let Reply::Error { message } = read()? {
        return Err((EXIT_USAGE, message));
    }
    let wanted = args
        .board
        .clone()
        .map(|b| format!("board {b}"))
        .or_else(|| args.kind.clone().map(|t| format!("a {t} board")))
        .unwrap_or_default();
    send(
        &mut w,
        &Request::Lease {
            board: args.board.clone(),
            kind: args.kind.clone(),
            wait_ms: args.wait.map(|d| d.as_millis() as u64),
        },
    )?;
    let granted = loop {
        match read()? {
            Reply::Granted(g) => break g,
            Reply::Waiting { place, holders } => {
                eprintln!(
                    "devshim: waiting for {wanted}: place {place} in line; held by {}",
                    if holders.is_empty() {
                        "nobody (not plugged in)".to_string()
                    } else {
                        holders.join(", ")
                    }
                );
            }
            Reply::Error { message } if message.contains("in time") => {
                return Err((
                    EXIT_NO_BOARD,
                    format!("no {wanted} within {:?}", args.wait.unwrap_or_default()),
                ))
            }
            Reply::Error { message } => return Err((EXIT_USAGE, message)),
            other => return Err((EXIT_NO_BOARD, format!("unexpected reply {other:?}"))),
        }
    };
    let paths: Vec<PathBuf> = granted
        .ttys
        .iter()
        .map(|t| guest_path(link_root, &granted.board, t))
        .collect();
    // devshim serve publishes the links once the broker adds the sockets.
    let t0 = Instant::now();
    for p in &paths {
        while p.symlink_metadata().is_err() {
            if t0.elapsed() > Duration::from_secs(10) {
                return Err((
                    EXIT_NO_BOARD,
                    format!(
                        "got {} but {} did not appear: is devshim serve running?",
                        granted.board,
                        p.display()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let ports = endpoints(state_dir, &paths, t0 + Duration::from_secs(10));
    let env =
        environment(&granted.board, &paths, &ports, &args.aliases).map_err(|e| (EXIT_USAGE, e))?;
    eprintln!(
        "devshim: got {} ({})",
        granted.board,
        paths
            .iter()
            .zip(&ports)
            .map(|(p, port)| match port {
                Some(port) => format!("{}, {}", p.display(), ports::url(*port)),
                None => p.display().to_string(),
            })
            .collect::<Vec<_>>()
            .join("; ")
    );
    let code = run_command(&args.command, &env);
    // A tool that wrote and exited may still have bytes on the way: give
    // devshim a moment to start their session, then let it finish (up to
    // 2 s) before the lease, and the socket, go.
    std::thread::sleep(Duration::from_millis(250));
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) && board_held(&mut w, &mut r, &granted.board) {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(w); // the lease ends with the connection
    code
}

/// Whether a session holds any tty of `board` now, asked on the lease's
/// own connection.
fn board_held(w: &mut UnixStream, r: &mut BufReader<UnixStream>, board: &str) -> bool {
    if w.write_all(&request_line(&Request::Status {})).is_err() {
        return false;
    }
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(n) if n > 0 => match serde_json::from_str::<Reply>(&line) {
            Ok(Reply::Status(s)) => s.boards.iter().filter(|b| b.name == board).flat_map(|b| &b.ttys).any(|t| t.holder.is_some()),
            _ => false,
        },
        _ => false,
    }
}

/// Runs the command, forwarding SIGINT, SIGTERM and SIGHUP to it.
fn run_command(cmd: &[String], env: &[(String, String)]) -> Result<u8, (u8, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (EXIT_NO_BOARD, e.to_string()))?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut child = tokio::process::Command::new(&cmd[0])
            .args(&cmd[1..])
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .spawn()
            .map_err(|e| (127, format!("can't run {}: {e}", cmd[0])))?;
        let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
        let mut int =
            signal(SignalKind::interrupt()).map_err(|e| (EXIT_NO_BOARD, e.to_string()))?;
        let mut term =
            signal(SignalKind::terminate()).map_err(|e| (EXIT_NO_BOARD, e.to_string()))?;
        let mut hup = signal(SignalKind::hangup()).map_err(|e| (EXIT_NO_BOARD, e.to_string()))?;
        loop {
            let sig = tokio::select! {
                st = child.wait() => {
                    let st = st.map_err(|e| (EXIT_NO_BOARD, e.to_string()))?;
                    use std::os::unix::process::ExitStatusExt;
                    return Ok(match (st.code(), st.signal()) {
                        (Some(c), _) => c as u8,
                        (None, Some(s)) => 128 + s as u8,
                        _ => 1,
                    });
                }
                _ = int.recv() => nix::sys::signal::Signal::SIGINT,
                _ = term.recv() => nix::sys::signal::Signal::SIGTERM,
                _ = hup.recv() => nix::sys::signal::Signal::SIGHUP,
            };
            if let Some(pid) = pid {
                let _ = nix::sys::signal::kill(pid, sig);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn sai_device_command_line() {
        let a = parse_sai_device(&s(&["esp-heltec-wb32", "ESPPORT=0", "ctest", "-V"])).unwrap();
        assert_eq!(a.kind.as_deref(), Some("esp-heltec-wb32"));
        assert_eq!(a.aliases, vec![("ESPPORT".to_string(), 0)]);
        assert_eq!(a.command, s(&["ctest", "-V"]));
        assert!(parse_sai_device(&s(&["esp32", "ESPPORT=0"]))
            .unwrap_err()
            .contains("no command"));
        assert!(parse_sai_device(&[]).is_err());
        // A command that looks like an assignment but isn't ENV=number.
        let a = parse_sai_device(&s(&["esp32", "make", "V=1x"])).unwrap();
        assert_eq!(a.command, s(&["make", "V=1x"]));
    }

    #[test]
    fn environment_maps_aliases() {
        let paths = vec![
            PathBuf::from("/dev/serial/by-id/a"),
            PathBuf::from("/dev/serial/by-id/b"),
        ];
        let env = environment(
            "esp1",
            &paths,
            &[None, Some(4321)],
            &[("ESPPORT".into(), 1)],
        )
        .unwrap();
        assert!(env.contains(&("SAI_DEVICE_TTY0".into(), "/dev/serial/by-id/a".into())));
        assert!(env.contains(&("ESPPORT".into(), "/dev/serial/by-id/b".into())));
        assert!(env.contains(&(
            "SAI_DEVICE_RFC2217_1".into(),
            "rfc2217://127.0.0.1:4321".into()
        )));
        assert!(!env.iter().any(|(k, _)| k == "SAI_DEVICE_RFC2217_0"));
        assert!(environment("esp1", &paths, &[], &[("X".into(), 2)])
            .unwrap_err()
            .contains("has 2 ttys"));
        let (al, cmd) = split_aliases(&s(&["A=0", "--", "sh", "-c", "x"])).unwrap();
        assert_eq!((al.len(), cmd.len()), (1, 3));
    }
}
