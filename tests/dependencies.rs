//! The daemon does not link the test and fuzz hooks' generator: `arbitrary` is a dependency
//! only with the `fuzzing` feature, which the fuzz crate and this package's own tests and
//! benchmarks enable (Cargo.toml), never a release build.

use std::process::Command;

#[test]
fn the_daemon_does_not_depend_on_arbitrary() {
    let out = Command::new(env!("CARGO"))
        .args(["tree", "--offline", "--edges", "normal", "--prefix", "none"])
        .args(["--package", "jat-proxy", "--manifest-path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .output()
        .expect("cargo runs");
    assert!(
        out.status.success(),
        "cargo tree: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8(out.stdout).expect("UTF-8");
    let has = |name: &str| tree.lines().any(|l| l.starts_with(&format!("{name} v")));
    assert!(has("jat-proxy") && has("tokio"), "not a tree: {tree}");
    assert!(
        !has("arbitrary"),
        "the daemon depends on arbitrary:\n{tree}"
    );
}
