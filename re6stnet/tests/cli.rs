//! The binaries' command-line contract: bad configuration is refused before
//! anything starts (exit 2, one line naming the key); re6stctl without a
//! daemon fails clearly (exit 1).

use std::process::Command;

const RE6STNET: &str = env!("CARGO_BIN_EXE_re6stnet");
const RE6STCTL: &str = env!("CARGO_BIN_EXE_re6stctl");

fn temp(name: &str, text: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("re6stnet-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
    p
}

fn run(cmd: &str, args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn bad_configuration_names_the_key_and_starts_nothing() {
    let cases = [
        (
            "unknown",
            "registry = \"http://[fd00::1]:8080\"\nprot = 326\n",
            "prot",
        ),
        ("range", "port = 99999\n", "port"),
        ("type", "interface = \"eth1\"\n", "interface"),
        ("url", "registry = \"ftp://x\"\n", "registry"),
        ("syntax", "port = \n", "line 1"),
    ];
    for (name, text, key) in cases {
        let path = temp(name, text);
        let (code, err) = run(RE6STNET, &["--config", &path.to_string_lossy()]);
        let _ = std::fs::remove_file(&path);
        assert_eq!(code, Some(2), "{name}: {err}");
        assert!(err.contains(key), "{name}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{name}: one line: {err}");
    }
    let (code, err) = run(RE6STNET, &["--config", "/nonexistent/re6stnet.toml"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("/nonexistent/re6stnet.toml"), "{err}");
    let (code, _) = run(RE6STNET, &["--port", "x"]);
    assert_eq!(code, Some(2), "bad flag value is bad usage");
}

#[test]
fn a_node_without_identity_fails_with_the_file_it_needs() {
    let dir = std::env::temp_dir().join(format!("re6stnet-cli-{}-empty", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let d = dir.to_string_lossy().into_owned();
    let (code, err) = run(
        RE6STNET,
        &[
            "--config",
            "/dev/null",
            "--dir",
            &d,
            "--state-dir",
            &d,
            "--ctl-socket",
            &format!("{d}/ctl.sock"),
        ],
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("ca.crt") && err.contains("re6st-conf"),
        "{err}"
    );
}

#[test]
fn re6stctl_without_a_daemon_says_so() {
    let (code, err) = run(RE6STCTL, &["--socket", "/nonexistent/ctl.sock", "status"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is re6stnet running"), "{err}");
    let (code, _) = run(RE6STCTL, &["frobnicate"]);
    assert_eq!(code, Some(2));
}
