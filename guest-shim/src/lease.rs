//! `devshim lease` (and `sai-device`): wait for a board, run a command with
//! its ttys, give the board back.
//!
//! The lease lives as long as this process's connection to the broker's
//! control socket, so a job that crashes or is killed releases its board
//! too. While it waits it says where it stands; once granted it waits for
//! `devshim serve` to publish the board's links, exports their paths and
//! RFC 2217 endpoints, runs the command with signals forwarded, and returns
//! its exit status.
//!
//! If the broker restarts while the command runs, the connection — and with
//! it the lease — is gone. devshim then takes the board again as soon as the
//! broker is back (within the broker grace, as `devshim serve` keeps the
//! ttys), and says so; if it can't, it says the lease ended and why, and the
//! command's ttys hang up when `devshim serve`'s grace runs out.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wire::control::{request_line, ErrorCode, Reply, Request, VERSION};
use wire::manifest::CONTROL_SOCKET;

use crate::{ports, publish};

/// Exit status when no board could be had (as sysexits' EX_TEMPFAIL).
pub const EXIT_NO_BOARD: u8 = 75;
/// Exit status for bad usage or a refused request.
pub const EXIT_USAGE: u8 = 2;

/// `ENV=IDX` words: export ENV as the path of tty IDX.
pub type Aliases = Vec<(String, usize)>;

/// A parsed lease command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseArgs {
    /// A board name (`--board`), else a type.
    pub board: Option<String>,
    pub kind: Option<String>,
    pub wait: Option<Duration>,
    pub aliases: Aliases,
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

/// The leading `ENV=IDX` words of `args`, and what follows them.
fn leading_aliases(args: &[String]) -> (Aliases, &[String]) {
    let aliases: Vec<_> = args.iter().map_while(|a| alias(a)).collect();
    let rest = &args[aliases.len()..];
    (aliases, rest)
}

/// What `sai-device --help` prints.
pub const SAI_DEVICE_HELP: &str = "\
Wait for a board of TYPE, run COMMAND with its ttys exported, give the board back.

usage: sai-device TYPE [ENV=IDX ...] COMMAND [ARGS...]

COMMAND gets SAI_DEVICE_TTY<n> (the path of tty n), SAI_DEVICE_RFC2217_<n>
(its RFC 2217 endpoint), SAI_DEVICE_BOARD and each ENV=IDX alias (e.g.
ESPPORT=0 names tty 0's path). Exits with COMMAND's status, or 75 when no
board could be had, 2 on a usage error.

Environment: DEVBROKER_DIR (the machine directory, /run/devbroker),
DEVBROKER_LINK_ROOT (/dev), DEVBROKER_STATE_DIR (devshim serve's state),
DEVSHIM_BROKER_GRACE (how long to wait for a broker that went away).
With options, see devshim lease --help.";

/// Parses Sai's `sai-device TYPE [ENV=IDX ...] CMD...`.
pub fn parse_sai_device(args: &[String]) -> Result<LeaseArgs, String> {
    let usage = "usage: sai-device TYPE [ENV=IDX ...] COMMAND [ARGS...]";
    let (kind, rest) = args.split_first().ok_or(usage)?;
    let (aliases, command) = leading_aliases(rest);
    if command.is_empty() {
        return Err(format!("no command given; {usage}"));
    }
    Ok(LeaseArgs {
        board: None,
        kind: Some(kind.clone()),
        wait: None,
        aliases,
        command: command.to_vec(),
    })
}

/// `devshim lease`'s options written after TYPE (`devshim lease esp32
/// --wait 10m -- idf.py flash`): the command line's parser stops at the
/// first word that is not an option, so they arrive with the command.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct LateOptions {
    pub board: Option<String>,
    pub wait: Option<Duration>,
    pub dir: Option<PathBuf>,
    pub link_root: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
}

/// Takes `devshim lease`'s own options out of `rest` (what follows TYPE),
/// up to `--` or the command's first word; `ENV=IDX` aliases may come
/// between them. A command never starts with one of these options, so
/// nothing of the command is taken.
pub fn take_late_options(rest: &mut Vec<String>) -> Result<LateOptions, String> {
    let mut o = LateOptions::default();
    let mut i = 0;
    while i < rest.len() {
        let word = &rest[i];
        if word == "--" {
            break;
        }
        if alias(word).is_some() {
            i += 1;
            continue;
        }
        let (name, inline) = match word.split_once('=') {
            Some((n, v)) => (n.to_string(), Some(v.to_string())),
            None => (word.clone(), None),
        };
        if !matches!(
            name.as_str(),
            "--board" | "--wait" | "--dir" | "--link-root" | "--state-dir"
        ) {
            break;
        }
        let (value, used) = match inline {
            Some(v) => (v, 1),
            None => match rest.get(i + 1) {
                Some(v) => (v.clone(), 2),
                None => return Err(format!("{name} needs a value")),
            },
        };
        match name.as_str() {
            "--board" => o.board = Some(value),
            "--wait" => {
                o.wait = Some(
                    humantime::parse_duration(&value)
                        .map_err(|e| format!("--wait {value:?}: {e} (e.g. 30s, 10m)"))?,
                )
            }
            "--dir" => o.dir = Some(value.into()),
            "--link-root" => o.link_root = Some(value.into()),
            _ => o.state_dir = Some(value.into()),
        }
        rest.drain(i..i + used);
    }
    Ok(o)
}

/// Splits `[ENV=IDX ...] [--] CMD...` (what follows `devshim lease`'s flags).
pub fn split_aliases(rest: &[String]) -> Result<(Aliases, Vec<String>), String> {
    let (aliases, mut command) = leading_aliases(rest);
    if command.first().is_some_and(|a| a == "--") {
        command = &command[1..];
    }
    if command.is_empty() {
        return Err("no command given: devshim lease [--board NAME | TYPE] [ENV=IDX ...] -- COMMAND [ARGS...]".into());
    }
    Ok((aliases, command.to_vec()))
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

/// How long a lease waits for a broker that went away:
/// `DEVSHIM_BROKER_GRACE` (e.g. `30s`), else `devshim serve`'s default.
pub fn broker_grace() -> Duration {
    std::env::var("DEVSHIM_BROKER_GRACE")
        .ok()
        .and_then(|v| humantime::parse_duration(v.trim()).ok())
        .unwrap_or(crate::serve::DEFAULT_BROKER_GRACE)
}

/// The name a lease's control connections give in their hello.
const CLIENT: &str = concat!("devshim-lease ", env!("CARGO_PKG_VERSION"));

/// A control connection that has said hello; errors carry the exit status
/// a lease leaves with.
pub(crate) struct Control {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Control {
    /// Connects and says hello as `client`; a broker that doesn't answer
    /// within 2 s is as good as gone.
    pub(crate) fn connect(path: &Path, client: &str) -> Result<Control, (u8, String)> {
        let sock = UnixStream::connect(path).map_err(|e| {
            let dir = path.parent().unwrap_or(path);
            (EXIT_NO_BOARD, format!("can't reach the broker at {}: {e} (is the machine's directory bound at {} and devbroker running?)", path.display(), dir.display()))
        })?;
        let w = sock
            .try_clone()
            .map_err(|e| (EXIT_NO_BOARD, e.to_string()))?;
        let mut c = Control {
            w,
            r: BufReader::new(sock),
        };
        let _ = c.w.set_read_timeout(Some(Duration::from_secs(2)));
        c.send(&Request::Hello {
            version: VERSION,
            client: client.into(),
        })?;
        if let Reply::Error { message, .. } = c.read()? {
            return Err((EXIT_USAGE, message));
        }
        let _ = c.w.set_read_timeout(None);
        Ok(c)
    }

    pub(crate) fn send(&mut self, req: &Request) -> Result<(), (u8, String)> {
        self.w
            .write_all(&request_line(req))
            .map_err(|e| (EXIT_NO_BOARD, e.to_string()))
    }

    pub(crate) fn read(&mut self) -> Result<Reply, (u8, String)> {
        let mut line = String::new();
        match self.r.read_line(&mut line) {
            Ok(0) | Err(_) => Err((EXIT_NO_BOARD, "the broker closed the connection".into())),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|e| (EXIT_NO_BOARD, format!("unreadable reply {line:?}: {e}"))),
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
    let mut c = Control::connect(&control, CLIENT)?;
    let wanted = args
        .board
        .clone()
        .map(|b| format!("board {b}"))
        .or_else(|| args.kind.clone().map(|t| format!("a board of type {t}")))
        .unwrap_or_default();
    c.send(&Request::Lease {
        board: args.board.clone(),
        kind: args.kind.clone(),
        wait_ms: args.wait.map(|d| d.as_millis() as u64),
    })?;
    let granted = loop {
        match c.read()? {
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
            Reply::Error {
                code: Some(ErrorCode::Timeout),
                ..
            } => {
                return Err((
                    EXIT_NO_BOARD,
                    format!("no {wanted} within {:?}", args.wait.unwrap_or_default()),
                ))
            }
            Reply::Error { message, .. } => return Err((EXIT_USAGE, message)),
            other => return Err((EXIT_NO_BOARD, format!("unexpected reply {other:?}"))),
        }
    };
    let paths: Vec<PathBuf> = granted
        .ttys
        .iter()
        .map(|t| {
            let short_name = format!("{}.{}", granted.board, t.tty);
            publish::guest_path(link_root, t.by_id.as_deref(), &short_name)
        })
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
    let keeper = Keeper::start(c, control.clone(), granted.board.clone(), broker_grace());
    let code = crate::run::command(&args.command, &env, state_dir);
    // A tool that wrote and exited may still have bytes on the way: give
    // devshim a moment to start their session, then let it finish (up to
    // 2 s) before the lease, and the socket, go.
    std::thread::sleep(Duration::from_millis(250));
    if let Ok(mut status) = Control::connect(&control, CLIENT) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(2) && board_held(&mut status, &granted.board) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    keeper.release(); // the lease ends with the connection
    code
}

/// Holds the lease's connection while the command runs, and takes the
/// board again if the broker restarts.
struct Keeper {
    done: std::sync::Arc<std::sync::atomic::AtomicBool>,
    current: std::sync::Arc<std::sync::Mutex<UnixStream>>,
    thread: std::thread::JoinHandle<()>,
}

impl Keeper {
    fn start(c: Control, control: PathBuf, board: String, grace: Duration) -> Keeper {
        use std::io::Read;
        use std::sync::atomic::Ordering;
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let current = std::sync::Arc::new(std::sync::Mutex::new(c.w));
        let (d, cur) = (done.clone(), current.clone());
        let thread = std::thread::spawn(move || {
            let mut reader = c.r.into_inner();
            loop {
                // Nothing more is sent on a granted lease: any end is the broker's.
                let mut buf = [0u8; 512];
                while matches!(reader.read(&mut buf), Ok(n) if n > 0) {}
                if d.load(Ordering::SeqCst) {
                    return;
                }
                let g = humantime::format_duration(grace);
                eprintln!("devshim: the broker went away; taking {board} again when it is back (waiting up to {g})");
                match retake(&control, &board, grace) {
                    Ok(c) => {
                        eprintln!("devshim: the broker is back; lease on {board} restored");
                        reader = c.r.into_inner();
                        *cur.lock().unwrap() = c.w;
                    }
                    Err(why) => {
                        eprintln!("devshim: lease on {board} ended: {why}; its ttys hang up");
                        return;
                    }
                }
            }
        });
        Keeper {
            done,
            current,
            thread,
        }
    }

    /// Ends the lease: closes the connection (every clone of it) and stops watching.
    fn release(self) {
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self
            .current
            .lock()
            .unwrap()
            .shutdown(std::net::Shutdown::Both);
        let _ = self.thread.join();
    }
}

/// Takes `board` again from a broker that restarted: connects once it
/// answers and asks for that board, all within `grace`.
fn retake(control: &Path, board: &str, grace: Duration) -> Result<Control, String> {
    let deadline = Instant::now() + grace;
    let g = humantime::format_duration(grace);
    let mut c = loop {
        match Control::connect(control, CLIENT) {
            Ok(c) => break c,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err((_, e)) => return Err(format!("the broker did not come back within {g} ({e})")),
        }
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100));
    c.send(&Request::Lease {
        board: Some(board.to_string()),
        kind: None,
        wait_ms: Some(left.as_millis() as u64),
    })
    .map_err(|(_, e)| e)?;
    loop {
        match c.read().map_err(|(_, e)| e)? {
            Reply::Granted(_) => return Ok(c),
            Reply::Waiting { .. } => {}
            Reply::Error {
                code: Some(ErrorCode::Timeout),
                ..
            } => {
                return Err(format!(
                    "the broker is back but {board} was not free again within {g}"
                ))
            }
            Reply::Error { message, .. } => {
                return Err(format!("the broker is back but refused it: {message}"))
            }
            other => return Err(format!("unexpected reply {other:?}")),
        }
    }
}

/// Whether a session holds any tty of `board` now.
fn board_held(c: &mut Control, board: &str) -> bool {
    if c.send(&Request::Status {}).is_err() {
        return false;
    }
    match c.read() {
        Ok(Reply::Status(s)) => s
            .boards
            .iter()
            .filter(|b| b.name == board)
            .flat_map(|b| &b.ttys)
            .any(|t| t.holder.is_some()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn options_after_the_type_are_options() {
        let mut rest = words("--wait 1s ESPPORT=0 --dir=/d --board b -- true --wait");
        let o = take_late_options(&mut rest).unwrap();
        assert_eq!(o.wait, Some(Duration::from_secs(1)));
        assert_eq!(o.dir, Some(PathBuf::from("/d")));
        assert_eq!(o.board.as_deref(), Some("b"));
        assert_eq!(
            rest,
            words("ESPPORT=0 -- true --wait"),
            "the command keeps its own"
        );
        // Without `--`, the command starts at its first word.
        let mut rest = words("idf.py --wait 1s flash");
        assert_eq!(
            take_late_options(&mut rest).unwrap(),
            LateOptions::default()
        );
        assert_eq!(rest, words("idf.py --wait 1s flash"));
        assert!(take_late_options(&mut words("--wait"))
            .unwrap_err()
            .contains("needs a value"));
        assert!(take_late_options(&mut words("--wait soon -- x"))
            .unwrap_err()
            .contains("--wait"));
    }

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

    #[test]
    fn lease_command_line() {
        // One `--` ends the aliases; what follows is the command as it is.
        let (al, cmd) = split_aliases(&s(&["--", "A=0", "--", "x"])).unwrap();
        assert!(al.is_empty());
        assert_eq!(cmd, s(&["A=0", "--", "x"]));
        let (al, cmd) = split_aliases(&s(&["A=0", "B=1", "make", "V=1"])).unwrap();
        assert_eq!(al, vec![("A".to_string(), 0), ("B".to_string(), 1)]);
        assert_eq!(cmd, s(&["make", "V=1"]));
        assert!(split_aliases(&s(&["A=0", "--"])).is_err());
        assert!(split_aliases(&[]).is_err());
    }
}
