//! The console's command language: a pure parser from a simple Query's text to commands.
//! Keywords are case-insensitive; several commands may be separated by `;`.

use super::ConsoleError;

/// What SHOW can list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Show {
    Tenants,
    Pools,
    Clients,
    Servers,
    Stats,
    Config,
    Help,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Show(Show),
    Reload,
    /// `None`: every tenant.
    Pause(Option<String>),
    /// `None`: lift every pause (suspensions stay until their tenant is named).
    Resume(Option<String>),
    Suspend(String),
    Kill(String),
    Shutdown,
}

impl Command {
    /// The metric label and the CommandComplete tag's source.
    pub fn label(&self) -> &'static str {
        match self {
            Command::Show(Show::Tenants) => "show_tenants",
            Command::Show(Show::Pools) => "show_pools",
            Command::Show(Show::Clients) => "show_clients",
            Command::Show(Show::Servers) => "show_servers",
            Command::Show(Show::Stats) => "show_stats",
            Command::Show(Show::Config) => "show_config",
            Command::Show(Show::Help) => "show_help",
            Command::Reload => "reload",
            Command::Pause(_) => "pause",
            Command::Resume(_) => "resume",
            Command::Suspend(_) => "suspend_tenant",
            Command::Kill(_) => "kill_tenant",
            Command::Shutdown => "shutdown",
        }
    }

    /// The CommandComplete tag psql prints (SHOW prints none of its own).
    pub fn tag(&self) -> &'static str {
        match self {
            Command::Show(_) => "SHOW",
            Command::Reload => "RELOAD",
            Command::Pause(_) => "PAUSE",
            Command::Resume(_) => "RESUME",
            Command::Suspend(_) => "SUSPEND",
            Command::Kill(_) => "KILL",
            Command::Shutdown => "SHUTDOWN",
        }
    }
}

/// One line per command, for SHOW HELP.
pub const HELP: &[(&str, &str)] = &[
    (
        "SHOW TENANTS",
        "tenants: route, open sessions, paused or suspended",
    ),
    (
        "SHOW POOLS",
        "per upstream: pool size, connections, idle, in use, waiting",
    ),
    ("SHOW CLIENTS", "live client sessions"),
    (
        "SHOW SERVERS",
        "server connections pinned to client sessions",
    ),
    (
        "SHOW STATS",
        "per tenant and upstream: sessions, queries, bytes",
    ),
    ("SHOW CONFIG", "the running config (secrets redacted)"),
    ("SHOW HELP", "this list"),
    (
        "RELOAD",
        "re-read the config file; an invalid one is rejected",
    ),
    (
        "PAUSE [tenant]",
        "hold new requests at transaction boundaries (all tenants without one)",
    ),
    (
        "RESUME [tenant]",
        "lift PAUSE (and, with a tenant, SUSPEND)",
    ),
    (
        "SUSPEND TENANT t",
        "end t's sessions and refuse new ones until RESUME t",
    ),
    (
        "KILL TENANT t",
        "end t's sessions now, even mid-transaction",
    ),
    ("SHUTDOWN", "stop pgtenant gracefully, as SIGTERM does"),
];

/// Parses a simple Query's text. Empty statements (`;;`) are skipped.
pub fn parse(text: &str) -> Result<Vec<Command>, ConsoleError> {
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse_one)
        .collect()
}

fn parse_one(statement: &str) -> Result<Command, ConsoleError> {
    let words: Vec<&str> = statement.split_whitespace().collect();
    let upper: Vec<String> = words.iter().map(|w| w.to_ascii_uppercase()).collect();
    let kw: Vec<&str> = upper.iter().map(String::as_str).collect();
    let command = match kw.as_slice() {
        ["SHOW", what] => Command::Show(match *what {
            "TENANTS" => Show::Tenants,
            "POOLS" => Show::Pools,
            "CLIENTS" => Show::Clients,
            "SERVERS" => Show::Servers,
            "STATS" => Show::Stats,
            "CONFIG" => Show::Config,
            "HELP" => Show::Help,
            _ => return Err(unknown(statement)),
        }),
        ["RELOAD"] => Command::Reload,
        ["SHUTDOWN"] => Command::Shutdown,
        ["PAUSE"] => Command::Pause(None),
        ["RESUME"] => Command::Resume(None),
        ["PAUSE" | "RESUME" | "SUSPEND" | "KILL", ..] => {
            let tenant = tenant_arg(&words[1..], statement)?;
            match kw[0] {
                "PAUSE" => Command::Pause(Some(tenant)),
                "RESUME" => Command::Resume(Some(tenant)),
                "SUSPEND" => Command::Suspend(tenant),
                _ => Command::Kill(tenant),
            }
        }
        _ => return Err(unknown(statement)),
    };
    Ok(command)
}

/// `t`, `TENANT t`, or either with the id quoted ('t' or "t").
fn tenant_arg(words: &[&str], statement: &str) -> Result<String, ConsoleError> {
    let rest = match words {
        [kw, rest @ ..] if kw.eq_ignore_ascii_case("tenant") && !rest.is_empty() => rest,
        rest => rest,
    };
    let [id] = rest else {
        return Err(ConsoleError::Syntax(format!(
            "expected one tenant id in \"{}\"",
            clip(statement)
        )));
    };
    let id = strip_quotes(id);
    if id.is_empty() || (id.eq_ignore_ascii_case("tenant") && words.len() == 1) {
        return Err(ConsoleError::Syntax(format!(
            "missing tenant id in \"{}\"",
            clip(statement)
        )));
    }
    Ok(id.to_string())
}

fn strip_quotes(s: &str) -> &str {
    for q in ['\'', '"'] {
        if let Some(inner) = s.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            return inner;
        }
    }
    s
}

fn unknown(statement: &str) -> ConsoleError {
    ConsoleError::Syntax(format!(
        "unknown console command \"{}\"; SHOW HELP lists the commands",
        clip(statement)
    ))
}

/// Statement text echoed in an error, bounded.
fn clip(s: &str) -> String {
    const MAX: usize = 80;
    match s.char_indices().nth(MAX) {
        Some((at, _)) => format!("{}...", &s[..at]),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_case_insensitively() {
        assert_eq!(
            parse("show clients").unwrap(),
            vec![Command::Show(Show::Clients)]
        );
        assert_eq!(
            parse("SHOW Pools;  show STATS ;").unwrap(),
            vec![Command::Show(Show::Pools), Command::Show(Show::Stats)]
        );
        assert_eq!(parse("reload").unwrap(), vec![Command::Reload]);
        assert_eq!(parse("SHUTDOWN;").unwrap(), vec![Command::Shutdown]);
        assert_eq!(parse(" ; ").unwrap(), vec![]);
    }

    #[test]
    fn tenant_arguments() {
        assert_eq!(parse("PAUSE").unwrap(), vec![Command::Pause(None)]);
        assert_eq!(
            parse("pause acme").unwrap(),
            vec![Command::Pause(Some("acme".into()))]
        );
        assert_eq!(
            parse("RESUME TENANT acme").unwrap(),
            vec![Command::Resume(Some("acme".into()))]
        );
        assert_eq!(
            parse("kill tenant 'Acme-1'").unwrap(),
            vec![Command::Kill("Acme-1".into())]
        );
        assert_eq!(
            parse("SUSPEND TENANT \"globex\"").unwrap(),
            vec![Command::Suspend("globex".into())]
        );
        // A tenant literally named "tenant" needs the keyword.
        assert_eq!(
            parse("KILL TENANT tenant").unwrap(),
            vec![Command::Kill("tenant".into())]
        );
    }

    #[test]
    fn mistakes_are_syntax_errors_naming_the_statement() {
        for bad in [
            "SELECT 1",
            "SHOW USERS",
            "SHOW",
            "KILL",
            "KILL TENANT",
            "SUSPEND TENANT a b",
            "PAUSE ''",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(matches!(err, ConsoleError::Syntax(_)), "{bad}: {err:?}");
        }
        let err = parse("SHOW CLIENTS; DROP TABLE x").unwrap_err();
        assert!(err.to_string().contains("DROP TABLE x"), "{err}");
        let long = "x".repeat(500);
        assert!(parse(&long).unwrap_err().to_string().len() < 200);
    }

    #[test]
    fn labels_and_tags() {
        assert_eq!(Command::Kill("t".into()).label(), "kill_tenant");
        assert_eq!(Command::Kill("t".into()).tag(), "KILL");
        assert_eq!(Command::Show(Show::Help).tag(), "SHOW");
    }
}
