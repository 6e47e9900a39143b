//! Records the git revision of the source being built, for the `jat_proxy_build_info`
//! metric: `JAT_PROXY_GIT_REVISION` from the environment if set (a package built from a
//! tarball), else `git rev-parse --short=12 HEAD`, else "unknown".

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (!s.is_empty()).then_some(s)
}

fn main() {
    println!("cargo:rerun-if-env-changed=JAT_PROXY_GIT_REVISION");
    println!("cargo:rerun-if-changed=build.rs");
    let revision = match std::env::var("JAT_PROXY_GIT_REVISION") {
        Ok(r) if !r.trim().is_empty() => r.trim().to_owned(),
        _ => {
            // Built again when HEAD moves: HEAD itself (another branch) and the ref it names
            // (a new commit), wherever this work tree keeps them.
            for path in ["HEAD".to_owned()]
                .into_iter()
                .chain(git(&["symbolic-ref", "-q", "HEAD"]))
                .filter_map(|p| git(&["rev-parse", "--path-format=absolute", "--git-path", &p]))
                .chain(git(&[
                    "rev-parse",
                    "--path-format=absolute",
                    "--git-path",
                    "packed-refs",
                ]))
            {
                if std::path::Path::new(&path).exists() {
                    println!("cargo:rerun-if-changed={path}");
                }
            }
            git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".to_owned())
        }
    };
    println!("cargo:rustc-env=JAT_PROXY_GIT_REVISION={revision}");
}
