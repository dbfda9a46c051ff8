//! Transaction mode: the answers to pgtenant's own setup (the tenant context and the
//! client's settings) that precede the client's frames on a freshly attached server
//! connection. They are consumed here, never forwarded, and checked before a single byte of
//! the server's answers to the client's own frames reaches the client. Pure (no I/O).

use bytes::{Buf, BytesMut};

use crate::pool::wire::{self, ErrorFields, MAX_CONTROL_FRAME};
use crate::pool::ServerError;
use crate::protocol::tags;

/// What the setup is expected to answer, and what it answered so far.
#[derive(Debug)]
pub struct SetupAnswer {
    /// ReadyForQuery messages still to come (one per setup cycle).
    ready_left: u8,
    /// The value the first `set_config` must return (the tenant), when it sets one.
    expect_first_value: Option<Box<[u8]>>,
    first_row_seen: bool,
    error: Option<ServerError>,
}

/// Progress after consuming what the server sent so far.
#[derive(Debug)]
pub enum SetupProgress {
    /// More setup answers are due; nothing may be forwarded yet.
    Pending,
    /// The setup succeeded; the rest of the buffer belongs to the client.
    Done,
    /// The setup failed: the connection must be destroyed and the client told. The
    /// client's frames that followed may have run without any tenant context (see
    /// `session::txn` for why never under another tenant's).
    Failed(ServerError),
}

impl SetupAnswer {
    /// `cycles`: setup requests sent (each ends with ReadyForQuery). `tenant_value`: what
    /// the first column of the first row must be (the `set_config` of the tenant setting).
    pub fn new(cycles: u8, tenant_value: Option<&str>) -> Self {
        SetupAnswer {
            ready_left: cycles,
            expect_first_value: tenant_value.map(|v| v.as_bytes().into()),
            first_row_seen: false,
            error: None,
        }
    }

    /// Consumes complete setup frames from the front of `buf`, recording ParameterStatus
    /// through `on_param`. Stops at the end of the last setup cycle.
    pub fn consume(
        &mut self,
        buf: &mut BytesMut,
        on_param: &mut dyn FnMut(String, String),
    ) -> SetupProgress {
        while self.ready_left > 0 {
            let (tag, body) = match wire::split_frame(buf, MAX_CONTROL_FRAME) {
                Ok(Some(frame)) => frame,
                Ok(None) => return SetupProgress::Pending,
                Err(e) => return SetupProgress::Failed(ServerError::Protocol(e)),
            };
            match tag {
                tags::READY_FOR_QUERY => self.ready_left -= 1,
                tags::ERROR_RESPONSE => {
                    let e = ErrorFields::parse(&body);
                    self.error.get_or_insert(e.into());
                }
                tags::PARAMETER_STATUS => {
                    if let Some((name, value)) = wire::parameter_status(&body) {
                        on_param(name, value);
                    }
                }
                tags::DATA_ROW => self.check_row(body),
                // ParseComplete, BindComplete, CommandComplete, notices.
                _ => {}
            }
        }
        match self.error.take() {
            Some(e) => SetupProgress::Failed(e),
            None => SetupProgress::Done,
        }
    }

    /// The first DataRow's first column must be the tenant: `set_config` returns the value
    /// it set, so anything else means the context is not what pgtenant asked for.
    fn check_row(&mut self, mut body: bytes::Bytes) {
        if self.first_row_seen {
            return;
        }
        self.first_row_seen = true;
        let Some(expected) = self.expect_first_value.as_deref() else {
            return;
        };
        let matches = body.len() >= 6 && body.get_i16() >= 1 && {
            let len = body.get_i32();
            usize::try_from(len).ok() == Some(expected.len())
                && body.get(..expected.len()) == Some(expected)
        };
        if !matches {
            self.error.get_or_insert(ServerError::Protocol(
                "the tenant setting did not read back as the tenant".into(),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::protocol::frame::test_frame as msg;

    fn row(value: &str) -> Vec<u8> {
        let mut body = 1i16.to_be_bytes().to_vec();
        body.extend_from_slice(&(value.len() as i32).to_be_bytes());
        body.extend_from_slice(value.as_bytes());
        msg(b'D', &body)
    }

    fn ok_cycle(value: &str) -> Vec<u8> {
        let mut v = msg(b'1', b"");
        v.extend(msg(b'2', b""));
        v.extend(row(value));
        v.extend(msg(b'C', b"SELECT 1\0"));
        v.extend(msg(b'Z', b"I"));
        v
    }

    #[test]
    fn consumes_only_the_setup_and_leaves_the_clients_answers() {
        let mut bytes = msg(b'C', b"RESET\0");
        bytes.extend(msg(b'Z', b"I"));
        bytes.extend(msg(b'S', b"application_name\0app\0"));
        bytes.extend(ok_cycle("acme"));
        let client = msg(b'T', b"\0\0");
        bytes.extend(&client);
        let mut buf = BytesMut::from(&bytes[..]);
        let mut params = Vec::new();
        let mut s = SetupAnswer::new(2, Some("acme"));
        let p = s.consume(&mut buf, &mut |k, v| params.push((k, v)));
        assert!(matches!(p, SetupProgress::Done), "{p:?}");
        assert_eq!(&buf[..], &client[..]);
        assert_eq!(params, [("application_name".into(), "app".into())]);
    }

    #[test]
    fn waits_for_partial_frames() {
        let bytes = ok_cycle("acme");
        let mut s = SetupAnswer::new(1, Some("acme"));
        let mut buf = BytesMut::from(&bytes[..bytes.len() - 2]);
        assert!(matches!(
            s.consume(&mut buf, &mut |_, _| {}),
            SetupProgress::Pending
        ));
        buf.extend_from_slice(&bytes[bytes.len() - 2..]);
        assert!(matches!(
            s.consume(&mut buf, &mut |_, _| {}),
            SetupProgress::Done
        ));
        assert!(buf.is_empty());
    }

    #[test]
    fn an_error_or_a_wrong_value_fails_the_setup() {
        let mut bytes = msg(b'E', b"SERROR\0C22023\0Mbad\0\0");
        bytes.extend(msg(b'Z', b"I"));
        let mut buf = BytesMut::from(&bytes[..]);
        let mut s = SetupAnswer::new(1, Some("acme"));
        assert!(matches!(
            s.consume(&mut buf, &mut |_, _| {}),
            SetupProgress::Failed(ServerError::Db { .. })
        ));

        let mut buf = BytesMut::from(&ok_cycle("globex")[..]);
        let mut s = SetupAnswer::new(1, Some("acme"));
        assert!(matches!(
            s.consume(&mut buf, &mut |_, _| {}),
            SetupProgress::Failed(ServerError::Protocol(_))
        ));
    }
}
