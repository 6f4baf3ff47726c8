//! OCI manifests, indexes and configs as a registry or layout serves them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    tessera_oci::fuzzing::parse_document(data);
});
