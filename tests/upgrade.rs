//! In-place upgrades over the live stream (SIGUSR2), on real Prosody and ejabberd: the
//! process `exec`s the binary installed at its path and goes on with the same TCP stream
//! and the same PID. And the systemd notification protocol, heard on a socket of the test's.

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use testkit::client::{Answer, Client, reply_to};
use testkit::deployment::{COMPONENT, Deployment, QUIET, WAIT, ejabberd_with_proxies, request};
use testkit::load::Tally;
use testkit::proxy::{ProxyProcess, install_build, lines_with};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jat-proxy"))
}

/// No rate limit in the way of one user sending 200 requests/s.
const UNLIMITED: &str = "\n[limits]\nrate_per_sender = 100000.0\nrate_burst = 100000\n";

/// A directory of the test's holding the binary jat-proxy is started from, as a package
/// manager's `/usr/bin` would.
fn bin_dir(tag: &str) -> PathBuf {
    let dir = testkit::work_dir(tag);
    install_build(&binary(), &dir.join("jat-proxy"), 0);
    dir
}

/// Installs, at `path`, a build that passes the configuration check and exits at once when
/// run for real.
fn install_broken_build(path: &Path, real: &Path) {
    install_script(
        path,
        &format!(
            "case \" $* \" in *\" check \"*) exec '{}' \"$@\";; esac\n\
             echo 'broken build: exiting at once' >&2\nexit 1\n",
            real.display()
        ),
    );
}

/// Installs, at `path`, a shell script standing for a build (written beside it, then renamed
/// over it, as a package manager does).
fn install_script(path: &Path, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, format!("#!/bin/sh\n{body}")).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Seconds since midnight of a log line's timestamp (`2026-12-01T18:34:11.623917Z ...`).
fn at(line: &str) -> f64 {
    let time = line.split('T').nth(1).unwrap_or_default();
    let mut parts = time
        .trim_end_matches(|c: char| !c.is_ascii_digit())
        .split(':');
    let mut secs = 0.0;
    for unit in [3600.0, 60.0, 1.0] {
        let v: f64 = parts
            .next()
            .and_then(|p| p.trim_end_matches('Z').split_whitespace().next())
            .and_then(|p| p.trim_end_matches('Z').parse().ok())
            .unwrap_or(0.0);
        secs += v * unit;
    }
    secs
}

/// For each upgrade in `log`: (ms from SIGUSR2 to the handover — the new binary's check —,
/// ms from the handover to the new process going on with the stream).
fn upgrade_times(log: &str) -> Vec<(u64, u64)> {
    let signals = lines_with(log, "SIGUSR2: upgrading in place");
    let handovers = lines_with(log, "handing the stream over");
    let resumed = lines_with(log, "upgraded in place");
    signals
        .iter()
        .zip(&handovers)
        .zip(&resumed)
        .map(|((s, h), r)| {
            (
                ((at(h) - at(s)) * 1000.0) as u64,
                ((at(r) - at(h)) * 1000.0) as u64,
            )
        })
        .collect()
}

/// Answers every request the implementing client receives, until aborted.
fn answer_everything(mut c: Client) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            if let Some(req) = c.recv_request(Duration::from_secs(1)).await {
                c.send(reply_to(
                    &req,
                    "result",
                    "<query xmlns='urn:example:echo'/>",
                ));
            }
        }
    })
}

/// Sends `rate` requests/s for `duration`, open loop (on schedule, whatever comes back),
/// calling `at_tick` with the time since the start between sends; then waits for the last
/// answers (all, or nothing new for 5 s).
async fn open_loop(
    user: &mut Client,
    rate: u32,
    duration: Duration,
    mut at_tick: impl FnMut(Duration),
) -> Tally {
    let mut tally = Tally::default();
    let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let start = tokio::time::Instant::now();
    let total = (rate as u64 * duration.as_secs()) as usize;
    while tally.sent.len() < total {
        tokio::select! {
            _ = tick.tick() => {
                let id = format!("U{}", tally.sent.len());
                user.send_xml(&request(&id));
                tally.sent.push((id, start.elapsed()));
            }
            Some(r) = user.recv_where(Duration::from_millis(2), |e| e.name() == "iq") => tally.take(r),
        }
        at_tick(start.elapsed());
    }
    let mut last_news = Instant::now();
    while tally.answers.len() < tally.sent.len() && last_news.elapsed() < Duration::from_secs(5) {
        if let Some(r) = user
            .recv_where(Duration::from_millis(200), |e| e.name() == "iq")
            .await
        {
            tally.take(r);
            last_news = Instant::now();
        }
    }
    tally
}

/// 200 requests/s for 15 s with an in-place upgrade to a new build every 2.5 s; returns the
/// build ids installed.
async fn upgrades_under_load(
    server: &str,
    proxy: &ProxyProcess,
    bin: &Path,
    user: &mut Client,
) -> (Tally, Vec<String>) {
    let mut builds: Vec<String> = Vec::new();
    let pid = proxy.pid();
    let mut next = Duration::from_millis(2500);
    let tally = open_loop(user, 200, Duration::from_secs(15), |t| {
        // The next upgrade once the previous one is through (a SIGUSR2 meanwhile would
        // upgrade again, to the same build: each upgrade here is to a build of its own).
        if t >= next
            && builds.len() < 5
            && lines_with(&proxy.log(), "upgraded in place").len() == builds.len()
        {
            builds.push(install_build(
                &binary(),
                &bin.join("jat-proxy"),
                builds.len() + 1,
            ));
            proxy.signal("USR2");
            next += Duration::from_millis(2500);
        }
    })
    .await;
    let upgraded = testkit::wait_until(WAIT, || {
        let log = proxy.log();
        (lines_with(&log, "upgraded in place").len() >= builds.len()
            && lines_with(&log, "running build").len() > builds.len())
        .then_some(())
    });
    assert!(upgraded.is_some(), "{server}: {}", proxy.log());
    assert_eq!(proxy.pid(), pid);
    let _ = server;
    (tally, builds)
}

/// What every run under load must show: each upgrade ran the build installed for it, on the
/// same stream, and every request was answered with a result.
fn assert_lossless(
    server: &str,
    proxy: &ProxyProcess,
    tally: &Tally,
    builds: &[String],
    logins: usize,
) {
    let log = proxy.log();
    assert_eq!(
        lines_with(&log, "upgraded in place").len(),
        builds.len(),
        "{server}:\n{log}"
    );
    let ran: Vec<String> = lines_with(&log, "running build")
        .iter()
        .skip(1)
        .map(|l| {
            testkit::proxy::log_field(l, "build")
                .unwrap_or("?")
                .to_owned()
        })
        .collect();
    assert_eq!(
        ran, builds,
        "{server}: each upgrade runs the build installed for it:\n{log}"
    );
    let starts = lines_with(&log, "jat-proxy starting");
    assert_eq!(starts.len(), 1 + builds.len(), "{server}:\n{log}");
    let (results, errors, lost) = tally.all();
    testkit::report(&format!(
        "{server}: {} requests at 200/s over 15 s with {} in-place upgrades: {results} results, \
         errors {errors:?}, {} lost; component logins in the server's log: {logins}",
        tally.sent.len(),
        builds.len(),
        lost.len()
    ));
    let handed: Vec<String> = lines_with(&log, "handing the stream over")
        .iter()
        .map(|l| {
            testkit::proxy::log_field(l, "pending_bytes")
                .unwrap_or("?")
                .to_owned()
        })
        .collect();
    testkit::report(&format!(
        "{server}: bytes of a stanza in mid-flight handed over at each upgrade: {handed:?}"
    ));
    testkit::report(&format!(
        "{server}: each upgrade's (check by the new binary, exec to resumed stream) in ms: {:?}",
        upgrade_times(&log)
    ));
    assert_eq!(logins, 1, "{server}: one component login for the whole run");
    assert_eq!(
        proxy.sessions(),
        1,
        "{server}: one session for the whole run"
    );
    assert!(errors.is_empty(), "{server}: errors {errors:?}");
    assert!(
        lost.is_empty(),
        "{server}: {} lost: {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
    assert_eq!(results, tally.sent.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_five_upgrades_under_load_lose_nothing() {
    testkit::prosody::require();
    let bin = bin_dir("upgrade-prosody");
    let d = Deployment::start_with(&bin.join("jat-proxy"), UNLIMITED);
    let answering = answer_everything(d.implementing("a").await);
    let mut user = d.client("user", "u").await;
    let (tally, builds) = upgrades_under_load("Prosody", &d.proxy, &bin, &mut user).await;
    answering.abort();
    let logins = d.prosody.component_logins();
    assert_lossless("Prosody", &d.proxy, &tally, &builds, logins);
    testkit::discard_work_dir(&bin, "binaries");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_five_upgrades_under_load_lose_nothing() {
    testkit::ejabberd::require();
    let bin = bin_dir("upgrade-ejabberd");
    let (ejabberd, proxies) = ejabberd_with_proxies(&bin.join("jat-proxy"), 1, "", UNLIMITED);
    let proxy = &proxies[0];
    let implementing = Client::login(
        ejabberd.c2s,
        "localhost",
        "impl",
        "pw",
        "a",
        Answer::Subscriptions,
    )
    .await;
    testkit::deployment::wait_resource(proxy, "a");
    let answering = answer_everything(implementing);
    let mut user = Client::login(
        ejabberd.c2s,
        "localhost",
        "user",
        "pw",
        "u",
        Answer::Nothing,
    )
    .await;
    let (tally, builds) = upgrades_under_load("ejabberd", proxy, &bin, &mut user).await;
    answering.abort();
    // ejabberd writes its log with a delay: a second login would show within a few seconds.
    std::thread::sleep(Duration::from_secs(2));
    let logins = ejabberd.component_logins(COMPONENT);
    assert_lossless("ejabberd", proxy, &tally, &builds, logins);
    testkit::discard_work_dir(&bin, "binaries");
}

/// An upgrade whose configuration is broken is refused and costs nothing; one whose new
/// binary exits at once costs what a restart costs (measured), and the service comes back
/// when it is started again, as systemd's `Restart=on-failure` does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_and_failed_upgrades() {
    testkit::prosody::require();
    let bin = bin_dir("upgrade-refused");
    let path = bin.join("jat-proxy");
    let real = bin.join("jat-proxy.real");
    std::fs::copy(binary(), &real).unwrap();
    let mut d = Deployment::start_with(&path, UNLIMITED);
    let answering = answer_everything(d.implementing("a").await);
    let mut user = d.client("user", "u").await;
    let config = std::fs::read_to_string(&d.config).unwrap();

    let mut phase = 0;
    let mut refusals: Vec<String> = Vec::new();
    let mut first_log = String::new();
    let mut broken_at = Duration::ZERO;
    let mut back_at = Duration::MAX;
    let tally = {
        let proxy = &mut d.proxy;
        let config_path = d.config.clone();
        open_loop(&mut user, 50, Duration::from_secs(10), |t| match phase {
            0 if t >= Duration::from_secs(1) => {
                // An unknown key in the last section (`[limits]`): the new binary's check says
                // which, and where.
                std::fs::write(&config_path, format!("{config}\nbogus = 1\n")).unwrap();
                install_build(&binary(), &path, 1);
                proxy.signal("USR2");
                phase = 1;
            }
            1 => {
                refusals = lines_with(&proxy.log(), "upgrade refused");
                if !refusals.is_empty() {
                    std::fs::write(&config_path, &config).unwrap();
                    phase = 2;
                }
            }
            2 if t >= Duration::from_secs(3) => {
                install_broken_build(&path, &real);
                broken_at = t;
                proxy.signal("USR2");
                phase = 3;
            }
            3 => {
                if let Some(status) = proxy.exited() {
                    first_log = proxy.log();
                    assert_eq!(status.code(), Some(1), "{first_log}");
                    // The service manager starts the unit again; the package's binary is
                    // back in place by then.
                    install_build(&binary(), &path, 2);
                    proxy.restart();
                    phase = 4;
                }
            }
            4 if proxy.log().contains("resource available") => {
                back_at = t + Duration::from_secs(1);
                phase = 5;
            }
            _ => {}
        })
        .await
    };
    answering.abort();
    assert_eq!(
        phase,
        5,
        "every step happened:\n{first_log}\n{}",
        d.proxy.log()
    );
    let refused = lines_with(&first_log, "upgrade refused");
    assert_eq!(refused, refusals, "one refusal:\n{first_log}");
    assert_eq!(refused.len(), 1, "one refusal:\n{first_log}");
    assert!(
        first_log.contains("broken build: exiting at once"),
        "the broken build ran:\n{first_log}"
    );
    assert!(
        refused[0].contains("jat-proxy.toml:") && refused[0].contains("bogus"),
        "the refusal names the file, line and key: {}",
        refused[0]
    );
    let (results, errors, lost) = tally.count(|t| t < broken_at);
    testkit::report(&format!(
        "refused upgrade (broken config): {results} results, errors {errors:?}, {} lost",
        lost.len()
    ));
    assert!(errors.is_empty() && lost.is_empty(), "{errors:?} {lost:?}");
    let (results, errors, lost) = tally.count(|t| (broken_at..back_at).contains(&t));
    testkit::report(&format!(
        "upgrade to a binary that exits at once, then a restart: {} requests in the {} ms \
         until served again: {results} results, errors {errors:?}, {} lost",
        results + errors.values().sum::<usize>() + lost.len(),
        (back_at - broken_at).as_millis(),
        lost.len()
    ));
    let (results, errors, lost) = tally.count(|t| t >= back_at);
    assert!(
        results > 0 && errors.is_empty() && lost.is_empty(),
        "after recovery: {errors:?} {lost:?}"
    );
    testkit::discard_work_dir(&bin, "binaries");
}

/// Whether a request from `user` is answered end to end (a result, from the implementing
/// client).
async fn answered(user: &mut Client, id: &str) -> bool {
    user.send_xml(&request(id));
    let reply = user.recv_iq(id, WAIT).await;
    reply.as_ref().and_then(|r| r.attr("type")) == Some("result")
}

/// An upgrade to a build that could not take the live stream is refused before `exec`, with
/// one log line naming the binary and why, and the process serves on: same PID, same stream,
/// no new login. Two such builds: one that passes `check` but reports no handover format (a
/// build without in-place upgrades: it would refuse `--handover` and exit 2, which the unit
/// does not restart), and one that lacks an argument the process runs with (`check` is run
/// with the arguments the `exec` would give). Then the package's build is back in place, and
/// the next upgrade goes through as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_to_a_build_that_cannot_take_the_stream_is_refused() {
    testkit::prosody::require();
    let bin = bin_dir("upgrade-older");
    let path = bin.join("jat-proxy");
    let real = bin.join("jat-proxy.real");
    std::fs::copy(binary(), &real).unwrap();
    let mut d = Deployment::start_with(&path, "");
    // Run with an argument of its own (its default value), which one of the builds lacks.
    d.proxy.kill9();
    d.proxy = ProxyProcess::start_with_args(&path, &d.config, &["--log-format", "text"]);
    d.proxy.wait_sessions(1, WAIT);
    let answering = answer_everything(d.implementing("a").await);
    let mut user = d.client("user", "u").await;
    assert!(answered(&mut user, "before").await, "{}", d.proxy.log());
    let pid = d.proxy.pid();
    let logins = d.prosody.component_logins();
    let builds = [
        (
            "a build without in-place upgrades",
            "case \" $* \" in *\" check \"*) echo 'configuration and key file OK'; exit 0;; esac\n\
             echo \"error: unexpected argument '--handover' found\" >&2\nexit 2\n"
                .to_owned(),
            "reports no handover format",
        ),
        (
            "a build without --log-format",
            format!(
                "case \" $* \" in *\" --log-format \"*) \
                 echo \"error: unexpected argument '--log-format' found\" >&2; exit 2;; esac\n\
                 case \" $* \" in *\" check \"*) exec '{}' \"$@\";; esac\nexit 2\n",
                real.display()
            ),
            "unexpected argument '--log-format'",
        ),
    ];
    for (n, (what, script, why)) in builds.iter().enumerate() {
        install_script(&path, script);
        d.proxy.signal("USR2");
        let refused = testkit::wait_until(WAIT, || {
            let refused = lines_with(&d.proxy.log(), "upgrade refused");
            refused.get(n).cloned()
        });
        let Some(refused) = refused else {
            panic!("{what}: no refusal:\n{}", d.proxy.log());
        };
        testkit::report(&format!("upgrade to {what}: {refused}"));
        assert!(
            refused.contains(&path.display().to_string()) && refused.contains(why),
            "{what}: the refusal names the binary and why: {refused}"
        );
        assert!(
            answered(&mut user, &format!("after-{n}")).await,
            "{what}: served on:\n{}",
            d.proxy.log()
        );
    }
    std::thread::sleep(QUIET);
    let log = d.proxy.log();
    assert_eq!(d.proxy.exited(), None, "{log}");
    assert_eq!(d.proxy.pid(), pid);
    assert_eq!(
        lines_with(&log, "upgrade refused").len(),
        2,
        "one line per refusal:\n{log}"
    );
    assert!(
        lines_with(&log, "handing the stream over").is_empty(),
        "no exec:\n{log}"
    );
    assert_eq!(d.proxy.sessions(), 1, "no new login:\n{log}");
    assert_eq!(d.prosody.component_logins(), logins, "no new login:\n{log}");

    install_build(&binary(), &path, 1);
    d.proxy.signal("USR2");
    let upgraded = testkit::wait_until(WAIT, || {
        (!lines_with(&d.proxy.log(), "upgraded in place").is_empty()).then_some(())
    });
    assert!(upgraded.is_some(), "{}", d.proxy.log());
    assert!(answered(&mut user, "upgraded").await, "{}", d.proxy.log());
    assert_eq!(d.proxy.pid(), pid);
    assert_eq!(d.proxy.sessions(), 1, "{}", d.proxy.log());
    answering.abort();
    testkit::discard_work_dir(&bin, "binaries");
}

/// Now, as seconds since midnight (UTC), the clock of the log's timestamps.
fn time_of_day() -> f64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (d.as_secs() % 86_400) as f64 + f64::from(d.subsec_micros()) / 1e6
}

/// Where a signal sent at `sent` (time of day) landed in the upgrade asked for at `asked`.
fn landed(log: &str, asked: f64, sent: f64) -> &'static str {
    let first_since = |what: &str| {
        lines_with(log, what)
            .iter()
            .map(|l| at(l))
            .find(|&t| t >= asked)
    };
    match (
        first_since("handing the stream over"),
        first_since("upgraded in place"),
    ) {
        (None, _) => "before the exec, which it called off",
        (Some(h), _) if sent < h => "before the exec",
        (Some(_), Some(r)) if sent >= r => "after the new process went on",
        _ => "across the exec",
    }
}

/// SIGHUP, a second SIGUSR2 or SIGTERM sent while an upgrade is under way — during the new
/// binary's check, while the record is written, across the `exec`, or before the new process
/// has its handlers in — is acted on, neither lost nor fatal: a SIGHUP reloads the key file
/// (one log line), a SIGUSR2 starts another upgrade or is logged as one under way, and a
/// SIGTERM stops the service cleanly (exit status 0). The signals are sent at delays around
/// the time the check takes (measured first), so that some land across the `exec`; which
/// process acts on each depends on when it lands (printed), what happens does not (asserted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signals_during_an_upgrade_are_neither_fatal_nor_lost() {
    testkit::prosody::require();
    let bin = bin_dir("upgrade-signals");
    let path = bin.join("jat-proxy");
    let mut d = Deployment::start_with(&path, "");
    let answering = answer_everything(d.implementing("a").await);
    let mut user = d.client("user", "u").await;
    let pid = d.proxy.pid();
    let send = |sig: Signal| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).unwrap();
        time_of_day()
    };
    let (mut usr2, mut hup) = (0, 0);
    // Every SIGUSR2 acted on (an upgrade started, or one under way logged), every upgrade
    // started through, every SIGHUP acted on.
    let settle = |d: &mut Deployment, usr2: usize, hup: usize, what: &str| {
        let done = testkit::wait_until(WAIT, || {
            let log = d.proxy.log();
            let started = lines_with(&log, "SIGUSR2: upgrading in place").len();
            (lines_with(&log, "SIGUSR2:").len() == usr2
                && lines_with(&log, "upgraded in place").len() == started
                && lines_with(&log, "handing the stream over").len() == started
                && lines_with(&log, "SIGHUP: reloading").len() == hup)
                .then_some(())
        });
        let exited = d.proxy.exited();
        assert!(
            done.is_some() && exited.is_none(),
            "{what}: {usr2} SIGUSR2 and {hup} SIGHUP sent, exited: {exited:?}:\n{}",
            d.proxy.log()
        );
        assert_eq!(d.proxy.pid(), pid);
    };
    // A plain upgrade first: how long the check takes here (then, each time, as long as the
    // check of the upgrade before).
    send(Signal::SIGUSR2);
    usr2 += 1;
    settle(&mut d, usr2, hup, "a plain upgrade");
    let check_ms = |d: &Deployment| upgrade_times(&d.proxy.log()).last().map_or(0, |t| t.0);
    let first_check = check_ms(&d);
    let mut report = Vec::new();
    let held = |d: &Deployment| lines_with(&d.proxy.log(), "held for the new process").len();
    for (second, offsets) in [
        (Signal::SIGHUP, (-6..=14).collect::<Vec<i64>>()),
        (Signal::SIGUSR2, vec![-2, 0, 2, 4, 6, 8]),
    ] {
        for offset in offsets {
            let delay = Duration::from_millis((check_ms(&d) as i64 + offset).max(0) as u64);
            let held_before = held(&d);
            let acted_on = |d: &Deployment| lines_with(&d.proxy.log(), "SIGUSR2:").len();
            let before = acted_on(&d);
            let asked = send(Signal::SIGUSR2);
            usr2 += 1;
            // Not before the first is taken: a signal sent again while the first is still
            // pending (a busy machine may not run the process for a while) merges with it
            // in the kernel, as POSIX has it; this test is about the upgrade's own windows.
            let started = std::time::Instant::now();
            while acted_on(&d) == before && started.elapsed() < WAIT {
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(delay.saturating_sub(started.elapsed()));
            let sent = send(second);
            match second {
                Signal::SIGHUP => hup += 1,
                _ => usr2 += 1,
            }
            settle(
                &mut d,
                usr2,
                hup,
                &format!("{second} {} ms after SIGUSR2", delay.as_millis()),
            );
            let log = d.proxy.log();
            report.push(format!(
                "{second} +{} ms: {}{}",
                delay.as_millis(),
                landed(&log, asked, sent),
                if held(&d) > held_before {
                    " (caught, held across the exec)"
                } else {
                    ""
                }
            ));
        }
    }
    assert!(answered(&mut user, "after").await, "{}", d.proxy.log());
    testkit::report(&format!(
        "signals during an upgrade (the new binary's check took {first_check} ms at first): {}; \
         upgrades (check, exec to resumed) in ms: {:?}",
        report.join(", "),
        upgrade_times(&d.proxy.log())
    ));

    // SIGTERM: a clean stop, by whichever process it reaches.
    let delay = check_ms(&d) + 2;
    let asked = send(Signal::SIGUSR2);
    std::thread::sleep(Duration::from_millis(delay));
    let sent = send(Signal::SIGTERM);
    let status = d.proxy.wait_exit(WAIT);
    let log = d.proxy.log();
    testkit::report(&format!(
        "SIGTERM +{delay} ms after SIGUSR2: {}; exit {status:?}",
        landed(&log, asked, sent)
    ));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{log}");
    assert_eq!(lines_with(&log, "SIGTERM: shutting down").len(), 1, "{log}");
    answering.abort();
    testkit::discard_work_dir(&bin, "binaries");
}

/// The service manager's side of the notification protocol: a datagram socket of the test's,
/// named by `NOTIFY_SOCKET`, and what arrives on it, with when.
struct Manager {
    socket: UnixDatagram,
    path: PathBuf,
    heard: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Manager {
    fn listen(dir: &Path) -> Manager {
        let path = dir.join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        let heard = Arc::new(Mutex::new(Vec::new()));
        let rx = socket.try_clone().unwrap();
        let h = heard.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = rx.recv(&mut buf) {
                h.lock().unwrap().push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                ));
            }
        });
        Manager {
            socket,
            path,
            heard,
        }
    }

    fn messages(&self) -> Vec<String> {
        self.heard
            .lock()
            .unwrap()
            .iter()
            .map(|(_, m)| m.clone())
            .collect()
    }

    /// Waits for a message with `line` after the first `after` messages; returns its index.
    fn wait_for(&self, line: &str, after: usize) -> usize {
        testkit::wait_until(WAIT, || {
            self.messages()
                .iter()
                .enumerate()
                .skip(after)
                .find(|(_, m)| m.lines().any(|l| l == line))
                .map(|(i, _)| i)
        })
        .unwrap_or_else(|| panic!("no {line} after message {after}: {:#?}", self.messages()))
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        let _ = std::fs::remove_file(&self.path);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_notifications() {
    testkit::prosody::require();
    let bin = bin_dir("upgrade-notify");
    let path = bin.join("jat-proxy");
    let mut d = Deployment::start_with(&path, "");
    let manager = Manager::listen(&bin);
    // The deployment's instance is replaced by one the test's service manager watches.
    d.proxy.kill9();
    let watchdog = Duration::from_millis(600);
    d.proxy = ProxyProcess::start_with_env(
        &path,
        &d.config,
        "info,jat_proxy=debug",
        &[
            ("NOTIFY_SOCKET", manager.path.to_str().unwrap()),
            ("WATCHDOG_USEC", &watchdog.as_micros().to_string()),
        ],
    );
    let ready = manager.wait_for("READY=1", 0);
    let m = &manager.messages()[ready];
    assert!(
        m.contains("STATUS=connected to") && m.contains(COMPONENT),
        "READY=1 comes once the handshake is done, with a status: {m}"
    );
    let _a = d.implementing("a").await;
    let status = testkit::wait_until(WAIT, || {
        manager
            .messages()
            .into_iter()
            .find(|m| m.contains("STATUS=") && m.contains("1 resource(s)"))
    });
    assert!(status.is_some(), "{:#?}", manager.messages());

    install_build(&binary(), &path, 1);
    let before = manager.messages().len();
    d.proxy.signal("USR2");
    let reloading = manager.wait_for("RELOADING=1", before);
    assert!(
        manager.messages()[reloading].contains("MONOTONIC_USEC="),
        "{:#?}",
        manager.messages()
    );
    let ready_again = manager.wait_for("READY=1", reloading);
    assert!(ready_again > reloading);
    let upgraded = testkit::wait_until(WAIT, || {
        (!lines_with(&d.proxy.log(), "upgraded in place").is_empty()).then_some(())
    });
    assert!(upgraded.is_some(), "{}", d.proxy.log());

    // The watchdog, heard over a few of its intervals (through the upgrade, too).
    std::thread::sleep(watchdog * 4);
    let pings: Vec<Instant> = manager
        .heard
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, m)| m == "WATCHDOG=1")
        .map(|(t, _)| *t)
        .collect();
    let gaps: Vec<u128> = pings
        .windows(2)
        .map(|w| (w[1] - w[0]).as_millis())
        .collect();
    testkit::report(&format!(
        "WATCHDOG=1 with WATCHDOG_USEC={} ms: {} pings, gaps (ms) {gaps:?}",
        watchdog.as_millis(),
        pings.len()
    ));
    assert!(pings.len() >= 4, "{:#?}", manager.messages());

    let before = manager.messages().len();
    d.proxy.signal("TERM");
    let status = d.proxy.wait_exit(WAIT);
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", d.proxy.log());
    manager.wait_for("STOPPING=1", before);
    testkit::discard_work_dir(&bin, "binaries");
}

/// What a handover the new binary cannot use costs: the stream it was handed is closed with
/// a footer, and an ordinary login follows. Played on a loopback socket of the test's (no
/// server can be made to hand jat-proxy a stream), with the handover done by a shell that
/// `exec`s jat-proxy as the old process would: the socket on descriptor 3, a record of a
/// format no build writes on descriptor 4, and the shell's own PID (which `exec` keeps).
#[test]
fn a_record_of_another_format_means_a_footer_and_a_new_login() {
    use std::io::Read;
    use std::net::TcpListener;
    let dir = testkit::work_dir("upgrade-format");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = testkit::proxy::write_config(
        &dir,
        "jat-proxy.toml",
        &testkit::proxy::ConfigSpec {
            component: COMPONENT,
            server: listener.local_addr().unwrap(),
            also: &[],
            secret: "s",
            target: "impl@localhost",
            key_file: &dir.join("keys.toml"),
            proxy_extra: "",
            extra: "",
        },
    );
    let record = dir.join("record");
    let mut bytes = b"jat-proxy handover".to_vec();
    bytes.extend_from_slice(&99u16.to_be_bytes());
    bytes.extend_from_slice(b"a future build's fields");
    std::fs::write(&record, bytes).unwrap();
    let script = format!(
        "exec 3<>/dev/tcp/127.0.0.1/{port} 4<'{}'; exec '{}' --config '{}' --handover $$:3:4",
        record.display(),
        binary().display(),
        config.display()
    );
    let mut proxy = testkit::process::Owned::spawn(
        "jat-proxy",
        Path::new("/bin/bash"),
        &["-c", &script],
        &[("RUST_LOG", "info"), ("NO_COLOR", "1")],
    );
    let read_all = |s: &mut std::net::TcpStream, until: &[u8]| {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while !seen.windows(until.len()).any(|w| w == until) {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        String::from_utf8_lossy(&seen).into_owned()
    };
    let (mut handed, _) = listener.accept().unwrap();
    let got = read_all(&mut handed, b"</stream:stream>");
    assert_eq!(got, "</stream:stream>", "{}", proxy.output());
    let (mut fresh, _) = listener.accept().unwrap();
    let header = read_all(&mut fresh, format!("to='{COMPONENT}'>").as_bytes());
    assert!(header.contains("<stream:stream"), "{header}");
    // The log line was written before the footer; the test reads the pipe on a thread.
    let logged = testkit::wait_until(WAIT, || {
        let log = proxy.output();
        (log.contains("cannot go on with the stream handed over")
            && log.contains("handover record of format 99"))
        .then_some(())
    });
    assert!(logged.is_some(), "{}", proxy.output());
    proxy.kill();
    testkit::discard_work_dir(&dir, "upgrade");
}
