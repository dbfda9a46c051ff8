//! A minimal hand-rolled frontend for protocol-abuse tests: real clients refuse to send
//! malformed packets, so these bytes are built by hand.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub fn startup_packet(major: u16, minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&major.to_be_bytes());
    body.extend_from_slice(&minor.to_be_bytes());
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

pub fn frame(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
    v.extend_from_slice(body);
    v
}

/// One backend message: (tag, body).
pub async fn read_message(s: &mut TcpStream) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head))
        .await
        .ok()?
        .ok()?;
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    let mut body = vec![0u8; len.saturating_sub(4)];
    s.read_exact(&mut body).await.ok()?;
    Some((head[0], body))
}

/// Reads until an ErrorResponse and returns its SQLSTATE and message, or None on EOF first.
pub async fn read_error(s: &mut TcpStream) -> Option<(String, String)> {
    loop {
        let (tag, body) = read_message(s).await?;
        if tag == b'E' {
            let field = |code: u8| {
                let mut rest = &body[..];
                while let Some((&f, tail)) = rest.split_first() {
                    if f == 0 {
                        break;
                    }
                    let end = tail.iter().position(|b| *b == 0).unwrap_or(tail.len());
                    if f == code {
                        return String::from_utf8_lossy(&tail[..end]).into_owned();
                    }
                    rest = &tail[(end + 1).min(tail.len())..];
                }
                String::new()
            };
            return Some((field(b'C'), field(b'M')));
        }
    }
}

/// Startup + password, up to the first ReadyForQuery. Returns the stream.
pub async fn login(addr: SocketAddr, token: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&startup_packet(
        3,
        0,
        &[("user", "app"), ("database", "app")],
    ))
    .await
    .expect("startup");
    let (tag, _) = read_message(&mut s).await.expect("auth request");
    assert_eq!(tag, b'R');
    let mut pw = token.as_bytes().to_vec();
    pw.push(0);
    s.write_all(&frame(b'p', &pw)).await.expect("password");
    loop {
        let (tag, body) = read_message(&mut s).await.expect("until ready");
        assert_ne!(
            tag,
            b'E',
            "login failed: {}",
            String::from_utf8_lossy(&body)
        );
        if tag == b'Z' {
            return s;
        }
    }
}
