//! Any bytes through the registry's parsers of untrusted input.
#![no_main]
use libfuzzer_sys::fuzz_target;
use re6st_registry::auth::{RequestAuth, SignedPeerRecord};
use re6st_registry::cert::{check_csr, CaCert, NodeCert};
use re6st_registry::config::SignedConfig;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = NodeCert::from_der(data.to_vec());
    let _ = NodeCert::from_pem(&text);
    let _ = CaCert::from_pem(&text);
    let _ = check_csr(&text);
    let _ = RequestAuth::parse(&text);
    let _ = serde_json::from_slice::<SignedConfig>(data);
    let _ = serde_json::from_slice::<SignedPeerRecord>(data);
});
