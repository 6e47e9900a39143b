//! What a remote user can make jat-proxy hold in memory, measured as the peak resident memory
//! of the real process behind a real Prosody (SECURITY.md, "Memory").

use std::path::PathBuf;

use testkit::client::reply_to;
use testkit::deployment::{COMPONENT, Deployment, WAIT, error_condition, peak_rss_kib};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_jat-proxy"))
}

/// Far below the shipped unit's `MemoryMax=256M`: the target for these workloads.
const PEAK_LIMIT_KIB: u64 = 64 * 1024;

/// Requests as large as Prosody's default c2s limit (256 KiB) lets a user send.
const REQUESTS: usize = 16;
const PAYLOAD_BYTES: usize = 240_000;

/// A request of about `PAYLOAD_BYTES` whose payload is `pairs` tiny elements each followed
/// by a text node, then one long text to make up the size (as the test client writes it:
/// `<a></a>`, 8 bytes a pair).
fn request(id: &str, pairs: usize) -> String {
    let small = "<a></a>x".repeat(pairs);
    let pad = "y".repeat(PAYLOAD_BYTES.saturating_sub(small.len()));
    format!(
        "<iq type='get' id='{id}' to='{COMPONENT}'><q xmlns='urn:x'>{small}<b>{pad}</b></q></iq>"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_requests_held_or_refused_stay_within_a_small_peak_rss() {
    // Requests may wait the longest hold time allowed while no resource is known.
    let d = Deployment::start_configured(&binary(), "hold_ms = 30000\n", "");
    d.implementing_gone("a").await;
    let mut user = d.client("user", "abc").await;
    let pid = d.proxy.pid();
    let start_kib = peak_rss_kib(pid).unwrap();

    // 1. The adversarial shape: 30,000 tiny elements and as many texts per request. Held
    //    as trees, such requests took hundreds of MiB; they are over the node limit and
    //    refused at once.
    for i in 0..REQUESTS {
        user.send_xml(&request(&format!("many-{i}"), PAYLOAD_BYTES / 8));
    }
    for i in 0..REQUESTS {
        let id = format!("many-{i}");
        let answer = user
            .recv_iq(&id, WAIT)
            .await
            .unwrap_or_else(|| panic!("no answer to {id}:\n{}", d.proxy.log()));
        assert_eq!(answer.attr("type"), Some("error"), "{id}");
        assert_eq!(
            error_condition(&answer).as_deref(),
            Some("policy-violation")
        );
    }
    // 1b. A long namespace inherited by many elements: 180 KB on the wire once, but each
    //    element of a tree holds its own copy (500 of them: 90 MB). Refused at once.
    let ns = "A".repeat(180_000);
    for i in 0..REQUESTS {
        user.send_xml(&format!(
            "<iq type='get' id='ns-{i}' to='{COMPONENT}'><q xmlns='{ns}'>{}</q></iq>",
            "<a></a>".repeat(500)
        ));
    }
    for i in 0..REQUESTS {
        let id = format!("ns-{i}");
        let answer = user
            .recv_iq(&id, WAIT)
            .await
            .unwrap_or_else(|| panic!("no answer to {id}:\n{}", d.proxy.log()));
        assert_eq!(
            error_condition(&answer).as_deref(),
            Some("policy-violation")
        );
    }
    let after_refused = peak_rss_kib(pid).unwrap();

    // 2. As many nodes as a built stanza may have, held while no resource is known, then
    //    released to the implementing client once it logs in: every one is answered.
    let pairs = 6_000;
    for i in 0..REQUESTS {
        user.send_xml(&request(&format!("held-{i}"), pairs));
    }
    assert!(
        testkit::wait_until(WAIT, || (d.proxy.log().matches("request held").count()
            >= REQUESTS)
            .then_some(()))
        .is_some(),
        "every request is held:\n{}",
        d.proxy.log()
    );
    let after_held = peak_rss_kib(pid).unwrap();
    let mut imp = d.implementing("a").await;
    for _ in 0..REQUESTS {
        let req = imp
            .recv_request(WAIT)
            .await
            .unwrap_or_else(|| panic!("a held request released:\n{}", d.proxy.log()));
        let q = req.get_child("q", "urn:x").expect("the payload whole");
        assert_eq!(q.children().count(), pairs + 1);
        imp.send(reply_to(&req, "result", ""));
    }
    for i in 0..REQUESTS {
        let id = format!("held-{i}");
        let answer = user.recv_iq(&id, WAIT).await.expect("answered");
        assert_eq!(answer.attr("type"), Some("result"), "{id}");
    }
    let peak = peak_rss_kib(pid).unwrap();
    testkit::report(&format!(
        "peak RSS of jat-proxy: {start_kib} KiB at start, {after_refused} after 2 × {REQUESTS} requests \
         over the node or tree limit, {after_held} with {REQUESTS} of {PAYLOAD_BYTES} bytes held, {peak} \
         after their release (limit {PEAK_LIMIT_KIB})"
    ));
    assert!(
        peak < PEAK_LIMIT_KIB,
        "peak RSS {peak} KiB reaches {PEAK_LIMIT_KIB} KiB"
    );
}
