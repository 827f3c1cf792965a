//! CRC-16/IBM-3740 (also sold as CRC-16/CCITT-FALSE), the checksum that closes every frame body.
//!
//! Parameters: width 16, polynomial `0x1021`, initial value `0xFFFF`, input and output not
//! reflected, final XOR `0x0000`. The check value (CRC of the ASCII bytes `123456789`) is
//! `0x29B1`. The frame carries the CRC little-endian, low byte first.

/// The `crc` crate's catalogue entry for these parameters, computed bit by bit (`NoTable`):
/// a lookup table would cost 512 bytes of the firmware's flash, and frames are short enough
/// that the speed never matters next to the line.
const CRC: crc::Crc<u16, crc::NoTable> = crc::Crc::<u16, crc::NoTable>::new(&crc::CRC_16_IBM_3740);

/// CRC-16/IBM-3740 of `data` (poly 0x1021, init 0xFFFF, no reflection, no final XOR).
///
/// ```
/// assert_eq!(edgelm_protocol::crc16(b"123456789"), 0x29B1);
/// assert_eq!(edgelm_protocol::crc16(b""), 0xFFFF);
/// ```
pub fn crc16(data: &[u8]) -> u16 {
    CRC.checksum(data)
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
    fn crate_matches_the_parameters_bit_by_bit() {
        let data: [u8; 300] = core::array::from_fn(|i| (i * 37 + 11) as u8);
        for n in 0..data.len() {
            assert_eq!(crc16(&data[..n]), crc16_bitwise(&data[..n]), "length {n}");
        }
    }
}
