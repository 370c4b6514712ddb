//! The row messages of `pgoutput` (protocol version 1): Relation, Insert,
//! Update, Delete, Truncate. pgwire-replication runs the replication
//! protocol and decodes Begin and Commit itself; the other messages reach us
//! as the bytes of an XLogData frame, decoded here.
//!
//! Message formats: <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>.
//! Tuples are in text format (the session does not ask for binary), so a
//! column's value is its type's text output, interpreted in `rows.rs`.

/// One column of a relation, as the latest Relation message describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub schema: String,
    pub name: String,
    /// `relreplident`: 'd' default (key), 'f' full, 'i' index, 'n' nothing.
    pub replica_identity: u8,
    pub columns: Vec<Column>,
}

/// One column's value in a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    Null,
    /// A TOASTed value the change did not touch: not sent.
    Unchanged,
    Text(String),
}

/// An old row image: the whole row (`REPLICA IDENTITY FULL`) or only its
/// key columns (the others are sent as nulls).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OldRow {
    Full(Vec<Datum>),
    Key(Vec<Datum>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Relation(Relation),
    Insert {
        relation: u32,
        new: Vec<Datum>,
    },
    Update {
        relation: u32,
        old: Option<OldRow>,
        new: Vec<Datum>,
    },
    Delete {
        relation: u32,
        old: OldRow,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Type, Origin and anything newer: nothing a view reads.
    Other(u8),
}

#[derive(Debug, thiserror::Error)]
#[error("malformed pgoutput message: {0}")]
pub struct Malformed(&'static str);

/// Decodes one pgoutput message.
pub fn decode(data: &[u8]) -> Result<Message, Malformed> {
    let mut r = Reader(data);
    let tag = r.u8()?;
    Ok(match tag {
        b'R' => {
            let oid = r.u32()?;
            let schema = r.string()?;
            let name = r.string()?;
            let replica_identity = r.u8()?;
            let count = r.u16()?;
            let mut columns = Vec::with_capacity(count.into());
            for _ in 0..count {
                let _flags = r.u8()?;
                let name = r.string()?;
                let type_oid = r.u32()?;
                let _typmod = r.u32()?;
                columns.push(Column { name, type_oid });
            }
            Message::Relation(Relation { oid, schema, name, replica_identity, columns })
        }
        b'I' => {
            let relation = r.u32()?;
            r.expect(b'N')?;
            Message::Insert { relation, new: r.tuple()? }
        }
        b'U' => {
            let relation = r.u32()?;
            let old = match r.u8()? {
                b'N' => None,
                kind => {
                    let old = r.old(kind)?;
                    r.expect(b'N')?;
                    Some(old)
                }
            };
            Message::Update { relation, old, new: r.tuple()? }
        }
        b'D' => {
            let relation = r.u32()?;
            let kind = r.u8()?;
            Message::Delete { relation, old: r.old(kind)? }
        }
        b'T' => {
            let count = r.u32()?;
            let _options = r.u8()?;
            let relations = (0..count).map(|_| r.u32()).collect::<Result<_, _>>()?;
            Message::Truncate { relations }
        }
        other => Message::Other(other),
    })
}

struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], Malformed> {
        if self.0.len() < n {
            return Err(Malformed("truncated"));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self) -> Result<u8, Malformed> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, Malformed> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")))
    }

    fn u32(&mut self) -> Result<u32, Malformed> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }

    fn expect(&mut self, byte: u8) -> Result<(), Malformed> {
        if self.u8()? != byte {
            return Err(Malformed("unexpected tuple kind"));
        }
        Ok(())
    }

    fn string(&mut self) -> Result<String, Malformed> {
        let end = self.0.iter().position(|&b| b == 0).ok_or(Malformed("unterminated string"))?;
        let text = String::from_utf8_lossy(&self.0[..end]).into_owned();
        self.0 = &self.0[end + 1..];
        Ok(text)
    }

    fn old(&mut self, kind: u8) -> Result<OldRow, Malformed> {
        match kind {
            b'O' => Ok(OldRow::Full(self.tuple()?)),
            b'K' => Ok(OldRow::Key(self.tuple()?)),
            _ => Err(Malformed("unknown old tuple kind")),
        }
    }

    fn tuple(&mut self) -> Result<Vec<Datum>, Malformed> {
        let count = self.u16()?;
        (0..count)
            .map(|_| match self.u8()? {
                b'n' => Ok(Datum::Null),
                b'u' => Ok(Datum::Unchanged),
                b't' => {
                    let len = self.u32()? as usize;
                    Ok(Datum::Text(String::from_utf8_lossy(self.take(len)?).into_owned()))
                }
                _ => Err(Malformed("unknown column kind (binary tuples are not asked for)")),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(v: &str) -> Vec<u8> {
        let mut b = vec![b't'];
        b.extend((v.len() as u32).to_be_bytes());
        b.extend(v.as_bytes());
        b
    }

    #[test]
    fn decodes_relations_and_row_changes() {
        let mut rel = vec![b'R'];
        rel.extend(16384u32.to_be_bytes());
        rel.extend(b"app\0orders\0f");
        rel.extend(2u16.to_be_bytes());
        for (name, oid) in [("user_id", 20u32), ("amount", 701)] {
            rel.push(0);
            rel.extend(name.as_bytes());
            rel.push(0);
            rel.extend(oid.to_be_bytes());
            rel.extend((-1i32).to_be_bytes());
        }
        let Message::Relation(r) = decode(&rel).unwrap() else { panic!() };
        assert_eq!((r.oid, r.schema.as_str(), r.name.as_str(), r.replica_identity), (16384, "app", "orders", b'f'));
        assert_eq!(r.columns[1], Column { name: "amount".into(), type_oid: 701 });

        let tuple = |a: &[u8]| {
            let mut b = 2u16.to_be_bytes().to_vec();
            b.extend(text("7"));
            b.extend(a);
            b
        };
        let mut update = vec![b'U'];
        update.extend(16384u32.to_be_bytes());
        update.push(b'O');
        update.extend(tuple(b"n"));
        update.push(b'N');
        update.extend(tuple(b"u"));
        let Message::Update { relation, old, new } = decode(&update).unwrap() else { panic!() };
        assert_eq!(relation, 16384);
        assert_eq!(old, Some(OldRow::Full(vec![Datum::Text("7".into()), Datum::Null])));
        assert_eq!(new, vec![Datum::Text("7".into()), Datum::Unchanged]);

        let mut delete = vec![b'D'];
        delete.extend(16384u32.to_be_bytes());
        delete.push(b'K');
        delete.extend(tuple(b"n"));
        assert!(matches!(decode(&delete).unwrap(), Message::Delete { old: OldRow::Key(_), .. }));
        // Cut anywhere, a message is an error, not a panic.
        for cut in 0..update.len() {
            assert!(decode(&update[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(decode(b"Yxyz").unwrap(), Message::Other(b'Y'));
    }
}
