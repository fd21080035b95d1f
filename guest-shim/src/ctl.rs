//! `devshim ctl BOARD SEQUENCE | STEP...`: line control a pty can't carry,
//! run by the broker on the host next to the port (exact timing, real DTR,
//! RTS and break), for a board this machine holds.

use std::path::Path;

use wire::control::{Reply, Request};
use wire::manifest::CONTROL_SOCKET;

use crate::lease::Control;

/// Builds the request: one word without `=` names a sequence; otherwise the
/// words are steps (`dtr=0 rts=1 break=250ms baud=N sleep=100ms`).
pub fn request(board: &str, tty: Option<String>, words: &[String]) -> Result<Request, String> {
    match words {
        [] => Err("name a sequence (reset, bootloader, esp32-bootloader, ...) or give steps like dtr=0 rts=1".into()),
        [one] if !one.contains('=') => Ok(Request::Run { board: board.into(), tty, sequence: Some(one.clone()), steps: None }),
        steps => Ok(Request::Run { board: board.into(), tty, sequence: None, steps: Some(steps.join(" ")) }),
    }
}

/// Sends the request and prints what ran; returns the exit status.
pub fn run(dir: &Path, req: &Request) -> u8 {
    let result = (|| -> Result<Vec<wire::control::StepTiming>, (u8, String)> {
        let mut c = Control::connect(&dir.join(CONTROL_SOCKET), "devshim-ctl")?;
        c.send(req)?;
        match c.read()? {
            Reply::Ran { steps, .. } => Ok(steps),
            Reply::Error { message, .. } => Err((1, message)),
            other => Err((1, format!("unexpected reply {other:?}"))),
        }
    })();
    match result {
        Ok(steps) => {
            for s in steps {
                println!(
                    "{:>9.3} ms  {:<14} (+{:.0} us)",
                    s.nominal_us as f64 / 1000.0,
                    s.step,
                    s.late_us
                );
            }
            0
        }
        Err((_, e)) => {
            eprintln!("devshim: {e}");
            1
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_become_a_request() {
        let r = request("esp1", None, &["reset".to_string()]).unwrap();
        assert!(matches!(r, Request::Run { sequence: Some(ref s), .. } if s == "reset"));
        let r = request("esp1", None, &["dtr=0".to_string(), "rts=1".to_string()]).unwrap();
        assert!(matches!(r, Request::Run { steps: Some(ref s), .. } if s == "dtr=0 rts=1"));
        assert!(request("esp1", None, &[]).is_err());
    }
}
