//! A script driven step by step: it prints a line at each step and waits
//! for a newline on stdin before going on, so a test can check the world
//! between two of its calls.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use crate::DieWithParent;

pub struct Stepped {
    child: Child,
    out: BufReader<ChildStdout>,
    stdin: ChildStdin,
}

impl Stepped {
    /// Starts `cmd` with piped stdin and stdout, stderr to `log`, and
    /// without the umockdev preload (the script needs no emulated devices).
    pub fn start(cmd: &mut Command, log: &Path) -> Stepped {
        let mut child = cmd
            .env_remove("LD_PRELOAD")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(log).unwrap())
            .die_with_parent()
            .spawn()
            .expect("start the script");
        Stepped {
            out: BufReader::new(child.stdout.take().unwrap()),
            stdin: child.stdin.take().unwrap(),
            child,
        }
    }

    /// A python3 script (`/usr/bin/python3 -c SCRIPT ARGS...`).
    pub fn python(script: &str, args: &[&str], log: &Path) -> Stepped {
        Stepped::start(
            Command::new("/usr/bin/python3")
                .args(["-c", script])
                .args(args),
            log,
        )
    }

    /// The script's next line, or `None` when it ended.
    pub fn line(&mut self) -> Option<String> {
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        if line.is_empty() {
            let _ = self.child.wait();
            return None;
        }
        Some(line.trim_end().to_string())
    }

    /// Lets the script go on to its next step.
    pub fn go(&mut self) {
        writeln!(self.stdin).unwrap();
    }

    /// Waits for the script to end; its exit status.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().unwrap()
    }
}
