//! Certificates: the CA, node certificates and CSRs.
//!
//! - CA: Ed25519, self-signed, with the network prefix in an extension, so
//!   any node can check an address against it offline.
//! - Node certificate: subject CN = the node prefix (`fd5e:2a1:77:3::/64`),
//!   SAN iPAddress = the overlay address (`prefix::1`), an extension with the
//!   node's 32-byte WireGuard public key, unique increasing serial.
//!
//! Issued with `rcgen`, parsed and verified with `x509-parser`.

use std::net::Ipv6Addr;

use ipnet::Ipv6Net;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, CustomExtension,
    DistinguishedName, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber, SignatureAlgorithm, SigningKey, PKCS_ED25519,
};
use ring::signature::{UnparsedPublicKey, ED25519};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::error::{Error, Result};

/// Our private OID arc, `2.25.N` with N random. (rcgen takes OID arcs as
/// u64, so N is a random 63-bit number rather than a full 128-bit UUID.)
pub const OID_ARC: [u64; 3] = [2, 25, 6_042_915_377_213_447_117];
/// Extension with the node's WireGuard (X25519) public key, 32 bytes.
pub const OID_WG_KEY: [u64; 4] = [2, 25, 6_042_915_377_213_447_117, 1];
/// Extension of the CA with the network prefix: 16 address bytes + length.
pub const OID_NETWORK: [u64; 4] = [2, 25, 6_042_915_377_213_447_117, 2];

fn oid_string(oid: &[u64]) -> String {
    oid.iter().map(u64::to_string).collect::<Vec<_>>().join(".")
}

/// DER OCTET STRING around short content (< 128 bytes).
fn octet_string(content: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(content.len() + 2);
    v.push(0x04);
    v.push(content.len() as u8);
    v.extend_from_slice(content);
    v
}

fn parse_octet_string(der: &[u8]) -> Result<&[u8]> {
    match der {
        [0x04, len, rest @ ..] if usize::from(*len) == rest.len() && *len < 128 => Ok(rest),
        _ => Err(Error::Invalid("malformed re6st extension".into())),
    }
}

/// The overlay address of a node prefix: `prefix::1`.
pub fn overlay_address(prefix: Ipv6Net) -> Ipv6Addr {
    Ipv6Addr::from(u128::from(prefix.network()) | 1)
}

/// SHA-256 of DER, lower-case hex: the fingerprint users pin.
pub fn fingerprint(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

fn pem_to_der(pem: &str, label: &str) -> Result<Vec<u8>> {
    let block = x509_parser::pem::parse_x509_pem(pem.as_bytes())
        .map_err(|e| Error::Invalid(format!("not a PEM {label}: {e}")))?
        .1;
    if block.label != label {
        return Err(Error::Invalid(format!(
            "expected PEM {label}, found {}",
            block.label
        )));
    }
    Ok(block.contents)
}

fn unix_to_time(ts: i64) -> Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(ts)
        .map_err(|e| Error::Invalid(format!("timestamp {ts}: {e}")))
}

/// Verifies an Ed25519 signature by a raw 32-byte public key.
pub fn verify_ed25519(public_key: &[u8], msg: &[u8], sig: &[u8]) -> Result<()> {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(msg, sig)
        .map_err(|_| Error::Unauthenticated("bad signature".into()))
}

/// A raw Ed25519 public key, for rcgen.
struct RawEd25519<'a>(&'a [u8]);

impl PublicKeyData for RawEd25519<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }
    fn algorithm(&self) -> &'static SignatureAlgorithm {
        &PKCS_ED25519
    }
}

/// Generates a new Ed25519 key pair (node or CA key).
pub fn generate_key() -> Result<KeyPair> {
    Ok(KeyPair::generate_for(&PKCS_ED25519)?)
}

/// Loads an Ed25519 key pair from PKCS#8 PEM.
pub fn load_key(pem: &str) -> Result<KeyPair> {
    let key = KeyPair::from_pem(pem).map_err(|e| Error::Invalid(format!("key: {e}")))?;
    if key.algorithm() != &PKCS_ED25519 {
        return Err(Error::Invalid("key is not Ed25519".into()));
    }
    Ok(key)
}

/// Signs with a key pair.
pub fn sign(key: &KeyPair, msg: &[u8]) -> Result<Vec<u8>> {
    Ok(key.sign(msg)?)
}

/// The public side of the CA: what every node holds as `ca.crt`.
#[derive(Clone, Debug)]
pub struct CaCert {
    pem: String,
    der: Vec<u8>,
    public_key: Vec<u8>,
    network: Ipv6Net,
}

impl CaCert {
    /// Parses a CA certificate and checks it is a self-signed Ed25519 CA
    /// with a network extension.
    pub fn from_pem(pem: &str) -> Result<Self> {
        let der = pem_to_der(pem, "CERTIFICATE")?;
        let (_, cert) = X509Certificate::from_der(&der)
            .map_err(|e| Error::Invalid(format!("CA certificate: {e}")))?;
        cert.verify_signature(None)
            .map_err(|_| Error::Invalid("CA certificate is not validly self-signed".into()))?;
        if !cert.is_ca() {
            return Err(Error::Invalid("certificate is not a CA".into()));
        }
        let public_key = cert.public_key().subject_public_key.data.to_vec();
        if public_key.len() != 32 {
            return Err(Error::Invalid("CA key is not Ed25519".into()));
        }
        let want = oid_string(&OID_NETWORK);
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == want)
            .ok_or_else(|| Error::Invalid("CA has no network extension".into()))?;
        let body = parse_octet_string(ext.value)?;
        let network = match body {
            [addr @ .., len] if addr.len() == 16 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(addr);
                Ipv6Net::new(Ipv6Addr::from(a), *len)
                    .map_err(|e| Error::Invalid(format!("CA network: {e}")))?
            }
            _ => return Err(Error::Invalid("malformed CA network extension".into())),
        };
        Ok(Self {
            pem: pem.to_string(),
            der,
            public_key,
            network,
        })
    }

    /// The PEM text.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// SHA-256 fingerprint (hex) of the DER.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.der)
    }

    /// The network prefix.
    pub fn network(&self) -> Ipv6Net {
        self.network
    }

    /// The CA's raw Ed25519 public key.
    pub fn public_key(&self) -> &[u8] {
        &self.public_key
    }

    /// Checks a signature made by the CA key (signed network config).
    pub fn verify(&self, msg: &[u8], sig: &[u8]) -> Result<()> {
        verify_ed25519(&self.public_key, msg, sig)
    }

    /// Parses a node certificate and checks it was issued by this CA, is
    /// valid at `now` (unix seconds; `None` skips the time check) and names
    /// a prefix inside the network.
    pub fn verify_node(&self, pem: &str, now: Option<i64>) -> Result<NodeCert> {
        let node = NodeCert::from_pem(pem)?;
        let (_, cert) = X509Certificate::from_der(&node.der)
            .map_err(|e| Error::Invalid(format!("node certificate: {e}")))?;
        let (_, ca) = X509Certificate::from_der(&self.der)
            .map_err(|e| Error::Corrupt(format!("CA certificate: {e}")))?;
        cert.verify_signature(Some(ca.public_key()))
            .map_err(|_| Error::Unauthenticated("certificate not signed by this CA".into()))?;
        if let Some(now) = now {
            if now < node.not_before || now > node.not_after {
                return Err(Error::Unauthenticated(format!(
                    "certificate {} not valid now",
                    node.serial
                )));
            }
        }
        if !self.network.contains(&node.prefix) {
            return Err(Error::Unauthenticated(format!(
                "certificate prefix {} outside network {}",
                node.prefix, self.network
            )));
        }
        Ok(node)
    }
}

/// What a node certificate says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeCert {
    /// X.509 serial.
    pub serial: u64,
    /// The node prefix (subject CN).
    pub prefix: Ipv6Net,
    /// The overlay address (SAN).
    pub address: Ipv6Addr,
    /// The node's WireGuard public key.
    pub wg_key: [u8; 32],
    /// The node's raw Ed25519 public key.
    pub public_key: [u8; 32],
    /// Validity start (unix seconds).
    pub not_before: i64,
    /// Validity end (unix seconds).
    pub not_after: i64,
    /// The DER encoding.
    pub der: Vec<u8>,
}

impl NodeCert {
    /// Parses (without verifying) a node certificate.
    pub fn from_pem(pem: &str) -> Result<Self> {
        let der = pem_to_der(pem, "CERTIFICATE")?;
        Self::from_der(der)
    }

    /// Parses (without verifying) a DER node certificate.
    pub fn from_der(der: Vec<u8>) -> Result<Self> {
        let (rest, cert) = X509Certificate::from_der(&der)
            .map_err(|e| Error::Invalid(format!("node certificate: {e}")))?;
        if !rest.is_empty() {
            return Err(Error::Invalid("trailing bytes after certificate".into()));
        }
        let serial_bytes = cert.raw_serial();
        let trimmed: Vec<u8> = serial_bytes
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        if trimmed.len() > 8 {
            return Err(Error::Invalid("serial too large".into()));
        }
        let serial = trimmed
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .ok_or_else(|| Error::Invalid("certificate has no CN".into()))?;
        let prefix: Ipv6Net = cn
            .parse()
            .map_err(|_| Error::Invalid(format!("CN {cn:?} is not an IPv6 prefix")))?;
        if prefix.trunc() != prefix {
            return Err(Error::Invalid(format!("CN {cn:?} has host bits set")));
        }
        let mut address = None;
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::IPAddress(bytes) = name {
                    if let Ok(a) = <[u8; 16]>::try_from(*bytes) {
                        address = Some(Ipv6Addr::from(a));
                    }
                }
            }
        }
        let address =
            address.ok_or_else(|| Error::Invalid("certificate has no IPv6 SAN".into()))?;
        if address != overlay_address(prefix) {
            return Err(Error::Invalid(format!(
                "SAN {address} is not the overlay address of {prefix}"
            )));
        }
        let want = oid_string(&OID_WG_KEY);
        let ext = cert
            .extensions()
            .iter()
            .find(|e| e.oid.to_id_string() == want)
            .ok_or_else(|| Error::Invalid("certificate has no WireGuard key".into()))?;
        let wg_key: [u8; 32] = parse_octet_string(ext.value)?
            .try_into()
            .map_err(|_| Error::Invalid("WireGuard key is not 32 bytes".into()))?;
        let public_key: [u8; 32] = cert
            .public_key()
            .subject_public_key
            .data
            .as_ref()
            .try_into()
            .map_err(|_| Error::Invalid("certificate key is not Ed25519".into()))?;
        if cert.public_key().algorithm.algorithm.to_id_string() != "1.3.101.112" {
            return Err(Error::Invalid("certificate key is not Ed25519".into()));
        }
        Ok(Self {
            serial,
            prefix,
            address,
            wg_key,
            public_key,
            not_before: cert.validity().not_before.timestamp(),
            not_after: cert.validity().not_after.timestamp(),
            der,
        })
    }
}

/// What the registry needs to issue a node certificate.
#[derive(Clone, Debug)]
pub struct IssueRequest {
    /// The node's raw Ed25519 public key (from its CSR).
    pub public_key: Vec<u8>,
    /// The allocated prefix.
    pub prefix: Ipv6Net,
    /// The node's WireGuard public key.
    pub wg_key: [u8; 32],
    /// The serial.
    pub serial: u64,
    /// Validity start (unix seconds).
    pub not_before: i64,
    /// Validity end (unix seconds).
    pub not_after: i64,
}

/// The CA: its key and certificate. Held by the registry only.
pub struct Ca {
    key: KeyPair,
    cert: CaCert,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("cert", &self.cert)
            .finish_non_exhaustive()
    }
}

impl Ca {
    /// Creates a new CA for `network`, valid for `days` from `now`.
    pub fn generate(network: Ipv6Net, now: i64, days: u32) -> Result<Self> {
        if network.trunc() != network {
            return Err(Error::Invalid(format!(
                "network {network} has host bits set"
            )));
        }
        let key = generate_key()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("re6st-rs CA {network}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = unix_to_time(now - 3600)?;
        params.not_after = unix_to_time(now + i64::from(days) * 86_400)?;
        params.serial_number = Some(SerialNumber::from_slice(&[1]));
        let mut net_bytes = network.network().octets().to_vec();
        net_bytes.push(network.prefix_len());
        params.custom_extensions = vec![CustomExtension::from_oid_content(
            &OID_NETWORK,
            octet_string(&net_bytes),
        )];
        let cert = params.self_signed(&key)?;
        let cert = CaCert::from_pem(&cert.pem())?;
        Ok(Self { key, cert })
    }

    /// Loads a CA from its certificate and key.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<Self> {
        let cert = CaCert::from_pem(cert_pem)?;
        let key = load_key(key_pem)?;
        if key.public_key_raw() != cert.public_key() {
            return Err(Error::Invalid(
                "CA key does not match the CA certificate".into(),
            ));
        }
        Ok(Self { key, cert })
    }

    /// The key in PKCS#8 PEM.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// The public certificate.
    pub fn cert(&self) -> &CaCert {
        &self.cert
    }

    /// Signs with the CA key.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>> {
        sign(&self.key, msg)
    }

    /// Makes a node key and issues its certificate, for tests, simulations
    /// and demos (a real node makes its own key and sends a CSR).
    pub fn issue_with_new_key(
        &self,
        prefix: Ipv6Net,
        wg_key: [u8; 32],
        serial: u64,
        not_before: i64,
        not_after: i64,
    ) -> Result<(KeyPair, String)> {
        let key = generate_key()?;
        let pem = self.issue(&IssueRequest {
            public_key: key.public_key_raw().to_vec(),
            prefix,
            wg_key,
            serial,
            not_before,
            not_after,
        })?;
        Ok((key, pem))
    }

    /// Issues a node certificate; returns its PEM.
    pub fn issue(&self, req: &IssueRequest) -> Result<String> {
        if req.public_key.len() != 32 {
            return Err(Error::Invalid("node key is not a raw Ed25519 key".into()));
        }
        if !self.cert.network.contains(&req.prefix) {
            return Err(Error::Invalid(format!(
                "{} is outside {}",
                req.prefix, self.cert.network
            )));
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, req.prefix.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::IpAddress(overlay_address(req.prefix).into())];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = unix_to_time(req.not_before)?;
        params.not_after = unix_to_time(req.not_after)?;
        let serial = req.serial.to_be_bytes();
        let first = serial.iter().position(|b| *b != 0).unwrap_or(7);
        let mut serial_bytes = serial[first..].to_vec();
        if serial_bytes[0] & 0x80 != 0 {
            serial_bytes.insert(0, 0);
        }
        params.serial_number = Some(SerialNumber::from_slice(&serial_bytes));
        params.use_authority_key_identifier_extension = true;
        params.custom_extensions = vec![CustomExtension::from_oid_content(
            &OID_WG_KEY,
            octet_string(&req.wg_key),
        )];
        let issuer = Issuer::from_ca_cert_pem(self.cert.pem(), &self.key)?;
        let cert = params.signed_by(&RawEd25519(&req.public_key), &issuer)?;
        Ok(cert.pem())
    }
}

/// Checks a CSR: valid self-signature, an Ed25519 key, and nothing the
/// registry decides itself (no CN, no SAN, no extensions). Returns the raw
/// public key.
pub fn check_csr(pem: &str) -> Result<Vec<u8>> {
    let csr = CertificateSigningRequestParams::from_pem(pem)
        .map_err(|e| Error::Invalid(format!("CSR refused: {e}")))?;
    if csr.public_key.algorithm() != &PKCS_ED25519 {
        return Err(Error::Invalid("CSR key is not Ed25519".into()));
    }
    let p = &csr.params;
    if p.distinguished_name.get(&DnType::CommonName).is_some() {
        return Err(Error::Invalid(
            "CSR names a CN: the registry chooses the prefix".into(),
        ));
    }
    if !p.subject_alt_names.is_empty()
        || !p.key_usages.is_empty()
        || !p.extended_key_usages.is_empty()
        || !matches!(p.is_ca, IsCa::NoCa)
        || !p.custom_extensions.is_empty()
    {
        return Err(Error::Invalid(
            "CSR requests extensions: the registry chooses them".into(),
        ));
    }
    Ok(csr.public_key.der_bytes().to_vec())
}

/// Builds a CSR (PEM) for a node key: empty subject, no extensions.
pub fn make_csr(key: &KeyPair) -> Result<String> {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    Ok(params.serialize_request(key)?.pem()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_790_000_000;

    fn ca() -> Result<Ca> {
        Ca::generate(
            "fd5e:2a1:77::/48"
                .parse()
                .map_err(|_| Error::Invalid("net".into()))?,
            NOW,
            3650,
        )
    }

    fn issue(ca: &Ca, key: &KeyPair, serial: u64) -> Result<String> {
        ca.issue(&IssueRequest {
            public_key: check_csr(&make_csr(key)?)?,
            prefix: "fd5e:2a1:77:3::/64"
                .parse()
                .map_err(|_| Error::Invalid("p".into()))?,
            wg_key: [7; 32],
            serial,
            not_before: NOW,
            not_after: NOW + 365 * 86_400,
        })
    }

    #[test]
    fn issues_and_verifies_a_node_certificate() -> Result<()> {
        let ca = ca()?;
        let key = generate_key()?;
        let pem = issue(&ca, &key, 0x80)?;
        let node = ca.cert().verify_node(&pem, Some(NOW + 10))?;
        assert_eq!(node.serial, 0x80);
        assert_eq!(node.prefix.to_string(), "fd5e:2a1:77:3::/64");
        assert_eq!(node.address.to_string(), "fd5e:2a1:77:3::1");
        assert_eq!(node.wg_key, [7; 32]);
        assert_eq!(&node.public_key[..], key.public_key_raw());
        assert_eq!(node.not_after, NOW + 365 * 86_400);
        assert!(ca
            .cert()
            .verify_node(&pem, Some(NOW + 400 * 86_400))
            .is_err());
        Ok(())
    }

    #[test]
    fn another_ca_does_not_verify() -> Result<()> {
        let (ca1, ca2) = (ca()?, ca()?);
        let pem = issue(&ca1, &generate_key()?, 1)?;
        assert!(matches!(
            ca2.cert().verify_node(&pem, None),
            Err(Error::Unauthenticated(_))
        ));
        Ok(())
    }

    #[test]
    fn ca_round_trips_and_signs() -> Result<()> {
        let ca = ca()?;
        let again = Ca::load(ca.cert().pem(), &ca.key_pem())?;
        assert_eq!(again.cert().network().to_string(), "fd5e:2a1:77::/48");
        let sig = ca.sign(b"config")?;
        again.cert().verify(b"config", &sig)?;
        assert!(again.cert().verify(b"other", &sig).is_err());
        assert!(Ca::load(ca.cert().pem(), &generate_key()?.serialize_pem()).is_err());
        Ok(())
    }

    #[test]
    fn csrs_that_choose_their_own_prefix_or_key_type_are_refused() -> Result<()> {
        let key = generate_key()?;
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, "fd5e:2a1:77:1::/64");
        assert!(check_csr(&p.serialize_request(&key)?.pem()?).is_err());
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::IpAddress(
            "fd5e:2a1:77:1::1"
                .parse()
                .map_err(|_| Error::Invalid("a".into()))?,
        )];
        assert!(check_csr(&p.serialize_request(&key)?.pem()?).is_err());
        let ec = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        assert!(check_csr(&make_csr(&ec)?).is_err());
        assert!(check_csr("garbage").is_err());
        assert!(check_csr(
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn garbage_certificates_are_errors_not_panics() {
        for junk in [
            "",
            "garbage",
            "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        ] {
            assert!(NodeCert::from_pem(junk).is_err());
            assert!(CaCert::from_pem(junk).is_err());
        }
    }
}
