//! Decoder tests on bytes captured from a real PostgreSQL 15 (`testdata/pg15.hex`, which
//! also records the SQL that produced each message), on hand-made malformed input, and a
//! seeded mutation fuzz loop.

use super::*;

const PG15: &str = include_str!("testdata/pg15.hex");

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len().is_multiple_of(2), "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

/// Every `name hex` line of the capture file.
fn captured() -> Vec<(&'static str, Bytes)> {
    PG15.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (name, hex) = l.split_once(' ').expect("`name hex` line");
            (name, Bytes::from(unhex(hex.trim())))
        })
        .collect()
}

fn bytes_of(name: &str) -> Bytes {
    let found = captured().into_iter().find(|(n, _)| *n == name);
    found
        .unwrap_or_else(|| panic!("no captured message {name}"))
        .1
}

fn dec(name: &str) -> Message {
    decode(&bytes_of(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn t(s: &str) -> Value {
    Value::Text(Bytes::copy_from_slice(s.as_bytes()))
}

fn tuple(values: Vec<Value>) -> Tuple {
    Tuple(values)
}

fn col(is_key: bool, name: &str, type_oid: u32) -> Column {
    Column {
        is_key,
        name: name.into(),
        type_oid,
        type_modifier: -1,
    }
}

const INT4: u32 = 23;
const TEXT: u32 = 25;
const ITEMS: u32 = 16394;
const LOGS: u32 = 16401;

// ---- real captured bytes ----

#[test]
fn every_captured_message_decodes() {
    let all = captured();
    assert_eq!(all.len(), 33);
    for (name, buf) in &all {
        if let Err(e) = decode(buf) {
            panic!("{name}: {e}");
        }
    }
}

#[test]
fn begin_and_commit() {
    let Message::Begin(b) = dec("begin") else {
        panic!()
    };
    assert_eq!(b.final_lsn, Lsn(0x0154_3CC8));
    assert_eq!(b.final_lsn.to_string(), "0/1543CC8");
    assert_eq!(b.commit_time_us, 0x0003_041c_d4f6_f50c);
    assert_eq!(b.xid, 733);
    let Message::Commit(c) = dec("commit") else {
        panic!()
    };
    assert_eq!(
        c,
        Commit {
            flags: 0,
            commit_lsn: b.final_lsn,
            end_lsn: Lsn(0x0154_3CF8),
            commit_time_us: b.commit_time_us,
        }
    );
}

#[test]
fn relation_with_primary_key() {
    let Message::Relation(r) = dec("relation_items") else {
        panic!()
    };
    assert_eq!(
        r,
        Relation {
            id: ITEMS,
            namespace: "public".into(),
            name: "items".into(),
            replica_identity: ReplicaIdentity::Default,
            columns: vec![
                col(true, "id", INT4),
                col(false, "name", TEXT),
                col(false, "qty", INT4),
                col(false, "note", TEXT),
            ],
        }
    );
}

#[test]
fn relation_replica_identities() {
    // FULL flags every column as part of the key.
    let Message::Relation(r) = dec("relation_logs") else {
        panic!()
    };
    assert_eq!((r.id, r.replica_identity), (LOGS, ReplicaIdentity::Full));
    assert_eq!(
        r.columns,
        vec![col(true, "id", INT4), col(true, "msg", TEXT)]
    );

    let Message::Relation(r) = dec("relation_tags") else {
        panic!()
    };
    assert_eq!(
        (r.name.as_str(), r.replica_identity),
        ("tags", ReplicaIdentity::Index)
    );
    assert_eq!(
        r.columns,
        vec![col(true, "id", INT4), col(false, "label", TEXT)]
    );

    let Message::Relation(r) = dec("relation_audit") else {
        panic!()
    };
    assert_eq!(
        (r.name.as_str(), r.replica_identity),
        ("audit", ReplicaIdentity::Nothing)
    );
    assert_eq!(r.columns, vec![col(false, "line", TEXT)]);
}

#[test]
fn insert_with_nulls() {
    let expected = Insert {
        relation_id: ITEMS,
        new: tuple(vec![t("1"), t("apple"), Value::Null, Value::Null]),
    };
    assert_eq!(dec("insert_items"), Message::Insert(expected));
}

#[test]
fn update_without_key_change_has_no_old_tuple() {
    let Message::Update(u) = dec("update_items_qty") else {
        panic!()
    };
    assert_eq!(u.relation_id, ITEMS);
    assert_eq!(u.old, None);
    assert_eq!(u.new, tuple(vec![t("1"), t("apple"), t("5"), Value::Null]));
}

#[test]
fn update_of_primary_key_sends_old_key() {
    let Message::Update(u) = dec("update_items_pk") else {
        panic!()
    };
    // Key tuples still carry every column; the non-key ones are null.
    let key = tuple(vec![t("1"), Value::Null, Value::Null, Value::Null]);
    assert_eq!(u.old, Some(OldTuple::Key(key)));
    assert_eq!(u.new, tuple(vec![t("2"), t("apple"), t("5"), Value::Null]));

    let Message::Delete(d) = dec("delete_items") else {
        panic!()
    };
    assert_eq!(d.relation_id, ITEMS);
    assert_eq!(
        d.old,
        OldTuple::Key(tuple(vec![t("2"), Value::Null, Value::Null, Value::Null]))
    );
}

#[test]
fn replica_identity_full_sends_old_row() {
    let Message::Insert(i) = dec("insert_logs") else {
        panic!()
    };
    assert_eq!(
        (i.relation_id, i.new),
        (LOGS, tuple(vec![t("1"), t("first")]))
    );
    let Message::Update(u) = dec("update_logs_full") else {
        panic!()
    };
    assert_eq!(u.old, Some(OldTuple::Full(tuple(vec![t("1"), t("first")]))));
    assert_eq!(u.new, tuple(vec![t("1"), t("second")]));
    let Message::Delete(d) = dec("delete_logs_full") else {
        panic!()
    };
    assert_eq!(
        (d.relation_id, d.old),
        (LOGS, OldTuple::Full(tuple(vec![t("1"), t("second")])))
    );
}

#[test]
fn unchanged_toast_value() {
    let Message::Update(u) = dec("update_items_toast") else {
        panic!()
    };
    assert_eq!(u.old, None);
    assert_eq!(
        u.new,
        tuple(vec![t("3"), t("big"), t("1"), Value::UnchangedToast])
    );
    assert_eq!(u.new.0[3].as_text(), None);
}

#[test]
fn truncate_flags_and_relations() {
    let expected = Truncate {
        cascade: true,
        restart_identity: true,
        relation_ids: vec![16414, 16420],
    };
    assert_eq!(dec("truncate_cascade"), Message::Truncate(expected));
    let expected = Truncate {
        cascade: false,
        restart_identity: false,
        relation_ids: vec![LOGS],
    };
    assert_eq!(dec("truncate_logs"), Message::Truncate(expected));
}

#[test]
fn logical_messages() {
    let Message::LogicalMessage(m) = dec("message_transactional") else {
        panic!()
    };
    assert!(m.transactional);
    assert_eq!(
        (m.lsn, m.prefix.as_str(), &m.content[..]),
        (Lsn(0x0154_9458), "walsync", &b"hello"[..])
    );
    let Message::LogicalMessage(m) = dec("message_nontransactional") else {
        panic!()
    };
    assert!(!m.transactional);
    assert_eq!(
        (m.lsn, m.prefix.as_str(), &m.content[..]),
        (Lsn(0x0154_94C8), "walsync", &b"bye"[..])
    );
}

#[test]
fn type_messages_for_enum_and_composite() {
    let ty = |id, name: &str| TypeInfo {
        id,
        namespace: "public".into(),
        name: name.into(),
    };
    assert_eq!(dec("type_mood"), Message::Type(ty(16385, "mood")));
    assert_eq!(dec("type_point2"), Message::Type(ty(16393, "point2")));
    let Message::Relation(r) = dec("relation_people") else {
        panic!()
    };
    let oids: Vec<u32> = r.columns.iter().map(|c| c.type_oid).collect();
    assert_eq!(oids, vec![INT4, 16385, 16393]);
    let Message::Insert(i) = dec("insert_people") else {
        panic!()
    };
    assert_eq!(i.new, tuple(vec![t("1"), t("happy"), t("(3,4)")]));
}

#[test]
fn transaction_under_replication_origin() {
    let Message::Begin(b) = dec("begin_branch1") else {
        panic!()
    };
    let Message::Origin(o) = dec("origin_branch1") else {
        panic!()
    };
    assert_eq!(
        o,
        Origin {
            commit_lsn: Lsn(0x1234),
            name: "walsync_branch1".into()
        }
    );
    assert_eq!(o.commit_lsn.to_string(), "0/1234");
    let Message::Insert(i) = dec("insert_items_branch1") else {
        panic!()
    };
    assert_eq!(
        i.new,
        tuple(vec![t("4"), t("from branch1"), t("7"), Value::Null])
    );
    let Message::Commit(c) = dec("commit_branch1") else {
        panic!()
    };
    assert_eq!(c.commit_lsn, b.final_lsn);
}

#[test]
fn captured_binary_values() {
    let bin = |b: &[u8]| Value::Binary(Bytes::copy_from_slice(b));
    let Message::Insert(i) = dec("insert_items_binary") else {
        panic!()
    };
    assert_eq!(
        i.new,
        tuple(vec![
            bin(&[0, 0, 0, 1]),
            bin(b"apple"),
            Value::Null,
            Value::Null
        ])
    );
    assert_eq!(i.new.0[1].as_text(), None, "binary is never text");

    let Message::Update(u) = dec("update_items_pk_binary") else {
        panic!()
    };
    let key = tuple(vec![
        bin(&[0, 0, 0, 1]),
        Value::Null,
        Value::Null,
        Value::Null,
    ]);
    assert_eq!(u.old, Some(OldTuple::Key(key)));

    // A composite's typsend: field count, then (type oid, length, bytes) per field.
    let Message::Insert(i) = dec("insert_people_binary") else {
        panic!()
    };
    let record = unhex("00000002000000170000000400000003000000170000000400000004");
    assert_eq!(i.new.0[2], bin(&record));
}

#[test]
fn handmade_binary_value() {
    // 'I', relation 7, 'N', 2 columns: binary [ff 00], text "é".
    let buf = Bytes::from_static(b"I\0\0\0\x07N\0\x02b\0\0\0\x02\xff\0t\0\0\0\x02\xc3\xa9");
    let Message::Insert(i) = decode(&buf).unwrap() else {
        panic!()
    };
    assert_eq!(i.relation_id, 7);
    assert_eq!(i.new.0[0], Value::Binary(Bytes::from_static(b"\xff\0")));
    assert_eq!(i.new.0[1].as_text(), Some("é"));
}

#[test]
fn values_are_slices_of_the_input() {
    let buf = bytes_of("insert_logs");
    let range = buf.as_ptr_range();
    let Message::Insert(i) = decode(&buf).unwrap() else {
        panic!()
    };
    for v in &i.new.0 {
        let Value::Text(b) = v else { panic!() };
        assert!(
            range.contains(&b.as_ptr()),
            "value copied instead of sliced"
        );
    }
    let buf = bytes_of("message_transactional");
    let Message::LogicalMessage(m) = decode(&buf).unwrap() else {
        panic!()
    };
    assert!(buf.as_ptr_range().contains(&m.content.as_ptr()));
}

#[test]
fn as_text_needs_valid_utf8() {
    assert_eq!(Value::Text(Bytes::from_static(b"\xff")).as_text(), None);
    assert_eq!(Value::Null.as_text(), None);
    assert_eq!(t("x").as_text(), Some("x"));
}

// ---- malformed input ----

fn err(bytes: &'static [u8]) -> DecodeError {
    decode(&Bytes::from_static(bytes)).expect_err("malformed input decoded")
}

#[test]
fn empty_buffer() {
    assert_eq!(err(b""), DecodeError::Empty);
}

#[test]
fn every_prefix_of_every_captured_message_fails() {
    for (name, buf) in captured() {
        for len in 0..buf.len() {
            if let Ok(m) = decode(&buf.slice(..len)) {
                panic!("{name} cut to {len} bytes decoded as {m:?}");
            }
        }
    }
}

#[test]
fn trailing_bytes_fail() {
    for (name, buf) in captured() {
        let mut longer = buf.to_vec();
        longer.push(0);
        let e = decode(&Bytes::from(longer)).expect_err(name);
        assert_eq!(
            e,
            DecodeError::TrailingBytes {
                tag: buf[0],
                left: 1
            },
            "{name}"
        );
    }
}

#[test]
fn unknown_tags_including_later_protocol_versions() {
    // v2 streaming, v3 two-phase, and garbage.
    for tag in [
        b'S', b'E', b'c', b'A', b'b', b'P', b'K', b'r', b'p', b'Z', 0,
    ] {
        assert_eq!(
            decode(&Bytes::from(vec![tag])),
            Err(DecodeError::UnknownTag(tag))
        );
    }
    assert_eq!(err(b"S").to_string(), "unknown message tag 'S'");
    assert_eq!(err(b"\0").to_string(), "unknown message tag 0x00");
}

#[test]
fn unknown_tuple_kind() {
    assert_eq!(
        err(b"I\0\0\0\x01N\0\x01x"),
        DecodeError::UnknownTupleKind(b'x')
    );
}

#[test]
fn wrong_tuple_markers() {
    let e = err(b"I\0\0\0\x01K\0\0");
    assert_eq!(
        e.to_string(),
        "insert new tuple: expected tuple marker 'N', found 'K'"
    );
    let e = err(b"U\0\0\0\x01X\0\0");
    assert!(
        matches!(e, DecodeError::UnexpectedTupleMarker { found: b'X', .. }),
        "{e}"
    );
    // Old tuple present but not followed by 'N'.
    let e = err(b"U\0\0\0\x01K\0\0O\0\0");
    assert!(matches!(
        e,
        DecodeError::UnexpectedTupleMarker {
            what: "update new tuple",
            ..
        }
    ));
    let e = err(b"D\0\0\0\x01N\0\0");
    assert!(matches!(
        e,
        DecodeError::UnexpectedTupleMarker {
            what: "delete old tuple",
            ..
        }
    ));
}

#[test]
fn unknown_replica_identity() {
    assert_eq!(
        err(b"R\0\0\0\x01s\0t\0x\0\0"),
        DecodeError::UnknownReplicaIdentity(b'x')
    );
}

#[test]
fn huge_counts_without_data_fail_cheaply() {
    let e = err(b"I\0\0\0\x01N\xff\xff");
    assert_eq!(
        e,
        DecodeError::Truncated {
            what: "tuple value kind",
            needed: 1,
            left: 0
        }
    );
    let e = err(b"R\0\0\0\x01s\0t\0d\xff\xff");
    assert_eq!(
        e,
        DecodeError::Truncated {
            what: "column flags",
            needed: 1,
            left: 0
        }
    );
    let e = err(b"T\x7f\xff\xff\xff\0");
    assert_eq!(
        e,
        DecodeError::Truncated {
            what: "truncate relation id",
            needed: 4,
            left: 0
        }
    );
    let e = err(b"I\0\0\0\x01N\0\x01t\x7f\xff\xff\xffabc");
    assert_eq!(
        e.to_string(),
        "truncated text value: needs 2147483647 bytes, 3 left"
    );
}

#[test]
fn negative_lengths() {
    let e = err(b"I\0\0\0\x01N\0\x01t\xff\xff\xff\xff");
    assert_eq!(
        e,
        DecodeError::Negative {
            what: "text value",
            value: -1
        }
    );
    let e = err(b"T\x80\0\0\0\0");
    assert_eq!(
        e.to_string(),
        "negative truncate relation count: -2147483648"
    );
}

#[test]
fn string_without_nul() {
    let e = err(b"O\0\0\0\0\0\0\x12\x34walsync");
    assert_eq!(
        e,
        DecodeError::MissingNul {
            what: "origin name"
        }
    );
    assert_eq!(e.to_string(), "origin name has no nul terminator");
}

#[test]
fn invalid_utf8_name() {
    let e = err(b"R\0\0\0\x01public\0it\xffems\0d\0\0");
    assert_eq!(
        e,
        DecodeError::InvalidUtf8 {
            what: "relation name"
        }
    );
    assert_eq!(e.to_string(), "relation name is not valid utf-8");
}

// ---- seeded mutation fuzzing ----

/// xorshift64*: tiny, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

fn mutate(rng: &mut Rng, corpus: &[Vec<u8>], m: &mut Vec<u8>) {
    let at = rng.below(m.len() + 1);
    match rng.below(6) {
        0 if at < m.len() => m[at] ^= 1 << rng.below(8),
        1 if at < m.len() => m[at] = rng.next() as u8,
        2 => m.truncate(at),
        3 => {
            let other = &corpus[rng.below(corpus.len())];
            let from = rng.below(other.len() + 1);
            m.truncate(at);
            m.extend_from_slice(&other[from..]);
        }
        4 => {
            let n = rng.below(8) + 1;
            let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            m.splice(at..at, junk);
        }
        // Lengths and counts are where decoders break: write an extreme one.
        _ => {
            let extreme = [0u8, 0x7f, 0x80, 0xff][rng.below(4)];
            let end = (at + 1 + rng.below(4)).min(m.len());
            m.get_mut(at..end).unwrap_or_default().fill(extreme);
        }
    }
}

#[test]
fn mutated_messages_never_panic() {
    let seed = std::env::var("WALSYNC_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_2024_CAFE_F00D_u64);
    eprintln!("seed {seed}");
    let mut rng = Rng(seed.max(1));
    let corpus: Vec<Vec<u8>> = captured().into_iter().map(|(_, b)| b.to_vec()).collect();
    let mut decoded = 0;
    for _ in 0..200_000 {
        let mut m = corpus[rng.below(corpus.len())].clone();
        for _ in 0..=rng.below(3) {
            mutate(&mut rng, &corpus, &mut m);
        }
        let buf = Bytes::from(m);
        if let Ok(msg) = decode(&buf) {
            decoded += 1;
            // Whatever decodes must still point into the input, never past it.
            if let Message::Insert(Insert { new, .. }) = msg {
                for v in new.0 {
                    if let Value::Text(b) | Value::Binary(b) = v {
                        assert!(b.len() <= buf.len());
                    }
                }
            }
        }
    }
    eprintln!("{decoded} of 200000 mutants decoded");
}

#[test]
fn changed_relation_reads_the_header_of_row_changes_only() {
    for name in [
        "insert_items",
        "update_items_qty",
        "update_items_pk",
        "delete_items",
    ] {
        let id = match dec(name) {
            Message::Insert(m) => m.relation_id,
            Message::Update(m) => m.relation_id,
            Message::Delete(m) => m.relation_id,
            other => panic!("{name}: {other:?}"),
        };
        assert_eq!(changed_relation(&bytes_of(name)), Some(id), "{name}");
    }
    assert_eq!(changed_relation(b"R\0\0\0\x01"), None);
    assert_eq!(changed_relation(b"I\0\0"), None);
    assert_eq!(changed_relation(b""), None);
}
