//! Untrusted input never panics: arbitrary bytes and mutated valid documents
//! through every parser of the registry (certificates, CSRs, request
//! signatures, signed config, peer records, sealed data). The toolchain here
//! is stable-only, so these property tests stand in for cargo-fuzz.

use proptest::prelude::*;
use re6st_registry::auth::{RequestAuth, SignedPeerRecord};
use re6st_registry::cert::{check_csr, generate_key, make_csr, Ca, CaCert, NodeCert};
use re6st_registry::config::{open, NetworkConfig, Sealed, SignedConfig};

fn ca() -> Ca {
    match Ca::generate("fd5e::/48".parse().unwrap_or_default(), 1_790_000_000, 10) {
        Ok(c) => c,
        Err(e) => panic!("test CA: {e}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let text = String::from_utf8_lossy(&data).into_owned();
        let _ = NodeCert::from_der(data.clone());
        let _ = NodeCert::from_pem(&text);
        let _ = CaCert::from_pem(&text);
        let _ = check_csr(&text);
        let _ = RequestAuth::parse(&text);
        let _ = serde_json::from_slice::<SignedConfig>(&data);
        let _ = serde_json::from_slice::<SignedPeerRecord>(&data);
        let _ = open(&[7; 32], &Sealed { ephemeral: text.clone(), ciphertext: text.clone() });
    }

    #[test]
    fn mutated_pem(flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
        let ca = ca();
        let csr = make_csr(&generate_key().unwrap_or_else(|e| panic!("{e}"))).unwrap_or_else(|e| panic!("{e}"));
        for pem in [ca.cert().pem().to_string(), csr] {
            let mut bytes = pem.into_bytes();
            for (i, b) in &flips {
                let n = bytes.len();
                bytes[i % n] = *b;
            }
            let text = String::from_utf8_lossy(&bytes).into_owned();
            let _ = CaCert::from_pem(&text);
            let _ = NodeCert::from_pem(&text);
            let _ = check_csr(&text);
            let _ = ca.cert().verify_node(&text, None);
        }
    }

    #[test]
    fn mutated_signed_config(payload in ".{0,300}", sig in "[A-Za-z0-9+/=]{0,100}") {
        let ca = ca();
        let good = SignedConfig::sign(&NetworkConfig::new("fd5e::/48", 64, 0), |m| ca.sign(m))
            .unwrap_or_else(|e| panic!("{e}"));
        let bad = SignedConfig { payload: payload.clone(), signature: good.signature.clone() };
        prop_assert!(bad.verify(ca.cert()).is_err() || payload == good.payload);
        let _ = SignedConfig { payload: good.payload.clone(), signature: sig }.verify(ca.cert());
        let _ = SignedPeerRecord { payload, signature: good.signature }.verify(ca.cert(), 0, &[]);
    }
}
