//! The spool segment format: a slot's change stream, as the link consumes it, in bytes.
//! Pure (no I/O): written by the spooler, read back by the link's replay, both a chunk
//! at a time, so neither holds more than a chunk whatever the size of a transaction.
//!
//! ```text
//! segment   "WSSPOOL3" chunk*
//! chunk     raw_len:u32 stored_len:u32 fnv1a64(raw):u64 lz4-block(raw)
//! raw       the next bytes of the record stream:
//! record    B final_lsn:u64 xid:u32 commit_time:i64          (Begin)
//!           D wal_start:u64 len:u32 pgoutput-bytes            (one pgoutput message)
//!           C lsn:u64 end_lsn:u64 commit_time:i64             (Commit)
//!           E records:u32                                     (end: records before it)
//! ```
//! All integers big-endian; a record may span chunks. A segment opens with the last
//! `Relation` message of every relation the stream has described so far (outside any
//! transaction), so replay can start at any segment; it holds whole transactions only.
//! Each chunk is checked before any record in it is used, so damage stops replay before
//! the first record it touches.

use bytes::Bytes;
use pgwire_replication::ReplicationEvent;

use crate::lsn::Lsn;

const MAGIC: &[u8; 8] = b"WSSPOOL3";
const CHUNK_HEADER: usize = 4 + 4 + 8;
/// Raw bytes per chunk (the last one of a segment may be smaller).
pub const CHUNK_BYTES: usize = 1 << 20;
/// A chunk claiming more than this is damaged, not big.
const MAX_CHUNK: usize = 64 << 20;
const BEGIN: u8 = b'B';
const DATA: u8 = b'D';
const COMMIT: u8 = b'C';
const END: u8 = b'E';

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a walsync spool segment (bad magic)")]
    Magic,
    #[error("the segment is truncated: it was not written completely")]
    Truncated,
    #[error("chunk at byte {at}: its checksum does not match, its bytes were damaged")]
    Checksum { at: usize },
    #[error("chunk at byte {at} cannot be decompressed: {reason}")]
    Decompress { at: usize, reason: String },
    #[error("the record stream is malformed at record {record}: {what}")]
    Malformed { record: u32, what: &'static str },
    #[error("the segment says it holds {said} records but holds {found}")]
    Count { said: u32, found: u32 },
}

/// FNV-1a, 64 bits: catches truncation and damaged bytes (not an adversary).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Builds one segment from the events of a slot's stream; hands out finished chunks.
pub struct SegmentWriter {
    /// Raw record bytes not yet in a chunk (less than [`CHUNK_BYTES`] after `take_chunk`).
    buf: Vec<u8>,
    /// Whether the magic has been handed out (it leads the first output).
    started: bool,
    raw_len: u64,
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
            buf: Vec::new(),
            started: false,
            raw_len: 0,
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

    fn put(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        self.raw_len += bytes.len() as u64;
    }

    fn data(&mut self, wal_start: Lsn, data: &[u8]) {
        self.put(&[DATA]);
        self.put(&wal_start.0.to_be_bytes());
        self.put(&(data.len() as u32).to_be_bytes());
        self.put(data);
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
                self.put(&[BEGIN]);
                self.put(&final_lsn.0.to_be_bytes());
                self.put(&xid.to_be_bytes());
                self.put(&commit_time_micros.to_be_bytes());
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
                self.put(&[COMMIT]);
                self.put(&lsn.0.to_be_bytes());
                self.put(&end_lsn.0.to_be_bytes());
                self.put(&commit_time_micros.to_be_bytes());
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

    /// Raw bytes of the segment so far.
    pub fn len(&self) -> u64 {
        self.raw_len
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

    fn chunk(&mut self, raw: &[u8]) -> Vec<u8> {
        let stored = lz4_flex::block::compress(raw);
        let mut out = Vec::with_capacity(MAGIC.len() + CHUNK_HEADER + stored.len());
        if !std::mem::replace(&mut self.started, true) {
            out.extend_from_slice(MAGIC);
        }
        out.extend_from_slice(&(raw.len() as u32).to_be_bytes());
        out.extend_from_slice(&(stored.len() as u32).to_be_bytes());
        out.extend_from_slice(&fnv1a64(raw).to_be_bytes());
        out.extend_from_slice(&stored);
        out
    }

    /// The next full chunk, stored form, once [`CHUNK_BYTES`] have gathered.
    pub fn take_chunk(&mut self) -> Option<Vec<u8>> {
        if self.buf.len() < CHUNK_BYTES {
            return None;
        }
        let raw: Vec<u8> = self.buf.drain(..CHUNK_BYTES).collect();
        Some(self.chunk(&raw))
    }

    /// The rest of the segment, stored form: what follows the chunks already taken.
    pub fn finish(mut self) -> Vec<u8> {
        let records = self.records;
        self.put(&[END]);
        self.put(&records.to_be_bytes());
        let mut out = Vec::new();
        while let Some(c) = self.take_chunk() {
            out.extend(c);
        }
        let rest = std::mem::take(&mut self.buf);
        out.extend(self.chunk(&rest));
        out
    }
}

/// Reads a segment back, fed its stored bytes in pieces of any size.
#[derive(Default)]
pub struct SegmentReader {
    /// Stored bytes not yet making a whole chunk.
    stored: Vec<u8>,
    /// Offset in the segment of `stored[0]`, for messages.
    at: usize,
    magic_seen: bool,
    /// Checked raw bytes not yet making a whole record.
    raw: Vec<u8>,
    records: u32,
    ended: bool,
}

impl SegmentReader {
    /// Takes the next stored bytes; returns the events of every record they complete.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<ReplicationEvent>, FormatError> {
        self.stored.extend_from_slice(bytes);
        if !self.magic_seen {
            if self.stored.len() < MAGIC.len() {
                return Ok(Vec::new());
            }
            if &self.stored[..MAGIC.len()] != MAGIC {
                return Err(FormatError::Magic);
            }
            self.stored.drain(..MAGIC.len());
            self.at = MAGIC.len();
            self.magic_seen = true;
        }
        let mut events = Vec::new();
        while self.stored.len() >= CHUNK_HEADER {
            let raw_len = u32::from_be_bytes(self.stored[0..4].try_into().unwrap()) as usize;
            let stored_len = u32::from_be_bytes(self.stored[4..8].try_into().unwrap()) as usize;
            let sum = u64::from_be_bytes(self.stored[8..16].try_into().unwrap());
            if raw_len > MAX_CHUNK || stored_len > MAX_CHUNK {
                return Err(FormatError::Decompress {
                    at: self.at,
                    reason: format!("claims {raw_len} bytes ({stored_len} stored)"),
                });
            }
            if self.stored.len() < CHUNK_HEADER + stored_len {
                break;
            }
            let raw = lz4_flex::block::decompress(
                &self.stored[CHUNK_HEADER..CHUNK_HEADER + stored_len],
                raw_len,
            )
            .map_err(|e| FormatError::Decompress {
                at: self.at,
                reason: e.to_string(),
            })?;
            if fnv1a64(&raw) != sum {
                return Err(FormatError::Checksum { at: self.at });
            }
            self.stored.drain(..CHUNK_HEADER + stored_len);
            self.at += CHUNK_HEADER + stored_len;
            self.raw.extend_from_slice(&raw);
            self.records_from_raw(&mut events)?;
        }
        Ok(events)
    }

    /// Parses every whole record in `raw`, leaving a partial one for the next chunk.
    fn records_from_raw(&mut self, events: &mut Vec<ReplicationEvent>) -> Result<(), FormatError> {
        let mut r = Reader {
            bytes: &self.raw,
            at: 0,
        };
        loop {
            let start = r.at;
            if self.ended {
                if r.at < r.bytes.len() {
                    return Err(FormatError::Malformed {
                        record: self.records,
                        what: "bytes after the end record",
                    });
                }
                break;
            }
            let Some(kind) = r.u8() else { break };
            let event = match kind {
                BEGIN => r.u64().zip(r.u32()).zip(r.u64()).map(|((lsn, xid), time)| {
                    ReplicationEvent::Begin {
                        final_lsn: pgwire_replication::Lsn(lsn),
                        xid,
                        commit_time_micros: time as i64,
                    }
                }),
                DATA => r.u64().zip(r.u32()).and_then(|(start, len)| {
                    let data = r.take(len as usize)?;
                    Some(ReplicationEvent::XLogData {
                        wal_start: pgwire_replication::Lsn(start),
                        wal_end: pgwire_replication::Lsn(start),
                        server_time_micros: 0,
                        data: Bytes::copy_from_slice(data),
                    })
                }),
                COMMIT => r.u64().zip(r.u64()).zip(r.u64()).map(|((lsn, end), time)| {
                    ReplicationEvent::Commit {
                        lsn: pgwire_replication::Lsn(lsn),
                        end_lsn: pgwire_replication::Lsn(end),
                        commit_time_micros: time as i64,
                    }
                }),
                END => {
                    let Some(said) = r.u32() else {
                        r.at = start;
                        break;
                    };
                    if said != self.records {
                        return Err(FormatError::Count {
                            said,
                            found: self.records,
                        });
                    }
                    self.ended = true;
                    continue;
                }
                _ => {
                    return Err(FormatError::Malformed {
                        record: self.records,
                        what: "unknown record kind",
                    })
                }
            };
            match event {
                Some(e) => {
                    events.push(e);
                    self.records += 1;
                }
                None => {
                    // The record goes on in the next chunk.
                    r.at = start;
                    break;
                }
            }
        }
        let used = r.at;
        self.raw.drain(..used);
        Ok(())
    }

    /// After the last bytes: the segment must have ended where it said it would.
    pub fn finish(&self) -> Result<(), FormatError> {
        if !self.magic_seen {
            return Err(FormatError::Magic);
        }
        if !self.ended || !self.stored.is_empty() {
            return Err(FormatError::Truncated);
        }
        Ok(())
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.bytes.len())?;
        let s = &self.bytes[self.at..end];
        self.at = end;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
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

    /// Writes `events` the way the spooler does (chunks taken as they fill), returns the
    /// stored segment.
    fn write(relations: &Relations, events: &[ReplicationEvent]) -> Vec<u8> {
        let mut w = SegmentWriter::new(relations.iter());
        let mut out = Vec::new();
        for e in events {
            w.push(e);
            while let Some(c) = w.take_chunk() {
                out.extend(c);
            }
        }
        out.extend(w.finish());
        out
    }

    /// Reads a stored segment fed in pieces of `piece` bytes.
    fn read(stored: &[u8], piece: usize) -> Result<Vec<ReplicationEvent>, FormatError> {
        let mut r = SegmentReader::default();
        let mut events = Vec::new();
        for p in stored.chunks(piece) {
            events.extend(r.feed(p)?);
        }
        r.finish()?;
        Ok(events)
    }

    #[test]
    fn a_segment_reads_back_as_the_events_it_was_written_from() {
        let relation = Bytes::from_static(b"R\0\0\0\x2apublic\0partner\0");
        let mut rels = Relations::default();
        rels.observe(&relation);
        rels.observe(&Bytes::from_static(b"I\0\0\0\x2aN")); // not a relation
        let events: Vec<_> = txn(100, &[b"I\0\0\0\x2aN\0\x01t\0\0\0\x011", b""])
            .into_iter()
            .chain(txn(200, &[b"x"]))
            .collect();
        let mut w = SegmentWriter::new(rels.iter());
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
        let stored = w.finish();
        for piece in [1, 7, 4096] {
            let back = read(&stored, piece).unwrap();
            // The relation first, outside any transaction, then the events in order.
            assert!(
                matches!(&back[0], ReplicationEvent::XLogData { data, .. } if *data == relation)
            );
            assert_eq!(back.len(), events.len() + 1);
            for (a, b) in back[1..].iter().zip(&events) {
                assert!(same(a, b), "{a:?} != {b:?}");
            }
        }
    }

    #[test]
    fn a_transaction_larger_than_a_chunk_spans_chunks_and_reads_back() {
        // 3 MiB of rows in one transaction: chunks are taken while it is open.
        let row = vec![b'x'; 64 * 1024];
        let rows: Vec<&[u8]> = (0..48).map(|_| row.as_slice()).collect();
        let events = txn(1000, &rows);
        let mut w = SegmentWriter::new([]);
        let mut chunks = 0;
        for e in &events {
            w.push(e);
            while w.take_chunk().is_some() {
                chunks += 1;
                assert!(w.in_transaction(), "chunks are taken mid-transaction");
            }
        }
        assert_eq!(chunks, 3);
        let stored = write(&Relations::default(), &events);
        let back = read(&stored, 100_000).unwrap();
        assert_eq!(back.len(), events.len());
        assert!(back.iter().zip(&events).all(|(a, b)| same(a, b)));
    }

    #[test]
    fn segments_are_compressed() {
        let row = b"I\0\0\0\x2aN\0\x02t\0\0\0\x0bPOS/0001/17t\0\0\0\x0bwalk-in customer";
        let events: Vec<_> = (0..500)
            .flat_map(|i| txn(100 + i * 16, &[row, row]))
            .collect();
        let mut w = SegmentWriter::new([]);
        events.iter().for_each(|e| w.push(e));
        let raw = w.len();
        let stored = write(&Relations::default(), &events);
        assert!((stored.len() as u64) * 4 < raw, "{} of {raw}", stored.len());
        assert_eq!(read(&stored, 333).unwrap().len(), events.len());
    }

    #[test]
    fn damage_and_truncation_are_named_before_any_record_of_the_damaged_chunk() {
        let row = vec![b'y'; 300 * 1024];
        let events: Vec<_> = (0..8).flat_map(|i| txn(100 + i * 16, &[&row])).collect();
        let stored = write(&Relations::default(), &events);
        assert_eq!(
            read(&stored[..stored.len() - 1], 4096).err(),
            Some(FormatError::Truncated)
        );
        assert_eq!(
            read(b"nonsense-and-more-bytes", 5).err(),
            Some(FormatError::Magic)
        );
        // A byte flipped in the second chunk: the first chunk's records come out, none of
        // the second's.
        let second = MAGIC.len()
            + CHUNK_HEADER
            + u32::from_be_bytes(stored[12..16].try_into().unwrap()) as usize;
        let mut flipped = stored.clone();
        flipped[second + CHUNK_HEADER + 3] ^= 1;
        let mut r = SegmentReader::default();
        let first = r.feed(&flipped[..second]).unwrap();
        assert!(!first.is_empty());
        assert!(matches!(
            r.feed(&flipped[second..]).err(),
            Some(FormatError::Checksum { .. } | FormatError::Decompress { .. })
        ));
        // A chunk claiming an absurd size.
        let mut huge = stored.clone();
        huge[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            read(&huge, 4096).err(),
            Some(FormatError::Decompress { .. })
        ));
    }

    #[test]
    fn an_end_record_that_lies_about_the_count_is_named() {
        let mut w = SegmentWriter::new([]);
        for e in txn(100, &[b"abc"]) {
            w.push(&e);
        }
        w.records = 9;
        assert_eq!(
            read(&w.finish(), 64).err(),
            Some(FormatError::Count { said: 9, found: 3 })
        );
    }

    #[test]
    fn an_empty_segment_is_empty() {
        let w = SegmentWriter::new([]);
        assert!(w.is_empty());
        assert_eq!(w.range(), None);
        assert_eq!(read(&w.finish(), 3).unwrap().len(), 0);
    }
}
