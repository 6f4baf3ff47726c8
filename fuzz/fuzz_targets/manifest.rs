//! The manifest parsers: the stored envelope and the plaintext manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_chunk::{Manifest, SealedManifest};

fuzz_target!(|data: &[u8]| {
    let _ = SealedManifest::from_bytes(data);
    if let Ok(m) = serde_json::from_slice::<Manifest>(data) {
        let _ = m.validate();
    }
});
