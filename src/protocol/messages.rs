//! Backend messages pgtenant writes itself (handshake, its own errors). Everything the
//! server says after authentication is relayed as bytes, never rebuilt.

use bytes::{BufMut, BytesMut};

use super::tags;

/// Appends a frame: tag, length placeholder, body written by `body`, then patches the length.
pub fn put_frame(buf: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    buf.put_u8(tag);
    let at = buf.len();
    buf.put_i32(0);
    body(buf);
    let len = (buf.len() - at) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends a NUL-terminated string.
pub fn put_cstr(buf: &mut BytesMut, s: &str) {
    // A NUL inside would end the field early; drop it rather than corrupt the frame.
    buf.extend(s.bytes().filter(|b| *b != 0));
    buf.put_u8(0);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// ErrorResponse with severity (localized and not), SQLSTATE and message.
pub fn error_response(buf: &mut BytesMut, severity: Severity, code: &str, message: &str) {
    put_frame(buf, tags::ERROR_RESPONSE, |b| {
        b.put_u8(b'S');
        put_cstr(b, severity.as_str());
        b.put_u8(b'V');
        put_cstr(b, severity.as_str());
        b.put_u8(b'C');
        put_cstr(b, code);
        b.put_u8(b'M');
        put_cstr(b, message);
        b.put_u8(0);
    });
}

/// AuthenticationCleartextPassword: the JWT comes back as a PasswordMessage.
pub fn auth_cleartext_request(buf: &mut BytesMut) {
    put_frame(buf, tags::AUTHENTICATION, |b| b.put_i32(3));
}

pub fn auth_ok(buf: &mut BytesMut) {
    put_frame(buf, tags::AUTHENTICATION, |b| b.put_i32(0));
}

pub fn parameter_status(buf: &mut BytesMut, name: &str, value: &str) {
    put_frame(buf, tags::PARAMETER_STATUS, |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(buf: &mut BytesMut, pid: i32, secret: i32) {
    put_frame(buf, tags::BACKEND_KEY_DATA, |b| {
        b.put_i32(pid);
        b.put_i32(secret);
    });
}

pub fn ready_for_query(buf: &mut BytesMut, status: u8) {
    put_frame(buf, tags::READY_FOR_QUERY, |b| b.put_u8(status));
}

/// NegotiateProtocolVersion: we speak 3.0 and name the `_pq_.` options we did not take.
pub fn negotiate_protocol_version(buf: &mut BytesMut, newest_minor: i32, unknown: &[&str]) {
    put_frame(buf, tags::NEGOTIATE_PROTOCOL_VERSION, |b| {
        b.put_i32(newest_minor);
        b.put_i32(unknown.len() as i32);
        for opt in unknown {
            put_cstr(b, opt);
        }
    });
}

/// The 16-byte CancelRequest packet sent to a server.
pub fn cancel_request(pid: i32, secret: i32) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..4].copy_from_slice(&16i32.to_be_bytes());
    out[4..8].copy_from_slice(&tags::CANCEL_REQUEST_CODE.to_be_bytes());
    out[8..12].copy_from_slice(&pid.to_be_bytes());
    out[12..].copy_from_slice(&secret.to_be_bytes());
    out
}

/// Field `code` of an ErrorResponse/NoticeResponse body (for logs and metrics).
pub fn error_field(body: &[u8], code: u8) -> Option<&str> {
    let mut rest = body;
    while let Some((&field, tail)) = rest.split_first() {
        if field == 0 {
            return None;
        }
        let end = tail.iter().position(|b| *b == 0)?;
        if field == code {
            return std::str::from_utf8(&tail[..end]).ok();
        }
        rest = &tail[end + 1..];
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_response_round_trips_through_postgres_protocol() {
        let mut buf = BytesMut::new();
        error_response(&mut buf, Severity::Fatal, "28P01", "token expired");
        let msg = postgres_protocol::message::backend::Message::parse(&mut buf)
            .unwrap()
            .unwrap();
        let postgres_protocol::message::backend::Message::ErrorResponse(body) = msg else {
            panic!("not an error response");
        };
        let raw = body.fields();
        use fallible_iterator::FallibleIterator;
        let fields: Vec<(u8, String)> = raw
            .map(|f| {
                Ok((
                    f.type_(),
                    String::from_utf8_lossy(f.value_bytes()).into_owned(),
                ))
            })
            .collect()
            .unwrap();
        assert!(fields.contains(&(b'C', "28P01".into())));
        assert!(fields.contains(&(b'M', "token expired".into())));
        assert!(fields.contains(&(b'S', "FATAL".into())));
    }

    #[test]
    fn error_field_reads_code() {
        let mut buf = BytesMut::new();
        error_response(&mut buf, Severity::Error, "42501", "no");
        assert_eq!(error_field(&buf[5..], b'C'), Some("42501"));
        assert_eq!(error_field(&buf[5..], b'M'), Some("no"));
        assert_eq!(error_field(&buf[5..], b'D'), None);
    }
}
