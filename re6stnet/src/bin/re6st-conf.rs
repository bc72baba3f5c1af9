//! `re6st-conf`: enrol this machine in a re6st-rs network (or renew its
//! certificate when run again).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use re6stnet::enrol::{enrol, EnrolOptions};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Enrol a node with a re6st-rs registry: fetch and pin the CA, make the keys, get a certificate and a prefix"
)]
struct Cli {
    /// Registry base URL (http://host:port or https://...).
    #[arg(long)]
    registry: String,
    /// One-time join token from the registry's operator (not needed to
    /// renew). Other local users can read it in the process list: prefer
    /// --token-file.
    #[arg(long, conflicts_with = "token_file")]
    token: Option<String>,
    /// File holding the join token (`-`: standard input).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Configuration directory: ca.crt, node.crt, node.key, wg.key, re6stnet.toml.
    #[arg(long, default_value = "/etc/re6stnet")]
    dir: PathBuf,
    /// SHA-256 fingerprint of the registry's CA (from `re6st-registry
    /// fingerprint`): needed on first enrolment (no ca.crt in --dir yet)
    /// unless --insecure-first-use.
    #[arg(long)]
    ca_fingerprint: Option<String>,
    /// Trust whatever CA the registry URL answers with on first enrolment
    /// (anyone on the path to it could then be the CA of this node).
    #[arg(long)]
    insecure_first_use: bool,
    /// Replace a different identity already in --dir (new key, new join).
    #[arg(long)]
    force: bool,
    /// PEM file of a CA to trust for the registry's HTTPS certificate (when
    /// it is not signed by a public CA).
    #[arg(long)]
    tls_ca: Option<PathBuf>,
}

fn fmt_time(ts: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(ts)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| ts.to_string())
}

/// The token from the command line, or read from a file or stdin (`-`).
fn read_token(
    token: Option<String>,
    file: Option<&std::path::Path>,
) -> anyhow::Result<Option<String>> {
    use anyhow::Context;
    let Some(path) = file else {
        return Ok(token);
    };
    let text = if path == std::path::Path::new("-") {
        std::io::read_to_string(std::io::stdin()).context("reading the token from stdin")?
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
    };
    let t = text.trim();
    anyhow::ensure!(!t.is_empty(), "the token file is empty");
    Ok(Some(t.to_string()))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let tls_root = match cli
        .tls_ca
        .as_deref()
        .map(std::fs::read_to_string)
        .transpose()
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("re6st-conf: reading --tls-ca: {e}");
            return ExitCode::FAILURE;
        }
    };
    let token = match read_token(cli.token, cli.token_file.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("re6st-conf: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let opts = EnrolOptions {
        tls_root,
        registry: cli.registry,
        token,
        insecure_first_use: cli.insecure_first_use,
        dir: cli.dir,
        ca_fingerprint: cli.ca_fingerprint,
        force: cli.force,
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("re6st-conf: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(enrol(&opts)) {
        Ok(r) => {
            for w in &r.warnings {
                eprintln!("re6st-conf: warning: {w}");
            }
            let what = match (r.joined, r.renewed) {
                (true, _) => "joined",
                (false, true) => "renewed",
                (false, false) => "certificate still valid (renewable 30 days before expiry)",
            };
            println!(
                "{what}: prefix {} (address {}), certificate #{}",
                r.cert.prefix, r.cert.address, r.cert.serial
            );
            println!(
                "valid until {}; renew from {}",
                fmt_time(r.cert.not_after),
                fmt_time(r.cert.not_after - 30 * 86_400)
            );
            println!(
                "files in {}; back up node.key and wg.key",
                opts.dir.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("re6st-conf: {e:#}");
            ExitCode::FAILURE
        }
    }
}
