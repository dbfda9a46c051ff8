//! Result sets as the wire carries them: RowDescription, DataRow (text format),
//! CommandComplete, and NoticeResponse. psql and drivers render them like any query's.

use bytes::{BufMut, BytesMut};

use crate::protocol::messages::{put_cstr, put_frame};
use crate::protocol::tags;

const ROW_DESCRIPTION: u8 = b'T';
/// PostgreSQL type oids the console uses; integers right-align in psql.
const TEXT_OID: i32 = 25;
const INT8_OID: i32 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text,
    Int,
}

/// A table with named, typed columns; every value is sent as text, `None` as NULL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultSet {
    pub columns: Vec<(&'static str, Kind)>,
    pub rows: Vec<Vec<Option<String>>>,
}

impl ResultSet {
    pub fn new(columns: &[(&'static str, Kind)]) -> Self {
        ResultSet {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row; it must have one value per column.
    pub fn push(&mut self, row: Vec<Option<String>>) {
        debug_assert_eq!(row.len(), self.columns.len());
        self.rows.push(row);
    }

    /// RowDescription and the DataRows (the caller adds CommandComplete).
    pub fn encode(&self, buf: &mut BytesMut) {
        put_frame(buf, ROW_DESCRIPTION, |b| {
            b.put_i16(self.columns.len() as i16);
            for (name, kind) in &self.columns {
                put_cstr(b, name);
                b.put_i32(0); // table oid
                b.put_i16(0); // column number
                let (oid, len) = match kind {
                    Kind::Text => (TEXT_OID, -1),
                    Kind::Int => (INT8_OID, 8),
                };
                b.put_i32(oid);
                b.put_i16(len);
                b.put_i32(-1); // type modifier
                b.put_i16(0); // text format
            }
        });
        for row in &self.rows {
            put_frame(buf, tags::DATA_ROW, |b| {
                b.put_i16(row.len() as i16);
                for value in row {
                    match value {
                        Some(v) => {
                            b.put_i32(v.len() as i32);
                            b.extend_from_slice(v.as_bytes());
                        }
                        None => b.put_i32(-1),
                    }
                }
            });
        }
    }
}

pub fn command_complete(buf: &mut BytesMut, tag: &str) {
    put_frame(buf, tags::COMMAND_COMPLETE, |b| put_cstr(b, tag));
}

pub fn empty_query(buf: &mut BytesMut) {
    put_frame(buf, tags::EMPTY_QUERY_RESPONSE, |_| {});
}

/// A NOTICE (psql prints it as `NOTICE:  message`).
pub fn notice(buf: &mut BytesMut, message: &str) {
    put_frame(buf, tags::NOTICE_RESPONSE, |b| {
        for (field, value) in [(b'S', "NOTICE"), (b'V', "NOTICE"), (b'C', "00000")] {
            b.put_u8(field);
            put_cstr(b, value);
        }
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use fallible_iterator::FallibleIterator;
    use postgres_protocol::message::backend::Message;

    #[test]
    fn result_sets_parse_as_postgres_messages() {
        let mut rs = ResultSet::new(&[("tenant", Kind::Text), ("sessions", Kind::Int)]);
        rs.push(vec![Some("acme".into()), Some("2".into())]);
        rs.push(vec![Some("globex".into()), None]);
        let mut buf = BytesMut::new();
        rs.encode(&mut buf);
        command_complete(&mut buf, "SHOW");

        let Some(Message::RowDescription(desc)) = Message::parse(&mut buf).unwrap() else {
            panic!("RowDescription first");
        };
        let fields: Vec<(String, u32)> = desc
            .fields()
            .map(|f| Ok((f.name().to_string(), f.type_oid())))
            .collect()
            .unwrap();
        assert_eq!(
            fields,
            vec![("tenant".to_string(), 25), ("sessions".to_string(), 20)]
        );
        let mut rows = Vec::new();
        while let Some(Message::DataRow(row)) = Message::parse(&mut buf).unwrap() {
            let body = row.buffer().to_vec();
            let values: Vec<Option<String>> = row
                .ranges()
                .map(|r| Ok(r.map(|r| String::from_utf8_lossy(&body[r]).into_owned())))
                .collect()
                .unwrap();
            rows.push(values);
            if rows.len() == 2 {
                break;
            }
        }
        assert_eq!(
            rows,
            vec![
                vec![Some("acme".into()), Some("2".into())],
                vec![Some("globex".into()), None]
            ]
        );
        let Some(Message::CommandComplete(done)) = Message::parse(&mut buf).unwrap() else {
            panic!("CommandComplete last");
        };
        assert_eq!(done.tag().unwrap(), "SHOW");
        assert!(buf.is_empty());
    }

    #[test]
    fn notice_carries_its_message() {
        let mut buf = BytesMut::new();
        notice(&mut buf, "2 sessions killed");
        let Some(Message::NoticeResponse(n)) = Message::parse(&mut buf).unwrap() else {
            panic!("notice");
        };
        let fields: Vec<(u8, String)> = n
            .fields()
            .map(|f| {
                Ok((
                    f.type_(),
                    String::from_utf8_lossy(f.value_bytes()).into_owned(),
                ))
            })
            .collect()
            .unwrap();
        assert!(fields.contains(&(b'M', "2 sessions killed".into())));
        assert!(fields.contains(&(b'S', "NOTICE".into())));
    }
}
