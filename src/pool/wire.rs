//! Pure helpers for the server side of the wire protocol: frame splitting and the few
//! message bodies the pool itself reads (errors, parameter status, SASL mechanisms).
//! No I/O here.

use bytes::{Buf, Bytes, BytesMut};
use postgres_protocol::message::backend::Header;

/// Largest server message the pool reads on its own (startup, settings, reset). The relay
/// has its own limits; control round trips never need more.
pub(crate) const MAX_CONTROL_FRAME: usize = 16 << 20;

/// `CopyBothResponse`; postgres-protocol has no constant for it.
pub(crate) const COPY_BOTH_RESPONSE_TAG: u8 = b'W';
/// `NegotiateProtocolVersion`.
pub(crate) const NEGOTIATE_PROTOCOL_VERSION_TAG: u8 = b'v';
/// The `Terminate` message, complete.
pub(crate) const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];
/// OID of `text`: every settings parameter is sent as text.
pub(crate) const TEXT_OID: u32 = 25;

/// Splits one complete message off the front of `buf`: its tag and body (without the
/// 5-byte header). `Ok(None)` when more bytes are needed. Refuses lengths over `max_len`
/// before buffering them.
pub(crate) fn split_frame(
    buf: &mut BytesMut,
    max_len: usize,
) -> Result<Option<(u8, Bytes)>, String> {
    let header = match Header::parse(buf) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    // Header::parse guarantees len >= 4.
    let len = header.len() as usize;
    if len > max_len {
        return Err(format!(
            "server message '{}' of {len} bytes exceeds the {max_len}-byte limit",
            header.tag().escape_ascii()
        ));
    }
    if buf.len() < 1 + len {
        buf.reserve(1 + len - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(1 + len);
    frame.advance(5);
    Ok(Some((header.tag(), frame.freeze())))
}

/// The fields of an ErrorResponse or NoticeResponse that the pool keeps.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct ErrorFields {
    /// Non-localized severity ('V') when present, else the localized one ('S').
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ErrorFields {
    pub(crate) fn parse(body: &[u8]) -> ErrorFields {
        let mut out = ErrorFields::default();
        let mut localized_severity = None;
        let mut rest = body;
        while let Some((&field, tail)) = rest.split_first() {
            if field == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            let value = String::from_utf8_lossy(&tail[..end]).into_owned();
            match field {
                b'V' => out.severity = value,
                b'S' => localized_severity = Some(value),
                b'C' => out.code = value,
                b'M' => out.message = value,
                _ => {}
            }
            rest = tail.get(end + 1..).unwrap_or_default();
        }
        if out.severity.is_empty() {
            out.severity = localized_severity.unwrap_or_default();
        }
        out
    }

    /// FATAL and PANIC end the server session: the connection is gone after them.
    pub(crate) fn ends_session(&self) -> bool {
        self.severity == "FATAL" || self.severity == "PANIC"
    }
}

/// Null-terminated strings in `body`, in order; stops at an empty string or the end.
pub(crate) fn cstrs(body: &[u8]) -> impl Iterator<Item = &str> {
    body.split(|&b| b == 0)
        .take_while(|s| !s.is_empty())
        .map(|s| std::str::from_utf8(s).unwrap_or(""))
}

/// ParameterStatus body → (name, value).
pub(crate) fn parameter_status(body: &[u8]) -> Option<(String, String)> {
    let mut parts = body.split(|&b| b == 0);
    let name = std::str::from_utf8(parts.next()?).ok()?;
    let value = std::str::from_utf8(parts.next()?).ok()?;
    Some((name.to_owned(), value.to_owned()))
}

/// `SELECT set_config($1,$2,false), set_config($3,$4,false), ...` for `n` settings.
pub(crate) fn set_config_sql(n: usize) -> String {
    let mut sql = String::from("SELECT ");
    for i in 0..n {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(&format!("set_config(${},${},false)", 2 * i + 1, 2 * i + 2));
    }
    sql
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    use crate::protocol::frame::test_frame as frame;

    #[test]
    fn splits_frames_and_waits_for_more() {
        let mut buf = BytesMut::new();
        buf.put_slice(&frame(b'Z', b"I"));
        let partial = frame(b'S', b"TimeZone\0UTC\0");
        buf.put_slice(&partial[..7]);
        let (tag, body) = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!((tag, &body[..]), (b'Z', &b"I"[..]));
        assert!(split_frame(&mut buf, 1024).unwrap().is_none());
        buf.put_slice(&partial[7..]);
        let (tag, body) = split_frame(&mut buf, 1024).unwrap().unwrap();
        assert_eq!(tag, b'S');
        assert_eq!(
            parameter_status(&body),
            Some(("TimeZone".into(), "UTC".into()))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn refuses_oversized_and_malformed_lengths() {
        let mut buf = BytesMut::from(&[b'D', 0x7f, 0, 0, 0][..]);
        assert!(split_frame(&mut buf, 1024).is_err());
        let mut buf = BytesMut::from(&[b'D', 0, 0, 0, 3][..]);
        assert!(split_frame(&mut buf, 1024).is_err());
    }

    #[test]
    fn parses_error_fields() {
        let body =
            b"SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user \"u\"\0Fauth.c\0\0";
        let e = ErrorFields::parse(body);
        assert_eq!(e.severity, "FATAL");
        assert_eq!(e.code, "28P01");
        assert!(e.message.starts_with("password authentication failed"));
        assert!(e.ends_session());
        let e = ErrorFields::parse(b"SERREUR\0C42601\0Msyntax\0\0");
        assert_eq!(e.severity, "ERREUR");
        assert!(!e.ends_session());
        // Truncated input does not panic.
        let e = ErrorFields::parse(b"C4260");
        assert_eq!(e.code, "4260");
    }

    #[test]
    fn sasl_mechanism_list() {
        let body = b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0";
        assert_eq!(
            cstrs(body).collect::<Vec<_>>(),
            ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
        );
    }

    #[test]
    fn set_config_statement_uses_only_placeholders() {
        assert_eq!(set_config_sql(1), "SELECT set_config($1,$2,false)");
        assert_eq!(
            set_config_sql(2),
            "SELECT set_config($1,$2,false), set_config($3,$4,false)"
        );
    }
}
