//! Where a pool connects: host, port, database and credentials parsed from an upstream URL.

use std::fmt;

use percent_encoding::percent_decode_str;

/// Parsed `postgres://user:password@host:port/dbname`. Debug output never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: Option<String>,
    pub database: String,
}

impl UpstreamTarget {
    pub fn from_url(raw: &str) -> Result<UpstreamTarget, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
        if url.scheme() != "postgres" && url.scheme() != "postgresql" {
            return Err("scheme must be postgres:// or postgresql://".into());
        }
        let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
        let host = url
            .host_str()
            .ok_or("missing host")?
            .trim_matches(['[', ']'])
            .to_owned();
        let user = decode(url.username());
        if user.is_empty() {
            return Err("missing user".into());
        }
        let database = decode(url.path().trim_start_matches('/'));
        Ok(UpstreamTarget {
            host,
            port: url.port().unwrap_or(5432),
            password: url.password().map(decode),
            database: if database.is_empty() {
                user.clone()
            } else {
                database
            },
            user,
        })
    }

    /// host:port for connecting and for messages.
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Debug for UpstreamTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("database", &self.database)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_url_and_redacts_password() {
        let t = UpstreamTarget::from_url("postgres://acme_app:s%40cret@db.example:5433/acme_db")
            .unwrap();
        assert_eq!(t.host, "db.example");
        assert_eq!(t.port, 5433);
        assert_eq!(t.user, "acme_app");
        assert_eq!(t.password.as_deref(), Some("s@cret"));
        assert_eq!(t.database, "acme_db");
        assert!(!format!("{t:?}").contains("cret"));
        assert!(UpstreamTarget::from_url("mysql://a@b/c").is_err());
        assert!(UpstreamTarget::from_url("postgres://host/db").is_err());
    }
}
