//! `re6st-orch` refuses bad set-ups before serving: an underlay listen
//! address, a malformed descriptor in the catalogue, a missing CA; bad usage
//! exits 2.

use std::process::Command;

const EXE: &str = env!("CARGO_BIN_EXE_re6st-orch");

struct Dir(std::path::PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: &[&str]) -> (Option<i32>, String) {
    let o = Command::new(EXE)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running re6st-orch: {e}"));
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn bad_setups_are_refused_before_serving() {
    let dir = Dir(std::env::temp_dir().join(format!("re6st-orch-cli-{}", std::process::id())));
    std::fs::create_dir_all(dir.0.join("catalog")).unwrap_or_else(|e| panic!("{e}"));
    let t = 1_790_000_000;
    let ca = re6st_registry::cert::Ca::generate("fd5e:5e::/48".parse().unwrap_or_default(), t, 10)
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.0.join("ca.crt"), ca.cert().pem()).unwrap_or_else(|e| panic!("{e}"));
    let (key, cert) = ca
        .issue_with_new_key(
            "fd5e:5e:0:1::/64".parse().unwrap_or_default(),
            [1; 32],
            7,
            t,
            t + 86_400,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.0.join("node.crt"), cert).unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(dir.0.join("node.key"), key.serialize_pem()).unwrap_or_else(|e| panic!("{e}"));
    let d = dir.0.to_string_lossy().into_owned();
    let db = format!("{d}/master.db");

    let (code, err) = run(&[
        "master",
        "--listen",
        "127.0.0.1:17080",
        "--dir",
        &d,
        "--db",
        &db,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not an overlay address"), "{err}");

    std::fs::write(
        dir.0.join("catalog/bad.toml"),
        "name = \"x\"\ncommand = [\"a\", \"{nope}\"]\n",
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let catalog = format!("{d}/catalog");
    let (code, err) = run(&[
        "master",
        "--listen",
        "127.0.0.1:17080",
        "--allow-underlay",
        "--dir",
        &d,
        "--db",
        &db,
        "--catalog",
        &catalog,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("bad.toml") && err.contains("{nope}"), "{err}");

    let (code, err) = run(&["master", "--listen", "[::1]:17080", "--dir", "/nonexistent"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("/nonexistent/ca.crt"), "{err}");

    // Another node's overlay address: agents would refuse its assignments.
    let (code, err) = run(&[
        "master",
        "--listen",
        "[fd5e:5e:0:9::1]:17080",
        "--dir",
        &d,
        "--db",
        &db,
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("not an overlay address of this node"), "{err}");

    // An agent needs the master's overlay address and a valid catalogue.
    let agent = |master: &str| {
        run(&[
            "agent",
            "--master",
            master,
            "--name",
            "n1",
            "--dir",
            &d,
            "--catalog",
            &catalog,
            "--state",
            &d,
        ])
    };
    let (code, err) = agent("http://master.example:7080");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("OVERLAY ADDRESS"), "{err}");
    let (code, err) = agent("http://[fd5e:5e:0:1::1]:7080");
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("bad.toml") && err.contains("{nope}"), "{err}");

    let (code, _) = run(&["request", "http-static"]);
    assert_eq!(code, Some(2), "missing NAME is bad usage");
}
