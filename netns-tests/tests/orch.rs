//! End-to-end orchestration (issue 7): a master on node m, agents on four
//! nodes, the Internet path m <-> n2 broken. Everything between them goes
//! over the overlay.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use netns_tests::mesh::Mesh;
use netns_tests::probe::wait_until;
use netns_tests::testing::{check, run_suite};
use netns_tests::{Error, LinkParams, Process, Result, Topology};

const PORT: u16 = 7080;

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

struct Orch {
    m: Mesh,
    orch: String,
    url: String,
    token: String,
}

impl Orch {
    /// `re6st-orch ARGS` in node `i` (admin token when `admin`).
    fn cli(&self, i: usize, args: &[&str]) -> Result<std::process::Output> {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--master", &self.url, "--admin-token-file", &self.token]);
        self.m.host(i)?.output(&self.orch, &all)
    }

    fn master(&self) -> Result<Process> {
        let n = &self.m.nodes[0];
        let dir = n.dir.to_string_lossy().into_owned();
        let catalog = concat!(env!("CARGO_MANIFEST_DIR"), "/../orchestration/catalog");
        self.m.host(0)?.spawn(
            "master",
            &self.orch,
            &[
                "master",
                "--listen",
                &format!("[{}]:{PORT}", n.address),
                "--db",
                &format!("{dir}/master.db"),
                "--catalog",
                catalog,
                "--dir",
                &dir,
                "--network-config",
                &format!("{dir}/state/network.json"),
                "--admin-token-file",
                &self.token,
            ],
        )
    }

    /// An HTTP GET of `/` from node `i`; the status line.
    fn get(&self, i: usize, url_host: &str, port: &str) -> String {
        self.get_path(i, url_host, port, "/")
    }

    /// An HTTP GET of `path` from node `i`; the status line.
    fn get_path(&self, i: usize, url_host: &str, port: &str, path: &str) -> String {
        let script = format!(
            "exec 3<>/dev/tcp/{url_host}/{port} && printf 'GET {path} HTTP/1.0\\r\\n\\r\\n' >&3 && head -c 15 <&3"
        );
        self.m
            .host(i)
            .and_then(|h| h.output("timeout", &["3", "bash", "-c", &script]))
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

fn master_and_agents_over_the_overlay() -> Result<()> {
    let names = ["m", "n1", "n2", "n3", "n4"];
    let mut t = Topology::new("orch");
    t.host("reg");
    for n in names {
        t.host(n);
    }
    t.default_wan(LinkParams::delay_ms(10));
    t.wan_both("m", "n2", LinkParams::delay_ms(10).with_blackhole(true));
    let m = Mesh::start(&t, "reg", &names, &[], &["--config-refresh", "5"])?;
    m.wait_full_reachability(Duration::from_secs(30))?;
    let token = m.net.log_dir().join("admin.token");
    std::fs::write(&token, "s3cret-operator-token\n")
        .map_err(|e| Error::io("writing the admin token", e))?;
    let orch = netns_tests::binary("re6st-orch")?
        .to_string_lossy()
        .into_owned();
    let url = format!("http://[{}]:{PORT}", m.nodes[0].address);
    let o = Orch {
        m,
        orch,
        url,
        token: token.to_string_lossy().into_owned(),
    };

    // The master refuses an underlay address.
    let under = o.m.host(0)?.addr(false)?;
    let refused = o.m.host(0)?.output(
        &o.orch,
        &[
            "master",
            "--listen",
            &format!("{under}:{PORT}"),
            "--dir",
            &o.m.nodes[0].dir.to_string_lossy(),
        ],
    )?;
    check(
        !refused.status.success() && text(&refused).contains("not an overlay address"),
        format!("underlay listen: {}", text(&refused)),
    )?;

    let mut master = o.master()?;
    let mut agents = Vec::new();
    for i in 1..5 {
        let n = &o.m.nodes[i];
        let dir = n.dir.to_string_lossy().into_owned();
        agents.push(o.m.host(i)?.spawn(
            "agent",
            &o.orch,
            &[
                "agent",
                "--master",
                &o.url,
                "--name",
                &n.name,
                "--dir",
                &dir,
                "--catalog",
                concat!(env!("CARGO_MANIFEST_DIR"), "/../orchestration/catalog"),
                "--network-config",
                &format!("{dir}/state/network.json"),
                "--state",
                &format!("{dir}/instances"),
                "--ctl-socket",
                &n.ctl.to_string_lossy(),
                "--period-ms",
                "500",
            ],
        )?);
    }
    wait_until(
        "four agents registered",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let out = o.cli(0, &["nodes"]).ok()?;
            let t = text(&out);
            ["n1 ", "n2 ", "n3 ", "n4 "]
                .iter()
                .all(|n| t.contains(n))
                .then_some(())
        },
    )?;

    // Bad requests leave nothing.
    for (args, want) in [
        (vec!["request", "mariadb", "db"], "unknown software"),
        (
            vec!["request", "http-static", "web", "--param", "port=http"],
            "not a port",
        ),
        (
            vec!["request", "http-static", "web", "--node", "n9"],
            "no node",
        ),
    ] {
        let out = o.cli(0, &args)?;
        check(
            !out.status.success() && text(&out).contains(want),
            format!("{args:?}: {}", text(&out)),
        )?;
    }

    // A path parameter that leaves the instance directory is refused.
    let out = o.cli(
        0,
        &[
            "request",
            "http-static",
            "keys",
            "--node",
            "n2",
            "--param",
            "root=/",
        ],
    )?;
    check(
        !out.status.success() && text(&out).contains("not a relative path"),
        format!("root=/: {}", text(&out)),
    )?;

    // A static server on n2, whose direct path to m is broken.
    let started = Instant::now();
    let out = o.cli(
        0,
        &[
            "request",
            "http-static",
            "web",
            "--node",
            "n2",
            "--wait",
            "--timeout",
            "60",
        ],
    )?;
    let ready_after = started.elapsed();
    check(out.status.success(), format!("request: {}", text(&out)))?;
    let n2 = o.m.nodes[2].address.to_string();
    check(
        text(&out).contains(&format!("url = http://[{n2}]:8080/")),
        format!("connection parameters: {}", text(&out)),
    )?;
    eprintln!("http-static on n2 ready {ready_after:?} after the request");
    check(
        o.get(0, &n2, "8080").starts_with("HTTP/1.0 200"),
        "the URL answers from m",
    )?;
    // The static server never serves outside its root (axum decodes %2F).
    let key = o.m.nodes[2].dir.join("node.key");
    let encoded = key.to_string_lossy().replace('/', "%2F");
    for path in [format!("/{encoded}"), "/..%2F..%2Fnode.key".to_string()] {
        let got = o.get_path(0, &n2, "8080", &path);
        check(
            got.starts_with("HTTP/1.0 404"),
            format!("GET {path}: {got:?}"),
        )?;
    }
    let again = o.cli(0, &["request", "http-static", "web", "--node", "n2"])?;
    check(
        text(&again).contains("ready"),
        format!("the same request again: {}", text(&again)),
    )?;

    // Kill the instance's process: the agent restarts it.
    let pattern = format!("serve-static --listen \\[{n2}\\]:8080");
    o.m.host(2)?.output("pkill", &["-f", &pattern])?;
    let killed = Instant::now();
    wait_until(
        "the server answering again",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || {
            (killed.elapsed() > Duration::from_millis(300)
                && o.get(0, &n2, "8080").starts_with("HTTP/1.0 200"))
            .then_some(())
        },
    )?;
    eprintln!(
        "killed instance answering again after {:?}",
        killed.elapsed()
    );
    let show = o.cli(0, &["show", "web"])?;
    check(
        text(&show).contains("\"ready\""),
        format!("show: {}", text(&show)),
    )?;

    // Placement near a prefix: the node inside it.
    let n3 = o.m.nodes[3].prefix.clone();
    let out = o.cli(
        0,
        &[
            "request",
            "kv",
            "cache",
            "--near",
            &n3,
            "--wait",
            "--timeout",
            "60",
        ],
    )?;
    check(
        out.status.success() && text(&out).contains("cache (kv on n3): ready"),
        format!("--near: {}", text(&out)),
    )?;

    // Provisioning a new node: a join token from the registry.
    let out = o.m.host(0)?.output(
        &o.orch,
        &[
            "node",
            "add",
            "n9",
            "--registry",
            &o.m.url,
            "--registry-token-file",
            &o.m.admin_token.to_string_lossy(),
            "--master",
            &o.url,
        ],
    )?;
    let printed = text(&out);
    let token = printed
        .split("--token ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("")
        .to_string();
    check(
        out.status.success() && token.len() == 32 && printed.contains("re6st-orch agent --master"),
        format!("node add: {printed}"),
    )?;
    check(
        o.m.registry_cmd(&["token", "list"])?.contains(&token),
        "the printed token is the registry's",
    )?;

    // The master restarts: state kept.
    master.stop()?;
    let _master = o.master()?;
    let (_, _) = wait_until(
        "the restarted master lists the instance as ready",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let out = o.cli(0, &["list"]).ok()?;
            text(&out)
                .contains("web (http-static on n2): ready")
                .then_some(())
        },
    )?;

    // Destroy: the agent stops it and the master forgets it.
    let out = o.cli(0, &["destroy", "web"])?;
    check(out.status.success(), format!("destroy: {}", text(&out)))?;
    wait_until(
        "the instance gone",
        Duration::from_secs(20),
        Duration::from_millis(300),
        || {
            let out = o.cli(0, &["list"]).ok()?;
            (!text(&out).contains("web")).then_some(())
        },
    )?;
    check(
        !o.get(0, &n2, "8080").starts_with("HTTP"),
        "the server is stopped",
    )?;
    drop(agents);
    Ok(())
}

fn main() -> ExitCode {
    run_suite(&[(
        "master_and_agents_over_the_overlay",
        master_and_agents_over_the_overlay,
    )])
}
