//! `Lsn`: a position in a node's WAL, as PostgreSQL prints it (`16/B374D848`).
//!
//! Only moves forward: progress is recorded as the end LSN of the last source commit applied.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

#[derive(Debug, thiserror::Error)]
#[error("invalid lsn {0:?}: expected two hex numbers separated by '/', like 16/B374D848")]
pub struct ParseLsnError(String);

impl Lsn {
    pub const ZERO: Lsn = Lsn(0);
}

impl fmt::Display for Lsn {
    /// `{:X}/{:X}` of the two halves, written out by hand: the applier prints three LSNs
    /// per applied transaction, and the formatting machinery cost ~1,000 instructions each.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 17];
        let mut at = buf.len();
        for (i, half) in [self.0 & 0xFFFF_FFFF, self.0 >> 32].into_iter().enumerate() {
            if i == 1 {
                at -= 1;
                buf[at] = b'/';
            }
            let mut n = half;
            loop {
                at -= 1;
                buf[at] = b"0123456789ABCDEF"[(n & 0xF) as usize];
                n >>= 4;
                if n == 0 {
                    break;
                }
            }
        }
        f.write_str(std::str::from_utf8(&buf[at..]).expect("hex digits and '/'"))
    }
}

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParseLsnError(s.to_string());
        let (hi, lo) = s.split_once('/').ok_or_else(err)?;
        let hi = u32::from_str_radix(hi, 16).map_err(|_| err())?;
        let lo = u32::from_str_radix(lo, 16).map_err(|_| err())?;
        Ok(Lsn(((hi as u64) << 32) | lo as u64))
    }
}

impl From<pgwire_replication::Lsn> for Lsn {
    fn from(l: pgwire_replication::Lsn) -> Self {
        Lsn(l.as_u64())
    }
}

impl From<Lsn> for pgwire_replication::Lsn {
    fn from(l: Lsn) -> Self {
        pgwire_replication::Lsn::from_u64(l.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_and_parses_like_postgres() {
        let lsn: Lsn = "16/B374D848".parse().unwrap();
        assert_eq!(lsn.0, 0x16_B374_D848);
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!(Lsn::ZERO.to_string(), "0/0");
    }

    #[test]
    fn prints_as_the_two_halves_in_upper_case_hex() {
        let cases = [
            0u64,
            1,
            0xF,
            0x10,
            0xFFFF_FFFF,
            0x1_0000_0000,
            0x16_B374_D848,
            0xABCD_EF01_0000_0000,
            u64::MAX,
        ];
        for v in cases {
            let want = format!("{:X}/{:X}", v >> 32, v & 0xFFFF_FFFF);
            assert_eq!(Lsn(v).to_string(), want);
            assert_eq!(want.parse::<Lsn>().unwrap(), Lsn(v));
        }
    }

    #[test]
    fn refuses_text_that_is_not_an_lsn() {
        for bad in ["", "16", "16/", "/1", "G/1", "1/2/3", "123456789/0"] {
            assert!(bad.parse::<Lsn>().is_err(), "{bad:?} parsed");
        }
    }
}
