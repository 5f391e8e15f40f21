//! An independent reader of TensorBoard event files for the tests: the record framing with
//! its CRC-32C checks (bitwise, from the polynomial) and the few protobuf fields of `Event`,
//! `Summary` and `Summary.Value` decoded by hand, so the writer's crates are not the judge.

/// One scalar: (step, tag, value).
pub type Scalar = (i64, String, f32);

fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0x82f6_3b78 } else { crc >> 1 };
        }
    }
    !crc
}

fn masked(bytes: &[u8]) -> u32 {
    let c = crc32c(bytes);
    c.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(b: &[u8], i: &mut usize) -> u64 {
    let (mut v, mut shift) = (0u64, 0);
    loop {
        let byte = b[*i];
        *i += 1;
        v |= ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return v;
        }
        shift += 7;
    }
}

/// Protobuf fields as (number, wire type, payload bytes or the varint's value).
fn fields(b: &[u8]) -> Vec<(u64, u64, Vec<u8>, u64)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let key = varint(b, &mut i);
        let (num, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let v = varint(b, &mut i);
                out.push((num, wire, Vec::new(), v));
            }
            1 => {
                out.push((num, wire, b[i..i + 8].to_vec(), 0));
                i += 8;
            }
            2 => {
                let n = varint(b, &mut i) as usize;
                out.push((num, wire, b[i..i + n].to_vec(), 0));
                i += n;
            }
            5 => {
                out.push((num, wire, b[i..i + 4].to_vec(), 0));
                i += 4;
            }
            w => panic!("unexpected wire type {w}"),
        }
    }
    out
}

/// The file version of the first event and every scalar of the others, in file order.
pub fn read_events(path: &std::path::Path) -> (String, Vec<Scalar>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (mut i, mut version, mut scalars) = (0, String::new(), Vec::new());
    while i < bytes.len() {
        let len_bytes = &bytes[i..i + 8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        assert_eq!(u32::from_le_bytes(bytes[i + 8..i + 12].try_into().unwrap()), masked(len_bytes), "length CRC");
        let data = &bytes[i + 12..i + 12 + len];
        let crc = u32::from_le_bytes(bytes[i + 12 + len..i + 16 + len].try_into().unwrap());
        assert_eq!(crc, masked(data), "data CRC");
        i += 16 + len;
        let mut step = 0;
        for (num, _, payload, v) in fields(data) {
            match num {
                2 => step = v as i64,
                3 => version = String::from_utf8(payload).unwrap(),
                5 => {
                    for (n, _, value, _) in fields(&payload) {
                        assert_eq!(n, 1, "Summary has only `value`");
                        let (mut tag, mut x) = (String::new(), None);
                        for (m, _, p, _) in fields(&value) {
                            match m {
                                1 => tag = String::from_utf8(p).unwrap(),
                                2 => x = Some(f32::from_le_bytes(p.try_into().unwrap())),
                                _ => {}
                            }
                        }
                        scalars.push((step, tag, x.expect("a simple_value")));
                    }
                }
                _ => {}
            }
        }
    }
    (version, scalars)
}
