//! Any text as a re6stnet configuration file and as a service descriptor
//! (with request parameters): errors, never panics.
#![no_main]
use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use re6st_orchestration::descriptor::{render, Descriptor};
use re6stnet::config::{merge, parse, FileConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(f) = parse(text) {
        let _ = merge(FileConfig::default(), f);
    }
    if let Ok(d) = Descriptor::parse(text) {
        let given: BTreeMap<String, String> = d
            .parameters
            .keys()
            .map(|k| (k.clone(), text.chars().take(20).collect()))
            .collect();
        if let Ok(mut values) = d.resolve(&given) {
            for b in ["address", "instance", "dir"] {
                values.insert(b.to_string(), "x".to_string());
            }
            for a in &d.command {
                let _ = render(a, &values);
            }
        }
    }
    let _ = render(text, &BTreeMap::new());
});
