//! The configuration, secret and key files: mistakes in them are reported by file, line,
//! column and key without ever echoing what the file holds; the key commands need only the
//! `[keys]` section; concurrent rotations all take effect. No server is started.

use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use jat_proxy::{config, keys};

const BIN: &str = env!("CARGO_BIN_EXE_jat-proxy");

/// A distinctive component secret.
const SECRET: &str = "Zq8xK2vR7mWp4tN9";
/// A key-file secret (32 bytes of base64url).
const KEY_SECRET: &str = "Xk3PqR7sT1uV9wY2zA4bC6dE8fG0hJ5mN7oQ9rS1tUw";

/// No 6-character piece of `secret` appears in `text`.
fn assert_clean(text: &str, secret: &str, case: &str) {
    let chars: Vec<char> = secret.chars().collect();
    for w in chars.windows(6) {
        let piece: String = w.iter().collect();
        assert!(
            !text.contains(&piece),
            "{case}: the message shows part of the secret ({piece}): {text}"
        );
    }
}

fn base_config(key_file: &str) -> String {
    format!(
        "[component]\n\
         jid = \"proxy.localhost\"\n\
         server = \"127.0.0.1:5347\"\n\
         secret = \"{SECRET}\"\n\
         \n\
         [proxy]\n\
         target_address = \"impl@localhost\"\n\
         \n\
         [keys]\n\
         file = \"{key_file}\"\n"
    )
}

fn secret_line() -> String {
    format!("secret = \"{SECRET}\"")
}

#[test]
fn config_errors_never_show_the_secret() {
    let good = base_config("/var/lib/jat-proxy/keys.toml");
    let line4 = secret_line();
    let sub = |from: &str, to: &str| {
        assert!(good.contains(from), "{from}");
        good.replacen(from, to, 1)
    };
    // (case, text, line, column (0: any), key)
    let cases: Vec<(&str, String, usize, usize, &str)> = vec![
        (
            "wrong type (a number)",
            sub(&line4, "secret = 86753091234577"),
            4,
            10,
            "component.secret",
        ),
        (
            "unterminated string",
            sub(&line4, &format!("secret = \"{SECRET}")),
            4,
            0,
            "component.secret",
        ),
        (
            "unterminated literal string",
            sub(&line4, &format!("secret = '{SECRET}")),
            4,
            0,
            "component.secret",
        ),
        (
            "unquoted",
            sub(&line4, &format!("secret = {SECRET}")),
            4,
            10,
            "component.secret",
        ),
        (
            "bad escape",
            sub(&line4, "secret = \"Zq8x\\qK2vR7mWp4tN9\""),
            4,
            0,
            "component.secret",
        ),
        (
            "junk after the value",
            sub(&line4, &format!("secret = \"{SECRET}\" \"{SECRET}\"")),
            4,
            0,
            "component.secret",
        ),
        (
            "syntax error on the line before",
            sub(
                "server = \"127.0.0.1:5347\"",
                "server = \"127.0.0.1:5347\" oops",
            ),
            3,
            27,
            "component.server",
        ),
        (
            "syntax error on the line after",
            sub(&line4, &format!("{line4}\noops oops")),
            5,
            0,
            "component",
        ),
        (
            "duplicate key",
            sub(&line4, &format!("{line4}\n{line4}")),
            5,
            1,
            "component.secret",
        ),
        (
            "unknown key next to it",
            sub(&line4, &format!("{line4}\nsecert = \"{SECRET}\"")),
            5,
            1,
            "component.secert",
        ),
        (
            "secret pasted alone on a line",
            sub(&line4, &format!("{line4}\n{SECRET}")),
            5,
            0,
            "component",
        ),
        (
            "secret pasted as a key",
            sub(&line4, &format!("{line4}\n{SECRET}=")),
            5,
            0,
            "component.<hidden>",
        ),
        (
            "secret as a quoted key",
            sub(&line4, &format!("{line4}\n\"{SECRET}\" = 1")),
            5,
            1,
            "component.<hidden>",
        ),
        (
            "secret as an array",
            sub(&line4, &format!("secret = [\"{SECRET}\"]")),
            4,
            10,
            "component.secret",
        ),
        (
            "secret as a table",
            sub(&line4, &format!("secret = {{ v = \"{SECRET}\" }}")),
            4,
            10,
            "component.secret",
        ),
        (
            "secret given to a boolean",
            sub(&line4, &format!("secret_env = \"{SECRET}\"")),
            4,
            14,
            "component.secret_env",
        ),
        (
            "secret where the server goes",
            sub("127.0.0.1:5347", SECRET),
            3,
            10,
            "component.server",
        ),
        (
            "secret where the domain goes",
            sub("\"proxy.localhost\"", &format!("\"{SECRET}@x\"")),
            2,
            7,
            "component.jid",
        ),
        (
            "secret in a policy list",
            format!("{good}\n[policy]\ndeny = [\"ok.example\", \"@{SECRET}@\"]\n"),
            13,
            23,
            "policy.deny[1]",
        ),
        (
            "secret in an unknown table",
            format!("{good}\n[extra]\nsecret = \"{SECRET}\"\n"),
            12,
            2,
            "extra",
        ),
    ];
    for (case, text, line, column, key) in &cases {
        let e = config::parse(Path::new("/etc/jat.toml"), text)
            .and_then(|mut c| {
                c.resolve_secret(Path::new("/etc/jat.toml"), |_| None)
                    .map(|_| c)
            })
            .expect_err(case);
        let shown = e.to_string();
        assert_clean(&shown, SECRET, case);
        assert_clean(&format!("{e:?}"), SECRET, case);
        assert_eq!(e.line, Some(*line), "{case}: {shown}");
        if *column != 0 {
            assert_eq!(e.column, Some(*column), "{case}: {shown}");
        }
        assert_eq!(e.key.as_deref(), Some(*key), "{case}: {shown}");
        let prefix = format!(
            "config /etc/jat.toml:{line}:{}: `{key}`: ",
            e.column.unwrap()
        );
        assert!(shown.starts_with(&prefix), "{case}: {shown}");
        assert!(!shown.contains('\n'), "{case}: one line: {shown}");
    }
}

#[test]
fn an_unterminated_multiline_secret_is_not_shown() {
    let good = base_config("/k.toml");
    let text = good.replace(&secret_line(), &format!("secret = \"\"\"{SECRET}"));
    let e = config::parse(Path::new("c.toml"), &text).unwrap_err();
    assert_clean(&e.to_string(), SECRET, "multi-line");
    assert!(e.line.is_some(), "{e}");
}

fn key_file_text() -> String {
    format!(
        "[[key]]\n\
         id = 1\n\
         created = 100\n\
         secret = \"{KEY_SECRET}\"\n\
         \n\
         [[key]]\n\
         id = 2\n\
         created = 200\n\
         secret = \"{KEY_SECRET}\"\n"
    )
}

#[test]
fn key_file_errors_never_show_a_secret() {
    let good = key_file_text();
    keys::parse(Path::new("k"), &good).expect("the base file is valid");
    let line = format!("secret = \"{KEY_SECRET}\"");
    let first = |to: &str| good.replacen(&line, to, 1);
    let second = |to: &str| {
        let i = good.rfind(&line).unwrap();
        format!("{}{to}{}", &good[..i], &good[i + line.len()..])
    };
    let cases: Vec<(&str, String, usize, &str)> = vec![
        (
            "unterminated",
            second(&format!("secret = \"{KEY_SECRET}")),
            9,
            "key[1].secret",
        ),
        (
            "unquoted",
            first(&format!("secret = {KEY_SECRET}")),
            4,
            "key[0].secret",
        ),
        (
            "syntax error before",
            good.replacen("created = 100", "created = 100 x", 1),
            3,
            "key[0].created",
        ),
        (
            "syntax error after",
            first(&format!("{line}\njunk junk")),
            5,
            "key[0]",
        ),
        (
            "duplicate",
            first(&format!("{line}\n{line}")),
            5,
            "key[0].secret",
        ),
        (
            "unknown key next to it",
            first(&format!("{line}\nsecrte = \"{KEY_SECRET}\"")),
            5,
            "key[0].secrte",
        ),
        (
            "secret given to the id",
            good.replacen("id = 1", &format!("id = \"{KEY_SECRET}\""), 1),
            2,
            "key[0].id",
        ),
        (
            "not base64url",
            first(&format!("secret = \"{KEY_SECRET}+/\"")),
            4,
            "key[0].secret",
        ),
        (
            "too short",
            first(&format!("secret = \"{}\"", &KEY_SECRET[..40])),
            4,
            "key[0].secret",
        ),
        (
            "pasted alone",
            first(&format!("{line}\n{KEY_SECRET}")),
            5,
            "key[0]",
        ),
        (
            "pasted as a key",
            first(&format!("{line}\n{KEY_SECRET} = 1")),
            5,
            "key[0].<hidden>",
        ),
    ];
    for (case, text, line, key) in &cases {
        let e = keys::parse(Path::new("/var/lib/jat/keys.toml"), text).expect_err(case);
        let shown = e.to_string();
        assert_clean(&shown, KEY_SECRET, case);
        assert_clean(&format!("{e:?}"), KEY_SECRET, case);
        assert_eq!(e.line, Some(*line), "{case}: {shown}");
        assert_eq!(e.key.as_deref(), Some(*key), "{case}: {shown}");
        assert!(
            shown.starts_with(&format!(
                "key file /var/lib/jat/keys.toml:{line}:{}: `{key}`: ",
                e.column.unwrap()
            )),
            "{case}: {shown}"
        );
    }
}

fn write_private(path: &Path, bytes: &[u8]) {
    use std::io::Write;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap()
        .write_all(bytes)
        .unwrap();
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove(config::SECRET_ENV)
        .env("NO_COLOR", "1")
        .output()
        .expect("run jat-proxy")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn binary_reports_a_broken_config_or_key_file_without_the_secret() {
    let dir = testkit::work_dir("files-leak");
    let key_file = dir.join("keys.toml");
    let cfg = dir.join("c.toml");
    let broken = base_config(key_file.to_str().unwrap())
        .replace(&secret_line(), &format!("secret = \"{SECRET}"));
    std::fs::write(&cfg, broken).unwrap();
    let o = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_clean(&text(&o), SECRET, "check");
    assert!(
        err.contains(&format!("{}:4:", cfg.display())) && err.contains("`component.secret`"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one message: {err}");

    // A broken key file, through `keys list` and `check`: exit 2, no secret.
    write_private(&cfg, base_config(key_file.to_str().unwrap()).as_bytes());
    let broken_keys = key_file_text().replacen(
        &format!("secret = \"{KEY_SECRET}\""),
        &format!("secret = {KEY_SECRET}"),
        1,
    );
    write_private(&key_file, broken_keys.as_bytes());
    for args in [
        &["keys", "list", "--config", cfg.to_str().unwrap()][..],
        &["check", "--config", cfg.to_str().unwrap()][..],
    ] {
        let o = run(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", text(&o));
        assert_clean(&text(&o), KEY_SECRET, "keys list");
        assert!(
            text(&o).contains(&format!("{}:4:10: `key[0].secret`", key_file.display())),
            "{}",
            text(&o)
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
}

fn keys_lines(out: &str) -> Vec<&str> {
    out.lines().filter(|l| l.starts_with("key ")).collect()
}

#[test]
fn key_commands_work_without_the_component_secret() {
    let dir = testkit::work_dir("files-keys");
    let key_file = dir.join("keys.toml");
    let cfg = dir.join("c.toml");
    // secret_env = true with the variable unset, and nothing else but the lifetime.
    std::fs::write(
        &cfg,
        format!(
            "[component]\nsecret_env = true\n\n[proxy]\ntoken_lifetime_secs = 60\n\n\
             [keys]\nfile = \"{}\"\n",
            key_file.display()
        ),
    )
    .unwrap();
    let c = cfg.to_str().unwrap();
    let o = run(&["keys", "rotate", "--config", c]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("new current key: "), "{}", text(&o));
    let o = run(&["keys", "list", "--config", c]);
    assert!(o.status.success(), "{}", text(&o));
    let out = text(&o);
    let lines = keys_lines(&out);
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[1].ends_with("(current)") && !lines[0].contains("current"),
        "{out}"
    );
    // The full configuration is still required to run or check.
    let o = run(&["check", "--config", c]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    // A complete configuration whose secret file cannot be read.
    std::fs::write(
        &cfg,
        base_config(key_file.to_str().unwrap()).replace(
            &secret_line(),
            &format!("secret_file = \"{}\"", dir.join("absent").display()),
        ),
    )
    .unwrap();
    let o = run(&["keys", "rotate", "--config", c]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&["keys", "list", "--config", c]);
    assert_eq!(keys_lines(&text(&o)).len(), 3, "{}", text(&o));
    let o = run(&["check", "--config", c]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("`component.secret_file`"), "{}", text(&o));
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn a_symlinked_secret_file_is_refused() {
    let dir = testkit::work_dir("files-secret");
    let real = dir.join("real-secret");
    write_private(&real, format!("{SECRET}\n").as_bytes());
    let link = dir.join("secret");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let cfg = dir.join("c.toml");
    let text_for = |p: &Path| {
        base_config(dir.join("keys.toml").to_str().unwrap()).replace(
            &secret_line(),
            &format!("secret_file = \"{}\"", p.display()),
        )
    };
    std::fs::write(&cfg, text_for(&link)).unwrap();
    let e = config::load(&cfg).unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_eq!(e.key.as_deref(), Some("component.secret_file"));
    assert_eq!((e.line, e.column), (Some(4), Some(15)), "{e}");
    std::fs::write(&cfg, text_for(&real)).unwrap();
    let c = config::load(&cfg).unwrap();
    assert_eq!(&*c.component.secret, SECRET);
    // Group-readable: refused, and the secret is not shown.
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o640)).unwrap();
    let e = config::load(&cfg).unwrap_err().to_string();
    assert!(e.contains("mode 0640"), "{e}");
    assert_clean(&e, SECRET, "mode");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn concurrent_rotating_processes_all_take_effect() {
    let dir = testkit::work_dir("files-rotate");
    let key_file: PathBuf = dir.join("keys.toml");
    let cfg = dir.join("c.toml");
    std::fs::write(&cfg, format!("[keys]\nfile = \"{}\"\n", key_file.display())).unwrap();
    let c = cfg.to_str().unwrap().to_owned();
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let c = c.clone();
            std::thread::spawn(move || {
                for _ in 0..4 {
                    let o = run(&["keys", "rotate", "--config", &c]);
                    assert!(o.status.success(), "{}", text(&o));
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let set = keys::load(&key_file).unwrap();
    // The first rotation created the file (one key) and every rotation added one.
    assert_eq!(set.ids().len(), 1 + 12, "{:?}", set.ids());
    std::fs::remove_dir_all(dir).unwrap();
}

/// The configuration docs/jitsi.md gives for replacing mod_client_proxy is one jat-proxy
/// accepts as written (only its two file paths point into a temporary directory), with the
/// sender revealed.
#[test]
fn the_jitsi_guide_s_configuration_is_accepted_as_written() {
    let guide =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/jitsi.md"))
            .unwrap();
    let block = guide
        .split("```toml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a toml block in docs/jitsi.md");
    assert!(block.contains("sender = \"revealed\""), "{block}");
    let dir = testkit::work_dir("files-jitsi");
    let secret = dir.join("secret");
    write_private(&secret, SECRET.as_bytes());
    let keys = dir.join("keys.toml");
    let text_of = block
        .replace("/etc/jat-proxy/secret", secret.to_str().unwrap())
        .replace("/var/lib/jat-proxy/keys.toml", keys.to_str().unwrap());
    assert_ne!(
        text_of, block,
        "the guide's paths changed: update this test"
    );
    let cfg = dir.join("jitsi.toml");
    std::fs::write(&cfg, &text_of).unwrap();
    // The key file is made as the README says, before the first start.
    let o = run(&["keys", "rotate", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let c = config::load(&cfg).unwrap();
    assert_eq!(c.component.jid, "focus.example");
    assert_eq!(c.proxy.target.to_string(), "focus@auth.example");
    assert_eq!(c.proxy.sender, jat_proxy::proxy::Sender::Revealed);
    std::fs::remove_dir_all(dir).unwrap();
}
