//! The systemd unit shipped in `deploy/`: supervised (notify, watchdog, reload = in-place
//! upgrade) and hardened, as `systemd-analyze security` scores it.

use std::path::Path;
use std::process::Command;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/jat-proxy.service");

fn settings() -> Vec<(String, String)> {
    std::fs::read_to_string(UNIT)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

fn get(key: &str) -> Vec<String> {
    settings()
        .into_iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect()
}

#[test]
fn supervision_settings() {
    assert_eq!(get("Type"), ["notify"]);
    assert_eq!(get("NotifyAccess"), ["main"]);
    assert_eq!(get("ExecReload"), ["/bin/kill -USR2 $MAINPID"]);
    let watchdog = get("WatchdogSec");
    assert_eq!(watchdog.len(), 1);
    assert!(watchdog[0].ends_with('s'), "{watchdog:?}");
    assert_eq!(get("Restart"), ["on-failure"]);
    assert_eq!(get("RestartPreventExitStatus"), ["2"]);
}

#[test]
fn exposure_is_at_most_one() {
    let tool = Path::new("/usr/bin/systemd-analyze");
    assert!(
        tool.exists(),
        "systemd-analyze is missing: run `apt-get install -y systemd` (scripts/install-deps does), then run the tests again"
    );
    let out = Command::new(tool)
        .args(["security", "--offline=true", "--no-pager", UNIT])
        .output()
        .expect("run systemd-analyze");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let level: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for jat-proxy.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{text}"));
    testkit::report(&format!("systemd-analyze security: exposure {level}"));
    assert!(level <= 1.0, "exposure {level}:\n{text}");
}
