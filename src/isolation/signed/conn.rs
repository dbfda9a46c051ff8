//! The signed-context round trips on a pooled [`ServerConn`]: extended protocol with bind
//! parameters (Parse/Bind/Execute/Sync on the unnamed statement), read to ReadyForQuery.
//!
//! Same contract as `ServerConn::apply_settings`: an ErrorResponse gives `ServerError::Db`
//! and leaves the connection usable; any other failure, a timeout or cancellation leave
//! `broken == true`. For `enter`/`leave` the caller destroys the connection on any error.

use std::io;

use bytes::Bytes;

use super::SignedContext;
use crate::pool::wire::TEXT_OID;
use crate::pool::{ServerConn, ServerError, RESET_TIMEOUT};

/// OID of `int8`.
const INT8_OID: u32 = 20;
/// Parameter types of `enter(text, bigint, bigint, text, text)`.
const ENTER_TYPES: [u32; 5] = [TEXT_OID, INT8_OID, INT8_OID, TEXT_OID, TEXT_OID];

/// What the proxy signs for one server backend: read once per server connection with
/// [`SignedContext::identity`]; valid for the connection's whole life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendIdentity {
    pub pid: i32,
    /// `backend_start` in microseconds since the Unix epoch, as the server computes it.
    pub backend_start_micros: i64,
}

impl SignedContext {
    /// Reads this backend's (pid, backend start). One round trip.
    pub async fn identity(&self, conn: &mut ServerConn) -> Result<BackendIdentity, ServerError> {
        let rows = timed(query_rows(conn, &self.identity_sql, &[], &[])).await?;
        let bad = || ServerError::Protocol("backend_identity() returned no usable row".into());
        let row = rows.first().ok_or_else(bad)?;
        let field =
            |i: usize| -> Option<&str> { std::str::from_utf8(row.get(i)?.as_ref()?.as_ref()).ok() };
        let pid = field(0).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let backend_start_micros = field(1).and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        Ok(BackendIdentity {
            pid,
            backend_start_micros,
        })
    }

    /// Signs a fresh proof for `tenant` on backend `id` and sends `enter` with bind
    /// parameters. One round trip. A refused proof is `ServerError::Db` with code 28000.
    pub async fn enter(
        &self,
        conn: &mut ServerConn,
        id: &BackendIdentity,
        tenant: &str,
    ) -> Result<(), ServerError> {
        let proof = self.proof(id, tenant);
        let seq = proof.seq.to_string();
        let exp = proof.exp.to_string();
        let params = [
            proof.tenant.as_str(),
            seq.as_str(),
            exp.as_str(),
            proof.key_id.as_str(),
            proof.mac.as_str(),
        ];
        timed(query_rows(conn, &self.enter_sql, &ENTER_TYPES, &params)).await?;
        Ok(())
    }

    /// [`Self::identity`] when `cached` is empty (stored there), then [`Self::enter`].
    /// Keep `cached` with the server connection.
    pub async fn pin(
        &self,
        conn: &mut ServerConn,
        cached: &mut Option<BackendIdentity>,
        tenant: &str,
    ) -> Result<(), ServerError> {
        let id = match *cached {
            Some(id) => id,
            None => {
                let id = self.identity(conn).await?;
                *cached = Some(id);
                id
            }
        };
        self.enter(conn, &id, tenant).await
    }

    /// Clears this backend's tenant (keeps its sequence high-water mark). One round trip.
    pub async fn leave(&self, conn: &mut ServerConn) -> Result<(), ServerError> {
        timed(query_rows(conn, &self.leave_sql, &[], &[])).await?;
        Ok(())
    }
}

/// Runs `fut` under `RESET_TIMEOUT`; a timeout leaves the connection broken (it was marked
/// broken while the exchange was in flight).
async fn timed<T>(
    fut: impl std::future::Future<Output = Result<T, ServerError>>,
) -> Result<T, ServerError> {
    match tokio::time::timeout(RESET_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(ServerError::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("tenant context round trip did not finish within {RESET_TIMEOUT:?}"),
        ))),
    }
}

/// One row: each field's text, `None` for NULL.
pub(super) type Row = Vec<Option<Bytes>>;

/// Parse/Bind/Execute/Sync of `sql` with text-format `params` (types from `types`, 0 or
/// missing = let the server infer), reading to ReadyForQuery. Returns the DataRows.
pub(super) async fn query_rows(
    conn: &mut ServerConn,
    sql: &str,
    types: &[u32],
    params: &[&str],
) -> Result<Vec<Row>, ServerError> {
    let bodies = conn.query_rows(sql, types, params).await?;
    bodies.iter().map(|body| data_row(body)).collect()
}

/// DataRow body: i16 count, then per field i32 length (-1 = NULL) and bytes.
fn data_row(body: &[u8]) -> Result<Row, ServerError> {
    let bad = || ServerError::Protocol("malformed DataRow".into());
    let (count, mut rest) = body.split_first_chunk::<2>().ok_or_else(bad)?;
    let count = u16::from_be_bytes(*count);
    let mut row = Vec::with_capacity(usize::from(count));
    for _ in 0..count {
        let (len, tail) = rest.split_first_chunk::<4>().ok_or_else(bad)?;
        let len = i32::from_be_bytes(*len);
        if len < 0 {
            row.push(None);
            rest = tail;
            continue;
        }
        let len = usize::try_from(len).map_err(|_| bad())?;
        let value = tail.get(..len).ok_or_else(bad)?;
        row.push(Some(Bytes::copy_from_slice(value)));
        rest = tail.get(len..).ok_or_else(bad)?;
    }
    Ok(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_data_rows() {
        let mut body = vec![0, 3];
        body.extend_from_slice(&2i32.to_be_bytes());
        body.extend_from_slice(b"42");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i32.to_be_bytes());
        let row = data_row(&body).unwrap();
        assert_eq!(row.len(), 3);
        assert_eq!(row[0].as_deref(), Some(&b"42"[..]));
        assert_eq!(row[1], None);
        assert_eq!(row[2].as_deref(), Some(&b""[..]));
        assert!(data_row(&body[..body.len() - 1]).is_err());
        assert!(data_row(&[0, 1, 0, 0, 0, 9, b'x']).is_err());
        assert!(data_row(&[0]).is_err());
    }
}
