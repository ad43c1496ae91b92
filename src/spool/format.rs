//! The spool segment format: a slot's change stream, as the link consumes it, in bytes.
//! Pure (no I/O): written by the spooler, read back by the link's replay.
//!
//! ```text
//! "WSSPOOL1"
//! record*   B final_lsn:u64 xid:u32 commit_time:i64          (Begin)
//!           D wal_start:u64 len:u32 pgoutput-bytes            (one pgoutput message)
//!           C lsn:u64 end_lsn:u64 commit_time:i64             (Commit)
//! trailer   E records:u32 fnv1a64(everything before the trailer):u64
//! ```
//! All integers big-endian. A segment opens with the last `Relation` message of every
//! relation the stream has described so far (outside any transaction), so replay can
//! start at any segment; it holds whole transactions only.
//!
//! Stored compressed: `"WSSPOOLZ" raw_len:u32 lz4-block(segment above)` (pgoutput's
//! text rows shrink several times). [`decode`] reads both forms.

use bytes::Bytes;
use pgwire_replication::ReplicationEvent;

use crate::lsn::Lsn;

const MAGIC: &[u8; 8] = b"WSSPOOL1";
const COMPRESSED: &[u8; 8] = b"WSSPOOLZ";
/// A compressed segment claiming more than this is damaged, not big.
const MAX_RAW_LEN: usize = 1 << 31;
const BEGIN: u8 = b'B';
const DATA: u8 = b'D';
const COMMIT: u8 = b'C';
const END: u8 = b'E';
const TRAILER_LEN: usize = 1 + 4 + 8;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a walsync spool segment (bad magic)")]
    Magic,
    #[error("the segment is truncated (no trailer): it was not written completely")]
    Truncated,
    #[error("the segment's checksum does not match: its bytes were damaged")]
    Checksum,
    #[error("the segment is malformed at byte {at}: {what}")]
    Malformed { at: usize, what: &'static str },
    #[error("the segment says it holds {said} records but holds {found}")]
    Count { said: u32, found: u32 },
    #[error("the segment cannot be decompressed: {0}")]
    Decompress(String),
}

/// FNV-1a, 64 bits: catches truncation and damaged bytes (not an adversary).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Builds one segment from the events of a slot's stream.
pub struct SegmentWriter {
    buf: Vec<u8>,
    records: u32,
    transactions: u32,
    in_txn: bool,
    first_commit: Option<Lsn>,
    last_end: Option<Lsn>,
}

impl SegmentWriter {
    /// A segment that opens with these `Relation` messages (pgoutput bytes).
    pub fn new<'a>(relations: impl IntoIterator<Item = &'a Bytes>) -> SegmentWriter {
        let mut w = SegmentWriter {
            buf: MAGIC.to_vec(),
            records: 0,
            transactions: 0,
            in_txn: false,
            first_commit: None,
            last_end: None,
        };
        for r in relations {
            w.data(Lsn::ZERO, r);
        }
        w
    }

    fn data(&mut self, wal_start: Lsn, data: &[u8]) {
        self.buf.push(DATA);
        self.buf.extend_from_slice(&wal_start.0.to_be_bytes());
        self.buf
            .extend_from_slice(&(data.len() as u32).to_be_bytes());
        self.buf.extend_from_slice(data);
        self.records += 1;
    }

    /// Adds an event; keepalives, logical messages and stop markers carry nothing the
    /// link applies and are left out.
    pub fn push(&mut self, event: &ReplicationEvent) {
        match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => {
                self.buf.push(BEGIN);
                self.buf.extend_from_slice(&final_lsn.0.to_be_bytes());
                self.buf.extend_from_slice(&xid.to_be_bytes());
                self.buf
                    .extend_from_slice(&commit_time_micros.to_be_bytes());
                self.records += 1;
                self.in_txn = true;
            }
            ReplicationEvent::XLogData {
                wal_start, data, ..
            } => self.data((*wal_start).into(), data),
            ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            } => {
                self.buf.push(COMMIT);
                self.buf.extend_from_slice(&lsn.0.to_be_bytes());
                self.buf.extend_from_slice(&end_lsn.0.to_be_bytes());
                self.buf
                    .extend_from_slice(&commit_time_micros.to_be_bytes());
                self.records += 1;
                self.in_txn = false;
                self.transactions += 1;
                self.first_commit.get_or_insert(Lsn(lsn.0));
                self.last_end = Some(Lsn(end_lsn.0));
            }
            ReplicationEvent::KeepAlive { .. }
            | ReplicationEvent::Message { .. }
            | ReplicationEvent::StoppedAt { .. } => {}
        }
    }

    /// Bytes so far.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.transactions == 0 && !self.in_txn
    }

    /// Whether a transaction is open (a segment ends only between transactions).
    pub fn in_transaction(&self) -> bool {
        self.in_txn
    }

    pub fn transactions(&self) -> u32 {
        self.transactions
    }

    /// Commit LSN of the first transaction and end LSN of the last, once one committed.
    pub fn range(&self) -> Option<(Lsn, Lsn)> {
        self.first_commit.zip(self.last_end)
    }

    /// The finished segment, compressed.
    pub fn finish(self) -> Vec<u8> {
        let raw = self.finish_raw();
        let mut out = COMPRESSED.to_vec();
        out.extend_from_slice(&(raw.len() as u32).to_be_bytes());
        out.extend_from_slice(&lz4_flex::block::compress(&raw));
        out
    }

    fn finish_raw(mut self) -> Vec<u8> {
        let sum = fnv1a64(&self.buf);
        self.buf.push(END);
        self.buf.extend_from_slice(&self.records.to_be_bytes());
        self.buf.extend_from_slice(&sum.to_be_bytes());
        self.buf
    }
}

/// Reads a segment back into the events it was written from (keepalives aside).
pub fn decode(segment: &[u8]) -> Result<Vec<ReplicationEvent>, FormatError> {
    if segment.len() >= COMPRESSED.len() + 4 && &segment[..COMPRESSED.len()] == COMPRESSED {
        let at = COMPRESSED.len();
        let raw_len = u32::from_be_bytes(segment[at..at + 4].try_into().unwrap()) as usize;
        if raw_len > MAX_RAW_LEN {
            return Err(FormatError::Decompress(format!("claims {raw_len} bytes")));
        }
        let raw = lz4_flex::block::decompress(&segment[at + 4..], raw_len)
            .map_err(|e| FormatError::Decompress(e.to_string()))?;
        return decode_raw(&raw);
    }
    decode_raw(segment)
}

fn decode_raw(segment: &[u8]) -> Result<Vec<ReplicationEvent>, FormatError> {
    if segment.len() < MAGIC.len() || &segment[..MAGIC.len()] != MAGIC {
        return Err(FormatError::Magic);
    }
    if segment.len() < MAGIC.len() + TRAILER_LEN {
        return Err(FormatError::Truncated);
    }
    let body_end = segment.len() - TRAILER_LEN;
    let trailer = &segment[body_end..];
    if trailer[0] != END {
        return Err(FormatError::Truncated);
    }
    let said = u32::from_be_bytes(trailer[1..5].try_into().unwrap());
    let sum = u64::from_be_bytes(trailer[5..13].try_into().unwrap());
    if fnv1a64(&segment[..body_end]) != sum {
        return Err(FormatError::Checksum);
    }
    let mut r = Reader {
        bytes: &segment[..body_end],
        at: MAGIC.len(),
    };
    let mut events = Vec::new();
    while r.at < r.bytes.len() {
        let kind = r.u8()?;
        let event = match kind {
            BEGIN => ReplicationEvent::Begin {
                final_lsn: pgwire_replication::Lsn(r.u64()?),
                xid: r.u32()?,
                commit_time_micros: r.u64()? as i64,
            },
            DATA => {
                let wal_start = pgwire_replication::Lsn(r.u64()?);
                let len = r.u32()? as usize;
                ReplicationEvent::XLogData {
                    wal_start,
                    wal_end: wal_start,
                    server_time_micros: 0,
                    data: Bytes::copy_from_slice(r.take(len)?),
                }
            }
            COMMIT => ReplicationEvent::Commit {
                lsn: pgwire_replication::Lsn(r.u64()?),
                end_lsn: pgwire_replication::Lsn(r.u64()?),
                commit_time_micros: r.u64()? as i64,
            },
            _ => {
                return Err(FormatError::Malformed {
                    at: r.at - 1,
                    what: "unknown record kind",
                })
            }
        };
        events.push(event);
    }
    if events.len() as u32 != said {
        return Err(FormatError::Count {
            said,
            found: events.len() as u32,
        });
    }
    Ok(events)
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or(FormatError::Malformed {
                at: self.at,
                what: "a record runs past the end",
            })?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, FormatError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64, FormatError> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
}

/// The last `Relation` message of each relation a stream described, to open segments with.
#[derive(Default)]
pub struct Relations {
    by_id: std::collections::BTreeMap<u32, Bytes>,
}

impl Relations {
    /// Remembers `data` if it is a pgoutput `Relation` message.
    pub fn observe(&mut self, data: &Bytes) {
        if data.len() >= 5 && data[0] == b'R' {
            let id = u32::from_be_bytes(data[1..5].try_into().unwrap());
            self.by_id.insert(id, data.clone());
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &Bytes> {
        self.by_id.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsn(n: u64) -> pgwire_replication::Lsn {
        pgwire_replication::Lsn(n)
    }

    fn txn(final_lsn: u64, rows: &[&[u8]]) -> Vec<ReplicationEvent> {
        let mut v = vec![ReplicationEvent::Begin {
            final_lsn: lsn(final_lsn),
            xid: 7,
            commit_time_micros: -5,
        }];
        for r in rows {
            v.push(ReplicationEvent::XLogData {
                wal_start: lsn(final_lsn - 1),
                wal_end: lsn(0),
                server_time_micros: 99,
                data: Bytes::copy_from_slice(r),
            });
        }
        v.push(ReplicationEvent::Commit {
            lsn: lsn(final_lsn),
            end_lsn: lsn(final_lsn + 8),
            commit_time_micros: 1_000_000,
        });
        v
    }

    fn same(a: &ReplicationEvent, b: &ReplicationEvent) -> bool {
        use ReplicationEvent::*;
        match (a, b) {
            (
                XLogData {
                    wal_start: s1,
                    data: d1,
                    ..
                },
                XLogData {
                    wal_start: s2,
                    data: d2,
                    ..
                },
            ) => s1 == s2 && d1 == d2,
            _ => format!("{a:?}") == format!("{b:?}"),
        }
    }

    #[test]
    fn a_segment_reads_back_as_the_events_it_was_written_from() {
        let relation = Bytes::from_static(b"R\0\0\0\x2apublic\0partner\0");
        let mut rels = Relations::default();
        rels.observe(&relation);
        rels.observe(&Bytes::from_static(b"I\0\0\0\x2aN")); // not a relation
        let mut w = SegmentWriter::new(rels.iter());
        let events: Vec<_> = txn(100, &[b"I\0\0\0\x2aN\0\x01t\0\0\0\x011", b""])
            .into_iter()
            .chain(txn(200, &[b"x"]))
            .collect();
        for (i, e) in events.iter().enumerate() {
            w.push(e);
            if i == 0 {
                assert!(w.in_transaction());
            }
        }
        w.push(&ReplicationEvent::KeepAlive {
            wal_end: lsn(300),
            reply_requested: false,
            server_time_micros: 0,
        });
        assert!(!w.in_transaction());
        assert_eq!(w.transactions(), 2);
        assert_eq!(w.range(), Some((Lsn(100), Lsn(208))));
        let bytes = w.finish();
        let back = decode(&bytes).unwrap();
        // The relation first, outside any transaction, then the events in order.
        assert!(matches!(&back[0], ReplicationEvent::XLogData { data, .. } if *data == relation));
        assert_eq!(back.len(), events.len() + 1);
        for (a, b) in back[1..].iter().zip(&events) {
            assert!(same(a, b), "{a:?} != {b:?}");
        }
    }

    #[test]
    fn damage_and_truncation_are_named() {
        let mut w = SegmentWriter::new([]);
        for e in txn(100, &[b"abc"]) {
            w.push(&e);
        }
        let bytes = w.finish_raw();
        assert_eq!(
            decode(&bytes[..bytes.len() - 1]).err(),
            Some(FormatError::Truncated)
        );
        assert_eq!(
            decode(b"nonsense-and-more-bytes").err(),
            Some(FormatError::Magic)
        );
        let mut flipped = bytes.clone();
        flipped[12] ^= 1;
        assert_eq!(decode(&flipped).err(), Some(FormatError::Checksum));
        // A trailer that lies about the count.
        let mut lying = bytes.clone();
        let at = lying.len() - 12;
        lying[at..at + 4].copy_from_slice(&9u32.to_be_bytes());
        assert_eq!(
            decode(&lying).err(),
            Some(FormatError::Count { said: 9, found: 3 })
        );
    }

    #[test]
    fn segments_are_stored_compressed_and_damage_there_is_named_too() {
        let mut w = SegmentWriter::new([]);
        let row = b"I\0\0\0\x2aN\0\x02t\0\0\0\x0bPOS/0001/17t\0\0\0\x0bwalk-in customer";
        for i in 0..500 {
            for e in txn(100 + i * 16, &[row, row]) {
                w.push(&e);
            }
        }
        let raw_len = w.len();
        let stored = w.finish();
        assert!(stored.len() * 4 < raw_len, "{} of {raw_len}", stored.len());
        assert_eq!(decode(&stored).unwrap().len(), 500 * 4);
        let mut damaged = stored.clone();
        let last = damaged.len() - 1;
        damaged[last] ^= 0x55;
        assert!(matches!(
            decode(&damaged).err(),
            Some(FormatError::Decompress(_) | FormatError::Checksum | FormatError::Truncated)
        ));
        let mut huge = stored.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode(&huge).err(),
            Some(FormatError::Decompress(_))
        ));
    }

    #[test]
    fn an_empty_segment_is_empty() {
        let w = SegmentWriter::new([]);
        assert!(w.is_empty());
        assert_eq!(w.range(), None);
        assert_eq!(decode(&w.finish()).unwrap().len(), 0);
    }
}
