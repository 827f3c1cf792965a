//! CRC-16/IBM-3740 (also sold as CRC-16/CCITT-FALSE), the checksum that closes every frame body.
//!
//! Parameters: width 16, polynomial `0x1021`, initial value `0xFFFF`, input and output not
//! reflected, final XOR `0x0000`. The check value (CRC of the ASCII bytes `123456789`) is
//! `0x29B1`. The frame carries the CRC little-endian, low byte first.

/// Byte-at-a-time lookup table for polynomial 0x1021, built at compile time (512 bytes of flash).
const TABLE: [u16; 256] = build_table();

const fn build_table() -> [u16; 256] {
    let mut table = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut crc = (i as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
            bit += 1;
        }
        table[i] = crc;
        i += 1;
    }
    table
}

/// CRC-16/IBM-3740 of `data` (poly 0x1021, init 0xFFFF, no reflection, no final XOR).
///
/// ```
/// assert_eq!(edgelm_protocol::crc16(b"123456789"), 0x29B1);
/// assert_eq!(edgelm_protocol::crc16(b""), 0xFFFF);
/// ```
pub fn crc16(data: &[u8]) -> u16 {
    data.iter().fold(0xFFFF, |crc, &b| (crc << 8) ^ TABLE[usize::from((crc >> 8) as u8 ^ b)])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bit-by-bit reference, written straight from the parameters.
    fn crc16_bitwise(data: &[u8]) -> u16 {
        let mut crc: u16 = 0xFFFF;
        for &b in data {
            crc ^= u16::from(b) << 8;
            for _ in 0..8 {
                crc = if crc & 0x8000 != 0 { (crc << 1) ^ 0x1021 } else { crc << 1 };
            }
        }
        crc
    }

    #[test]
    fn check_value() {
        assert_eq!(crc16(b"123456789"), 0x29B1);
        assert_eq!(crc16_bitwise(b"123456789"), 0x29B1);
    }

    #[test]
    fn table_matches_bitwise() {
        let data: [u8; 300] = core::array::from_fn(|i| (i * 37 + 11) as u8);
        for n in 0..data.len() {
            assert_eq!(crc16(&data[..n]), crc16_bitwise(&data[..n]), "length {n}");
        }
    }
}
