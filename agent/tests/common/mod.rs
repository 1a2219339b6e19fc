//! Helpers the agent's integration tests share.

use std::process::Command;

/// Whether this process's effective uid is 0.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A command running `program` without privileges: as `nobody` with no capabilities when
/// we are root (CI), so that a refusal really happens; as ourselves otherwise.
pub fn unprivileged(program: &str) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            program,
        ]);
        c
    } else {
        Command::new(program)
    }
}
