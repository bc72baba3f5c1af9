//! Any bytes through the registry's parsers of untrusted input: the
//! certificates, CSRs and signed records nodes send, request
//! authentication headers, and the JSON bodies of the API.
#![no_main]
use libfuzzer_sys::fuzz_target;
use re6st_registry::api::{JoinRequest, RenewRequest, RevokeRequest, TokenRequest};
use re6st_registry::auth::{RequestAuth, SignedPeerRecord};
use re6st_registry::cert::{check_csr, CaCert, NodeCert};
use re6st_registry::config::{SignedConfig, SignedHmacKeys};
use re6st_registry::store::parse_wg_key;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = NodeCert::from_der(data.to_vec());
    let _ = NodeCert::from_pem(&text);
    let _ = CaCert::from_pem(&text);
    let _ = check_csr(&text);
    let _ = RequestAuth::parse(&text);
    let _ = parse_wg_key(&text);
    let _ = serde_json::from_slice::<SignedConfig>(data).map(|c| c.floods());
    let _ = serde_json::from_slice::<SignedHmacKeys>(data);
    let _ = serde_json::from_slice::<SignedPeerRecord>(data);
    if let Ok(j) = serde_json::from_slice::<JoinRequest>(data) {
        let _ = check_csr(&j.csr);
        let _ = parse_wg_key(&j.wg_key);
    }
    if let Ok(r) = serde_json::from_slice::<RenewRequest>(data) {
        let _ = r.wg_key.as_deref().map(parse_wg_key);
    }
    let _ = serde_json::from_slice::<RevokeRequest>(data);
    let _ = serde_json::from_slice::<TokenRequest>(data);
});
