//! What a cache node or the tier client reads from the other side: stripe
//! paths, stripe headers, and stripes of any shape handed to the decoder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_cache::ec::Code;
use tessera_cache::tier::{wire, StripeHeader};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Some(c) = wire::chunk_of(s) {
            assert_eq!(wire::chunk_of(&wire::path(&c)), Some(c));
        }
    }
    let _ = StripeHeader::parse(data);
    // What a node checks before it keeps a stripe: never panics, and a
    // stripe it accepts has a header that parses.
    if StripeHeader::check(data).is_ok() {
        assert!(StripeHeader::parse(data).is_some());
    }
    // Five stripes cut from the input (some missing), rebuilt by a 4+1 code.
    let Some((&mask, rest)) = data.split_first() else { return };
    let part = rest.len() / 5;
    let stripes: Vec<Option<&[u8]>> = (0..5)
        .map(|i| {
            // One stripe may come a byte short (a ragged set).
            let short = usize::from(i == (mask as usize >> 5) % 5 && part > 0 && mask & 0x80 != 0);
            (mask >> i & 1 == 1).then(|| &rest[i * part..(i + 1) * part - short])
        })
        .collect();
    let _ = Code::new(4, 1).expect("a valid code").decode(&stripes, rest.len());
});
