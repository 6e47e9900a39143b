//! `--log-format json`: the real binary in front of a real Prosody writes one JSON object per
//! line on stderr (timestamp, level, target, message, fields), and the sender's address
//! appears only in debug lines; a bad format is a usage error (exit status 2).

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use testkit::client::{Answer, Client, reply_to};
use testkit::deployment::{COMPONENT, SECRET, WAIT, request};
use testkit::process::Owned;
use testkit::proxy::{ConfigSpec, run_to_end, write_config};

const BIN: &str = env!("CARGO_BIN_EXE_jat-proxy");

/// Every line of `output` as a JSON object with the keys of the format; panics otherwise.
fn parse_lines(output: &str) -> Vec<Value> {
    output
        .lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("not JSON ({e}): {line}\nwhole log:\n{output}"));
            let o = v
                .as_object()
                .unwrap_or_else(|| panic!("not an object: {line}"));
            for key in ["timestamp", "level", "target", "message"] {
                assert!(o.get(key).is_some_and(Value::is_string), "{key} in {line}");
            }
            assert!(
                o.get("fields").is_some_and(Value::is_object),
                "fields in {line}"
            );
            v
        })
        .collect()
}

fn has(lines: &[Value], message: &str) -> bool {
    lines.iter().any(|l| l["message"] == message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line() {
    let prosody = testkit::Prosody::start(&[(COMPONENT, SECRET)]);
    prosody.register("impl", "pw");
    prosody.register("user", "pw");
    let config = write_config(
        prosody.dir(),
        "jat-proxy.toml",
        &ConfigSpec {
            component: COMPONENT,
            server: prosody.component,
            also: &[],
            secret: SECRET,
            target: "impl@localhost",
            key_file: &prosody.dir().join("keys.toml"),
            proxy_extra: "",
            extra: "",
        },
    );
    let mut proxy = Owned::spawn(
        "jat-proxy",
        Path::new(BIN),
        &["--log-format", "json", "--config", config.to_str().unwrap()],
        &[("RUST_LOG", "info,jat_proxy=debug"), ("NO_COLOR", "1")],
    );
    let wait_for = |message: &str, field: Option<(&str, &str)>| {
        let seen = testkit::wait_until(WAIT, || {
            parse_lines(&proxy.output())
                .iter()
                .any(|l| l["message"] == message && field.is_none_or(|(k, v)| l["fields"][k] == v))
                .then_some(())
        });
        assert!(
            seen.is_some(),
            "no line {message:?} {field:?}:\n{}",
            proxy.output()
        );
    };
    wait_for("session established", None);

    let mut imp = Client::login(
        prosody.c2s,
        "localhost",
        "impl",
        "pw",
        "a",
        Answer::Subscriptions,
    )
    .await;
    wait_for(
        "implementing client resource available",
        Some(("resource", "a")),
    );
    let mut user = Client::login(
        prosody.c2s,
        "localhost",
        "user",
        "pw",
        "abc",
        Answer::Nothing,
    )
    .await;
    user.send_xml(&request("j1"));
    let req = imp.recv_request(WAIT).await.expect("request reaches impl");
    imp.send(reply_to(&req, "result", ""));
    let res = user.recv_iq("j1", WAIT).await.expect("result reaches user");
    assert_eq!(res.attr("type"), Some("result"));

    proxy.signal("TERM");
    let status = proxy
        .wait_exit(Duration::from_secs(20))
        .expect("jat-proxy exits on SIGTERM");
    assert!(status.success(), "{status:?}");
    let output = proxy.output();
    let lines = parse_lines(&output);
    assert!(has(&lines, "jat-proxy starting"), "{output}");
    assert!(has(&lines, "stream closed"), "{output}");
    let start = lines
        .iter()
        .find(|l| l["message"] == "jat-proxy starting")
        .unwrap();
    assert_eq!(start["level"], "INFO");
    assert_eq!(start["target"], "jat_proxy");
    assert_eq!(start["fields"]["version"], env!("CARGO_PKG_VERSION"));
    assert!(start["fields"]["pid"].is_u64(), "{start}");
    // The sender's address, which only the decrypted token tells: in debug lines only.
    let sender = user.jid();
    assert!(
        lines.iter().any(|l| l.to_string().contains(sender)),
        "the debug lines name {sender}: {output}"
    );
    for l in &lines {
        if l.to_string().contains(sender) {
            assert!(
                matches!(l["level"].as_str(), Some("DEBUG" | "TRACE")),
                "{sender} logged above debug: {l}"
            );
        }
    }
}

#[test]
fn a_configuration_error_is_a_json_line_too() {
    let (status, output) = run_to_end(
        Path::new(BIN),
        &[
            "--log-format",
            "json",
            "--config",
            "/nonexistent/jat-proxy.toml",
            "check",
        ],
    );
    assert_eq!(status.code(), Some(2), "{output}");
    let lines = parse_lines(&output);
    assert!(
        lines.iter().any(|l| l["level"] == "ERROR"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("/nonexistent/jat-proxy.toml"))),
        "{output}"
    );
}

#[test]
fn a_bad_log_format_is_a_usage_error() {
    for bad in ["xml", "JSONL", ""] {
        let (status, output) = run_to_end(
            Path::new(BIN),
            &["--log-format", bad, "--config", "/nonexistent", "check"],
        );
        assert_eq!(status.code(), Some(2), "--log-format {bad:?}: {output}");
        assert!(output.contains("--log-format"), "{output}");
    }
    // Text stays the default, and is accepted by name.
    let (status, output) = run_to_end(
        Path::new(BIN),
        &["--log-format", "text", "--config", "/nonexistent", "check"],
    );
    assert_eq!(status.code(), Some(2), "{output}");
    assert!(output.starts_with("jat-proxy: "), "{output}");
}
