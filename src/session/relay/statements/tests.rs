use super::*;

fn cstrs(parts: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    for p in parts {
        v.extend_from_slice(p.as_bytes());
        v.push(0);
    }
    v
}

fn error_body(code: &str) -> Vec<u8> {
    let mut v = vec![b'S'];
    v.extend(cstrs(&["ERROR"]));
    v.push(b'C');
    v.extend(cstrs(&[code]));
    v.push(b'M');
    v.extend(cstrs(&["boom"]));
    v.push(0);
    v
}

fn tags_of(t: &StatementTracker) -> Vec<(String, u32, Option<String>, Option<String>)> {
    t.completed
        .iter()
        .map(|c| {
            (
                c.sql.to_string(),
                c.index,
                c.command_tag.clone(),
                c.sqlstate.clone(),
            )
        })
        .collect()
}

#[test]
fn simple_query_with_several_statements_yields_one_result_each() {
    let now = Instant::now();
    let mut t = StatementTracker::default();
    t.on_client_frame(tags::QUERY, &cstrs(&["SELECT 1; UPDATE x SET a = 1"]), now);
    t.expect_ready();
    t.on_server_frame(tags::COMMAND_COMPLETE, &cstrs(&["SELECT 1"]), now);
    t.on_server_frame(tags::COMMAND_COMPLETE, &cstrs(&["UPDATE 3"]), now);
    t.on_server_frame(tags::READY_FOR_QUERY, b"I", now);
    let sql = "SELECT 1; UPDATE x SET a = 1".to_string();
    assert_eq!(
        tags_of(&t),
        vec![
            (sql.clone(), 0, Some("SELECT 1".into()), None),
            (sql, 1, Some("UPDATE 3".into()), None)
        ]
    );
    assert!(t.pending.is_empty());
}

#[test]
fn error_in_a_simple_query_skips_its_remaining_statements() {
    let now = Instant::now();
    let mut t = StatementTracker::default();
    t.on_client_frame(tags::QUERY, &cstrs(&["SELECT 1/0; SELECT 2"]), now);
    t.expect_ready();
    t.on_client_frame(tags::QUERY, &cstrs(&["SELECT 3"]), now);
    t.expect_ready();
    t.on_server_frame(tags::ERROR_RESPONSE, &error_body("22012"), now);
    t.on_server_frame(tags::READY_FOR_QUERY, b"I", now);
    t.on_server_frame(tags::COMMAND_COMPLETE, &cstrs(&["SELECT 1"]), now);
    t.on_server_frame(tags::READY_FOR_QUERY, b"I", now);
    assert_eq!(
        tags_of(&t),
        vec![
            ("SELECT 1/0; SELECT 2".into(), 0, None, Some("22012".into())),
            ("SELECT 3".into(), 0, Some("SELECT 1".into()), None)
        ]
    );
}

#[test]
fn prepared_statements_are_followed_through_bind_and_execute() {
    let now = Instant::now();
    let mut t = StatementTracker::default();
    t.on_client_frame(tags::PARSE, &cstrs(&["P0_1", "SELECT $1"]), now);
    t.on_client_frame(tags::BIND, &cstrs(&["", "P0_1"]), now);
    t.on_client_frame(tags::EXECUTE, &cstrs(&[""]), now);
    t.expect_ready();
    // A second execution without Parse (pgbench -M prepared).
    t.on_client_frame(tags::BIND, &cstrs(&["", "P0_1"]), now);
    t.on_client_frame(tags::EXECUTE, &cstrs(&[""]), now);
    t.expect_ready();
    for _ in 0..2 {
        t.on_server_frame(tags::COMMAND_COMPLETE, &cstrs(&["SELECT 1"]), now);
        t.on_server_frame(tags::READY_FOR_QUERY, b"I", now);
    }
    assert_eq!(t.completed.len(), 2);
    assert!(t.completed.iter().all(|c| &*c.sql == "SELECT $1"));
    // Closing the statement forgets it.
    t.on_client_frame(tags::CLOSE, &[b'S', b'P', b'0', b'_', b'1', 0], now);
    assert!(t.prepared.get(b"P0_1").is_none());
}

#[test]
fn extended_error_skips_the_rest_of_the_batch_until_ready() {
    let now = Instant::now();
    let mut t = StatementTracker::default();
    for sql in ["SELECT 1/0", "SELECT 2"] {
        t.on_client_frame(tags::PARSE, &cstrs(&["", sql]), now);
        t.on_client_frame(tags::BIND, &cstrs(&["", ""]), now);
        t.on_client_frame(tags::EXECUTE, &cstrs(&[""]), now);
    }
    t.expect_ready();
    t.on_server_frame(tags::ERROR_RESPONSE, &error_body("22012"), now);
    t.on_server_frame(tags::READY_FOR_QUERY, b"I", now);
    assert_eq!(
        tags_of(&t),
        vec![("SELECT 1/0".into(), 0, None, Some("22012".into()))]
    );
    assert!(t.pending.is_empty());
    assert!(!t.skipping);
}

#[test]
fn empty_query_and_suspended_portals_produce_no_event() {
    let now = Instant::now();
    let mut t = StatementTracker::default();
    t.on_client_frame(tags::QUERY, &cstrs(&[""]), now);
    t.expect_ready();
    t.on_server_frame(tags::EMPTY_QUERY_RESPONSE, b"", now);
    t.on_server_frame(tags::READY_FOR_QUERY, b"I", now);
    t.on_client_frame(
        tags::PARSE,
        &cstrs(&["", "SELECT g FROM generate_series(1,10) g"]),
        now,
    );
    t.on_client_frame(tags::BIND, &cstrs(&["", ""]), now);
    t.on_client_frame(tags::EXECUTE, &cstrs(&[""]), now);
    t.on_client_frame(tags::EXECUTE, &cstrs(&[""]), now);
    t.expect_ready();
    t.on_server_frame(tags::PORTAL_SUSPENDED, b"", now);
    t.on_server_frame(tags::COMMAND_COMPLETE, &cstrs(&["SELECT 5"]), now);
    t.on_server_frame(tags::READY_FOR_QUERY, b"T", now);
    assert_eq!(t.completed.len(), 1);
    assert_eq!(t.completed[0].command_tag.as_deref(), Some("SELECT 5"));
}

#[test]
fn names_are_bounded() {
    let mut n = Names::default();
    for i in 0..(MAX_NAMES + 10) {
        n.insert(format!("s{i}").as_bytes(), Arc::from("x"));
    }
    assert_eq!(n.map.len(), MAX_NAMES);
    assert!(n.get(b"s0").is_none());
    assert!(n.get(format!("s{}", MAX_NAMES + 9).as_bytes()).is_some());
}

#[test]
fn rows_from_command_tags() {
    assert_eq!(rows_of("SELECT 5"), Some(5));
    assert_eq!(rows_of("INSERT 0 7"), Some(7));
    assert_eq!(rows_of("COPY 10"), Some(10));
    assert_eq!(rows_of("BEGIN"), None);
    assert_eq!(rows_of("CREATE TABLE"), None);
}
