//! A throwaway Prometheus server on loopback (Debian's `prometheus` package): its own
//! configuration, data directory and free port, scraping the given targets every second.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::ports::free_port;
use crate::process::Owned;

const BINARY: &str = "/usr/bin/prometheus";
/// Debian's `promtool`, from the same package.
pub const PROMTOOL: &str = "/usr/bin/promtool";

/// Panics, saying how to install it, unless Prometheus (and promtool) is installed. Never
/// skips.
pub fn require() {
    for binary in [BINARY, PROMTOOL] {
        if !Path::new(binary).exists() {
            panic!(
                "Prometheus is not installed ({binary} missing). The monitoring tests scrape \
                 jat-proxy with a real Prometheus: run `apt-get install -y prometheus` \
                 (Debian/Ubuntu; or scripts/install-deps), then run the tests again."
            );
        }
    }
}

/// A running Prometheus.
pub struct Prometheus {
    dir: PathBuf,
    process: Owned,
    /// Its web listener (the query API is under `/api/v1/`).
    pub web: SocketAddr,
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (job `jat-proxy`) every second, with these rule
    /// files loaded (Prometheus refuses to start if one is invalid).
    pub fn start(targets: &[SocketAddr], rule_files: &[&Path]) -> Prometheus {
        require();
        let dir = crate::work_dir("prometheus");
        let web = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let list: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let rules: Vec<String> = rule_files
            .iter()
            .map(|p| format!("  - \"{}\"\n", p.display()))
            .collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n{}\
             scrape_configs:\n  - job_name: jat-proxy\n    static_configs:\n      - targets: [{}]\n",
            rules.concat(),
            list.join(", ")
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let mut process = Owned::spawn(
            "prometheus",
            Path::new(BINARY),
            &[
                &format!("--config.file={}", config_path.display()),
                &format!("--storage.tsdb.path={}", dir.join("data").display()),
                &format!("--web.listen-address={web}"),
                "--log.level=warn",
            ],
            &[],
        );
        process.wait_listening(&[web], Duration::from_secs(60), String::new);
        Prometheus { dir, process, web }
    }

    /// The value of an instant query's first sample, if it has one.
    pub fn query(&self, promql: &str) -> Option<f64> {
        let r = crate::http::get(
            self.web,
            &format!("/api/v1/query?query={}", crate::http::encode(promql)),
        )?;
        if r.status != 200 {
            return None;
        }
        // {"status":"success","data":{"resultType":"vector","result":[{"metric":{...},
        // "value":[1733.123,"20"]}]}}
        let after = r.body.split_once("\"value\":[")?.1;
        let v = after.split_once(",\"")?.1.split('"').next()?;
        v.parse().ok()
    }

    /// Its output so far.
    pub fn log(&self) -> String {
        self.process.output()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.process.kill();
        crate::discard_work_dir(&self.dir, "prometheus");
    }
}
