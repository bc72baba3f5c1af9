//! Enrolment: what `re6st-conf` does.
//!
//! Fetch the CA (checking a pinned fingerprint, or an existing `ca.crt`;
//! without either only when trust on first use is asked for),
//! make or reuse the node's Ed25519 key and WireGuard key (files 0600), then
//! join with a token, or, when a certificate of this identity is already
//! there, renew it. Files are written atomically; a different identity in
//! the directory is never replaced without `force`.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use re6st_registry::api::{JoinRequest, RenewRequest};
use re6st_registry::cert::{generate_key, load_key, make_csr, CaCert, NodeCert};
use re6st_registry::client::{Identity, RegistryClient};
use re6st_registry::config::{random_bytes, x25519_public};
use re6st_registry::store::Issued;

/// Names of the files in the configuration directory.
pub const CA_FILE: &str = "ca.crt";
/// The node certificate.
pub const CERT_FILE: &str = "node.crt";
/// The node's Ed25519 key (0600).
pub const KEY_FILE: &str = "node.key";
/// The node's WireGuard private key, base64 (0600).
pub const WG_FILE: &str = "wg.key";
/// The daemon's configuration.
pub const CONFIG_FILE: &str = "re6stnet.toml";

/// What `re6st-conf` was asked.
#[derive(Clone, Debug)]
pub struct EnrolOptions {
    /// Registry base URL.
    pub registry: String,
    /// Join token (needed unless a certificate is there to renew).
    pub token: Option<String>,
    /// Configuration directory.
    pub dir: PathBuf,
    /// Expected SHA-256 fingerprint of the CA (hex, colons allowed).
    pub ca_fingerprint: Option<String>,
    /// Replace a different identity (new key, new join).
    pub force: bool,
    /// Trust the registry's CA without a fingerprint or an existing
    /// `ca.crt` (trust on first use: whoever answers at the URL first).
    pub insecure_first_use: bool,
    /// Extra TLS root (PEM) for an HTTPS registry with a private TLS CA.
    pub tls_root: Option<String>,
}

/// What enrolment did.
#[derive(Clone, Debug)]
pub struct EnrolReport {
    /// The certificate now in the directory.
    pub cert: NodeCert,
    /// Whether this run joined (true) or renewed / kept (false).
    pub joined: bool,
    /// Whether a new certificate was issued.
    pub renewed: bool,
    /// Warnings for the user.
    pub warnings: Vec<String>,
}

fn read_opt(path: &Path) -> anyhow::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `contents` to `path` atomically (temporary file + rename) with `mode`.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(contents)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn normalise_fingerprint(f: &str) -> String {
    f.chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Loads the WireGuard private key file (base64 of 32 bytes).
pub fn load_wg_key(path: &Path) -> anyhow::Result<[u8; 32]> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    B64.decode(text.trim())
        .ok()
        .and_then(|v| <[u8; 32]>::try_from(v).ok())
        .with_context(|| format!("{} does not hold a base64 32-byte key", path.display()))
}

fn sample_config(registry: &str, dir: &Path) -> String {
    format!(
        "# re6stnet configuration, written by re6st-conf.\n\
         # Every setting is also a command-line flag of re6stnet (re6stnet --help).\n\
         \n\
         # The registry: needed to join and renew, not to keep running.\n\
         registry = \"{registry}\"\n\
         \n\
         # Where ca.crt, node.crt, node.key and wg.key are.\n\
         dir = \"{}\"\n\
         \n\
         # UDP port of the tunnels (all peers share one socket).\n\
         # port = 326\n\
         \n\
         # LAN interfaces on which to find other nodes directly.\n\
         # interface = [\"eth1\"]\n\
         \n\
         # Control socket (re6stctl) and Prometheus metrics.\n\
         # ctl_socket = \"/run/re6stnet/ctl.sock\"\n\
         # metrics = \"127.0.0.1:9326\"\n",
        dir.display()
    )
}

/// Enrols (or renews) the node described by `opts`.
pub async fn enrol(opts: &EnrolOptions) -> anyhow::Result<EnrolReport> {
    let mut warnings = Vec::new();
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("creating {}", opts.dir.display()))?;
    let client = RegistryClient::with_tls_root(&opts.registry, opts.tls_root.as_deref())?;
    let answer = client.ca().await.context("fetching the CA")?;
    let ca = CaCert::from_pem(&answer.cert).context("the registry's CA certificate")?;
    let fp = ca.fingerprint();
    if let Some(want) = &opts.ca_fingerprint {
        if normalise_fingerprint(want) != fp {
            bail!("CA fingerprint mismatch: the registry's CA is {fp}, expected {want}");
        }
    }
    let ca_path = opts.dir.join(CA_FILE);
    match read_opt(&ca_path)? {
        Some(old) => {
            let old = CaCert::from_pem(&old)
                .with_context(|| format!("existing {}", ca_path.display()))?;
            if old.fingerprint() != fp && !opts.force {
                bail!(
                    "{} pins another CA ({}) than the registry's ({fp}); use --force to join this network instead",
                    ca_path.display(),
                    old.fingerprint()
                );
            }
        }
        None if opts.ca_fingerprint.is_none() && !opts.insecure_first_use => bail!(
            "no CA to trust: give --ca-fingerprint (the operator's `re6st-registry fingerprint`), \
             or --insecure-first-use to trust {fp}, whoever answers at {}",
            opts.registry
        ),
        None if opts.ca_fingerprint.is_none() => warnings.push(format!(
            "the CA was not pinned (--ca-fingerprint); trusting {fp} on first use"
        )),
        None => {}
    }

    let key_path = opts.dir.join(KEY_FILE);
    let wg_path = opts.dir.join(WG_FILE);
    let cert_path = opts.dir.join(CERT_FILE);
    let existing_cert = read_opt(&cert_path)?;
    let existing_key = read_opt(&key_path)?;

    // Is what is in the directory an identity of this network that we keep?
    let mut keep = None;
    if let (Some(cert_pem), Some(key_pem)) = (&existing_cert, &existing_key) {
        let key = load_key(key_pem).with_context(|| format!("existing {}", key_path.display()))?;
        match ca.verify_node(cert_pem, None) {
            Ok(cert) if cert.public_key[..] == *key.public_key_raw() => keep = Some((key, cert)),
            _ if opts.force => {}
            _ => bail!(
                "{} holds another identity (other key or network); use --force to replace it",
                opts.dir.display()
            ),
        }
    } else if existing_cert.is_some() && !opts.force {
        bail!(
            "{} exists without {}; use --force to start over",
            cert_path.display(),
            key_path.display()
        );
    }

    // New keys are written only once the registry has certified them, so
    // a refused join leaves the directory as it was.
    let (wg_secret, new_wg) = match (&keep, read_opt(&wg_path)?) {
        (Some(_), Some(_)) => (load_wg_key(&wg_path)?, false),
        _ => (random_bytes::<32>()?, true),
    };
    let wg_public = x25519_public(&wg_secret);

    let (issued, joined, key, new_key): (Issued, bool, _, _) = match keep {
        Some((key, cert)) => {
            let want_wg = (cert.wg_key != wg_public).then(|| B64.encode(wg_public));
            let issued = client
                .renew(
                    &Identity {
                        key: &key,
                        serial: cert.serial,
                    },
                    &RenewRequest { wg_key: want_wg },
                )
                .await
                .context("renewing")?;
            (issued, false, key, false)
        }
        None => {
            let token = opts
                .token
                .as_deref()
                .context("no certificate to renew here: --token is needed to join")?;
            let (key, new_key) = match existing_key.filter(|_| !opts.force) {
                Some(pem) => (
                    load_key(&pem).with_context(|| format!("existing {}", key_path.display()))?,
                    false,
                ),
                None => (generate_key()?, true),
            };
            let req = JoinRequest {
                token: token.to_string(),
                csr: make_csr(&key)?,
                wg_key: B64.encode(wg_public),
            };
            (
                client.join(&req).await.context("joining")?,
                true,
                key,
                new_key,
            )
        }
    };
    let cert = ca
        .verify_node(&issued.cert, None)
        .context("the certificate the registry sent")?;
    if cert.public_key[..] != *key.public_key_raw() || cert.wg_key != wg_public {
        bail!("the registry sent a certificate for other keys");
    }
    if new_key {
        write_atomic(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    }
    if new_wg {
        write_atomic(
            &wg_path,
            format!("{}\n", B64.encode(wg_secret)).as_bytes(),
            0o600,
        )?;
    }
    write_atomic(&ca_path, ca.pem().as_bytes(), 0o644)?;
    write_atomic(&cert_path, issued.cert.as_bytes(), 0o644)?;
    let config_path = opts.dir.join(CONFIG_FILE);
    if !config_path.exists() {
        write_atomic(
            &config_path,
            sample_config(&opts.registry, &opts.dir).as_bytes(),
            0o644,
        )?;
    }
    Ok(EnrolReport {
        cert,
        joined,
        renewed: issued.renewed,
        warnings,
    })
}
