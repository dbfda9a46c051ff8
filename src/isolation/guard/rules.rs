//! The rules: which nodes of a parsed statement make the guard block it.
//!
//! Rules apply wherever a node occurs in the statement's tree (a `set_config` call in a
//! CTE, a `WHERE` clause, a view definition, a `PREPARE`d query, a SQL-standard function
//! body), so nesting cannot hide one. The first match in walk order (pre-order, fields in
//! declaration order) is reported.

use std::ops::ControlFlow;

use pg_query::protobuf::{ObjectType, VariableSetKind};

use super::walk::{Leaf, Step, Visit};
use super::{GuardConfig, Rule};

/// Functions that run SQL given to them as a string, which the guard cannot see. Checked
/// on PostgreSQL 15: `query_to_xml`, `ts_stat`, `ts_rewrite(tsquery, text)` (core) and
/// `crosstab` (the trusted extension `tablefunc`) each ran a `set_config` hidden in an
/// argument; `connectby` (also `tablefunc`) pastes its name arguments into SQL unquoted.
/// `xpath_table` (`xml2`) builds SQL the same way. Configurable with `block_dynamic_sql`.
pub(super) const DYNAMIC_SQL_FUNCTIONS: &[&str] = &[
    "query_to_xml",
    "query_to_xmlschema",
    "query_to_xml_and_xmlschema",
    "ts_stat",
    "ts_rewrite",
    "crosstab",
    "crosstab2",
    "crosstab3",
    "crosstab4",
    "connectby",
    "xpath_table",
];

/// Fields whose `String` nodes name a function that will be called: calls, and the places
/// that bind an existing function to something callable (`CREATE AGGREGATE ... (sfunc =
/// set_config)` was observed to work). Strings under these fields (through `Node`, `List`,
/// `TypeName` and `DefElem` wrappers) are compared with the blocked function names.
const FUNCTION_NAME_FIELDS: &[(&str, &str)] = &[
    ("FuncCall", "funcname"),
    ("ObjectWithArgs", "objname"),
    ("DefineStmt", "definition"),
    ("CreateRangeStmt", "params"),
    ("CreateTrigStmt", "funcname"),
    ("CreateEventTrigStmt", "funcname"),
    ("CreateConversionStmt", "func_name"),
    ("CreatePLangStmt", "plhandler"),
    ("CreatePLangStmt", "plinline"),
    ("CreatePLangStmt", "plvalidator"),
    ("CreateFdwStmt", "func_options"),
    ("AlterFdwStmt", "func_options"),
    ("AlterOperatorStmt", "options"),
    ("AlterTypeStmt", "options"),
];

/// Wrappers skipped when looking for the field a name string belongs to.
const NAME_WRAPPERS: &[&str] = &["Node", "String", "List", "TypeName", "DefElem"];

/// Statements whose target `pg_settings` is: its rules turn the write into `set_config`.
const DML_STATEMENTS: &[&str] = &["InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt"];

/// A session parameter the rules care about, as named in a `SET`/`RESET`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Param {
    #[default]
    Other,
    Tenant,
    Role,
    SessionAuthorization,
    /// Decides how the server splits statement text into tokens.
    ClientEncoding,
    /// Decides whether `\` escapes a quote in `'...'`.
    StandardConformingStrings,
}

/// What the walk has seen of one `VariableSetStmt` so far.
#[derive(Debug, Default)]
struct SetStmt {
    at_root: bool,
    kind: i32,
    param: Param,
    args: u32,
    /// How many of the arguments are strings acceptable for `param`.
    acceptable_args: u32,
}

/// Inspects one statement's tree; `found` holds the first violation.
pub(super) struct Inspector<'c> {
    cfg: &'c GuardConfig,
    pub found: Option<Rule>,
    sets: Vec<SetStmt>,
}

impl<'c> Inspector<'c> {
    pub fn new(cfg: &'c GuardConfig) -> Self {
        Inspector {
            cfg,
            found: None,
            sets: Vec::new(),
        }
    }

    fn block(&mut self, rule: Rule) -> ControlFlow<()> {
        self.found = Some(rule);
        ControlFlow::Break(())
    }

    fn block_if(&mut self, enabled: bool, rule: Rule) -> ControlFlow<()> {
        if enabled {
            self.block(rule)
        } else {
            ControlFlow::Continue(())
        }
    }

    fn classify(&self, name: &str) -> Param {
        if name.eq_ignore_ascii_case(&self.cfg.tenant_setting) {
            Param::Tenant
        } else if name.eq_ignore_ascii_case("role") {
            Param::Role
        } else if name.eq_ignore_ascii_case("session_authorization") {
            Param::SessionAuthorization
        } else if name.eq_ignore_ascii_case("client_encoding") {
            Param::ClientEncoding
        } else if name.eq_ignore_ascii_case("standard_conforming_strings") {
            Param::StandardConformingStrings
        } else {
            Param::Other
        }
    }

    /// A string under a function-name field: the name, or one of its qualifiers.
    fn function_name(&mut self, name: &str) -> ControlFlow<()> {
        if name.eq_ignore_ascii_case("set_config") {
            return self.block(Rule::SetConfig);
        }
        if DYNAMIC_SQL_FUNCTIONS
            .iter()
            .any(|f| name.eq_ignore_ascii_case(f))
        {
            return self.block_if(self.cfg.block_dynamic_sql, Rule::DynamicSql);
        }
        ControlFlow::Continue(())
    }

    /// A string argument of the innermost `SET`.
    fn set_arg(&mut self, value: &str) {
        let Some(set) = self.sets.last_mut() else {
            return;
        };
        let acceptable = match set.param {
            Param::ClientEncoding => is_utf8_encoding_name(value),
            Param::StandardConformingStrings => is_true(value),
            _ => false,
        };
        if acceptable {
            set.acceptable_args += 1;
        }
    }

    fn finish_set(&mut self, set: SetStmt) -> ControlFlow<()> {
        match set.param {
            Param::Tenant => return self.block(Rule::TenantSetting),
            Param::Role => return self.block(Rule::SetRole),
            Param::SessionAuthorization => return self.block(Rule::SessionAuthorization),
            Param::ClientEncoding | Param::StandardConformingStrings => {
                // DEFAULT, RESET and FROM CURRENT go back to values the proxy controls.
                let sets_value = set.kind == VariableSetKind::VarSetValue as i32;
                if sets_value && !(set.args == 1 && set.acceptable_args == 1) {
                    return self.block(Rule::ParserSetting);
                }
            }
            Param::Other => {}
        }
        // `ALTER DATABASE/FUNCTION ... RESET ALL` is not a session reset.
        if set.at_root && set.kind == VariableSetKind::VarResetAll as i32 {
            return self.block(Rule::ResetAll);
        }
        ControlFlow::Continue(())
    }
}

impl Visit for Inspector<'_> {
    fn enter(&mut self, path: &[Step], node: &'static str) -> ControlFlow<()> {
        match node {
            "DiscardStmt" => self.block(Rule::Discard),
            "AlterRoleStmt" | "AlterRoleSetStmt" => self.block(Rule::AlterRole),
            "DoStmt" => self.block_if(self.cfg.block_do, Rule::DoBlock),
            "CreateFunctionStmt" => {
                self.block_if(self.cfg.block_create_function, Rule::CreateFunction)
            }
            "ListenStmt" => self.block_if(self.cfg.block_listen, Rule::Listen),
            "VariableSetStmt" => {
                // The statement root is `Node` → `VariableSetStmt`: one step.
                self.sets.push(SetStmt {
                    at_root: path.len() <= 1,
                    ..SetStmt::default()
                });
                ControlFlow::Continue(())
            }
            "Node" => {
                if path.last().is_some_and(|s| s.is("VariableSetStmt", "args")) {
                    if let Some(set) = self.sets.last_mut() {
                        set.args += 1;
                    }
                }
                ControlFlow::Continue(())
            }
            _ => ControlFlow::Continue(()),
        }
    }

    fn leave(&mut self, _path: &[Step], node: &'static str) -> ControlFlow<()> {
        if node == "VariableSetStmt" {
            if let Some(set) = self.sets.pop() {
                return self.finish_set(set);
            }
        }
        ControlFlow::Continue(())
    }

    fn leaf(&mut self, path: &[Step], leaf: Leaf<'_>) -> ControlFlow<()> {
        let Some(step) = path.last() else {
            return ControlFlow::Continue(());
        };
        match (step.node, step.field, leaf) {
            ("CopyStmt", "is_program", Leaf::Bool(true)) => {
                self.block_if(self.cfg.block_copy_program, Rule::CopyProgram)
            }
            ("RenameStmt", "rename_type", Leaf::Int(t)) if t == ObjectType::ObjectRole as i64 => {
                self.block(Rule::AlterRole)
            }
            ("VariableSetStmt", "kind", Leaf::Int(kind)) => {
                if let Some(set) = self.sets.last_mut() {
                    set.kind = i32::try_from(kind).unwrap_or_default();
                }
                ControlFlow::Continue(())
            }
            ("VariableSetStmt", "name", Leaf::Str(name)) => {
                let param = self.classify(name);
                if let Some(set) = self.sets.last_mut() {
                    set.param = param;
                }
                ControlFlow::Continue(())
            }
            ("RangeVar", "relname", Leaf::Str(rel)) if rel.eq_ignore_ascii_case("pg_settings") => {
                if writes_through(path) {
                    self.block(Rule::SetConfig)
                } else {
                    ControlFlow::Continue(())
                }
            }
            ("String", "sval", Leaf::Str(s)) => {
                if names_function(path) {
                    return self.function_name(s);
                }
                if in_set_args(path) {
                    self.set_arg(s);
                }
                ControlFlow::Continue(())
            }
            _ => ControlFlow::Continue(()),
        }
    }
}

/// The field a name string belongs to, past the wrapper nodes.
fn owning_field(path: &[Step]) -> Option<&Step> {
    path.iter().rev().find(|s| !NAME_WRAPPERS.contains(&s.node))
}

fn names_function(path: &[Step]) -> bool {
    owning_field(path).is_some_and(|s| FUNCTION_NAME_FIELDS.iter().any(|(n, f)| s.is(n, f)))
}

fn in_set_args(path: &[Step]) -> bool {
    path.iter()
        .rev()
        .find(|s| s.node == "VariableSetStmt")
        .is_some_and(|s| s.field == "args")
}

/// `pg_settings` (a `RangeVar` whose parent step is `path[len-2]`) as the target of a
/// write, or anywhere in a view definition (an updatable view over it writes through).
fn writes_through(path: &[Step]) -> bool {
    let target = path.len() >= 2 && {
        let parent = &path[path.len() - 2];
        parent.field == "relation" && DML_STATEMENTS.contains(&parent.node)
    };
    target || path.iter().any(|s| s.is("ViewStmt", "query"))
}

/// PostgreSQL's encoding-name matching: case-insensitive, non-alphanumerics ignored.
fn is_utf8_encoding_name(value: &str) -> bool {
    let clean: String = value
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    clean == "utf8" || clean == "unicode"
}

/// PostgreSQL's `parse_bool` for true: prefixes of `true`/`yes`, `on`, `1`.
fn is_true(value: &str) -> bool {
    let v = value.to_ascii_lowercase();
    (!v.is_empty() && ("true".starts_with(&v) || "yes".starts_with(&v))) || v == "on" || v == "1"
}

#[cfg(test)]
mod tests {
    use super::super::Guard;
    use super::*;

    /// Each function-name field exists under that name: a `set_config` placed there (and
    /// nowhere else) is found. (Checked once by deleting all fields but `FuncCall`'s: every
    /// other sample then passed.)
    #[test]
    fn every_function_name_field_is_reached() {
        let samples = [
            ("FuncCall", "funcname", "SELECT set_config('a','b',false)"),
            (
                "ObjectWithArgs",
                "objname",
                "GRANT EXECUTE ON FUNCTION set_config(text,text,bool) TO public",
            ),
            (
                "DefineStmt",
                "definition",
                "CREATE AGGREGATE a(text, bool) (sfunc = set_config, stype = text)",
            ),
            (
                "CreateRangeStmt",
                "params",
                "CREATE TYPE r AS RANGE (subtype = float8, subtype_diff = set_config)",
            ),
            (
                "CreateTrigStmt",
                "funcname",
                "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION set_config()",
            ),
            (
                "CreateEventTrigStmt",
                "funcname",
                "CREATE EVENT TRIGGER et ON ddl_command_start EXECUTE FUNCTION set_config()",
            ),
            (
                "CreateConversionStmt",
                "func_name",
                "CREATE CONVERSION c FOR 'LATIN1' TO 'UTF8' FROM set_config",
            ),
            (
                "CreatePLangStmt",
                "plhandler",
                "CREATE LANGUAGE l HANDLER set_config",
            ),
            (
                "CreatePLangStmt",
                "plinline",
                "CREATE LANGUAGE l HANDLER h INLINE set_config",
            ),
            (
                "CreatePLangStmt",
                "plvalidator",
                "CREATE LANGUAGE l HANDLER h VALIDATOR set_config",
            ),
            (
                "CreateFdwStmt",
                "func_options",
                "CREATE FOREIGN DATA WRAPPER w HANDLER set_config",
            ),
            (
                "AlterFdwStmt",
                "func_options",
                "ALTER FOREIGN DATA WRAPPER w VALIDATOR set_config",
            ),
            (
                "AlterOperatorStmt",
                "options",
                "ALTER OPERATOR = (int, int) SET (RESTRICT = set_config)",
            ),
            (
                "AlterTypeStmt",
                "options",
                "ALTER TYPE t SET (RECEIVE = set_config)",
            ),
        ];
        for field in FUNCTION_NAME_FIELDS {
            assert!(
                samples
                    .iter()
                    .any(|(n, f, _)| (n, f) == (&field.0, &field.1)),
                "no sample for {field:?}"
            );
        }
        let guard = Guard::new(GuardConfig::default());
        for (node, field, sql) in samples {
            let verdict = guard.check(sql).map_err(|v| v.rule);
            assert_eq!(verdict, Err(Rule::SetConfig), "{node}.{field}: {sql}");
        }
    }

    #[test]
    fn encoding_names_match_like_postgres() {
        for ok in ["UTF8", "utf-8", "Utf_8", "UNICODE"] {
            assert!(is_utf8_encoding_name(ok), "{ok}");
        }
        for bad in ["SJIS", "LATIN1", "utf16", "", "BIG5"] {
            assert!(!is_utf8_encoding_name(bad), "{bad}");
        }
    }

    #[test]
    fn booleans_match_like_postgres() {
        for ok in ["on", "ON", "true", "t", "tr", "yes", "y", "1"] {
            assert!(is_true(ok), "{ok}");
        }
        for bad in ["off", "of", "false", "f", "no", "0", "", "o", "truee"] {
            assert!(!is_true(bad), "{bad}");
        }
    }
}
