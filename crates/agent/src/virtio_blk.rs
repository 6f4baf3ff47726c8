//! virtio-blk requests (virtio 1.2, §5.2.6), parsed and checked apart from
//! any guest memory, so the parser can be fuzzed on its own.
//!
//! A request is a descriptor chain: a 16-byte header the driver wrote
//! (`type`, reserved, `sector`), then data (written by the driver for a
//! write, by the device for a read), then one status byte the device
//! writes. [`parse`] takes the header bytes and the sizes of the two parts
//! and says what to do, or which status to answer with.

/// Bytes per sector: offsets and lengths in requests count these.
pub const SECTOR: u64 = 512;
/// The header the driver writes first.
pub const HEADER_LEN: usize = 16;
/// Bytes of the id a `GET_ID` request returns.
pub const ID_LEN: usize = 20;
/// The largest request this device takes (more is an I/O error): bounds the
/// buffer one request may make the agent hold.
pub const MAX_REQUEST: u64 = 4 << 20;

/// Request types.
pub mod kind {
    /// Read.
    pub const IN: u32 = 0;
    /// Write.
    pub const OUT: u32 = 1;
    /// Flush.
    pub const FLUSH: u32 = 4;
    /// The device's id string.
    pub const GET_ID: u32 = 8;
}

/// Status bytes.
pub mod status {
    /// Done.
    pub const OK: u8 = 0;
    /// Failed.
    pub const IOERR: u8 = 1;
    /// Not a request this device does.
    pub const UNSUPP: u8 = 2;
}

/// What a request asks for, checked against the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Read `len` bytes at byte `offset` into the device-writable part.
    Read {
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Write the driver's `len` bytes at byte `offset`.
    Write {
        /// Byte offset on the disk.
        offset: u64,
        /// Bytes.
        len: u64,
    },
    /// Make completed writes durable.
    Flush,
    /// Write the device's id (at most [`ID_LEN`] bytes).
    GetId,
}

/// What the device is, for checking requests.
#[derive(Clone, Copy, Debug)]
pub struct Disk {
    /// Bytes of the disk.
    pub size: u64,
    /// Whether writes are allowed.
    pub writable: bool,
}

/// Parses a request: `header` is what the driver wrote before any data
/// (at least [`HEADER_LEN`] bytes for a valid request), `readable` the
/// driver-written bytes after the header, `writable` the device-writable
/// bytes (data, then the status byte). Returns the request, or the status
/// to answer with; `None` as the status when there is no byte to put one in.
pub fn parse(header: &[u8], readable: u64, writable: u64, disk: Disk) -> Result<Request, Option<u8>> {
    if writable == 0 {
        return Err(None);
    }
    let fail = |s| Err(Some(s));
    let Some(h) = header.get(..HEADER_LEN) else { return fail(status::IOERR) };
    let kind = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    let data_in = writable - 1;
    let span = |len: u64| -> Result<u64, Option<u8>> {
        if len == 0 || !len.is_multiple_of(SECTOR) || len > MAX_REQUEST {
            return Err(Some(status::IOERR));
        }
        let offset = sector.checked_mul(SECTOR).ok_or(Some(status::IOERR))?;
        match offset.checked_add(len) {
            Some(end) if end <= disk.size => Ok(offset),
            _ => Err(Some(status::IOERR)),
        }
    };
    match kind {
        kind::IN => {
            let offset = span(data_in)?;
            Ok(Request::Read { offset, len: data_in })
        }
        kind::OUT => {
            if !disk.writable {
                return fail(status::IOERR);
            }
            let offset = span(readable)?;
            Ok(Request::Write { offset, len: readable })
        }
        kind::FLUSH => Ok(Request::Flush),
        kind::GET_ID => {
            if data_in == 0 {
                return fail(status::IOERR);
            }
            Ok(Request::GetId)
        }
        _ => fail(status::UNSUPP),
    }
}

/// The id string of an export: its name, cut to [`ID_LEN`] bytes (not
/// terminated when it fills them, as the spec allows).
pub fn id_of(name: &str) -> Vec<u8> {
    let mut id = name.as_bytes().to_vec();
    id.truncate(ID_LEN);
    id
}

/// The largest segment a request may have, given `seg_max` segments: a
/// driver that respects both never builds a request past [`MAX_REQUEST`]
/// (Linux lets the guest raise `max_sectors_kb` up to what they allow).
pub fn size_max(seg_max: u32) -> u32 {
    ((MAX_REQUEST / u64::from(seg_max.max(1))) & !4095) as u32
}

/// The device configuration space (`struct virtio_blk_config`) up to and
/// including `num_queues`: capacity in sectors, the largest segment and the
/// most segments per request (together at most [`MAX_REQUEST`]), the block
/// size, and the number of queues.
pub fn config(size: u64, seg_max: u32, num_queues: u16) -> Vec<u8> {
    let mut c = vec![0u8; 36];
    c[0..8].copy_from_slice(&(size / SECTOR).to_le_bytes());
    c[8..12].copy_from_slice(&size_max(seg_max).to_le_bytes());
    c[12..16].copy_from_slice(&seg_max.to_le_bytes());
    // geometry (16..20) unused
    c[20..24].copy_from_slice(&4096u32.to_le_bytes());
    // topology (24..32): physical block exponent 0, alignment 0, min io 8
    // sectors (4 KiB), optimal io 0.
    c[26..28].copy_from_slice(&8u16.to_le_bytes());
    // writeback (32) 0, unused (33), num_queues (34..36)
    c[34..36].copy_from_slice(&num_queues.to_le_bytes());
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u32, sector: u64) -> Vec<u8> {
        let mut h = vec![0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    const RW: Disk = Disk { size: 1 << 20, writable: true };
    const RO: Disk = Disk { size: 1 << 20, writable: false };

    #[test]
    fn reads_writes_and_the_rest() {
        assert_eq!(parse(&header(kind::IN, 2), 0, 4097, RW), Ok(Request::Read { offset: 1024, len: 4096 }));
        assert_eq!(parse(&header(kind::OUT, 8), 512, 1, RW), Ok(Request::Write { offset: 4096, len: 512 }));
        assert_eq!(parse(&header(kind::FLUSH, 0), 0, 1, RW), Ok(Request::Flush));
        assert_eq!(parse(&header(kind::GET_ID, 0), 0, 21, RO), Ok(Request::GetId));
        assert_eq!(parse(&header(kind::IN, 2047), 0, 513, RO), Ok(Request::Read { offset: 2047 * 512, len: 512 }), "the last sector");
    }

    #[test]
    fn bad_requests_get_a_status_and_never_reach_the_disk() {
        assert_eq!(parse(&header(kind::OUT, 0), 512, 1, RO), Err(Some(status::IOERR)), "a read-only disk");
        assert_eq!(parse(&header(kind::IN, 2048), 0, 513, RW), Err(Some(status::IOERR)), "past the end");
        assert_eq!(parse(&header(kind::IN, u64::MAX), 0, 513, RW), Err(Some(status::IOERR)), "an overflowing sector");
        assert_eq!(parse(&header(kind::IN, 0), 0, 100, RW), Err(Some(status::IOERR)), "not whole sectors");
        assert_eq!(parse(&header(kind::IN, 0), 0, 1, RW), Err(Some(status::IOERR)), "no data");
        assert_eq!(parse(&header(kind::IN, 0), 0, MAX_REQUEST + 513, RW), Err(Some(status::IOERR)), "too large");
        assert_eq!(parse(&header(99, 0), 0, 1, RW), Err(Some(status::UNSUPP)));
        assert_eq!(parse(&header(kind::IN, 0)[..8], 0, 513, RW), Err(Some(status::IOERR)), "a short header");
        assert_eq!(parse(&header(kind::IN, 0), 0, 0, RW), Err(None), "no room for a status");
        assert_eq!(parse(&header(kind::GET_ID, 0), 0, 1, RW), Err(Some(status::IOERR)));
    }

    #[test]
    fn config_space() {
        let c = config(1 << 30, 126, 4);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2 << 20);
        let (size_max, seg_max) = (u32::from_le_bytes(c[8..12].try_into().unwrap()), u32::from_le_bytes(c[12..16].try_into().unwrap()));
        assert_eq!((size_max, seg_max), (32 << 10, 126));
        assert!(u64::from(size_max) * u64::from(seg_max) <= MAX_REQUEST);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(id_of("a-very-long-image-name-indeed").len(), ID_LEN);
    }
}
