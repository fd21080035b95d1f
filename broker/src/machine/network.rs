//! The host side of a machine's network: NetworkManager shares the host's
//! connection on the machine's veth, and firewalld lets it through.

use std::process::Command;

use super::name::veth;

/// The commands that set up the host side for a machine on `192.168.N.0/24`.
pub fn host_steps(machine: &str, subnet: u8) -> Vec<Vec<String>> {
    let ve = veth(machine);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<String>>();
    vec![
        s(&["firewall-cmd", "--permanent", "--new-zone=vm"]),
        s(&[
            "firewall-cmd",
            "--permanent",
            "--zone=vm",
            "--add-masquerade",
        ]),
        s(&[
            "firewall-cmd",
            "--permanent",
            "--zone=vm",
            "--add-service=dns",
        ]),
        s(&[
            "firewall-cmd",
            "--permanent",
            "--zone=vm",
            "--add-service=dhcp",
        ]),
        s(&["firewall-cmd", "--reload"]),
        vec![
            "nmcli".into(),
            "connection".into(),
            "add".into(),
            "type".into(),
            "ethernet".into(),
            "ifname".into(),
            ve.clone(),
            "con-name".into(),
            ve.clone(),
            "ipv4.method".into(),
            "shared".into(),
            "ipv4.addresses".into(),
            format!("192.168.{subnet}.1/24"),
            "connection.zone".into(),
            "vm".into(),
        ],
    ]
}

/// Renders the steps as shell lines.
pub fn render(steps: &[Vec<String>]) -> String {
    steps
        .iter()
        .map(|s| format!("  {}\n", s.join(" ")))
        .collect()
}

/// Runs the steps where `nmcli` exists; says what it did or why not.
pub fn apply(steps: &[Vec<String>]) -> Result<String, String> {
    if Command::new("nmcli").arg("--version").output().is_err() {
        return Err("nmcli is not installed here: run the host steps above by hand".into());
    }
    let mut out = String::new();
    for s in steps {
        let r = Command::new(&s[0])
            .args(&s[1..])
            .output()
            .map_err(|e| format!("{}: {e}", s[0]))?;
        let err = String::from_utf8_lossy(&r.stderr);
        // An existing zone or connection is what we want.
        if !r.status.success()
            && !err.contains("ALREADY_ENABLED")
            && !err.contains("NAME_CONFLICT")
            && !err.contains("already exists")
        {
            return Err(format!("{} failed: {}", s.join(" "), err.trim()));
        }
        out.push_str(&format!("  ran: {}\n", s.join(" ")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn steps_name_the_veth_and_subnet() {
        let r = super::render(&super::host_steps("sai-builder-1", 101));
        assert!(r.contains("ifname ve-sai-builder con-name ve-sai-builder ipv4.method shared ipv4.addresses 192.168.101.1/24 connection.zone vm"), "{r}");
        assert!(r.contains("--add-masquerade"));
    }
}
