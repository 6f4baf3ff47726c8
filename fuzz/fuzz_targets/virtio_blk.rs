//! The virtio-blk request parser: any header bytes and buffer lengths,
//! against disks of any size, read-only or not. A request it accepts must
//! lie inside the disk, be whole sectors and no larger than the cap, and a
//! write must be to a writable disk.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tessera_agent::virtio_blk::{parse, Disk, Request, MAX_REQUEST, SECTOR};

fuzz_target!(|input: (Vec<u8>, u64, u64, u64, bool)| {
    let (header, readable, writable, size, rw) = input;
    let disk = Disk { size, writable: rw };
    match parse(&header, readable, writable, disk) {
        Ok(Request::Read { offset, len }) | Ok(Request::Write { offset, len }) => {
            assert!(len > 0 && len % SECTOR == 0 && len <= MAX_REQUEST);
            assert!(offset.checked_add(len).is_some_and(|end| end <= size));
        }
        Ok(Request::Flush) | Ok(Request::GetId) => assert!(writable > 0),
        Err(Some(_)) => assert!(writable > 0, "a status needs a byte to go in"),
        Err(None) => assert_eq!(writable, 0),
    }
    if let Ok(Request::Write { .. }) = parse(&header, readable, writable, disk) {
        assert!(rw, "no write reaches a read-only disk");
    }
});
