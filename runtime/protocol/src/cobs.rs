//! Consistent Overhead Byte Stuffing: removes every `0x00` from a frame so that `0x00` can
//! delimit frames on the line.
//!
//! The encoded form is a chain of blocks. Each block starts with a code byte `c` (1..=255)
//! followed by `c - 1` non-zero data bytes. A code below `0xFF` means "a zero byte follows
//! these data bytes", except for the last block, whose zero is implied by the end of the frame
//! and dropped. Code `0xFF` carries 254 data bytes and no zero, so long zero-free runs are split.
//!
//! Cost: one byte for the first block plus one per 254 zero-free bytes, so `n` bytes encode
//! into at most `n + n / 254 + 1` bytes ([`cobs_max_encoded_len`]).
//!
//! The encoder here always closes the data with a block whose code is below `0xFF` (a zero-free
//! input of exactly 254 bytes encodes as `FF <254 bytes> 01`). The decoder also accepts a
//! chain that ends right after an `0xFF` block, as some other encoders write it.
//!
//! Why not the `cobs` crate that postcard uses: its encoder (0.3) writes an empty input as no
//! bytes and ends a trailing run of 254 non-zero bytes without the closing `01` block, so
//! frames that end in such a run would change their bytes on the wire; its in-place decoder
//! takes a zero as the end of the chain instead of refusing it. Both were tried against this
//! module's tests.

/// Largest encoded size of `n` input bytes (without the frame delimiter).
pub const fn cobs_max_encoded_len(n: usize) -> usize {
    n + n / 254 + 1
}

/// Exact encoded size of `src` (without the frame delimiter), the length [`cobs_encode`] writes.
pub fn cobs_encoded_len(src: &[u8]) -> usize {
    // One code byte to start, one output byte per input byte (a zero becomes the next block's
    // code byte), and one more code byte after every run of 254 non-zero bytes.
    let mut len = 1 + src.len();
    let mut run = 0;
    for &b in src {
        if b == 0 {
            run = 0;
        } else {
            run += 1;
            if run == 254 {
                len += 1;
                run = 0;
            }
        }
    }
    len
}

/// COBS-encodes `src` into `dst` and returns the number of bytes written, or `None` when `dst`
/// is too short ([`cobs_encoded_len`] tells the exact size). The output never contains `0x00`
/// and does not include the frame delimiter.
///
/// ```
/// use edgelm_protocol::cobs_encode;
/// let mut out = [0u8; 8];
/// let n = cobs_encode(&[0x11, 0x00, 0x22, 0x33], &mut out).unwrap();
/// assert_eq!(&out[..n], &[0x02, 0x11, 0x03, 0x22, 0x33]);
/// ```
pub fn cobs_encode(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    let mut code_at = 0; // where the code byte of the open block goes
    let mut out = 1; // next data position
    let mut code: u8 = 1;
    for &b in src {
        if b == 0 {
            *dst.get_mut(code_at)? = code;
            code_at = out;
            out += 1;
            code = 1;
        } else {
            *dst.get_mut(out)? = b;
            out += 1;
            code += 1;
            if code == 0xFF {
                *dst.get_mut(code_at)? = code;
                code_at = out;
                out += 1;
                code = 1;
            }
        }
    }
    *dst.get_mut(code_at)? = code;
    Some(out)
}

/// Decodes a COBS block chain in place (without the `0x00` delimiter) and returns the decoded
/// length; the decoded bytes are `buf[..len]`.
///
/// Returns `None` when the input is not a valid chain: it contains a `0x00`, or a code byte
/// announces more data bytes than are left. On `None` the contents of `buf` are unspecified.
///
/// ```
/// use edgelm_protocol::cobs_decode_in_place;
/// let mut buf = [0x02, 0x11, 0x03, 0x22, 0x33];
/// let n = cobs_decode_in_place(&mut buf).unwrap();
/// assert_eq!(&buf[..n], &[0x11, 0x00, 0x22, 0x33]);
/// ```
pub fn cobs_decode_in_place(buf: &mut [u8]) -> Option<usize> {
    let len = buf.len();
    let mut read = 0;
    let mut write = 0;
    while read < len {
        let code = buf[read];
        if code == 0 {
            return None;
        }
        read += 1;
        let n = usize::from(code) - 1;
        let end = read.checked_add(n).filter(|&e| e <= len)?;
        if buf[read..end].contains(&0) {
            return None;
        }
        // `write < read` always holds here (each block consumed a code byte that was not
        // copied), so the copy moves data towards the front and never overwrites unread input.
        buf.copy_within(read..end, write);
        read = end;
        write += n;
        if code != 0xFF && read < len {
            buf[write] = 0;
            write += 1;
        }
    }
    Some(write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(data: &[u8]) {
        let mut enc = [0u8; 1200];
        let n = cobs_encode(data, &mut enc).unwrap();
        assert_eq!(n, cobs_encoded_len(data), "encoded length for {} bytes", data.len());
        assert!(n <= cobs_max_encoded_len(data.len()));
        assert!(!enc[..n].contains(&0));
        let m = cobs_decode_in_place(&mut enc[..n]).unwrap();
        assert_eq!(&enc[..m], data);
    }

    #[test]
    fn known_encodings() {
        // Examples from the COBS paper's conventions: zeros become code bytes.
        let cases: &[(&[u8], &[u8])] = &[
            (&[], &[0x01]),
            (&[0x00], &[0x01, 0x01]),
            (&[0x00, 0x00], &[0x01, 0x01, 0x01]),
            (&[0x11, 0x22, 0x00, 0x33], &[0x03, 0x11, 0x22, 0x02, 0x33]),
            (&[0x11, 0x22, 0x33, 0x44], &[0x05, 0x11, 0x22, 0x33, 0x44]),
            (&[0x11, 0x00, 0x00, 0x00], &[0x02, 0x11, 0x01, 0x01, 0x01]),
        ];
        for (data, want) in cases {
            let mut out = [0u8; 16];
            let n = cobs_encode(data, &mut out).unwrap();
            assert_eq!(&out[..n], *want, "encode {data:02x?}");
            let mut buf = want.to_vec();
            let m = cobs_decode_in_place(&mut buf).unwrap();
            assert_eq!(&buf[..m], *data, "decode {want:02x?}");
        }
    }

    #[test]
    fn long_runs() {
        for n in [253usize, 254, 255, 508, 509, 600] {
            let data: Vec<u8> = (0..n).map(|i| (i % 255 + 1) as u8).collect();
            round_trip(&data);
            let mut with_zeros = data.clone();
            with_zeros[n / 2] = 0;
            round_trip(&with_zeros);
        }
        let exact: Vec<u8> = vec![7; 254];
        let mut out = [0u8; 300];
        let n = cobs_encode(&exact, &mut out).unwrap();
        assert_eq!((out[0], out[255], n), (0xFF, 0x01, 256));
        // The shorter form without the closing 0x01 block decodes to the same bytes.
        let m = cobs_decode_in_place(&mut out[..255]).unwrap();
        assert_eq!(&out[..m], &exact[..]);
    }

    #[test]
    fn rejects_bad_chains() {
        assert_eq!(cobs_decode_in_place(&mut [0x03, 0x11]), None); // block runs past the end
        assert_eq!(cobs_decode_in_place(&mut [0x02, 0x00]), None); // zero inside
        assert_eq!(cobs_decode_in_place(&mut [0x00]), None); // zero code
    }

    #[test]
    fn short_output_is_none() {
        let mut out = [0u8; 3];
        assert_eq!(cobs_encode(&[1, 2, 3], &mut out), None);
        assert_eq!(cobs_encode(&[1, 2], &mut out), Some(3));
    }
}
