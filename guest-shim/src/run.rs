//! Runs a job's command the way `devshim run`, `devshim lease` and
//! `sai-device` do: under the line-control supervisor where the kernel
//! allows it ([`crate::supervise`]), with SIGINT, SIGTERM and SIGHUP
//! forwarded, returning its exit status (128 + the signal if one killed it).

use std::path::Path;

/// Exit status when the command could not be run at all (as a shell's).
pub const EXIT_CANT_RUN: u8 = 127;

/// Runs `cmd` with `env` added; `state_dir` is where `devshim serve` keeps
/// `ports.json`. Errors carry the exit status to leave with.
pub fn command(
    cmd: &[String],
    env: &[(String, String)],
    state_dir: &Path,
) -> Result<u8, (u8, String)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| (1, e.to_string()))?;
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut c = tokio::process::Command::new(&cmd[0]);
        c.args(&cmd[1..])
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let supervision = crate::supervise::prepare(&mut c, state_dir);
        let mut child = c
            .spawn()
            .map_err(|e| (EXIT_CANT_RUN, format!("can't run {}: {e}", cmd[0])))?;
        // The supervisor thread lives as long as this process: it serves
        // whatever of the job still runs until then.
        let _supervisor = supervision.and_then(|s| s.started());
        let pid = child.id().map(|p| nix::unistd::Pid::from_raw(p as i32));
        let mut int = signal(SignalKind::interrupt()).map_err(|e| (1, e.to_string()))?;
        let mut term = signal(SignalKind::terminate()).map_err(|e| (1, e.to_string()))?;
        let mut hup = signal(SignalKind::hangup()).map_err(|e| (1, e.to_string()))?;
        loop {
            let sig = tokio::select! {
                st = child.wait() => {
                    let st = st.map_err(|e| (1, e.to_string()))?;
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
