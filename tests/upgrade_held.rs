//! Requests held for a resource do not hold up an in-place upgrade: they are handed to the
//! new process with the stream, and answered once the implementing client is back.

use std::path::PathBuf;
use std::time::Duration;

use testkit::client::reply_to;
use testkit::deployment::{Deployment, WAIT, request};
use testkit::proxy::{install_build, lines_with};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jat-proxy"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_goes_ahead_while_requests_are_held_and_loses_none() {
    testkit::prosody::require();
    let bin = testkit::work_dir("upgrade-held");
    let path = bin.join("jat-proxy");
    install_build(&binary(), &path, 0);
    let d = Deployment::start_configured(&path, "hold_ms = 30000\n", "");
    // From now on every request waits for the implementing client.
    d.implementing_gone("a").await;
    let mut user = d.client("user", "u").await;
    let held = |d: &Deployment| lines_with(&d.proxy.log(), "request held").len();

    // A request every 500 ms keeps requests held the whole time; the upgrade is asked for
    // after the first is held.
    let mut sent = Vec::new();
    let mut upgraded = None;
    let start = std::time::Instant::now();
    for i in 0..16 {
        let id = format!("h{i}");
        user.send_xml(&request(&id));
        sent.push(id);
        if i == 1 {
            assert!(
                testkit::wait_until(WAIT, || (held(&d) >= 1).then_some(())).is_some(),
                "{}",
                d.proxy.log()
            );
            install_build(&binary(), &path, 1);
            d.proxy.signal("USR2");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        if upgraded.is_none() && d.proxy.log().contains("upgraded in place") {
            upgraded = Some(start.elapsed());
        }
    }
    let log = d.proxy.log();
    assert!(
        upgraded.is_some(),
        "the upgrade went ahead while requests were held:\n{log}"
    );
    assert!(!log.contains("upgrade abandoned"), "{log}");
    assert_eq!(d.prosody.component_logins(), 1, "the same stream:\n{log}");

    // The implementing client comes back: every request, held before, during or after the
    // upgrade, is forwarded and answered.
    let mut imp = d.implementing("a").await;
    let answering = tokio::spawn(async move {
        while let Some(req) = imp.recv_request(Duration::from_secs(5)).await {
            imp.send(reply_to(&req, "result", ""));
        }
    });
    for id in &sent {
        let answer = user
            .recv_iq(id, WAIT)
            .await
            .unwrap_or_else(|| panic!("no answer to {id}:\n{}", d.proxy.log()));
        assert_eq!(answer.attr("type"), Some("result"), "{id}");
    }
    answering.abort();
    testkit::report(&format!(
        "upgrade with requests held: handed over {:?} after the first request; {} requests \
         held in all (counting those held again by the new process), all {} answered",
        upgraded.unwrap(),
        held(&d),
        sent.len()
    ));
    testkit::discard_work_dir(&bin, "binaries");
}
