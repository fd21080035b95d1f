//! `devbroker machine setup|check|remove` as commands: the options resolved
//! against the config, the work done by [`super::setup`] and
//! [`super::check`], and what to print about it.

use std::path::PathBuf;

use crate::cli::MachineCmd;
use crate::config::{self, Config};

use super::{check, network, setup};

/// Runs a `machine` subcommand; the exit status.
pub fn run(cmd: MachineCmd) -> anyhow::Result<u8> {
    match cmd {
        MachineCmd::Setup {
            name,
            tree,
            nspawn_dir,
            user,
            dry_run,
            apply_host_network,
            run_dir,
            devshim,
            state_dir,
            machines_dir,
            config: cfg_path,
        } => {
            let cfg = if cfg_path.exists() {
                config::load(&cfg_path)?
            } else {
                Config::default()
            };
            let devshim = match devshim {
                Some(p) => p,
                None => std::env::current_exe()?.with_file_name("devshim"),
            };
            let opts = setup_options(SetupArgs {
                cfg: &cfg,
                name: &name,
                tree,
                nspawn_dir,
                user,
                run_dir,
                devshim,
                state_dir,
                machines_dir,
                dry_run,
            })?;
            let rep = setup::setup(&opts)?;
            print!("{}", setup_report(&name, &rep, dry_run));
            let steps = network::host_steps(&name, rep.subnet);
            println!(
                "\nHost side, for 192.168.{}.0/24 on {}:\n{}",
                rep.subnet,
                super::name::veth(&name),
                network::render(&steps)
            );
            if apply_host_network && !dry_run {
                match network::apply(&steps) {
                    Ok(done) => print!("{done}"),
                    Err(e) => eprintln!("devbroker: {e}"),
                }
            }
            Ok(0)
        }
        MachineCmd::Check {
            name,
            fix,
            systemd_dir,
            nspawn_dir,
            udev_dir,
        } => {
            super::name::check(&name).map_err(anyhow::Error::msg)?;
            let found = check::scan(&check::Places {
                machine: name.clone(),
                systemd_dir,
                nspawn_dirs: nspawn_dir,
                udev_dir,
            });
            check_report(&name, &found, fix)
        }
        MachineCmd::Remove { name, state_dir } => {
            let rep = setup::remove(&name, &state_dir)?;
            for u in &rep.undone {
                println!("  {u}");
            }
            for k in &rep.kept {
                println!("  kept {k}");
            }
            println!("machine {name}: removed what setup added");
            Ok(0)
        }
    }
}

/// What `machine setup` was given.
struct SetupArgs<'a> {
    cfg: &'a Config,
    name: &'a str,
    tree: Option<PathBuf>,
    nspawn_dir: PathBuf,
    user: Option<String>,
    run_dir: PathBuf,
    devshim: PathBuf,
    state_dir: PathBuf,
    machines_dir: PathBuf,
    dry_run: bool,
}

/// The setup options: flags first, then the config's `[[machine]]` entry,
/// then the defaults; every path made absolute (the record keeps them).
fn setup_options(a: SetupArgs<'_>) -> anyhow::Result<setup::SetupOptions> {
    let entry = a.cfg.machines.iter().find(|m| m.name == a.name);
    let (user, uid) = match (&a.user, entry) {
        (Some(u), _) => config::parse_job_user(u).map_err(anyhow::Error::msg)?,
        (None, Some(m)) => (m.user.clone(), m.uid),
        (None, None) => config::parse_job_user(config::DEFAULT_JOB_USER).expect("valid default"),
    };
    let tree = a
        .tree
        .or_else(|| entry.map(|m| m.tree.clone()))
        .unwrap_or_else(|| a.machines_dir.join(a.name));
    let names: Vec<String> = crate::plan::machines(a.cfg).into_iter().collect();
    let others = super::known_machines(
        &a.machines_dir,
        &[
            PathBuf::from("/etc/systemd/nspawn"),
            PathBuf::from("/run/systemd/nspawn"),
            a.nspawn_dir.clone(),
        ],
        &names,
    );
    let abs = |p: PathBuf| std::path::absolute(&p).unwrap_or(p);
    Ok(setup::SetupOptions {
        name: a.name.to_string(),
        tree: abs(tree),
        nspawn_dir: abs(a.nspawn_dir),
        run_dir: abs(a.run_dir),
        user,
        uid,
        devshim: a.devshim,
        state_dir: abs(a.state_dir),
        machines_dir: abs(a.machines_dir),
        other_machines: others,
        dry_run: a.dry_run,
    })
}

/// What setup did, or would do with `--dry-run`.
fn setup_report(name: &str, rep: &setup::SetupReport, dry_run: bool) -> String {
    let mut out = String::new();
    if dry_run {
        out += &rep.diff;
        if rep.changed.is_empty() {
            out += &format!("machine {name}: already set up; nothing would change\n");
        } else {
            out += &format!(
                "machine {name}: {} paths would change (dry run: nothing written)\n",
                rep.changed.len()
            );
        }
    } else if rep.changed.is_empty() {
        out += &format!("machine {name}: already set up; nothing changed\n");
    } else {
        for c in &rep.changed {
            out += &format!("  wrote {c}\n");
        }
        out += &format!(
            "machine {name}: set up ({} paths changed; `devbroker machine remove {name}` undoes it)\n",
            rep.changed.len()
        );
    }
    if rep.uid_shift != 0 {
        out += &format!(
            "  the tree is owned by uid {}: private users (-U) shift ids by that much\n",
            rep.uid_shift
        );
    }
    out
}

/// Prints what `check` found and, with `--fix`, fixes it; the exit status
/// (1 while leftovers remain).
fn check_report(name: &str, found: &[check::Finding], fix: bool) -> anyhow::Result<u8> {
    if found.is_empty() {
        println!("machine {name}: no leftovers of binding devices by hand");
        return Ok(0);
    }
    for f in found {
        println!("{f}");
    }
    if !fix {
        println!(
            "machine {name}: {} leftover lines; `devbroker machine check {name} --fix` removes them",
            found.len()
        );
        return Ok(1);
    }
    let fixed = check::fix(found)?;
    for b in &fixed.backups {
        println!("  backup kept: {}", b.display());
    }
    for r in &fixed.refused {
        eprintln!("devbroker: not fixed: {r}");
    }
    if !fixed.refused.is_empty() {
        println!(
            "machine {name}: {} of {} files with leftovers fixed; fix the others by hand",
            fixed.backups.len(),
            fixed.backups.len() + fixed.refused.len()
        );
        return Ok(1);
    }
    println!(
        "machine {name}: removed {} leftover lines; restart the container to drop them",
        found.len()
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn setup_options_come_from_flags_then_the_config_then_defaults() {
        let cfg = crate::config::parse(
            Path::new("t"),
            "[[machine]]\nname = \"ci1\"\ntree = \"/srv/ci1\"\nuser = \"builder:1500\"\n",
        )
        .unwrap();
        let args = |name: &'static str, user: Option<&str>| SetupArgs {
            cfg: &cfg,
            name,
            tree: None,
            nspawn_dir: "/etc/systemd/nspawn".into(),
            user: user.map(str::to_owned),
            run_dir: "/run/devbroker".into(),
            devshim: "/usr/lib/devbroker/devshim".into(),
            state_dir: "/var/lib/devbroker".into(),
            machines_dir: "/nonexistent-machines".into(),
            dry_run: false,
        };
        let o = setup_options(args("ci1", None)).unwrap();
        assert_eq!(o.tree, Path::new("/srv/ci1"));
        assert_eq!((o.user.as_str(), o.uid), ("builder", 1500));
        let o = setup_options(args("ci1", Some("sai:883"))).unwrap();
        assert_eq!((o.user.as_str(), o.uid), ("sai", 883));
        let o = setup_options(args("ci2", None)).unwrap();
        assert_eq!(o.tree, Path::new("/nonexistent-machines/ci2"));
        assert_eq!((o.user.as_str(), o.uid), ("sai", 883));
        assert!(setup_options(args("ci2", Some("root:0"))).is_err());
    }
}
