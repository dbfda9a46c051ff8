//! The audit table: its DDL, `pgtenant audit init`, and the insert-only writer role.
//! (To be written.)

/// A validated, quoted table name (optionally schema-qualified).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    pub schema: Option<String>,
    pub name: String,
}

impl TableName {
    pub fn parse(s: &str) -> Result<TableName, String> {
        let parts: Vec<&str> = s.split('.').collect();
        let ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 63
                && p.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                && !p.starts_with(|c: char| c.is_ascii_digit())
        };
        match parts.as_slice() {
            [name] if ok(name) => Ok(TableName { schema: None, name: name.to_string() }),
            [schema, name] if ok(schema) && ok(name) => Ok(TableName {
                schema: Some(schema.to_string()),
                name: name.to_string(),
            }),
            _ => Err(format!("{s:?} is not a table name (letters, digits, _; optionally schema.table)")),
        }
    }
}
