//! The broker's configuration file: boards, their ttys, and who may use them.
//!
//! Parsing happens in two steps. serde reads the TOML into raw structs that
//! keep each value's position; [`validate`] then checks the rules serde can't
//! (names, duplicates, overlapping matches) and collects every problem, each
//! with `file:line:col`, the offending value, and what to write instead.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;
use wire::names::{check_link_name, check_name, socket_name, suggest_name};

/// Where the broker looks for its config when `--config` is not given.
pub const DEFAULT_PATH: &str = crate::cli::DEFAULT_CONFIG;
/// Rate a tty gets when the config does not give one.
pub const DEFAULT_RATE: u32 = 115_200;

/// A checked configuration.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Config {
    pub boards: Vec<Board>,
    /// Containers the broker keeps a directory for even before any board is
    /// allowed there, and that `machine setup` can set up by name.
    pub machines: Vec<Machine>,
    /// Where the Prometheus metrics are served, if anywhere (`[metrics]`).
    pub metrics: Option<MetricsListen>,
}

impl Config {
    /// The board of that name, if the config has one.
    pub fn board(&self, name: &str) -> Option<&Board> {
        self.boards.iter().find(|b| b.name == name)
    }
}

/// Where `[metrics] listen` serves the metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetricsListen {
    /// A TCP address, e.g. `127.0.0.1:9477`.
    Tcp(std::net::SocketAddr),
    /// A unix socket path (`unix:/run/devbroker/metrics.sock`).
    Unix(PathBuf),
}

impl MetricsListen {
    /// Parses `HOST:PORT` or `unix:/ABSOLUTE/PATH`.
    pub fn parse(s: &str) -> Option<MetricsListen> {
        match s.strip_prefix("unix:") {
            Some(p) if p.starts_with('/') => Some(MetricsListen::Unix(p.into())),
            Some(_) => None,
            None => s.parse().ok().map(MetricsListen::Tcp),
        }
    }
}

impl fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetricsListen::Tcp(a) => write!(f, "{a}"),
            MetricsListen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A container, from a `[[machine]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub name: String,
    /// Its root directory (default `/var/lib/machines/NAME`).
    pub tree: PathBuf,
    /// The job user inside and its uid (default `sai:883`).
    pub user: String,
    pub uid: u32,
}

/// The job user a machine gets when none is named.
pub const DEFAULT_JOB_USER: &str = "sai:883";

/// Parses `NAME:UID`.
pub fn parse_job_user(s: &str) -> Result<(String, u32), String> {
    let (name, uid) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not NAME:UID, e.g. \"sai:883\""))?;
    check_name(name).map_err(|why| format!("user name {name:?} is not allowed: {why}"))?;
    let uid: u32 = uid
        .parse()
        .map_err(|_| format!("uid {uid:?} is not a number"))?;
    if uid == 0 || uid >= 65534 {
        return Err(format!(
            "uid {uid} is not a job user's: give one between 1 and 65533"
        ));
    }
    Ok((name.to_string(), uid))
}

/// One board: a device under test with one or more USB serial ttys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Board {
    pub name: String,
    /// Types this board can stand in for, as in Sai's device conf.
    pub compatible: Vec<String>,
    /// Containers that may use the board.
    pub machines: Vec<String>,
    /// Host unix groups whose members may use the board.
    pub host_groups: Vec<String>,
    pub ttys: Vec<Tty>,
    /// Named line sequences (`reset`, `bootloader`, ...), as step text.
    pub sequences: std::collections::BTreeMap<String, String>,
    /// How its console is captured.
    pub console: crate::capture::ConsoleConfig,
    /// How long an adapter may be away and come back as the same identity
    /// (a native-USB board re-enumerating as it resets) before it counts as
    /// unplugged. Zero: every disappearance is an unplug.
    pub reenumerate_grace: std::time::Duration,
}

/// One serial port of a board.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tty {
    pub name: String,
    /// The rate a new session starts at.
    pub rate: u32,
    pub matcher: Match,
}

/// Which adapter is this tty: every key given must match.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Match {
    /// Link name in `/dev/serial/by-id`.
    pub by_id: Option<String>,
    /// `ID_SERIAL_SHORT`.
    pub serial: Option<String>,
    /// `ID_PATH`: the port path, for adapters without a serial number.
    pub path: Option<String>,
    /// USB vendor and product id.
    pub usb: Option<UsbId>,
}

/// A USB vendor:product pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UsbId {
    pub vendor: u16,
    pub product: u16,
}

impl fmt::Display for UsbId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:04x}", self.vendor, self.product)
    }
}

impl UsbId {
    /// Parses `"0403:6001"`.
    pub fn parse(s: &str) -> Option<UsbId> {
        let (v, p) = s.split_once(':')?;
        if v.len() != 4 || p.len() != 4 {
            return None;
        }
        Some(UsbId {
            vendor: u16::from_str_radix(v, 16).ok()?,
            product: u16::from_str_radix(p, 16).ok()?,
        })
    }
}

impl Board {
    /// A board given to exactly one machine and no host group is attached to
    /// that machine all the time; any other board is shared.
    pub fn dedicated_machine(&self) -> Option<&str> {
        match (&self.machines[..], self.host_groups.is_empty()) {
            ([m], true) => Some(m),
            _ => None,
        }
    }
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub col: usize,
    pub message: String,
    /// What to write instead.
    pub help: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)?;
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.col,
                self.message
            )?;
        }
        if let Some(h) = &self.help {
            write!(f, "\n  help: {h}")?;
        }
        Ok(())
    }
}

/// All the problems of one config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and checks a config file.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let (why, help) = unreadable(&e);
        ConfigErrors(vec![ConfigError {
            file: path.to_owned(),
            line: 0,
            col: 0,
            message: format!("can't read the config: {why}"),
            help: Some(help),
        }])
    })?;
    parse(path, &text)
}

/// Why a config can't be read, and what to do about it.
fn unreadable(e: &std::io::Error) -> (String, String) {
    use std::io::ErrorKind;
    match (e.kind(), e.raw_os_error()) {
        (ErrorKind::NotFound, _) => (
            "there is no such file".into(),
            format!("write one (see devbroker.example.toml) or pass --config; the default is {DEFAULT_PATH}"),
        ),
        (ErrorKind::PermissionDenied, _) => (
            "permission denied".into(),
            "run this as root, or as a user who may read the file and every directory above it".into(),
        ),
        (_, Some(libc::EISDIR)) => (
            "it is a directory".into(),
            "pass the config file itself, e.g. --config /etc/devbroker/devbroker.toml".into(),
        ),
        (ErrorKind::InvalidData, _) => (
            "it is not UTF-8 text".into(),
            "save it as UTF-8 (TOML files are UTF-8)".into(),
        ),
        _ => (e.to_string(), "check the file and the disk it is on".into()),
    }
}

/// Things a config allows that are likely mistakes: a board nobody may use,
/// a config with no boards. `check` prints them; the broker logs them.
pub fn warnings(config: &Config) -> Vec<String> {
    let mut out = Vec::new();
    if config.boards.is_empty() {
        out.push("the config names no boards: the broker will serve nothing (add [[board]] entries; `devbroker boards --suggest` writes them)".into());
    }
    for b in &config.boards {
        if b.machines.is_empty() && b.host_groups.is_empty() {
            out.push(format!(
                "board {:?}: no machine and no host group may use it; add machines = [\"...\"] or host-groups = [\"...\"]",
                b.name
            ));
        }
    }
    out
}

/// A scalar of the file that may have the wrong type (`rate = "fast"`):
/// kept with its place and what was wrong, so a type mistake is reported
/// among every other problem of the file instead of ending the check.
#[derive(Debug, Clone)]
struct Typed<T> {
    span: Range<usize>,
    value: Result<T, String>,
}

impl<'de, T: serde::de::DeserializeOwned> Deserialize<'de> for Typed<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Spanned::<toml::Value>::deserialize(d)?;
        let span = v.span();
        let value = v.into_inner();
        let shown = value.to_string();
        Ok(Typed {
            span,
            value: T::deserialize(value).map_err(|_| shown),
        })
    }
}

impl<T: Clone> Typed<T> {
    /// The value with its place, or, reported, `None`: `key` names the
    /// setting and `want` says what it takes.
    fn ok(&self, cx: &mut Ctx, key: &str, want: &str) -> Option<Spanned<T>> {
        match &self.value {
            Ok(v) => Some(Spanned::new(self.span.clone(), v.clone())),
            Err(shown) => {
                cx.err(
                    self.span.clone(),
                    format!("{key} = {shown} has the wrong type: {key} takes {want}"),
                    Some(format!("write e.g. {key} = {}", example(want))),
                );
                None
            }
        }
    }
}

/// The example at the end of a [`Typed::ok`] `want` ("..., e.g. 115200").
fn example(want: &str) -> &str {
    want.rsplit("e.g. ").next().unwrap_or(want)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    board: Vec<RawBoard>,
    #[serde(default)]
    machine: Vec<RawMachine>,
    metrics: Option<RawMetrics>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMetrics {
    listen: Typed<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMachine {
    name: Spanned<String>,
    tree: Option<Typed<String>>,
    user: Option<Typed<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBoard {
    name: Spanned<String>,
    #[serde(default)]
    compatible: Vec<Spanned<String>>,
    #[serde(default)]
    machines: Vec<Spanned<String>>,
    #[serde(default, rename = "host-groups")]
    host_groups: Vec<Spanned<String>>,
    #[serde(default)]
    tty: Vec<RawTty>,
    #[serde(default)]
    sequences: BTreeMap<String, Spanned<String>>,
    console: Option<RawConsole>,
    #[serde(rename = "reenumerate-grace")]
    reenumerate_grace: Option<Typed<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConsole {
    tty: Option<Typed<String>>,
    mode: Option<Typed<String>>,
    ring: Option<Typed<i64>>,
    log: Option<Typed<String>>,
    #[serde(rename = "log-max")]
    log_max: Option<Typed<i64>>,
    #[serde(rename = "log-keep")]
    log_keep: Option<Typed<i64>>,
}

fn validate_console(
    cx: &mut Ctx,
    raw: Option<&RawConsole>,
    ttys: &[Tty],
) -> crate::capture::ConsoleConfig {
    use crate::capture::{ConsoleConfig, Mode, DEFAULT_LOG_KEEP, DEFAULT_LOG_MAX, DEFAULT_RING};
    let mut c = ConsoleConfig {
        tty: ttys.first().map(|t| t.name.clone()).unwrap_or_default(),
        mode: Mode::Session,
        ring: DEFAULT_RING,
        log: None,
        log_max: DEFAULT_LOG_MAX,
        log_keep: DEFAULT_LOG_KEEP,
    };
    let Some(raw) = raw else { return c };
    const NAME: &str = "a tty name in quotes, e.g. \"console\"";
    const TEXT: &str = "text in quotes, e.g. \"/var/log/devbroker/esp1.log\"";
    const MODE: &str = "\"session\" or \"always\", e.g. \"always\"";
    const BYTES: &str = "a whole number of bytes, e.g. 262144";
    const COUNT: &str = "a whole number, e.g. 3";
    let tty = raw.tty.as_ref().and_then(|t| t.ok(cx, "tty", NAME));
    let mode = raw.mode.as_ref().and_then(|t| t.ok(cx, "mode", MODE));
    let ring = raw.ring.as_ref().and_then(|t| t.ok(cx, "ring", BYTES));
    let log = raw.log.as_ref().and_then(|t| t.ok(cx, "log", TEXT));
    let log_max = raw
        .log_max
        .as_ref()
        .and_then(|t| t.ok(cx, "log-max", BYTES));
    let log_keep = raw
        .log_keep
        .as_ref()
        .and_then(|t| t.ok(cx, "log-keep", COUNT));
    if let Some(t) = &tty {
        if ttys.iter().any(|x| &x.name == t.get_ref()) {
            c.tty = t.get_ref().clone();
        } else {
            cx.err(
                t.span(),
                format!(
                    "console tty {:?} is not one of the board's ttys",
                    t.get_ref()
                ),
                Some(format!(
                    "write one of: {}",
                    ttys.iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )),
            );
        }
    }
    if let Some(m) = &mode {
        match m.get_ref().as_str() {
            "session" => c.mode = Mode::Session,
            "always" => c.mode = Mode::Always,
            other => cx.err(m.span(), format!("console mode {other:?} is not session or always"), Some("mode = \"session\" (while a client is attached) or \"always\" (the broker keeps the port open)".into())),
        }
    }
    let mut num = |v: &Option<Spanned<i64>>, what: &str, lo: i64, hi: i64| -> Option<i64> {
        let v = v.as_ref()?;
        if (lo..=hi).contains(v.get_ref()) {
            Some(*v.get_ref())
        } else {
            cx.err(
                v.span(),
                format!("console {what} {} is out of range", v.get_ref()),
                Some(format!("give {what} between {lo} and {hi}")),
            );
            None
        }
    };
    if let Some(r) = num(&ring, "ring", 1024, 64 << 20) {
        c.ring = r as usize;
    }
    if let Some(r) = num(&log_max, "log-max", 4096, 1 << 40) {
        c.log_max = r as u64;
    }
    if let Some(r) = num(&log_keep, "log-keep", 0, 100) {
        c.log_keep = r as u32;
    }
    if let Some(l) = &log {
        if l.get_ref().starts_with('/') {
            c.log = Some(PathBuf::from(l.get_ref()));
        } else {
            cx.err(
                l.span(),
                format!("console log {:?} is not an absolute path", l.get_ref()),
                Some("write e.g. log = \"/var/log/devbroker/esp1.log\"".into()),
            );
        }
    }
    c
}

/// The longest re-enumeration grace: past a minute, a board is unplugged.
pub const MAX_REENUMERATE_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

fn validate_grace(cx: &mut Ctx, raw: Option<&Typed<String>>) -> std::time::Duration {
    let Some(raw) =
        raw.and_then(|r| r.ok(cx, "reenumerate-grace", "a duration in quotes, e.g. \"3s\""))
    else {
        return std::time::Duration::ZERO;
    };
    match humantime::parse_duration(raw.get_ref().trim()) {
        Ok(d) if d <= MAX_REENUMERATE_GRACE => d,
        Ok(_) => {
            cx.err(raw.span(), format!("reenumerate-grace {:?} is longer than {}s", raw.get_ref(), MAX_REENUMERATE_GRACE.as_secs()), Some("a board that needs longer than a minute to come back is unplugged; give e.g. \"3s\"".into()));
            std::time::Duration::ZERO
        }
        Err(e) => {
            cx.err(
                raw.span(),
                format!(
                    "reenumerate-grace {:?} is not a duration: {e}",
                    raw.get_ref()
                ),
                Some("write e.g. reenumerate-grace = \"3s\" or \"1500ms\"".into()),
            );
            std::time::Duration::ZERO
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTty {
    name: Spanned<String>,
    rate: Option<Typed<i64>>,
    #[serde(rename = "match")]
    matcher: Spanned<RawMatch>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatch {
    #[serde(rename = "by-id")]
    by_id: Option<Spanned<String>>,
    serial: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    usb: Option<Spanned<String>>,
}

struct Ctx<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<ConfigError>,
}

impl Ctx<'_> {
    fn err(&mut self, span: Range<usize>, message: String, help: Option<String>) {
        let (line, col) = line_col(self.text, span.start);
        self.errors.push(ConfigError {
            file: self.file.to_owned(),
            line,
            col,
            message,
            help,
        });
    }

    fn pos(&self, span: &Range<usize>) -> String {
        let (l, c) = line_col(self.text, span.start);
        format!("{l}:{c}")
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

/// Parses and checks config text; `file` is only used in messages.
pub fn parse(file: &Path, text: &str) -> Result<Config, ConfigErrors> {
    let mut cx = Ctx {
        file,
        text,
        errors: Vec::new(),
    };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(r) => r,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let mut msg = e.message().trim().to_string();
            let mut help = if msg.contains("unknown field") {
                Some("remove the key or fix its spelling; top-level tables are [[board]], [[machine]] and [metrics] (key listen); board keys are name, compatible, machines, host-groups, tty, sequences, console, reenumerate-grace; console keys are tty, mode, ring, log, log-max, log-keep; tty keys are name, rate, match; match keys are by-id, serial, path, usb; machine keys are name, tree, user".into())
            } else {
                None
            };
            if msg.is_empty() {
                // toml gives no message for a control character in a comment.
                let c = text.get(span.start..).and_then(|s| s.chars().next());
                msg = match c {
                    Some(c) => format!("the character {c:?} is not allowed here"),
                    None => "the file is not valid TOML".into(),
                };
                if c.is_some_and(char::is_control) {
                    help = Some("TOML allows no control characters but tab, not even in comments; remove it".into());
                }
            }
            cx.err(span, msg, help);
            return Err(ConfigErrors(cx.errors));
        }
    };
    let config = validate(&mut cx, raw);
    if cx.errors.is_empty() {
        Ok(config)
    } else {
        // In the order of the file.
        cx.errors.sort_by_key(|e| (e.line, e.col));
        Err(ConfigErrors(cx.errors))
    }
}

fn check_named(cx: &mut Ctx, what: &str, name: &Spanned<String>) {
    if let Err(why) = check_name(name.get_ref()) {
        cx.err(
            name.span(),
            format!("{what} name {:?} is not allowed: {why}", name.get_ref()),
            Some(format!(
                "names are 1-63 characters of a-z, 0-9, '.' and '-', starting with a letter or digit, e.g. {:?}",
                suggest_name(name.get_ref())
            )),
        );
    }
}

/// Notes `name` in `seen`; when it was there already, reports
/// `message(position of the first)` with `help` and returns false.
fn first_use(
    cx: &mut Ctx,
    seen: &mut BTreeMap<String, Range<usize>>,
    name: &Spanned<String>,
    message: impl FnOnce(String) -> String,
    help: &str,
) -> bool {
    match seen.get(name.get_ref()) {
        Some(first) => {
            let first = cx.pos(first);
            cx.err(name.span(), message(first), Some(help.into()));
            false
        }
        None => {
            seen.insert(name.get_ref().clone(), name.span());
            true
        }
    }
}

/// [`first_use`] for a machine name.
fn machine_once(
    cx: &mut Ctx,
    seen: &mut BTreeMap<String, Range<usize>>,
    name: &Spanned<String>,
) -> bool {
    let n = name.get_ref();
    first_use(
        cx,
        seen,
        name,
        |first| format!("machine {n:?} is listed twice (first at {first})"),
        "list each machine once",
    )
}

fn validate_machines(cx: &mut Ctx, raw: Vec<RawMachine>) -> Vec<Machine> {
    let mut out: Vec<Machine> = Vec::new();
    let mut seen: BTreeMap<String, Range<usize>> = BTreeMap::new();
    for m in raw {
        check_named(cx, "machine", &m.name);
        let name = m.name.get_ref().clone();
        if let Err(why) = crate::machine::name::check(&name) {
            if check_name(&name).is_ok() {
                cx.err(m.name.span(), why, None);
            }
        }
        if !machine_once(cx, &mut seen, &m.name) {
            continue;
        }
        let tree = m.tree.as_ref().and_then(|t| {
            t.ok(
                cx,
                "tree",
                "an absolute path in quotes, e.g. \"/var/lib/machines/ci1\"",
            )
        });
        let user = m
            .user
            .as_ref()
            .and_then(|u| u.ok(cx, "user", "NAME:UID in quotes, e.g. \"sai:883\""));
        let tree = match &tree {
            Some(t) if !t.get_ref().starts_with('/') => {
                cx.err(
                    t.span(),
                    format!("tree {:?} is not an absolute path", t.get_ref()),
                    Some(format!("write e.g. tree = \"/var/lib/machines/{name}\"")),
                );
                PathBuf::new()
            }
            Some(t) => PathBuf::from(t.get_ref()),
            None => PathBuf::from("/var/lib/machines").join(&name),
        };
        let (user, uid) = match &user {
            None => parse_job_user(DEFAULT_JOB_USER).expect("default is valid"),
            Some(u) => match parse_job_user(u.get_ref()) {
                Ok(x) => x,
                Err(why) => {
                    cx.err(
                        u.span(),
                        why,
                        Some("write user = \"NAME:UID\", e.g. \"sai:883\"".into()),
                    );
                    continue;
                }
            },
        };
        out.push(Machine {
            name,
            tree,
            user,
            uid,
        });
    }
    out
}

fn validate_metrics(cx: &mut Ctx, raw: Option<&RawMetrics>) -> Option<MetricsListen> {
    let l = raw?.listen.ok(
        cx,
        "listen",
        "an address in quotes, e.g. \"127.0.0.1:9477\"",
    )?;
    let parsed = MetricsListen::parse(l.get_ref());
    if parsed.is_none() {
        cx.err(
            l.span(),
            format!("metrics listen {:?} is not HOST:PORT or unix:/PATH", l.get_ref()),
            Some("write e.g. listen = \"127.0.0.1:9477\" or listen = \"unix:/run/devbroker/metrics.sock\"".into()),
        );
    }
    parsed
}

fn validate(cx: &mut Ctx, raw: RawConfig) -> Config {
    let metrics = validate_metrics(cx, raw.metrics.as_ref());
    let machines = validate_machines(cx, raw.machine);
    let mut boards = Vec::new();
    let mut board_names: BTreeMap<String, Range<usize>> = BTreeMap::new();
    let mut sockets: BTreeMap<String, (String, Range<usize>)> = BTreeMap::new();
    // (board, tty, span of the match table, match)
    let mut matches: Vec<(String, String, Range<usize>, Match)> = Vec::new();

    for rb in raw.board {
        check_named(cx, "board", &rb.name);
        let bname = rb.name.get_ref().clone();
        first_use(
            cx,
            &mut board_names,
            &rb.name,
            |first| format!("board name {bname:?} is used twice (first at {first})"),
            "give each board its own name",
        );
        for c in &rb.compatible {
            let ok = !c.get_ref().is_empty()
                && c.get_ref()
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || "._-".contains(ch));
            if !ok {
                cx.err(
                    c.span(),
                    format!("compatible type {:?} is not allowed", c.get_ref()),
                    Some(
                        "types use only letters, digits, '.', '_' and '-', as Sai device types do"
                            .into(),
                    ),
                );
            }
        }
        let mut seen = BTreeMap::new();
        for m in &rb.machines {
            check_named(cx, "machine", m);
            machine_once(cx, &mut seen, m);
        }
        for g in &rb.host_groups {
            let name = g.get_ref();
            let ok = !name.is_empty()
                && name.len() <= 32
                && name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
            if !ok {
                cx.err(
                    g.span(),
                    format!("host group {name:?} is not a unix group name"),
                    Some("write the group's name as in /etc/group, e.g. \"dialout\"".into()),
                );
            }
        }
        if rb.tty.is_empty() {
            cx.err(
                rb.name.span(),
                format!("board {bname:?} has no tty"),
                Some("add one: [[board.tty]] with name = \"console\" and match = { by-id = \"usb-...\" }".into()),
            );
        }
        let mut ttys = Vec::new();
        let mut tty_names: BTreeMap<String, Range<usize>> = BTreeMap::new();
        for rt in rb.tty {
            check_named(cx, "tty", &rt.name);
            let tname = rt.name.get_ref().clone();
            if first_use(
                cx,
                &mut tty_names,
                &rt.name,
                |first| format!("board {bname:?} has two ttys named {tname:?} (first at {first})"),
                "give each tty of a board its own name",
            ) {
                let sock = socket_name(&bname, &tname);
                if let Some((other, first)) = sockets.get(&sock).cloned() {
                    cx.err(
                        rt.name.span(),
                        format!("board {bname:?} tty {tname:?} needs the socket {sock:?}, which {other} (at {}) needs too", cx.pos(&first)),
                        Some("board and tty names are joined with '.'; rename one so the joined names differ".into()),
                    );
                } else {
                    sockets.insert(
                        sock,
                        (format!("board {bname:?} tty {tname:?}"), rt.name.span()),
                    );
                }
            }
            let rate = match rt
                .rate
                .as_ref()
                .and_then(|r| r.ok(cx, "rate", "a whole number of bits per second, e.g. 115200"))
            {
                None => DEFAULT_RATE,
                Some(r) => {
                    let v = *r.get_ref();
                    if !(50..=20_000_000).contains(&v) {
                        cx.err(
                            r.span(),
                            format!("rate {v} is out of range"),
                            Some("give the baud rate the board's console uses, e.g. 115200".into()),
                        );
                        DEFAULT_RATE
                    } else {
                        v as u32
                    }
                }
            };
            let matcher = validate_match(cx, &rt.matcher);
            matches.push((
                bname.clone(),
                tname.clone(),
                rt.matcher.span(),
                matcher.clone(),
            ));
            ttys.push(Tty {
                name: tname,
                rate,
                matcher,
            });
        }
        let mut sequences = std::collections::BTreeMap::new();
        for (name, text) in &rb.sequences {
            if let Err(why) = check_name(name) {
                cx.err(
                    text.span(),
                    format!("sequence name {name:?} is not allowed: {why}"),
                    Some("name sequences like boards, e.g. reset, bootloader".into()),
                );
            }
            match crate::sequence::parse(text.get_ref()) {
                Ok(_) => {
                    sequences.insert(name.clone(), text.get_ref().clone());
                }
                Err(why) => cx.err(
                    text.span(),
                    format!("sequence {name:?}: {why}"),
                    Some("write steps like \"dtr=0 rts=1 sleep=100ms rts=0\"".into()),
                ),
            }
        }
        boards.push(Board {
            name: bname,
            compatible: rb.compatible.into_iter().map(Spanned::into_inner).collect(),
            machines: rb.machines.into_iter().map(Spanned::into_inner).collect(),
            host_groups: rb
                .host_groups
                .into_iter()
                .map(Spanned::into_inner)
                .collect(),
            console: validate_console(cx, rb.console.as_ref(), &ttys),
            reenumerate_grace: validate_grace(cx, rb.reenumerate_grace.as_ref()),
            ttys,
            sequences,
        });
    }

    for i in 0..matches.len() {
        for j in 0..i {
            let (ab, at, aspan, am) = &matches[i];
            let (bb, bt, bspan, bm) = &matches[j];
            if *am == Match::default() || *bm == Match::default() {
                continue; // already reported as empty
            }
            if could_match_same(am, bm) {
                cx.err(
                    aspan.clone(),
                    format!(
                        "board {ab:?} tty {at:?} and board {bb:?} tty {bt:?} (match at {}) can match the same adapter",
                        cx.pos(bspan)
                    ),
                    Some("tell them apart with a key both give with different values: serial = \"...\" (ID_SERIAL_SHORT), or path = \"...\" (ID_PATH) for adapters without a serial number; `udevadm info /dev/ttyUSB0` shows them".into()),
                );
            }
        }
    }
    Config {
        boards,
        machines,
        metrics,
    }
}

fn validate_match(cx: &mut Ctx, m: &Spanned<RawMatch>) -> Match {
    let raw = m.get_ref();
    let mut out = Match::default();
    if let Some(b) = &raw.by_id {
        match check_link_name(b.get_ref()) {
            Ok(()) => out.by_id = Some(b.get_ref().clone()),
            Err(why) => {
                let base = b
                    .get_ref()
                    .rsplit('/')
                    .find(|s| !s.is_empty() && *s != "." && *s != "..")
                    .unwrap_or("usb-...");
                cx.err(b.span(), format!("by-id {:?} is not a link name: {why}", b.get_ref()), Some(format!("write the name of the link in /dev/serial/by-id alone, e.g. by-id = {base:?}")));
            }
        }
    }
    for (key, val, slot) in [
        ("serial", &raw.serial, &mut out.serial),
        ("path", &raw.path, &mut out.path),
    ] {
        if let Some(v) = val {
            let s = v.get_ref();
            if !is_match_value(s) {
                cx.err(
                    v.span(),
                    format!("{key} {s:?} is empty or has white space"),
                    Some(format!("copy {key} from `udevadm info /dev/ttyUSB0`")),
                );
            } else {
                *slot = Some(s.clone());
            }
        }
    }
    if let Some(u) = &raw.usb {
        match UsbId::parse(u.get_ref()) {
            Some(id) => out.usb = Some(id),
            None => cx.err(
                u.span(),
                format!("usb {:?} is not VENDOR:PRODUCT", u.get_ref()),
                Some("write four hex digits each, e.g. usb = \"0403:6001\"".into()),
            ),
        }
    }
    if raw.by_id.is_none() && raw.serial.is_none() && raw.path.is_none() && raw.usb.is_none() {
        cx.err(
            m.span(),
            "match is empty: it would match any adapter".into(),
            Some("give at least one of by-id, serial, path, usb".into()),
        );
    }
    out
}

/// Whether `s` can be a `serial` or `path` value: not empty, no white space
/// or control characters.
pub fn is_match_value(s: &str) -> bool {
    !s.is_empty() && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Whether some adapter could satisfy both matches. Two matches are apart
/// only when a key both give differs; a by-id name embeds the serial number
/// (`usb-<vendor>_<model>_<serial>-if00`), so a by-id and a serial that isn't
/// in it are apart too.
pub fn could_match_same(a: &Match, b: &Match) -> bool {
    fn differ<T: PartialEq>(x: &Option<T>, y: &Option<T>) -> bool {
        matches!((x, y), (Some(x), Some(y)) if x != y)
    }
    if differ(&a.by_id, &b.by_id)
        || differ(&a.serial, &b.serial)
        || differ(&a.path, &b.path)
        || differ(&a.usb, &b.usb)
    {
        return false;
    }
    let by_id_vs_serial = |m: &Match, n: &Match| match (&m.by_id, &n.serial) {
        (Some(link), Some(serial)) => !link.contains(serial.as_str()),
        _ => false,
    };
    !(by_id_vs_serial(a, b) || by_id_vs_serial(b, a))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errs(text: &str) -> Vec<String> {
        match parse(Path::new("t.toml"), text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    const GOOD: &str = r#"
[[board]]
name = "esp1"
compatible = ["esp32"]
machines = ["ci1"]

[[board.tty]]
name = "console"
match = { by-id = "usb-FTDI_FT232R_USB_UART_A1B2C3-if00-port0" }
"#;

    #[test]
    fn good_config() {
        let c = parse(Path::new("t.toml"), GOOD).unwrap();
        assert_eq!(c.boards[0].ttys[0].rate, DEFAULT_RATE);
        assert_eq!(c.boards[0].dedicated_machine(), Some("ci1"));
    }

    #[test]
    fn line_col_counts_from_one() {
        assert_eq!(line_col("ab\ncd", 4), (2, 2));
        assert_eq!(line_col("x", 0), (1, 1));
    }

    #[test]
    fn overlap_rules() {
        let by = |s: &str| Match {
            by_id: Some(s.into()),
            ..Default::default()
        };
        let ser = |s: &str| Match {
            serial: Some(s.into()),
            ..Default::default()
        };
        let usb = Match {
            usb: UsbId::parse("0403:6001"),
            ..Default::default()
        };
        assert!(!could_match_same(&by("a"), &by("b")));
        assert!(could_match_same(&by("a"), &by("a")));
        assert!(could_match_same(&usb, &ser("X")));
        assert!(!could_match_same(&by("usb-FTDI_X_A1-if00"), &ser("B2")));
        assert!(could_match_same(&by("usb-FTDI_X_A1-if00"), &ser("A1")));
        let both = Match {
            serial: Some("A".into()),
            usb: UsbId::parse("0403:6001"),
            ..Default::default()
        };
        assert!(!could_match_same(&both, &ser("B")));
    }

    #[test]
    fn control_character_in_a_comment_is_named() {
        // Found by fuzz/ (target config): toml's error has an empty message.
        let e = errs("# devbroker\n#\x02\n[[board]]\n");
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(
            e[0].starts_with("t.toml:2:2: the character '\\u{2}' is not allowed here"),
            "{e:?}"
        );
        assert!(e[0].contains("help:"), "{e:?}");
        let e = errs("#\r");
        assert!(e[0].starts_with("t.toml:1:2: the character '\\r'"), "{e:?}");
    }

    #[test]
    fn unknown_key_names_the_key() {
        let e = errs("[[board]]\nname = \"a\"\ncolour = \"red\"\n");
        assert!(
            e[0].starts_with("t.toml:3:1: unknown field `colour`"),
            "{e:?}"
        );
        assert!(e[0].contains("help:"));
    }
}
