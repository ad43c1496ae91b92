//! pgoutput decoder, protocol version 1: the payload of one XLogData message in, one
//! [`Message`] out.
//!
//! Guarantees:
//! - pure: no I/O, no state between calls (relation and type caches belong to the caller);
//! - never panics, whatever the bytes: every read is bounds-checked, and a count read from the
//!   wire never sizes an allocation beyond what the bytes left could hold;
//! - every failure is a [`DecodeError`] that names the field that was wrong;
//! - column values ([`Value::Text`], [`Value::Binary`]) and [`LogicalMessage::content`] are
//!   zero-copy slices of the input [`Bytes`];
//! - a message must be consumed exactly: trailing bytes are an error, not ignored.
//!
//! Format: PostgreSQL docs, "Logical Replication Message Formats"
//! (protocol-logicalrep-message-formats), and `src/backend/replication/logical/proto.c`.
//! Only protocol version 1 is understood. The streaming messages of version 2 ('S', 'E',
//! 'c', 'A') and the two-phase messages of version 3 ('b', 'P', 'K', 'r', 'p') are
//! [`DecodeError::UnknownTag`], and so is the optional xid that v2 puts in front of streamed
//! changes: walsync asks for `proto_version '1'` without `streaming`, so it never gets them.
//! Names and prefixes must be UTF-8; anything else is [`DecodeError::InvalidUtf8`].

use bytes::Bytes;

use crate::lsn::Lsn;

#[cfg(test)]
mod tests;

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin),
    Relation(Relation),
    Type(TypeInfo),
    Insert(Insert),
    Update(Update),
    Delete(Delete),
    Truncate(Truncate),
    LogicalMessage(LogicalMessage),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Begin {
    /// LSN of the commit record; equals the following [`Commit::commit_lsn`].
    pub final_lsn: Lsn,
    /// Microseconds since 2000-01-01 00:00 UTC (the PostgreSQL epoch).
    pub commit_time_us: i64,
    pub xid: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Commit {
    /// Unused by PostgreSQL (always 0); kept so nothing on the wire is silently dropped.
    pub flags: u8,
    pub commit_lsn: Lsn,
    /// End of the commit record: the position to confirm once this transaction is applied.
    pub end_lsn: Lsn,
    pub commit_time_us: i64,
}

/// Sent after Begin when the transaction was replayed under a replication origin.
#[derive(Debug, Clone, PartialEq)]
pub struct Origin {
    /// The LSN the origin session recorded (`pg_replication_origin_xact_setup`).
    pub commit_lsn: Lsn,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Relation {
    pub id: u32,
    /// Empty for `pg_catalog` (per the docs).
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    /// Generated columns are not sent, so these match the tuples, not `pg_attribute`.
    pub columns: Vec<Column>,
}

/// `pg_class.relreplident`: what the old tuple of an Update/Delete carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    Default,
    Nothing,
    Full,
    Index,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub is_key: bool,
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
}

/// Sent before a Relation that uses a non-built-in type (enum, composite, domain...).
#[derive(Debug, Clone, PartialEq)]
pub struct TypeInfo {
    pub id: u32,
    pub namespace: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Insert {
    pub relation_id: u32,
    pub new: Tuple,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Update {
    pub relation_id: u32,
    /// `None` when the replica identity did not change (REPLICA IDENTITY DEFAULT/INDEX).
    pub old: Option<OldTuple>,
    pub new: Tuple,
}

/// The old row of an Update/Delete.
#[derive(Debug, Clone, PartialEq)]
pub enum OldTuple {
    /// 'K': the replica identity key. PostgreSQL still sends every column; the non-key
    /// ones are [`Value::Null`].
    Key(Tuple),
    /// 'O': the whole old row (REPLICA IDENTITY FULL).
    Full(Tuple),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Delete {
    pub relation_id: u32,
    pub old: OldTuple,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Truncate {
    pub cascade: bool,
    pub restart_identity: bool,
    pub relation_ids: Vec<u32>,
}

/// `pg_logical_emit_message`. Non-transactional ones arrive outside any Begin/Commit.
#[derive(Debug, Clone, PartialEq)]
pub struct LogicalMessage {
    pub transactional: bool,
    pub lsn: Lsn,
    pub prefix: String,
    pub content: Bytes,
}

/// Column values in relation column order.
#[derive(Debug, Clone, PartialEq)]
pub struct Tuple(pub Vec<Value>);

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    Null,
    /// A TOASTed value the change did not touch: the subscriber keeps what it has.
    UnchangedToast,
    /// Text output of the type (`typoutput`), in the server encoding.
    Text(Bytes),
    /// Binary output of the type (`typsend`), only with the `binary` option.
    Binary(Bytes),
}

impl Value {
    /// Bytes the value holds (0 for NULL and unchanged TOAST).
    pub fn as_bytes_len(&self) -> usize {
        match self {
            Value::Text(b) | Value::Binary(b) => b.len(),
            Value::Null | Value::UnchangedToast => 0,
        }
    }

    /// The value as `&str` when it is [`Value::Text`] and valid UTF-8.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum DecodeError {
    #[error("empty message")]
    Empty,
    #[error("unknown message tag {}", show(*.0))]
    UnknownTag(u8),
    #[error("truncated {what}: needs {needed} bytes, {left} left")]
    Truncated {
        what: &'static str,
        needed: usize,
        left: usize,
    },
    #[error("{what} has no nul terminator")]
    MissingNul { what: &'static str },
    #[error("{what} is not valid utf-8")]
    InvalidUtf8 { what: &'static str },
    #[error("negative {what}: {value}")]
    Negative { what: &'static str, value: i32 },
    #[error("unknown replica identity {}", show(*.0))]
    UnknownReplicaIdentity(u8),
    #[error("unknown tuple value kind {}", show(*.0))]
    UnknownTupleKind(u8),
    #[error("{what}: expected tuple marker {expected}, found {}", show(*found))]
    UnexpectedTupleMarker {
        what: &'static str,
        expected: &'static str,
        found: u8,
    },
    #[error("{left} trailing bytes after {} message", show(*tag))]
    TrailingBytes { tag: u8, left: usize },
}

/// A protocol byte as it reads in the docs: `'B'` when printable, `0x00` otherwise.
fn show(b: u8) -> String {
    if b.is_ascii_graphic() {
        format!("'{}'", b as char)
    } else {
        format!("{b:#04x}")
    }
}

/// The relation an Insert, Update or Delete message changes, read from its header only
/// (the tuple is not decoded); `None` for any other message.
pub fn changed_relation(buf: &[u8]) -> Option<u32> {
    match buf {
        [b'I' | b'U' | b'D', a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
        _ => None,
    }
}

/// Decode one pgoutput v1 message (the XLogData payload, starting at the tag byte).
pub fn decode(buf: &Bytes) -> Result<Message, DecodeError> {
    let Some(&tag) = buf.first() else {
        return Err(DecodeError::Empty);
    };
    let mut r = Reader { buf, pos: 1 };
    // Struct expressions evaluate their fields in source order, which is wire order here.
    let msg = match tag {
        b'B' => Message::Begin(Begin {
            final_lsn: r.lsn("begin final lsn")?,
            commit_time_us: r.i64("begin commit time")?,
            xid: r.u32("begin xid")?,
        }),
        b'C' => Message::Commit(Commit {
            flags: r.u8("commit flags")?,
            commit_lsn: r.lsn("commit lsn")?,
            end_lsn: r.lsn("commit end lsn")?,
            commit_time_us: r.i64("commit time")?,
        }),
        b'O' => Message::Origin(Origin {
            commit_lsn: r.lsn("origin commit lsn")?,
            name: r.string("origin name")?,
        }),
        b'R' => Message::Relation(r.relation()?),
        b'Y' => Message::Type(TypeInfo {
            id: r.u32("type oid")?,
            namespace: r.string("type namespace")?,
            name: r.string("type name")?,
        }),
        b'I' => {
            let relation_id = r.u32("insert relation id")?;
            r.marker("insert new tuple", "'N'", |m| m == b'N')?;
            Message::Insert(Insert {
                relation_id,
                new: r.tuple()?,
            })
        }
        b'U' => {
            let relation_id = r.u32("update relation id")?;
            // The old tuple is optional: 'K' or 'O' then a tuple, then 'N' and the new tuple.
            let m = r.marker("update tuple", "'K', 'O' or 'N'", |m| b"KON".contains(&m))?;
            let old = match m {
                b'N' => None,
                _ => {
                    let old = r.old_tuple(m)?;
                    r.marker("update new tuple", "'N'", |m| m == b'N')?;
                    Some(old)
                }
            };
            Message::Update(Update {
                relation_id,
                old,
                new: r.tuple()?,
            })
        }
        b'D' => {
            let relation_id = r.u32("delete relation id")?;
            let m = r.marker("delete old tuple", "'K' or 'O'", |m| b"KO".contains(&m))?;
            Message::Delete(Delete {
                relation_id,
                old: r.old_tuple(m)?,
            })
        }
        b'T' => {
            let n = r.len("truncate relation count")?;
            // proto.c: TRUNCATE_CASCADE = 1, TRUNCATE_RESTART_SEQS = 2; other bits unused.
            let options = r.u8("truncate options")?;
            let mut relation_ids = Vec::with_capacity(n.min(r.left() / 4));
            for _ in 0..n {
                relation_ids.push(r.u32("truncate relation id")?);
            }
            Message::Truncate(Truncate {
                cascade: options & 1 != 0,
                restart_identity: options & 2 != 0,
                relation_ids,
            })
        }
        b'M' => Message::LogicalMessage(LogicalMessage {
            // Docs: flags are 0, or 1 if the message is transactional.
            transactional: r.u8("message flags")? & 1 != 0,
            lsn: r.lsn("message lsn")?,
            prefix: r.string("message prefix")?,
            content: r.sized("message content")?,
        }),
        other => return Err(DecodeError::UnknownTag(other)),
    };
    match r.left() {
        0 => Ok(msg),
        left => Err(DecodeError::TrailingBytes { tag, left }),
    }
}

/// A cursor over the message. Invariant: `pos <= buf.len()`.
struct Reader<'a> {
    buf: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn left(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    fn rest(&self) -> &[u8] {
        self.buf.get(self.pos..).unwrap_or_default()
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let Some(bytes) = self
            .rest()
            .get(..N)
            .and_then(|s| <[u8; N]>::try_from(s).ok())
        else {
            return Err(DecodeError::Truncated {
                what,
                needed: N,
                left: self.left(),
            });
        };
        self.pos += N;
        Ok(bytes)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let [b] = self.array(what)?;
        Ok(b)
    }

    // The protocol's Int16 column counts are unsigned on both sides of proto.c.
    fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_be_bytes(self.array(what)?))
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(i64::from_be_bytes(self.array(what)?))
    }

    fn lsn(&mut self, what: &'static str) -> Result<Lsn, DecodeError> {
        Ok(Lsn(u64::from_be_bytes(self.array(what)?)))
    }

    /// An Int32 length or count, which PostgreSQL writes from a signed int.
    fn len(&mut self, what: &'static str) -> Result<usize, DecodeError> {
        let value = self.i32(what)?;
        usize::try_from(value).map_err(|_| DecodeError::Negative { what, value })
    }

    /// Int32 length, then that many bytes, as a zero-copy slice of the input.
    fn sized(&mut self, what: &'static str) -> Result<Bytes, DecodeError> {
        let n = self.len(what)?;
        let left = self.left();
        if n > left {
            return Err(DecodeError::Truncated {
                what,
                needed: n,
                left,
            });
        }
        let start = self.pos;
        self.pos += n;
        Ok(self.buf.slice(start..self.pos))
    }

    /// A nul-terminated string.
    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = self.rest();
        let nul = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(DecodeError::MissingNul { what })?;
        let s = std::str::from_utf8(rest.get(..nul).unwrap_or_default())
            .map_err(|_| DecodeError::InvalidUtf8 { what })?
            .to_owned();
        self.pos += nul + 1;
        Ok(s)
    }

    fn marker(
        &mut self,
        what: &'static str,
        expected: &'static str,
        ok: impl Fn(u8) -> bool,
    ) -> Result<u8, DecodeError> {
        match self.u8(what)? {
            m if ok(m) => Ok(m),
            found => Err(DecodeError::UnexpectedTupleMarker {
                what,
                expected,
                found,
            }),
        }
    }

    /// The tuple after an old-tuple marker already checked to be 'K' or 'O'.
    fn old_tuple(&mut self, marker: u8) -> Result<OldTuple, DecodeError> {
        let tuple = self.tuple()?;
        Ok(if marker == b'K' {
            OldTuple::Key(tuple)
        } else {
            OldTuple::Full(tuple)
        })
    }

    /// TupleData: Int16 column count, then per column a kind byte and maybe a sized value.
    fn tuple(&mut self) -> Result<Tuple, DecodeError> {
        let n = usize::from(self.u16("tuple column count")?);
        // Every value takes at least its kind byte, so the bytes left bound the count.
        let mut values = Vec::with_capacity(n.min(self.left()));
        for _ in 0..n {
            values.push(match self.u8("tuple value kind")? {
                b'n' => Value::Null,
                b'u' => Value::UnchangedToast,
                b't' => Value::Text(self.sized("text value")?),
                b'b' => Value::Binary(self.sized("binary value")?),
                kind => return Err(DecodeError::UnknownTupleKind(kind)),
            });
        }
        Ok(Tuple(values))
    }

    fn relation(&mut self) -> Result<Relation, DecodeError> {
        let id = self.u32("relation id")?;
        let namespace = self.string("relation namespace")?;
        let name = self.string("relation name")?;
        let replica_identity = match self.u8("replica identity")? {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            other => return Err(DecodeError::UnknownReplicaIdentity(other)),
        };
        let n = usize::from(self.u16("relation column count")?);
        // A column is at least 10 bytes: flags, an empty name's nul, type oid, typmod.
        let mut columns = Vec::with_capacity(n.min(self.left() / 10));
        for _ in 0..n {
            columns.push(Column {
                // Docs: flags are 0, or 1 for a column that is part of the key.
                is_key: self.u8("column flags")? & 1 != 0,
                name: self.string("column name")?,
                type_oid: self.u32("column type oid")?,
                type_modifier: self.i32("column type modifier")?,
            });
        }
        Ok(Relation {
            id,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }
}
