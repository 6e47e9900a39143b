//! Child processes owned by a test: stopped by PID when dropped.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A child process, killed (SIGKILL, by PID) and reaped when dropped unless it already exited.
pub struct Owned {
    child: Option<Child>,
    name: String,
    output: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Owned {
    /// Spawns `program args` under `setpriv --pdeathsig KILL`, capturing stdout and stderr
    /// (interleaved, line by line) into a buffer readable with [`Owned::output`].
    pub fn spawn(name: &str, program: &Path, args: &[&str], envs: &[(&str, &str)]) -> Owned {
        let mut cmd = if Path::new("/usr/bin/setpriv").exists() {
            let mut c = Command::new("/usr/bin/setpriv");
            c.arg("--pdeathsig").arg("KILL").arg("--").arg(program);
            c
        } else {
            Command::new(program)
        };
        cmd.args(args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({}): {e}", program.display()));
        let output = Arc::new(Mutex::new(String::new()));
        let mut readers = Vec::new();
        for pipe in [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let out = output.clone();
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { break };
                    let mut o = out.lock().unwrap();
                    o.push_str(&line);
                    o.push('\n');
                }
            }));
        }
        Owned {
            child: Some(child),
            name: name.to_owned(),
            output,
            readers,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Sends `signal` (e.g. "TERM", "KILL", "HUP") to the process by PID.
    pub fn signal(&self, signal: &str) {
        if let Some(c) = &self.child {
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(c.id().to_string())
                .stderr(Stdio::null())
                .status();
        }
    }

    /// Waits up to `limit` for the process to exit; once it has, [`Owned::output`] holds
    /// everything it printed (its last lines are read from the pipes before this returns).
    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let start = std::time::Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                self.drain_output();
                return Some(status);
            }
            if start.elapsed() >= limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits (a few seconds at most: a grandchild may hold the pipes open) until the output
    /// of an exited process has been read to its end.
    fn drain_output(&mut self) {
        let start = std::time::Instant::now();
        while self.readers.iter().any(|r| !r.is_finished())
            && start.elapsed() < Duration::from_secs(5)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Kills the process (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills the process and every process it started (found through /proc, by PID), for
    /// servers whose start script leaves the real server as a grandchild.
    pub fn kill_tree(&mut self) {
        if let Some(c) = &self.child {
            let mut pids = vec![c.id()];
            let mut i = 0;
            while i < pids.len() {
                pids.extend(children(pids[i]));
                i += 1;
            }
            for pid in pids.iter().rev() {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
            }
        }
        self.kill();
    }

    /// Waits until something listens on every address, panicking with the process output
    /// and `log()` if the process exits first or `limit` passes.
    pub fn wait_listening(
        &mut self,
        addrs: &[std::net::SocketAddr],
        limit: Duration,
        log: impl Fn() -> String,
    ) {
        let up = crate::wait_until(limit, || {
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited ({status}) while starting:\n{}\n{}",
                    self.name,
                    self.output(),
                    log()
                );
            }
            addrs
                .iter()
                .all(|a| std::net::TcpStream::connect(a).is_ok())
                .then_some(())
        });
        if up.is_none() {
            panic!("{} did not listen within {limit:?}:\n{}", self.name, log());
        }
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Direct children of `pid`, from /proc/PID/task/*/children.
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(list) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(
                    list.split_whitespace()
                        .filter_map(|p| p.parse::<u32>().ok()),
                );
            }
        }
    }
    out
}
