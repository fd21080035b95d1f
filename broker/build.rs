//! With the `package` feature (what `cargo deb` builds), makes what the
//! Debian package ships besides the devbroker binary, in
//! `target/release/package/`:
//!
//! - `devshim`: the static, stripped devshim that goes into containers
//!   (`machine setup` installs it from next to devbroker);
//! - `man/*.1`: man pages of both commands and every subcommand, rendered
//!   from their command lines (clap_mangen);
//! - `completions/`: bash, zsh and fish completions of both (clap_complete).
//!
//! Without the feature (every ordinary build, check or clippy run) it does
//! nothing.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    #[cfg(feature = "package")]
    package::make();
}

/// devbroker's command line, as the binary parses it.
#[cfg(feature = "package")]
#[path = "src/cli.rs"]
mod broker_cli;

/// devshim's.
#[cfg(feature = "package")]
#[path = "../guest-shim/src/cli.rs"]
mod devshim_cli;

/// How the static devshim is built.
#[cfg(feature = "package")]
#[path = "../guest-shim/static_build.rs"]
mod static_build;

#[cfg(feature = "package")]
mod package {
    use std::path::{Path, PathBuf};

    use super::{broker_cli, devshim_cli, static_build};

    pub fn make() {
        for f in [
            "src/cli.rs",
            "../guest-shim/src",
            "../guest-shim/static_build.rs",
            "../wire/src",
            "../Cargo.lock",
        ] {
            println!("cargo:rerun-if-changed={f}");
        }
        let out = package_dir();
        std::fs::create_dir_all(out.join("man")).unwrap();
        std::fs::create_dir_all(out.join("completions")).unwrap();
        use clap::CommandFactory;
        render(broker_cli::Cli::command(), &out);
        render(devshim_cli::Cli::command(), &out);
        static_devshim(&out);
    }

    /// `target/<profile>/package`, beside the binaries (`OUT_DIR` is
    /// `target/<profile>/build/devbroker-HASH/out`).
    fn package_dir() -> PathBuf {
        let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
        out.ancestors().nth(3).unwrap().join("package")
    }

    /// The man pages of `cmd` and its subcommands, and its completions.
    fn render(cmd: clap::Command, out: &Path) {
        let name = cmd.get_name().to_string();
        let mut cmd = cmd;
        cmd.build();
        man(&cmd, &name, &out.join("man"));
        use clap_complete::Shell;
        for (shell, file) in [
            (Shell::Bash, format!("{name}.bash")),
            (Shell::Zsh, format!("_{name}")),
            (Shell::Fish, format!("{name}.fish")),
        ] {
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, &name, &mut buf);
            std::fs::write(out.join("completions").join(file), buf).unwrap();
        }
    }

    /// `NAME.1` for a command, `NAME-SUB.1` for each subcommand, down the tree.
    fn man(cmd: &clap::Command, page: &str, dir: &Path) {
        let mut buf = Vec::new();
        let title: &'static str = Box::leak(page.to_string().into_boxed_str());
        clap_mangen::Man::new(cmd.clone().name(title))
            .render(&mut buf)
            .unwrap();
        std::fs::write(dir.join(format!("{page}.1")), buf).unwrap();
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            man(sub, &format!("{page}-{}", sub.get_name()), dir);
        }
    }

    /// Builds devshim static and stripped (the recipe the suite uses).
    fn static_devshim(out: &Path) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let built = static_build::build(root, &std::env::var("TARGET").unwrap());
        std::fs::copy(built, out.join("devshim")).unwrap();
    }
}
