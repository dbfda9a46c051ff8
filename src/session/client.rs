//! The client side of a session after TLS negotiation: the stream, its read buffer
//! (which may already hold pipelined bytes), and writing pgtenant's own messages.

use std::net::SocketAddr;

use bytes::BytesMut;
use pgwire::tokio::server::MaybeTls;
use tokio::io::AsyncWriteExt;

use crate::error::ClientError;
use crate::protocol::messages;

pub struct ClientConn {
    pub io: MaybeTls,
    /// Bytes read from the client and not yet consumed.
    pub read_buf: BytesMut,
    pub peer: SocketAddr,
    pub tls: bool,
    /// Largest frame accepted after authentication (`limits.max_client_frame_bytes` of the
    /// session's config snapshot).
    pub max_frame: u32,
}

impl ClientConn {
    /// Sends pgtenant's own error (FATAL) and flushes. Errors writing are ignored: the
    /// client may already be gone, and the session ends either way.
    pub async fn send_error(&mut self, err: &ClientError) {
        let wire = err.to_wire();
        let mut buf = BytesMut::with_capacity(128);
        messages::error_response(&mut buf, wire.severity, &wire.code, &wire.message);
        let _ = self.io.write_all(&buf).await;
        let _ = self.io.flush().await;
    }

    pub async fn write_flush(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.io.write_all(bytes).await?;
        self.io.flush().await
    }
}
